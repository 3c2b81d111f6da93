"""Neural Batch Sampling with real labelled defects against synthetic ones (issue 11).

    python benchmarks/nbs_real.py ../shared/data/magnetic_tile [--every 2]

Splits the dataset's defective test images by defect type, every `--every`-th one (sorted
by name) becoming a labelled anomaly for `--anomalies`; the rest, with all good test images,
is the evaluation set for both runs. The folders are symbolic links in a temporary
directory: nothing is copied. Two fits on the same train/good: synthetic defects (the
default) and `--anomalies` with the real ones. Both are evaluated on the same held-out test
images, so the labelled defects are never scored. One JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from defectlens import Detector
from defectlens.data.dataset import find_test_samples
from defectlens.evaluation import evaluate


def link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source.resolve())


def split(data: Path, every: int, out: Path) -> tuple[Path, Path, int]:
    """(labelled-anomaly root, evaluation root, labelled count) under `out`."""
    labelled, held = out / "labelled", out / "evaluate"
    link(data / "train", held / "train")
    count, seen = 0, {}
    for sample in find_test_samples(data):
        rel = sample.path.relative_to(data)
        if sample.label == 0:
            link(sample.path, held / rel)
            continue
        index = seen.get(sample.defect, 0)
        seen[sample.defect] = index + 1
        root = labelled if index % every == 0 else held
        count += root is labelled
        link(sample.path, root / rel)
        if sample.mask is not None:
            link(sample.mask, root / sample.mask.relative_to(data))
    return labelled, held, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--every", type=int, default=2)
    args = parser.parse_args()
    data = Path(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        labelled, held, count = split(data, args.every, Path(tmp))
        for anomalies in (None, str(labelled)):
            params = {} if anomalies is None else {"anomalies": anomalies}
            start = time.perf_counter()
            detector = Detector(method="nbs", method_params=params).fit(held, device="cpu")
            fit_s = time.perf_counter() - start
            m = evaluate(detector, held).metrics
            print(
                json.dumps(
                    {
                        "dataset": data.name,
                        "labelled": "synthetic" if anomalies is None else f"{count} real",
                        "supervision": detector.supervision,
                        "fit_s": round(fit_s, 1),
                        "episodes": len(detector.model_.history),
                        "image_auroc": round(m["image_auroc"], 4),
                        "pixel_auroc": round(m["pixel_auroc"], 4),
                        "aupro": round(m["aupro"], 4),
                        "n_test": len(find_test_samples(held)),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
