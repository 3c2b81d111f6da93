"""Fit and evaluate one method on one MVTec-layout dataset; print accuracy, speed and memory.

    python benchmarks/bench.py ../shared/data/magnetic_tile --method padim --image-size 256

Prints one JSON object (and a Markdown table row). Speeds are measured with 2 torch threads:
- backbone img/s: the bare feature extractor (eager torch, and `fast` on the chosen backend)
  on a batch of 32 real images, measured before fitting,
- model img/s: the fitted detector on the same preloaded batch (no decoding),
- end-to-end img/s: `evaluate`'s scoring loop (decode, resize, score, maps at full resolution).
Peak RSS is the process's maximum resident memory (fit and evaluate included).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from defectlens import Detector
from defectlens.data.dataset import find_normal_images
from defectlens.data.loader import iter_batches
from defectlens.evaluation import evaluate


def rate(fn, batch: torch.Tensor, repeats: int = 3) -> float:
    fn(batch)  # warm-up (and tracing)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(batch)
    return repeats * batch.shape[0] / (time.perf_counter() - start)


def score_variants(data: str, model: Path, method: str, variants: dict, scorer) -> None:
    """One fitted model (fitted at `model` with `method`'s defaults if it is not a model yet),
    its test split evaluated once per variant with its score replaced by `scorer(method,
    *variant)` (None: as fitted), no refit. Prints one JSON line per variant: image / pixel
    AUROC and AUPRO. What the *_terms.py studies share."""
    torch.set_num_threads(2)
    if not (model / "config.json").is_file():
        start = time.perf_counter()
        Detector(method=method).fit(find_normal_images(data), progress=True).save(model)
        print(json.dumps({"fit_s": round(time.perf_counter() - start, 1)}), flush=True)
    for label, variant in variants.items():
        detector = Detector.load(model)
        if variant is not None:
            detector.model_.score = scorer(detector.model_, *variant)
        metrics = evaluate(detector, data, report=False).metrics
        row = {"dataset": Path(data).name, "variant": label}
        row.update({k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")})
        print(json.dumps(row), flush=True)


def terms_main(doc: str, method: str, variants: dict, scorer) -> None:
    """The command line of a *_terms.py study: DATA --model DIR, then `score_variants`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    score_variants(args.data, Path(args.model), method, variants, scorer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--method", default="padim")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--max-train", type=int, default=None, help="use the first N train images")
    parser.add_argument("--param", action="append", default=[], help="method parameter k=v (JSON)")
    parser.add_argument("--fit-only", action="store_true", help="skip evaluation (memory runs)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per speed figure")
    parser.add_argument("--backend", default="onnxruntime", help="onnxruntime or torch")
    args = parser.parse_args()
    torch.set_num_threads(2)
    params = {k: json.loads(v) for k, v in (p.split("=", 1) for p in args.param)}

    images = find_normal_images(args.data)[: args.max_train]
    detector = Detector(method=args.method, image_size=args.image_size, method_params=params)
    detector.use_backend(args.backend)
    # A real batch of 32 training images, for the speed measurements below.
    batch_np = next(iter_batches(images[:32], args.image_size, 32)).images
    batch = torch.from_numpy(batch_np)
    rates = {}
    if not args.fit_only and detector.model_.strides:  # the bare backbone, on a quiet process
        extractor = detector.ensure_extractor()
        with torch.no_grad():
            rates["backbone_eager_img_s"] = round(rate(extractor, batch, args.repeats), 1)
            rates["backbone_fast_img_s"] = round(rate(extractor.fast, batch, args.repeats), 1)
    start = time.perf_counter()
    detector.fit(images)
    fit_seconds = time.perf_counter() - start
    history = getattr(detector.model_, "history", None)
    fit_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {
        "dataset": Path(args.data).name,
        "method": args.method,
        "params": params,
        "image_size": args.image_size,
        "backend": args.backend,
        "n_train": len(images),
        "fit_seconds": round(fit_seconds, 1),
        "fit_peak_rss_gb": round(fit_rss, 2),
    }
    if history:  # trained methods: epochs run and the last losses
        result["epochs"] = len(history)
        result["last_epoch"] = {
            k: round(v, 4) if isinstance(v, float) else v for k, v in history[-1].items()
        }
    with tempfile.TemporaryDirectory() as tmp:
        detector.save(Path(tmp) / "m")
        size = sum(f.stat().st_size for f in (Path(tmp) / "m").iterdir())
        result["model_mb"] = round(size / 1e6, 1)
    if not args.fit_only:
        evaluation = evaluate(detector, args.data)
        m = evaluation.metrics
        with torch.no_grad():
            result.update(
                image_auroc=round(m["image_auroc"], 4),
                pixel_auroc=round(m.get("pixel_auroc", float("nan")), 4),
                aupro=round(m.get("aupro", float("nan")), 4),
                f1_max=round(m["image_f1_max"], 4),
                false_alarm_rate=round(m["false_alarm_rate"], 4),
                miss_rate=round(m["miss_rate"], 4),
                end_to_end_img_s=round(m["images_per_second"], 1),
                model_img_s=round(rate(detector.score_batch, batch_np, args.repeats), 1),
                **rates,
            )
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(result))
    keys = [k for k in result if k not in ("dataset", "method", "params")]
    print(
        "| "
        + " | ".join([result["dataset"], result["method"]] + [str(result[k]) for k in keys])
        + " |",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
