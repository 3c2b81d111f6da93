"""Evaluating a fitted detector on an MVTec-layout test set and writing the results.

Writes `metrics.json`, `scores.csv` (path relative to the data root, score, label, predicted,
error), optional raw maps (`maps/<path>.npy`, float32 at the image's resolution) and
`report.html`. Pixel metrics are computed only when every defective image has a mask; otherwise
metrics.json says why they are missing.

Evaluation streams: each image's map goes to the pixel metrics, to its .npy file and to
scores.csv as soon as it is scored, and is then dropped, so memory does not grow with the test
set (the pixel metrics stay exact by spilling sorted runs to disk, see `metrics.PixelMetrics`).
An image or mask that cannot be read is listed in scores.csv with its error and left out of
every metric; metrics.json counts and names them. The report's example heat maps are recomputed
for the dozen images it shows rather than kept for all.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from defectlens import metrics
from defectlens.data.dataset import Sample, find_test_samples
from defectlens.data.images import read_mask
from defectlens.errors import DataError, DefectLensWarning
from defectlens.outputs import (
    clear_results,
    prepare_results_dir,
    read_results_marker,
    refuse_unwritten,
    write_results_marker,
    write_text_atomic,
)
from defectlens.prediction import Prediction, Predictor
from defectlens.results import ResultsTable, safe_text

SCORE_COLUMNS = ("path", "score", "label", "predicted", "error")
PRODUCES = ("metrics.json", "scores.csv", "report.html", "maps")


@dataclass
class Evaluation:
    """What an evaluation measured: the scored samples with their scores and decisions."""

    samples: list[Sample]
    scores: np.ndarray
    predicted: np.ndarray
    metrics: dict = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # path relative to root -> error
    pixel_roc: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=int)


def image_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    f1, f1_threshold = metrics.f1_max(scores, labels) if labels.any() else (math.nan, math.nan)
    return {
        "n_images": int(labels.size),
        "n_defective": int(labels.sum()),
        "image_auroc": metrics.auroc(scores, labels),
        "image_f1_max": f1,
        "image_f1_max_threshold": f1_threshold,
        **metrics.rates_at(scores, labels, threshold),
    }


def _relative(path: Path, root: Path) -> str:
    return safe_text(path.relative_to(root).as_posix())


def evaluate(
    detector: Predictor,
    root: str | Path,
    out: str | Path | None = None,
    save_maps: bool = False,
    report: bool = True,
    progress: bool = False,
    on_skip: Callable[[str, str], None] | None = None,
) -> Evaluation:
    """Score every test image under `root`; with `out`, write metrics, scores and the report.

    Images or masks that cannot be read are skipped (`on_skip(path, error)` hears of each) and
    listed in scores.csv and metrics.json; the metrics cover the images that were scored.
    """
    root = Path(root)
    samples = find_test_samples(root)
    learned_from = _labelled_anomalies(detector)
    if learned_from is not None and Path(learned_from).resolve() == root.resolve():
        warnings.warn(
            f"this {detector.method} model learned from the labelled defects of {learned_from}, "
            "which is DATA itself: its test defects are what it was trained on, so these "
            "metrics overstate how it does on new parts",
            DefectLensWarning,
            stacklevel=2,
        )
    out_dir = None if out is None else prepare_results_dir(out, PRODUCES, "evaluate")
    if out_dir is not None:
        # Nothing of an earlier run (ours: the folder carries our marker) may sit beside this
        # run's: not its summary if this one is interrupted, not another model's maps. Maps
        # an earlier run did not save are not its own, and are never deleted.
        earlier = read_results_marker(out_dir)
        if earlier.get("maps") is False:
            refuse_unwritten(out_dir, ["maps"], "the earlier evaluation saved no maps")
        clear_results(out_dir, PRODUCES)
        write_results_marker(out_dir, {**earlier, "maps": bool(save_maps)})
    by_path = {str(s.path): s for s in samples}
    defective = [s for s in samples if s.label == 1]
    with_masks = all(s.mask is not None for s in defective)
    unmasked = [s for s in defective if s.mask is None]
    if unmasked and len(unmasked) < len(defective):  # some masks, not all: say which
        warnings.warn(
            f"{len(unmasked)} of {len(defective)} defective test image(s) have no mask, e.g. "
            f"{_relative(unmasked[0].path, root)} (expected ground_truth/{unmasked[0].defect}/"
            f"{safe_text(unmasked[0].path.stem)}_mask.png); pixel metrics need every mask and "
            "are left out",
            DefectLensWarning,
            stacklevel=2,
        )
    pixel = metrics.PixelMetrics(fpr_limit=0.3) if with_masks and detector.has_maps else None
    table = None if out_dir is None else ResultsTable(out_dir / "scores.csv", SCORE_COLUMNS)
    scored: list[Sample] = []
    scores: list[float] = []
    predicted: list[bool] = []
    skipped: dict[str, str] = {}

    def skip(sample: Sample, error: str) -> None:
        rel = _relative(sample.path, root)
        skipped[rel] = error
        if table is not None:
            table.write([rel, "", sample.label, "", error])
        if on_skip is not None:
            on_skip(rel, error)

    start = time.perf_counter()
    try:
        stream = detector.iter_predict(
            [s.path for s in samples],
            progress=progress,
            on_error=lambda name, exc: skip(by_path[name], str(exc)),
        )
        for prediction in stream:
            sample = by_path[prediction.source]
            if pixel is not None:
                try:
                    truth = _truth(sample, prediction)
                except DataError as exc:
                    skip(sample, f"mask: {exc}")
                    continue
                pixel.add(prediction.anomaly_map, truth)
            scored.append(sample)
            scores.append(prediction.score)
            predicted.append(prediction.is_anomalous)
            rel = _relative(sample.path, root)
            if table is not None:
                decision = int(prediction.is_anomalous)
                table.write([rel, f"{prediction.score:.6g}", sample.label, decision, ""])
            if save_maps and out_dir is not None and prediction.anomaly_map is not None:
                target = out_dir / "maps" / f"{sample.path.relative_to(root).as_posix()}.npy"
                target.parent.mkdir(parents=True, exist_ok=True)
                np.save(target, prediction.anomaly_map.astype(np.float32, copy=False))
        elapsed = time.perf_counter() - start
        if not scored:
            raise DataError(f"{root}: no test image could be scored ({len(skipped)} skipped)")
        result_scores = np.array(scores, dtype=np.float64)
        evaluation = Evaluation(scored, result_scores, np.array(predicted, dtype=bool))
        evaluation.skipped = skipped
        m = image_metrics(result_scores, evaluation.labels, detector.thresholds_.image)
        m["threshold"] = detector.thresholds_.to_dict()
        m["supervision"] = detector.supervision
        if not detector.has_maps:
            m["pixel_metrics"] = "skipped: this model scores images without anomaly maps"
        elif pixel is None:
            m["pixel_metrics"] = "skipped: not every defective image has a ground-truth mask"
        else:
            m.update(pixel.result())
            evaluation.pixel_roc = pixel.roc_curve()
        m["per_defect_type"] = _per_type(scored, result_scores)
        m["n_skipped"] = len(skipped)
        if skipped:
            m["skipped"] = skipped
        m["seconds"] = elapsed
        m["images_per_second"] = len(scored) / max(elapsed, 1e-9)
        evaluation.metrics = m
    finally:
        if table is not None:
            table.close()
        if pixel is not None:
            pixel.close()
    if out_dir is not None:
        write_text_atomic(out_dir / "metrics.json", _json(evaluation.metrics) + "\n")
        if report:
            from defectlens.report.html import write_report

            write_report(
                evaluation,
                root,
                out_dir / "report.html",
                detector,
                lambda indices: example_views(detector, evaluation, indices),
            )
    return evaluation


def _json(value: dict) -> str:
    """metrics.json: NaN (an undefined metric) written as null, so strict parsers read it."""

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return json.dumps(clean(value), indent=2, allow_nan=False)


def _truth(sample: Sample, prediction: Prediction) -> np.ndarray:
    shape = prediction.size
    if sample.mask is None:
        return np.zeros(shape, dtype=bool)
    return read_mask(sample.mask, shape)


def _per_type(samples: list[Sample], scores: np.ndarray) -> dict:
    labels = np.array([s.label for s in samples])
    defects = np.array([s.defect for s in samples])
    per_type = {}
    for defect in sorted(set(defects.tolist()) - {"good"}):
        keep = (defects == defect) | (defects == "good")
        per_type[defect] = {"image_auroc": metrics.auroc(scores[keep], labels[keep])}
    return per_type


def example_views(
    detector: Predictor, evaluation: Evaluation, indices: list[int]
) -> list[tuple[Sample, Prediction, np.ndarray | None]]:
    """(sample, prediction, true mask) for the few images a report shows, scored again: cheaper
    than keeping every map of a large test set in memory."""
    chosen = [evaluation.samples[i] for i in indices]
    views = []
    for sample, prediction in zip(chosen, detector.predict([s.path for s in chosen]), strict=True):
        truth = None
        if sample.mask is not None or sample.label == 0:
            try:
                truth = _truth(sample, prediction)
            except DataError:
                truth = None
        views.append((sample, prediction, truth))
    return views


def _labelled_anomalies(detector: Predictor) -> str | None:
    """The folder of labelled anomalies the model learned from (NBS's `anomalies`), if any:
    a saved model's parameter, or an export's, read from the model it was made from."""
    anomalies = getattr(detector, "method_params", {}).get("anomalies")
    return anomalies if isinstance(anomalies, str) else None
