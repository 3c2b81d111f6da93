"""Uninformed Students with its map standardised per position (`normalise="position"`)
against the paper's global standardisation, on one fitted model, without retraining
(training does not depend on the rule; issue 11).

    python benchmarks/students_position.py ../shared/data/magnetic_tile --model DIR

`--model`: a Students model fitted with the defaults on DATA (e.g. `defectlens fit DATA
--method students --out DIR`). The same seeded split as the fit: the per-position statistics
from its training images or from its validation images, the threshold from the validation
images. One JSON line per rule: image / pixel AUROC, AUPRO,
false alarms / misses at the threshold, and, from the normal validation images alone (no test
label), the share whose map maximum lies in the outer 1/16 of the image on some side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from defectlens import Detector
from defectlens.data.dataset import find_normal_images
from defectlens.data.loader import iter_batches
from defectlens.evaluation import evaluate


def border_share(detector: Detector, images: list) -> float:
    """Share of `images` whose raw map peaks within 1/16 of the side from an edge."""
    near = []
    for batch in iter_batches(images, detector.image_size, detector.batch_size):
        maps = detector.raw_scores(batch.images)[0]
        side = maps.shape[-1]
        rows, cols = np.unravel_index(maps.reshape(len(maps), -1).argmax(1), maps.shape[1:])
        edge = np.minimum(np.minimum(rows, side - 1 - rows), np.minimum(cols, side - 1 - cols))
        near += (edge < side / 16).tolist()
    return float(np.mean(near))


def prepared_inputs(detector: Detector, images: list) -> tuple[torch.Tensor, ...]:
    """The method's inputs (pixels, teacher maps) for these images, as scoring makes them."""
    extractor, parts = detector.ensure_extractor(), []
    with torch.no_grad():
        for batch in iter_batches(images, detector.image_size, detector.batch_size):
            parts.append(detector.model_.prepare(extractor, torch.from_numpy(batch.images)))
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    detector = Detector.load(args.model)
    fit, val = detector.split_validation(find_normal_images(args.data))
    for rule, source in (("global", None), ("position", "training"), ("position", "validation")):
        if source is not None:
            images = fit if source == "training" else val
            detector.model_.normalise_per_position(prepared_inputs(detector, images))
            detector.calibrate(val)
        metrics = evaluate(detector, args.data, report=False).metrics
        row = {"dataset": Path(args.data).name, "normalise": rule, "n_validation": len(val)}
        row["statistics_from"] = source
        row["validation_peaks_at_border"] = round(border_share(detector, val), 3)
        for key in ("image_auroc", "pixel_auroc", "aupro", "false_alarm_rate", "miss_rate"):
            value = metrics.get(key)
            row[key] = round(value, 4) if isinstance(value, float) else value
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
