"""Fit one method that trains a network (MemAE, MNAD, GradCon, OGNet, Uninformed Students,
Patch SVDD, segmentation-aided, Neural Batch Sampling) with its defaults on one dataset,
evaluate it, then evaluate the same fitted network with its other scoring rules (no refit:
they only change how an image is scored). One JSON line per scoring rule.

    python benchmarks/trained.py ../shared/data/magnetic_tile --method memae
    python benchmarks/trained.py benchmarks/results/trained.jsonl --summary

- fit s: `Detector.fit` wall time (training within the method's `max_minutes`, then the
  validation images' scores for the threshold); epochs: phase-one epochs run, and why they
  stopped.
- e2e img/s: `evaluate`'s loop (decode, resize, score, maps at full size, metrics).
- model img/s: `Detector.score_batch` on a preloaded batch of 32 (no decoding).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from defectlens import Detector
from defectlens.data.dataset import find_normal_images
from defectlens.data.loader import iter_batches
from defectlens.evaluation import evaluate

# Other scoring rules of the same fitted network: (label, attribute changes on the method).
VARIANTS = {
    "memae": [("image_score=map_max", {"image_score": "map_max"})],
    "mnad": [("alpha=1 (PSNR only)", {"alpha": 1.0}), ("alpha=0 (distance only)", {"alpha": 0.0})],
    "gradcon": [("gradient_weight=0 (reconstruction only)", {"gradient_weight": 0.0})],
    "ognet": [],
    "students": [],
    "patchsvdd": [],
    "segaided": [("image_score=map_max", {"image_score": "map_max"})],
    "nbs": [],
}
# Methods without a `space` parameter (the table shows "–"). segaided has one since
# 2026-12-07: its earlier rows, without `space` in their params, were on pixels.
SPACELESS = {"students", "patchsvdd"}


def summary(path: str) -> None:
    """The JSON lines of `path` as BENCHMARKS.md's Markdown table."""
    print(
        "| dataset | method | space | budget | scoring | image AUROC | pixel AUROC | AUPRO "
        "| F1-max | false alarms / misses | fit s (epochs, stop) | e2e img/s |"
    )
    print("|---" * 12 + "|")
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        space = r.get("space") or r["params"].get("space", "pixels")  # "space": since 2026-12-07
        space = "–" if r["method"] in SPACELESS else space
        budget = f"{r['params'].get('max_minutes', 10):g} min"
        # other non-default parameters go with the scoring rule, e.g. Students' teacher
        others = {k: v for k, v in r["params"].items() if k not in ("space", "max_minutes")}
        scoring = ", ".join([r["scoring"], *(f"{k}={v}" for k, v in others.items())])
        print(
            f"| {r['dataset']} | {r['method']} | {space} | {budget} | {scoring} "
            f"| {r['image_auroc']:.3f} "
            f"| {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | {r['f1_max']:.3f} "
            f"| {r['false_alarm_rate']:.3f} / {r['miss_rate']:.3f} "
            f"| {r['fit_s']:.0f} ({r['epochs']}, {r['stopped']}) | {r['e2e_img_s']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="a dataset root, or with --summary the JSON lines file")
    parser.add_argument("--method", choices=sorted(VARIANTS))
    parser.add_argument("--param", action="append", default=[], help="k=v (JSON)")
    parser.add_argument("--summary", action="store_true", help="print the table of DATA")
    args = parser.parse_args()
    if args.summary:
        summary(args.data)
        return
    if args.method is None:
        parser.error("--method is required")
    torch.set_num_threads(2)
    params = {k: json.loads(v) for k, v in (p.split("=", 1) for p in args.param)}
    images = find_normal_images(args.data)
    detector = Detector(method=args.method, method_params=params)
    start = time.perf_counter()
    detector.fit(images, device="cpu", progress=True)
    fit_s = time.perf_counter() - start
    # Kept for later analysis (bench-output/ is not tracked); replaced by the next run.
    detector.save(Path("bench-output/trained") / f"{Path(args.data).name}-{args.method}")
    history = detector.model_.history
    epochs = [r for r in history if "epoch" in r]
    common = {
        "dataset": Path(args.data).name,
        "method": args.method,
        "params": params,
        "space": getattr(detector.model_, "space", None),  # the input space it ran in
        "n_train": len(images),
        "fit_s": round(fit_s, 1),
        "epochs": len(epochs),
        "stopped": epochs[-1].get("stopped"),
        "best_val_loss": round(min(r["val_loss"] for r in epochs), 5),
    }
    batch = next(iter_batches(images[:32], detector.image_size, 32)).images
    for label, changes in [("default", {}), *VARIANTS[args.method]]:
        for name, value in changes.items():
            setattr(detector.model_, name, value)
        if changes:  # thresholds follow the scoring rule: from the validation images again
            detector.calibrate(detector.split_validation(images)[1])
        m = evaluate(detector, args.data).metrics
        detector.score_batch(batch)
        t = time.perf_counter()
        detector.score_batch(batch)
        model_rate = 32 / (time.perf_counter() - t)
        row = {
            **common,
            "scoring": label,
            "image_auroc": round(m["image_auroc"], 4),
            "pixel_auroc": round(m.get("pixel_auroc", float("nan")), 4),
            "aupro": round(m.get("aupro", float("nan")), 4),
            "f1_max": round(m["image_f1_max"], 4),
            "false_alarm_rate": round(m["false_alarm_rate"], 4),
            "miss_rate": round(m["miss_rate"], 4),
            "e2e_img_s": round(m["images_per_second"], 1),
            "model_img_s": round(model_rate, 1),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
