"""Can the synthetic-defect task tell when the map's smoothing should be off?

    python benchmarks/sigma_selection.py ../shared/data/{deeppcb,kolektorsdd,magnetic_tile}

For each dataset, exactly as `defectlens select` splits it (seed 0): PaDiM with its defaults
is fitted once on 80 % of train/good; then, for each smoothing sigma (4, the default, and 0),
the same fitted model scores the synthetic task of the held-out 20 % (the default drawn
defect kinds) and the real test set, which `select` never reads. One JSON line per
(dataset, sigma) is appended to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from defectlens.data.dataset import find_normal_images
from defectlens.evaluation import evaluate
from defectlens.metrics import aupro, auroc
from defectlens.selection import Candidate, make_task, split_for_selection, try_candidate

SIGMAS = (4.0, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="+", type=Path, help="MVTec-layout dataset roots")
    default = Path("benchmarks/results/sigma_selection.jsonl")
    parser.add_argument("--out", type=Path, default=default)
    args = parser.parse_args()
    for root in args.data:
        fit_images, held_out = split_for_selection(find_normal_images(root), seed=0)
        task = make_task(held_out, 256, seed=0)
        outcome = try_candidate(Candidate("padim"), fit_images, task, keep_detector=True)
        if outcome.error:
            raise SystemExit(f"{root}: {outcome.error}")
        detector = outcome.extra["detector"]
        for sigma in SIGMAS:
            detector.sigma = sigma  # scoring only: the fitted Gaussian does not depend on it
            predictions = detector.predict(task.images)
            scores = np.array([p.score for p in predictions])
            real = evaluate(detector, root, report=False).metrics
            row = {
                "dataset": root.name,
                "candidate": "padim / efficientnet_lite0 / 256",
                "sigma": sigma,
                "synthetic_image_auroc": auroc(scores, task.labels),
                "synthetic_aupro": aupro([p.anomaly_map for p in predictions], task.masks),
                "real_image_auroc": real.get("image_auroc"),
                "real_pixel_auroc": real.get("pixel_auroc"),
            }
            print(json.dumps(row), flush=True)
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
