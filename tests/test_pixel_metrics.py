"""PixelMetrics, the streaming pixel AUROC / AUPRO, against straightforward references.

The references are deliberately naive (sklearn on every pixel; AUPRO threshold by threshold, as
in test_metrics.py), so small data; the spilled path is forced with a tiny `run_pixels`.
"""

import gc
import math
import tracemalloc
from fractions import Fraction

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from defectlens import metrics
from defectlens.metrics import PixelMetrics


def _reference_aupro(maps, masks, limit=0.3):
    """AUPRO by definition: at every distinct score, each region's overlap and the FPR."""
    values = np.concatenate([m.ravel() for m in maps])
    thresholds = np.unique(values)[::-1, None]
    regions = []
    for m, k in zip(maps, masks, strict=True):
        labelled, n = ndimage.label(k, np.ones((3, 3)))
        regions += [m[labelled == i] for i in range(1, n + 1)]
    normal = np.concatenate([m[~k] for m, k in zip(maps, masks, strict=True)])
    fpr = np.r_[0, (normal >= thresholds).mean(axis=1)]
    pro = np.r_[0, np.mean([(r >= thresholds).mean(axis=1) for r in regions], axis=0)]
    end = np.searchsorted(fpr, limit, side="right")
    x = np.r_[fpr[:end], limit]
    y = np.r_[pro[:end], np.interp(limit, fpr[end - 1 : end + 1], pro[end - 1 : end + 1])]
    return np.trapezoid(y, x) / limit


def _reference(maps, masks, limit=0.3):
    truth = np.concatenate([k.ravel() for k in masks])
    scores = np.concatenate([m.ravel() for m in maps])
    return {
        "pixel_auroc": roc_auc_score(truth, scores),
        "aupro": _reference_aupro(maps, masks, limit),
    }


def _dataset(seed: int, levels: int | None = None):
    """Smooth float32 maps of different sizes, masks of several 8-connected regions (one
    diagonal pair touching by a corner only, so one region), an image without defects, and an
    all-zero map, half of it -0.0; with `levels`, maps quantised to that many values."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for h, w in [(30, 40), (25, 52), (41, 29), (20, 20), (33, 45)]:
        amap = ndimage.gaussian_filter(rng.random((h, w)), 1.5)
        mask = np.zeros((h, w), bool)
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
            mask[y : y + rng.integers(1, 7), x : x + rng.integers(1, 7)] = True
        mask[h - 2, w - 2] = mask[h - 1, w - 1] = True  # diagonal neighbours: one region
        amap = amap + 0.08 * mask + 0.02 * rng.random((h, w))
        maps.append(amap.astype(np.float32))
        masks.append(mask)
    masks[3][:] = False  # an image without defects
    zeros = np.zeros((16, 24), np.float32)  # an all-zero map, with a defect
    zeros[:, ::2] = -0.0  # the two zeros are one score
    maps.append(zeros)
    mask = np.zeros((16, 24), bool)
    mask[3:6, 4:9] = True
    masks.append(mask)
    if levels is not None:
        maps = [np.round(m * levels * 2).astype(np.float32) for m in maps]
    return maps, masks


def _stream(maps, masks, **kwargs):
    with PixelMetrics(**kwargs) as pixels:
        for amap, mask in zip(maps, masks, strict=True):
            pixels.add(amap, mask)
        return pixels.result(), pixels.spilled


@pytest.mark.parametrize("levels", [None, 3])
@pytest.mark.parametrize("run_pixels", [97, 1000, 10**9])
def test_matches_reference(run_pixels, levels):
    maps, masks = _dataset(0, levels)
    expected = _reference(maps, masks)
    result, spilled = _stream(maps, masks, run_pixels=run_pixels)
    assert spilled == (run_pixels < 6000)
    assert all(type(value) is float for value in result.values())  # plain floats, for JSON
    assert result["pixel_auroc"] == pytest.approx(expected["pixel_auroc"], abs=1e-9)
    assert result["aupro"] == pytest.approx(expected["aupro"], abs=1e-9)


@pytest.mark.parametrize("run_pixels", [1000, 10**9])
def test_pixel_auroc_is_the_exactly_rounded_fraction(run_pixels):
    maps, masks = _dataset(7, levels=3)
    scores = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    truth = np.concatenate([k.ravel() for k in masks])
    positives, negatives = np.sort(scores[truth]), scores[~truth]
    below = np.searchsorted(positives, negatives, side="left")  # positives under each negative
    above = positives.size - np.searchsorted(positives, negatives, side="right")
    twice_wins = int(np.sum(2 * above + (positives.size - above - below)))  # a tie wins half
    exact = Fraction(twice_wins, 2 * positives.size * negatives.size)
    result, _ = _stream(maps, masks, run_pixels=run_pixels)
    assert result["pixel_auroc"] == float(exact)


def test_running_sum_of_weights_does_not_drift():
    weights = 1 / np.random.default_rng(8).integers(1, 5000, 200_000).astype(np.float64)
    running = metrics._running_sum(weights)
    for n in (1, 1000, 200_000):  # a plain cumsum: ~750 units in the last place off
        exact = math.fsum(weights[:n])
        assert abs(running[n - 1] - exact) <= 2 * np.spacing(exact)


@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_fpr_limit_and_wrappers(limit):
    maps, masks = _dataset(1)
    expected = _reference(maps, masks, limit)
    assert metrics.aupro(maps, masks, fpr_limit=limit) == pytest.approx(expected["aupro"], abs=1e-9)
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(expected["pixel_auroc"], abs=1e-12)
    spilled, _ = _stream(maps, masks, run_pixels=500, fpr_limit=limit)
    assert spilled["aupro"] == pytest.approx(expected["aupro"], abs=1e-9)


def test_result_midway_then_more_images():
    maps, masks = _dataset(2)
    whole, _ = _stream(maps, masks, run_pixels=10**9)
    for run_pixels in (2000, 10**9):  # result() after a run was flushed / with the buffer only
        with PixelMetrics(run_pixels=run_pixels) as pixels:
            for amap, mask in zip(maps[:3], masks[:3], strict=True):
                pixels.add(amap, mask)
            assert pixels.result() == pytest.approx(_reference(maps[:3], masks[:3]), abs=1e-9)
            for amap, mask in zip(maps[3:], masks[3:], strict=True):
                pixels.add(amap, mask)
            assert pixels.result() == pytest.approx(whole, abs=1e-12)
            assert pixels.n_pixels == sum(m.size for m in maps)


def test_undefined_results_are_nan():
    rng = np.random.default_rng(3)
    amap = rng.random((10, 10))
    nothing, _ = _stream([amap], [np.zeros((10, 10), bool)])
    assert np.isnan(nothing["pixel_auroc"]) and np.isnan(nothing["aupro"])
    everything, _ = _stream([amap], [np.ones((10, 10), bool)])
    assert np.isnan(everything["pixel_auroc"]) and np.isnan(everything["aupro"])
    with PixelMetrics() as empty:
        assert all(np.isnan(v) for v in empty.result().values())
        assert empty.n_pixels == 0


def test_bad_input_raises():
    with PixelMetrics() as pixels:
        with pytest.raises(ValueError, match="same shape"):
            pixels.add(np.zeros((4, 5)), np.zeros((5, 4), bool))
        with pytest.raises(ValueError, match="same shape"):
            pixels.add(np.zeros(20), np.zeros(20, bool))
        with pytest.raises(ValueError, match="NaN"):
            pixels.add(np.full((3, 3), np.nan), np.zeros((3, 3), bool))
        assert pixels.n_pixels == 0
    with pytest.raises(ValueError):
        PixelMetrics(fpr_limit=0)


def test_spilled_only_beyond_one_run_and_files_removed(tmp_path):
    maps, masks = _dataset(4)
    total = sum(m.size for m in maps)
    with PixelMetrics(run_pixels=total, tmpdir=tmp_path) as pixels:
        for amap, mask in zip(maps, masks, strict=True):
            pixels.add(amap, mask)
        pixels.result()
        assert not pixels.spilled
    assert not any(tmp_path.iterdir())

    pixels = PixelMetrics(run_pixels=total - 1, tmpdir=tmp_path)
    for amap, mask in zip(maps, masks, strict=True):
        pixels.add(amap, mask)
    result = pixels.result()
    assert pixels.spilled
    assert len(list(tmp_path.iterdir())) == 1  # one folder, holding the runs
    pixels.close()
    assert not any(tmp_path.iterdir())
    assert pixels.result() == result  # still available once computed
    with pytest.raises(ValueError, match="closed"):
        pixels.add(maps[0], masks[0])


def test_files_removed_on_exception_and_garbage_collection(tmp_path):
    maps, masks = _dataset(5)
    with pytest.raises(RuntimeError), PixelMetrics(run_pixels=500, tmpdir=tmp_path) as pixels:
        for amap, mask in zip(maps, masks, strict=True):
            pixels.add(amap, mask)
        assert pixels.spilled and any(tmp_path.iterdir())
        raise RuntimeError("interrupted")
    assert not any(tmp_path.iterdir())

    pixels = PixelMetrics(run_pixels=500, tmpdir=tmp_path)
    for amap, mask in zip(maps, masks, strict=True):
        pixels.add(amap, mask)
    assert any(tmp_path.iterdir())
    del pixels
    gc.collect()
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("run_pixels", [300, 10**9])
def test_roc_curve_thinned_from_the_exact_curve(run_pixels):
    maps, masks = _dataset(6)
    truth = np.concatenate([k.ravel() for k in masks])
    full_fpr, full_tpr = metrics.roc_curve(np.concatenate([m.ravel() for m in maps]), truth)
    exact = set(zip(full_fpr, full_tpr, strict=True))
    with PixelMetrics(run_pixels=run_pixels) as pixels:
        for amap, mask in zip(maps, masks, strict=True):
            pixels.add(amap, mask)
        for max_points in (2, 10, 100, 100_000):
            fpr, tpr = pixels.roc_curve(max_points)
            assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
            assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
            assert fpr.size <= max_points
            assert set(zip(fpr, tpr, strict=True)) <= exact  # points of the exact curve
        assert fpr.size == full_fpr.size  # enough points allowed: the exact curve itself
        # Its area is the AUROC.
        assert np.trapezoid(tpr, fpr) == pytest.approx(pixels.result()["pixel_auroc"], abs=1e-12)


def _large_image(i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + i)
    amap = rng.random((500, 1000), dtype=np.float32)
    mask = np.zeros((500, 1000), bool)
    for _ in range(3):
        y, x = rng.integers(0, 400), rng.integers(0, 900)
        mask[y : y + rng.integers(5, 100), x : x + rng.integers(5, 100)] = True
    amap[mask] += 0.3
    return amap, mask


def test_memory_is_bounded_by_the_run_size():
    n_images = 24  # 12 M pixels; holding them all as before takes ~21 bytes a pixel
    tracemalloc.start()
    try:
        with PixelMetrics(run_pixels=1_000_000) as pixels:
            for i in range(n_images):
                pixels.add(*_large_image(i))
            streamed = pixels.result()
            assert pixels.spilled
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12_000_000 * 8  # less than one 8-byte word per pixel of the whole set
    assert peak < 80 * 1_000_000  # a small multiple of the run size (measured: ~56 MB)
    with PixelMetrics(run_pixels=10**9) as pixels:
        for i in range(n_images):
            pixels.add(*_large_image(i))
        in_memory = pixels.result()
        assert not pixels.spilled
    assert streamed == pytest.approx(in_memory, abs=1e-12)
