"""Evaluation metrics: image AUROC, pixel AUROC, AUPRO (to FPR 0.3), F1-max, rates at a threshold.

All are exact (no threshold binning). Pixel-level curves sort every pixel once; AUPRO uses the
fact that the per-region overlap averaged over regions is a weighted count of true-positive
pixels (weight 1 / (n_regions x region area)), so the whole PRO curve comes from one sort too,
instead of a loop over thresholds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def _curve(scores: np.ndarray, positive_weight: np.ndarray, negative: np.ndarray):
    """Cumulative (positive weight, negative count) at each distinct threshold, high to low."""
    order = np.argsort(scores, kind="stable")[::-1]
    s = scores[order]
    tp = np.cumsum(positive_weight[order], dtype=np.float64)
    fp = np.cumsum(negative[order], dtype=np.float64)
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # end of each tie group
    return np.r_[0.0, tp[last]], np.r_[0.0, fp[last]], s[last]


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve; NaN if only one class is present."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    n_pos = labels.sum()
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    tp, fp, _ = _curve(scores, labels.astype(np.float64), (~labels).astype(np.float64))
    return float(np.trapezoid(tp / n_pos, fp / n_neg))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) arrays for plotting."""
    labels = np.asarray(labels).ravel().astype(bool)
    tp, fp, _ = _curve(
        np.asarray(scores, dtype=np.float64).ravel(),
        labels.astype(np.float64),
        (~labels).astype(np.float64),
    )
    return fp / max(fp[-1], 1), tp / max(tp[-1], 1)


def f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds, and the threshold achieving it (score >= threshold)."""
    labels = np.asarray(labels).astype(bool)
    tp, fp, thresholds = _curve(
        np.asarray(scores, dtype=np.float64), labels.astype(np.float64), (~labels) * 1.0
    )
    tp, fp = tp[1:], fp[1:]
    f1 = 2 * tp / np.maximum(tp + fp + labels.sum(), 1e-12)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def rates_at(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """False-alarm rate (good flagged) and miss rate (defective passed) for score > threshold."""
    scores, labels = np.asarray(scores), np.asarray(labels).astype(bool)
    flagged = scores > threshold
    return {
        "false_alarm_rate": float(flagged[~labels].mean()) if (~labels).any() else float("nan"),
        "miss_rate": float((~flagged[labels]).mean()) if labels.any() else float("nan"),
    }


def _flatten(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]):
    scores = np.concatenate([m.ravel().astype(np.float32) for m in maps])
    truth = np.concatenate([m.ravel().astype(bool) for m in masks])
    return scores, truth


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    scores, truth = _flatten(maps, masks)
    return auroc(scores, truth)


def aupro(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit`, divided by `fpr_limit`.

    Regions are 8-connected components of each ground-truth mask; FPR counts all defect-free
    pixels of all images (MVTec AD's definition).
    """
    weights = []
    n_regions = 0
    for mask in masks:
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        w = np.zeros(mask.shape, dtype=np.float64)
        if count:
            areas = np.bincount(labelled.ravel())
            w = np.where(labelled > 0, 1.0 / areas[labelled], 0.0)
        n_regions += count
        weights.append(w)
    if n_regions == 0:
        return float("nan")
    scores, truth = _flatten(maps, masks)
    weight = np.concatenate([w.ravel() for w in weights]) / n_regions
    negatives = ~truth
    pro, fp, _ = _curve(scores, weight, negatives.astype(np.float64))
    fpr = fp / negatives.sum()
    # Cut the curve exactly at fpr_limit by linear interpolation, then integrate.
    end = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:end], pro[:end]
    if end < fpr.size:
        x = np.r_[x, fpr_limit]
        y = np.r_[y, np.interp(fpr_limit, fpr[end - 1 : end + 1], pro[end - 1 : end + 1])]
    return float(np.trapezoid(y, x) / fpr_limit)
