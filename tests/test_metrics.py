import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from defectlens import metrics


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=3000), 1)
    labels = rng.random(3000) < 0.3 + 0.3 * (scores > 0)
    assert metrics.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert np.isnan(metrics.auroc(scores, np.zeros(3000)))


def test_f1_max_matches_sklearn():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=500)
    labels = rng.random(500) < 0.2 + 0.5 * (scores > 0.5)
    precision, recall, _ = precision_recall_curve(labels, scores)
    expected = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))
    f1, threshold = metrics.f1_max(scores, labels)
    assert f1 == pytest.approx(expected)
    predicted = scores >= threshold
    tp = (predicted & labels).sum()
    assert 2 * tp / (predicted.sum() + labels.sum()) == pytest.approx(f1)


def _brute_force_aupro(maps, masks, limit=0.3):
    regions = []
    for m, k in zip(maps, masks, strict=True):
        labelled, n = ndimage.label(k, np.ones((3, 3)))
        regions += [m[labelled == i] for i in range(1, n + 1)]
    normal = np.concatenate([m[~k] for m, k in zip(maps, masks, strict=True)])
    thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    fpr = np.r_[0, [(normal >= t).mean() for t in thresholds]]
    pro = np.r_[0, [np.mean([(r >= t).mean() for r in regions]) for t in thresholds]]
    end = np.searchsorted(fpr, limit, side="right")
    x = np.r_[fpr[:end], limit]
    y = np.r_[pro[:end], np.interp(limit, fpr[end - 1 : end + 1], pro[end - 1 : end + 1])]
    return np.trapezoid(y, x) / limit


def test_aupro_matches_threshold_by_threshold_definition():
    rng = np.random.default_rng(2)
    maps = [rng.random((16, 16)) for _ in range(4)]
    masks = [np.zeros((16, 16), bool) for _ in range(4)]
    masks[0][2:6, 2:6] = True
    masks[1][10:12, 1:15] = True
    masks[1][14:16, 14:16] = True  # a second, small region: must weigh as much as the big one
    for m, k in zip(maps, masks, strict=True):
        m[k] += 0.3
    assert metrics.aupro(maps, masks) == pytest.approx(_brute_force_aupro(maps, masks), rel=1e-9)


def test_perfect_and_empty_localisation():
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    perfect = mask.astype(float)
    assert metrics.aupro([perfect], [mask]) == pytest.approx(1.0)
    assert metrics.pixel_auroc([perfect], [mask]) == pytest.approx(1.0)
    assert np.isnan(metrics.aupro([perfect], [np.zeros_like(mask)]))


def test_rates_at_threshold():
    scores = np.array([0.1, 0.5, 0.9, 0.2, 0.8])
    labels = np.array([0, 0, 0, 1, 1])
    rates = metrics.rates_at(scores, labels, 0.4)
    assert rates == {"false_alarm_rate": pytest.approx(2 / 3), "miss_rate": pytest.approx(0.5)}
