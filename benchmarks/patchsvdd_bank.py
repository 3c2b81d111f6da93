"""Rescore a fitted Patch SVDD model with its memory banks rebuilt at other coreset ratios,
without retraining the encoder: what the default 1 % coreset costs against the authors' full
banks (every training patch). One JSON line per ratio.

    python benchmarks/patchsvdd_bank.py bench-output/trained/kolektorsdd-patchsvdd \
        ../shared/data/kolektorsdd --ratio 0.01 --ratio 1

The model must have been fitted on DATA's train/good with its own seed and validation
fraction (as `benchmarks/trained.py` fits): the fit images are re-derived from them, and the
run stops if their count differs from the model's. The thresholds are set again from the
same validation images; AUROC does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from defectlens import Detector
from defectlens.data.loader import iter_batches
from defectlens.evaluation import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a fitted patchsvdd model folder")
    parser.add_argument("data", help="the dataset root it was fitted on (MVTec layout)")
    parser.add_argument("--ratio", type=float, action="append", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    detector = Detector.load(args.model)
    method = detector.model_
    if method.name != "patchsvdd":
        parser.error(f"{args.model} is a {method.name} model, not patchsvdd")
    fit_images, val = detector.plan_fit(Path(args.data) / "train" / "good")
    if len(fit_images) != detector.n_fit_images_:
        parser.error(f"{len(fit_images)} fit images here, the model had {detector.n_fit_images_}")
    batches = iter_batches(fit_images, detector.image_size, 32)
    train = method.inputs(torch.cat([torch.from_numpy(b.images) for b in batches]), None)
    for ratio in args.ratio:
        start = time.perf_counter()
        method.coreset_ratio = ratio
        method.build_banks(train)
        build_s = time.perf_counter() - start
        detector.calibrate(val)
        m = evaluate(detector, args.data).metrics
        row = {
            "dataset": Path(args.data).name,
            "model": args.model,
            "seed": method.seed,
            "coreset_ratio": ratio,
            "bank_small": len(method.bank_small),
            "bank_large": len(method.bank_large),
            "build_s": round(build_s, 1),
            "image_auroc": round(m["image_auroc"], 4),
            "pixel_auroc": round(m["pixel_auroc"], 4),
            "aupro": round(m["aupro"], 4),
            "e2e_img_s": round(m["images_per_second"], 2),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
