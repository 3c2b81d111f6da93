"""Pixel metrics in bounded memory give the same numbers as keeping every pixel, on real data.

For each development dataset with masks: fit PaDiM (256 px, defaults), score the test set, and
feed every map and mask to
  - `PixelMetrics` with one in-memory run (everything fits),
  - `PixelMetrics` forced to spill many small runs to disk (`--run-pixels`, default 200k),
  - the all-pixels-in-memory implementation this project used before (read from git at
    `--reference-commit`, so the comparison is against the code that produced earlier numbers).
Prints one JSON line per dataset with the three pixel AUROC / AUPRO values and their largest
absolute differences. Data: ../shared/data (research use only; nothing is saved).

    PATH=.venv/bin:$PATH python benchmarks/pixel_metrics_check.py magnetic_tile kolektorsdd deeppcb
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from defectlens import Detector
from defectlens.data import find_test_samples, read_mask
from defectlens.metrics import PixelMetrics


def reference_metrics(commit: str):
    """The metrics module as it was at `commit` (the all-in-memory implementation)."""
    source = subprocess.run(
        ["git", "show", f"{commit}:src/defectlens/metrics.py"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "reference_metrics.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("reference_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+")
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--run-pixels", type=int, default=200_000)
    parser.add_argument("--reference-commit", default="1119713")
    args = parser.parse_args()
    torch.set_num_threads(2)
    reference = reference_metrics(args.reference_commit)
    for name in args.datasets:
        root = args.data_root / name
        detector = Detector(image_size=256).fit(root)
        samples = find_test_samples(root)
        in_memory = PixelMetrics(run_pixels=10**10)
        spilled = PixelMetrics(run_pixels=args.run_pixels)
        maps, masks = [], []
        for sample, prediction in zip(
            samples, detector.iter_predict([s.path for s in samples]), strict=True
        ):
            shape = prediction.anomaly_map.shape
            truth = read_mask(sample.mask, shape) if sample.mask else np.zeros(shape, bool)
            in_memory.add(prediction.anomaly_map, truth)
            spilled.add(prediction.anomaly_map, truth)
            maps.append(prediction.anomaly_map)
            masks.append(truth)
        timings = {}
        start = time.perf_counter()
        a = in_memory.result()
        timings["in_memory_s"] = time.perf_counter() - start
        start = time.perf_counter()
        b = spilled.result()
        timings["spilled_s"] = time.perf_counter() - start
        start = time.perf_counter()
        c = {
            "pixel_auroc": reference.pixel_auroc(maps, masks),
            "aupro": reference.aupro(maps, masks, fpr_limit=0.3),
        }
        timings["reference_s"] = time.perf_counter() - start
        row = {
            "dataset": name,
            "pixels": in_memory.n_pixels,
            "spilled": spilled.spilled,
            "in_memory": a,
            "spilled_runs": b,
            "reference": c,
            "max_abs_diff_spilled_vs_in_memory": max(abs(a[k] - b[k]) for k in a),
            "max_abs_diff_vs_reference": max(abs(a[k] - c[k]) for k in a),
            **{k: round(v, 1) for k, v in timings.items()},
        }
        in_memory.close()
        spilled.close()
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
