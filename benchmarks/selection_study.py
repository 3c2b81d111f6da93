"""Does the synthetic-defect task rank configurations as the real test sets do? (issue 15)

    python benchmarks/selection_study.py DATA... [--candidates padim/efficientnet_lite0/256 ...]

For each dataset and candidate, exactly what `defectlens select` does: fit on 80 % of
train/good (seeded), score the other 20 % each as it is and with one synthetic defect
(image AUROC, AUPRO). The same fitted model is then evaluated on the real test/ set (image
AUROC, pixel AUROC, AUPRO where masks exist), which `select` never reads. One JSON line per
(dataset, candidate), then one summary line per dataset: the Spearman rank correlation of
synthetic and real image AUROC, and the real image AUROC of the selector's pick, of the best
configuration in hindsight and of the default (the first candidate).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from defectlens.data.dataset import find_normal_images
from defectlens.evaluation import evaluate
from defectlens.selection import Candidate, make_task, rank, split_for_selection, try_candidate

DEFAULT_CANDIDATES = [
    "padim/efficientnet_lite0/256",
    "patchcore/efficientnet_lite0/256",
    "padim/efficientnet_lite1/256",
    "patchcore/efficientnet_lite1/256",
    "padim/efficientnet_lite0/320",
    "spade/efficientnet_lite0/256",
]


def parse(text: str) -> Candidate:
    method, backbone, size = text.split("/")
    params = (("seed", 0),) if method in ("padim", "patchcore") else ()
    return Candidate(method, backbone, int(size), params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="+", type=Path)
    parser.add_argument("--candidates", nargs="+", default=DEFAULT_CANDIDATES)
    args = parser.parse_args()
    candidates = [parse(c) for c in args.candidates]
    for root in args.data:
        images = find_normal_images(root)
        fit_images, held_out = split_for_selection(images, seed=0)
        task = make_task(held_out, max(c.image_size for c in candidates), seed=0)
        outcomes, real = [], {}
        for candidate in candidates:
            started = time.perf_counter()
            outcome = try_candidate(candidate, fit_images, task, keep_detector=True)
            detector = outcome.extra.pop("detector", None)
            line = {"data": root.name, **outcome.row()}
            if detector is not None:
                metrics = evaluate(detector, root, report=False).metrics
                real[candidate] = metrics["image_auroc"]
                line |= {
                    "real_image_auroc": metrics["image_auroc"],
                    "real_pixel_auroc": metrics.get("pixel_auroc"),
                    "real_aupro": metrics.get("aupro"),
                }
            line["total_s"] = time.perf_counter() - started
            print(json.dumps(line), flush=True)
            outcomes.append(outcome)
        ranked = [o for o in rank(outcomes) if o.candidate in real]
        tried = [o.candidate for o in outcomes if o.candidate in real]
        synthetic = [next(o.image_auroc for o in outcomes if o.candidate == c) for c in tried]
        rho = spearmanr(synthetic, [real[c] for c in tried]).statistic if len(tried) > 2 else None
        best = max(tried, key=lambda c: real[c])
        summary = {
            "data": root.name,
            "summary": True,
            "spearman_synthetic_vs_real": None if rho is None else float(rho),
            "pick": ranked[0].candidate.label,
            "pick_real_image_auroc": real[ranked[0].candidate],
            "best": best.label,
            "best_real_image_auroc": real[best],
            "default": candidates[0].label,
            "default_real_image_auroc": real.get(candidates[0], float("nan")),
            "pick_minus_best": real[ranked[0].candidate] - real[best],
        }
        print(json.dumps(summary), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
