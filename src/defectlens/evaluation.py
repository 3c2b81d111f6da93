"""Evaluating a fitted detector on an MVTec-layout test set and writing the results.

Writes `metrics.json`, `scores.csv` (path relative to the data root, score, label, predicted),
optional raw maps (`maps/<path>.npy`, float32 at the image's resolution) and `report.html`.
Pixel metrics are computed only when every defective image has a mask; otherwise metrics.json
says why they are missing.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from defectlens import metrics
from defectlens.data.dataset import Sample, find_test_samples
from defectlens.data.images import read_mask
from defectlens.detector import Detector, Prediction


@dataclass
class Evaluation:
    samples: list[Sample]
    predictions: list[Prediction]
    masks: list[np.ndarray] | None
    metrics: dict = field(default_factory=dict)


def compute_metrics(
    detector: Detector,
    samples: list[Sample],
    predictions: list[Prediction],
    masks: list[np.ndarray] | None,
) -> dict:
    labels = np.array([s.label for s in samples])
    scores = np.array([p.score for p in predictions])
    f1, f1_threshold = metrics.f1_max(scores, labels)
    result: dict = {
        "n_images": len(samples),
        "n_defective": int(labels.sum()),
        "image_auroc": metrics.auroc(scores, labels),
        "image_f1_max": f1,
        "image_f1_max_threshold": f1_threshold,
        "threshold": detector.thresholds_.to_dict(),
        **metrics.rates_at(scores, labels, detector.thresholds_.image),
    }
    if masks is None:
        result["pixel_metrics"] = "skipped: not every defective image has a ground-truth mask"
    else:
        maps = [p.anomaly_map for p in predictions]
        result["pixel_auroc"] = metrics.pixel_auroc(maps, masks)
        result["aupro"] = metrics.aupro(maps, masks, fpr_limit=0.3)
    per_type = {}
    for defect in sorted({s.defect for s in samples} - {"good"}):
        keep = np.array([s.defect in (defect, "good") for s in samples])
        per_type[defect] = {"image_auroc": metrics.auroc(scores[keep], labels[keep])}
    result["per_defect_type"] = per_type
    return result


def load_masks(samples: list[Sample], predictions: list[Prediction]) -> list[np.ndarray] | None:
    if any(s.label == 1 and s.mask is None for s in samples):
        return None
    return [
        read_mask(s.mask, p.anomaly_map.shape)
        if s.mask is not None
        else np.zeros(p.anomaly_map.shape, dtype=bool)
        for s, p in zip(samples, predictions, strict=True)
    ]


def evaluate(
    detector: Detector,
    root: str | Path,
    out: str | Path | None = None,
    save_maps: bool = False,
    report: bool = True,
    progress: bool = False,
) -> Evaluation:
    """Score every test image under `root`; with `out`, write metrics, scores and the report."""
    root = Path(root)
    samples = find_test_samples(root)
    start = time.perf_counter()
    predictions = list(detector.iter_predict([s.path for s in samples], progress=progress))
    elapsed = time.perf_counter() - start
    masks = load_masks(samples, predictions)
    result = compute_metrics(detector, samples, predictions, masks)
    result["seconds"] = elapsed
    result["images_per_second"] = len(samples) / elapsed
    evaluation = Evaluation(samples, predictions, masks, result)
    if out is not None:
        write_outputs(evaluation, root, Path(out), detector, save_maps, report)
    return evaluation


def write_outputs(
    evaluation: Evaluation,
    root: Path,
    out: Path,
    detector: Detector,
    save_maps: bool,
    report: bool,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(evaluation.metrics, indent=2) + "\n")
    with open(out / "scores.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "score", "label", "predicted"])
        for s, p in zip(evaluation.samples, evaluation.predictions, strict=True):
            rel = s.path.relative_to(root).as_posix()
            writer.writerow([rel, f"{p.score:.6g}", s.label, int(p.is_anomalous)])
    if save_maps:
        for s, p in zip(evaluation.samples, evaluation.predictions, strict=True):
            target = out / "maps" / f"{s.path.relative_to(root).as_posix()}.npy"
            target.parent.mkdir(parents=True, exist_ok=True)
            np.save(target, p.anomaly_map.astype(np.float32))
    if report:
        from defectlens.report.html import write_report

        write_report(evaluation, root, out / "report.html", detector)
