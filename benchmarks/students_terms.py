"""Which part of Uninformed Students' score localises: one fitted Students model (defaults),
its test maps recomputed from each scale alone and from each term alone (regression error,
predictive variance), no refit (issue 11's pixel target).

    python benchmarks/students_terms.py ../shared/data/kolektorsdd --model DIR

`--model`: where the fitted model is saved (fitted there first if it is not a model yet).
One JSON line per variant: image / pixel AUROC and AUPRO on the whole test split.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from defectlens import Detector
from defectlens.data.dataset import find_normal_images
from defectlens.evaluation import evaluate
from defectlens.methods.students import mean_of_scales

# label -> (scales kept (None: all), error weight, variance weight)
VARIANTS = {
    "as fitted (no change)": None,
    "every scale, error + variance (this script's copy of the rule)": (None, 1.0, 1.0),
    "17 px only": ([0], 1.0, 1.0),
    "65 px only": ([1], 1.0, 1.0),
    "error only": (None, 1.0, 0.0),
    "variance only": (None, 0.0, 1.0),
}


def scorer(method, scales, error_weight, variance_weight):
    """`Students.score` with some scales or terms left out."""

    def score(*x: torch.Tensor):
        maps = method.scale_maps(x[0], x[1:], error_weight, variance_weight)
        return mean_of_scales(
            [m for k, m in enumerate(maps) if scales is None or k in scales]
        ), None

    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = Path(args.model)
    if not (model / "config.json").is_file():
        start = time.perf_counter()
        Detector(method="students").fit(find_normal_images(args.data), progress=True).save(model)
        print(json.dumps({"fit_s": round(time.perf_counter() - start, 1)}), flush=True)
    for label, variant in VARIANTS.items():
        detector = Detector.load(model)
        if variant is not None:
            detector.model_.score = scorer(detector.model_, *variant)
        metrics = evaluate(detector, args.data, report=False).metrics
        row = {"dataset": Path(args.data).name, "variant": label}
        row.update({k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")})
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
