"""Evaluation metrics: image AUROC, pixel AUROC, AUPRO (to FPR 0.3), F1-max, rates at a threshold.

All are exact (no threshold binning). Image-level curves sort every score once. AUPRO uses the
fact that the per-region overlap averaged over regions is a weighted count of true-positive
pixels (weight 1 / (n_regions x region area)), so the whole PRO curve, like the pixel ROC curve,
comes from one pass over the pixels in decreasing score order instead of a loop over thresholds.

Pixel metrics are streamed (`PixelMetrics`): a test set of 200 maps of 800x1600 is 256 M pixels,
and holding them all (scores, labels, weights, a sort permutation) needs more than 12 GB. Each
pixel is packed into one uint64 key (order-preserving float32 score bits, region area), so a
chunk of `run_pixels` pixels sorts with one fast `np.sort` and collapses into a "run" of distinct
(score, area) keys with counts. One run stays in memory; more are written to a temporary folder
and merged as an exact external sort: value slabs (score ranges, so ties never straddle a slab)
are read from every run, re-sorted, reduced to one row per distinct score, and the ROC and PRO
sums and trapezoids are accumulated slab by slab from high to low scores. Memory is about
`run_pixels` x 40 bytes plus one image, whatever the number of images. Nothing is approximated:
AUROC is summed in integers and divided once (the exactly rounded value), and the PRO weights'
running sum is compensated, so it does not drift over millions of defect pixels as a plain
float cumsum does (by ~1e-13).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

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


_SHIFT = np.uint64(32)  # a key is (score code << 32) | region area (0 for a defect-free pixel)
_LOW32 = np.uint64(0xFFFFFFFF)
_CONNECTIVITY = np.ones((3, 3), dtype=bool)  # 8-connected defect regions, as MVTec AD's AUPRO


def _score_codes(amap: np.ndarray) -> np.ndarray:
    """uint32 codes of the maps' float32 scores whose unsigned order is the float order.

    Positive floats get their sign bit set and negative ones are bit-inverted. -0.0 is first
    made +0.0 so that the two zeros stay one tie, as they are when floats are compared.
    """
    scores = np.asarray(amap, dtype=np.float32) + np.float32(0.0)
    if np.isnan(scores).any():
        raise ValueError("anomaly map contains NaN: a NaN score has no place in a ranking")
    bits = scores.view(np.uint32)
    return bits ^ ((bits >> np.uint32(31)) * np.uint32(0x7FFFFFFF) | np.uint32(0x80000000))


def _collapse(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys of a sorted key array and how often each occurs."""
    n = keys.size
    new = np.empty(n, dtype=bool)
    new[:1] = True
    np.not_equal(keys[1:], keys[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    del new
    count_type = np.uint32 if n < 2**32 else np.int64
    if starts.size == n:  # no repeated key: the common case for smooth float maps
        return keys, np.ones(n, dtype=count_type)
    return keys[starts], np.diff(starts, append=n).astype(count_type)


class _Run:
    """One sorted, collapsed chunk of pixels (distinct keys and their counts), in memory or
    spilled to two raw files.

    Spilled runs are read with plain reads, not memory-mapped: the pages of a mapping that a
    process touches count towards its resident memory, and the kernel maps 16 neighbours with
    each, so binary searches over mapped runs would soon make the whole set resident. Instead a
    small in-memory index (the score code every `stride` rows) narrows a search to one read of
    `stride` rows.
    """

    def __init__(self, keys: np.ndarray, counts: np.ndarray) -> None:
        self.size = int(keys.size)
        self.keys: np.ndarray | None = keys
        self.counts: np.ndarray | None = counts
        self.count_type = counts.dtype
        self.stem: Path | None = None
        self.stride = 1
        self.index = np.empty(0, dtype=np.uint32)

    def spill(self, stem: Path, stride: int) -> None:
        self.stride = stride
        self.index = (self.keys[::stride] >> _SHIFT).astype(np.uint32)
        self.keys.tofile(f"{stem}.keys")
        self.counts.tofile(f"{stem}.counts")
        self.keys = self.counts = None
        self.stem = stem

    def _read(self, suffix: str, dtype: np.dtype, start: int, stop: int) -> np.ndarray:
        offset = start * np.dtype(dtype).itemsize
        return np.fromfile(f"{self.stem}.{suffix}", dtype=dtype, count=stop - start, offset=offset)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and counts of rows [start, stop)."""
        if self.stem is None:
            return self.keys[start:stop], self.counts[start:stop]
        return (
            self._read("keys", np.uint64, start, stop),
            self._read("counts", self.count_type, start, stop),
        )

    def code_at(self, row: int) -> int:
        """Score code of one row."""
        key = (
            self.keys[row] if self.stem is None else self._read("keys", np.uint64, row, row + 1)[0]
        )
        return int(key >> _SHIFT)

    def position(self, code: int, exact: bool = True) -> int:
        """Number of rows whose score code is below `code` (0 <= code <= 2**32); for a spilled
        run with exact=False, an estimate within stride / 2 from the index alone."""
        if code >= 2**32:
            return self.size
        key = np.uint64(code) << _SHIFT
        if self.stem is None:
            return int(np.searchsorted(self.keys, key))
        j = int(np.searchsorted(self.index, code))  # so (j - 1) * stride < position <= j * stride
        if j == 0:
            return 0
        first, last = (j - 1) * self.stride + 1, min(j * self.stride, self.size)
        if not exact:
            return (first + last) // 2
        return first + int(np.searchsorted(self._read("keys", np.uint64, first, last), key))


class PixelMetrics:
    """Exact pixel AUROC and AUPRO (and a ROC curve for plotting) from maps fed one image at a
    time, in memory bounded by `run_pixels`, whatever the number of images.

    Definitions are those of MVTec AD: AUROC over every pixel of every image (one curve point per
    distinct float32 score, trapezoid rule); AUPRO over 8-connected regions of each image's mask,
    each positive pixel weighing 1 / (regions in the whole set x its region's area), false
    positives counted over all defect-free pixels, integrated up to `fpr_limit` (the curve cut by
    linear interpolation there) and divided by `fpr_limit`.

    Pixels are buffered `run_pixels` at a time; a full buffer is sorted into a run. When more than
    `run_pixels` pixels arrive, runs go to a temporary folder under `tmpdir` (the system's by
    default), removed by `close()`, by leaving a `with` block, or when the object is collected.
    Peak memory is about `run_pixels` x 40 bytes plus one image.
    """

    def __init__(
        self,
        fpr_limit: float = 0.3,
        run_pixels: int = 8_000_000,
        tmpdir: str | Path | None = None,
    ) -> None:
        if not fpr_limit > 0:
            raise ValueError(f"fpr_limit must be positive, got {fpr_limit}")
        if int(run_pixels) < 2:
            raise ValueError(f"run_pixels must be at least 2, got {run_pixels}")
        self.fpr_limit = float(fpr_limit)
        self.run_pixels = int(run_pixels)
        self._stride = max(1, self.run_pixels // 4096)  # spilled runs' index: ~4096 codes each
        self._tmpdir = tmpdir
        self._folder: Path | None = None
        self._remove_folder: weakref.finalize | None = None
        self._pieces: list[np.ndarray] = []  # buffered keys, not yet sorted into a run
        self._buffered = 0
        self._runs: list[_Run] = []
        self._n_pixels = 0
        self._n_positive = 0
        self._n_regions = 0
        self._cache: tuple[int, dict[str, float], tuple[np.ndarray, np.ndarray]] | None = None
        self._closed = False

    @property
    def n_pixels(self) -> int:
        """Pixels added so far, over all images."""
        return self._n_pixels

    @property
    def spilled(self) -> bool:
        """Whether runs went to disk: once `result()` has run, exactly when more than
        `run_pixels` pixels were added (more than one run was needed)."""
        return self._folder is not None

    def add(self, amap: np.ndarray, mask: np.ndarray) -> None:
        """Add one image's (H, W) anomaly map and its (H, W) mask (nonzero = defect)."""
        if self._closed:
            raise ValueError("PixelMetrics is closed")
        amap, mask = np.asarray(amap), np.asarray(mask, dtype=bool)
        if amap.ndim != 2 or amap.shape != mask.shape:
            raise ValueError(
                "need an (H, W) map and a mask of the same shape, "
                f"got {amap.shape} and {mask.shape}"
            )
        if amap.size >= 2**32:
            raise ValueError(
                f"an image of {amap.size} pixels is too large (region areas are 32-bit)"
            )
        keys = _score_codes(amap).ravel().astype(np.uint64) << _SHIFT
        labelled, n_regions = ndimage.label(mask, structure=_CONNECTIVITY)
        if n_regions:
            areas = np.bincount(labelled.ravel()).astype(np.uint64)
            areas[0] = 0
            keys |= areas[labelled.ravel()]
        del labelled
        self._n_pixels += keys.size
        self._n_positive += int(np.count_nonzero(mask))
        self._n_regions += n_regions
        self._cache = None
        start = 0
        while start < keys.size:  # an image larger than the buffer is split between runs
            take = min(self.run_pixels - self._buffered, keys.size - start)
            self._pieces.append(keys[start : start + take])
            self._buffered += take
            start += take
            if self._buffered == self.run_pixels:
                self._flush()

    def _sorted_buffer(self) -> np.ndarray:
        keys = self._pieces[0] if len(self._pieces) == 1 else np.concatenate(self._pieces)
        self._pieces = []
        keys.sort()
        return keys

    def _flush(self) -> None:
        """Sort the buffer into a run; keep a first run in memory, spill all once there are two."""
        run = _Run(*_collapse(self._sorted_buffer()))
        self._buffered = 0
        if self._runs:
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="defectlens-pixels-", dir=self._tmpdir))
                self._remove_folder = weakref.finalize(
                    self, shutil.rmtree, self._folder, ignore_errors=True
                )
            for i, old in enumerate(self._runs):
                if old.stem is None:
                    old.spill(self._folder / f"run{i:06d}", self._stride)
            run.spill(self._folder / f"run{len(self._runs):06d}", self._stride)
        self._runs.append(run)

    def result(self) -> dict[str, float]:
        """{"pixel_auroc": ..., "aupro": ...}; NaN where undefined (a class or regions missing)."""
        if self._cache is None:
            self._cache = (1000, *self._evaluate(1000))
        return dict(self._cache[1])

    def roc_curve(self, max_points: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """(false-positive rate, true-positive rate) from (0, 0) to (1, 1), thinned to at most
        `max_points` points for plotting: a point is kept each time fpr + tpr has grown by about
        2 / max_points, so steep and flat stretches are both drawn faithfully.

        With no positive or no negative pixel the rates are divided by max(count, 1), as
        `roc_curve` does for images.
        """
        if max_points < 2:
            raise ValueError(f"max_points must be at least 2, got {max_points}")
        if self._cache is None or self._cache[0] != max_points:
            self._cache = (max_points, *self._evaluate(max_points))
        fpr, tpr = self._cache[2]
        return fpr.copy(), tpr.copy()

    def _evaluate(self, max_points: int) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
        if self._closed:
            raise ValueError("PixelMetrics is closed")
        if self._buffered and self._runs:
            self._flush()  # a second run: both go to disk, as any further run would
        runs = self._runs
        if self._buffered:  # a partial buffer alone: merged in memory, and it stays the buffer
            keys = self._sorted_buffer()
            self._pieces = [keys]
            runs = [_Run(*_collapse(keys))]
        return _merge(
            runs,
            n_positive=self._n_positive,
            n_negative=self._n_pixels - self._n_positive,
            n_regions=self._n_regions,
            fpr_limit=self.fpr_limit,
            slab_rows=max(self.run_pixels // 2, 1),
            max_points=max_points,
        )

    def close(self) -> None:
        """Remove the temporary files and drop the buffers; `result()` stays available if it
        was computed before."""
        self._closed = True
        self._pieces, self._runs, self._buffered = [], [], 0
        if self._remove_folder is not None:
            self._remove_folder()

    def __enter__(self) -> PixelMetrics:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _running_sum(values: np.ndarray) -> np.ndarray:
    """Cumulative sum of float64 values, correct to a couple of roundings however many there are.

    A plain cumsum of a million region weights drifts by ~1e-13; here the exact rounding error
    of each sequential addition is recovered (Knuth's TwoSum) and added back, summed apart.
    """
    total = np.cumsum(values)
    before = np.r_[0.0, total[:-1]]
    added = total - before  # the part of each value that made it into the sum
    error = (before - (total - added)) + (values - added)
    return total + np.cumsum(error)


def _slab_start(runs: list[_Run], upper: list[int], hi: int, slab_rows: int) -> int:
    """Smallest score code `lo` such that codes [lo, hi) hold about `slab_rows` rows of all runs
    together (`upper`: each run's rows below `hi`; counts estimated from the runs' indexes), or
    hi - 1, a single score, when even that holds more."""

    def rows_from(code: int) -> int:
        estimates = (run.position(code, exact=False) for run in runs)
        return sum(max(u - e, 0) for u, e in zip(upper, estimates, strict=True))

    if rows_from(0) <= slab_rows:
        return 0
    too_many, lo = 0, hi - 1  # bisection on codes: rows_from(too_many) > slab_rows throughout
    while lo - too_many > 1:
        mid = (too_many + lo) // 2
        if rows_from(mid) <= slab_rows:
            lo = mid
        else:
            too_many = mid
    return lo


def _merge(
    runs: list[_Run],
    *,
    n_positive: int,
    n_negative: int,
    n_regions: int,
    fpr_limit: float,
    slab_rows: int,
    max_points: int,
) -> tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
    """Walk all runs' distinct scores from high to low in slabs and accumulate both curves.

    A slab is a range of score codes [lo, hi) holding about `slab_rows` rows of all runs
    together: `lo` is found by bisection on the codes, so ties never straddle two slabs and a
    slab only exceeds `slab_rows` when one score alone has more (collapsed) rows than that.
    """
    auroc_twice = 0  # 2 x area under ROC x n_positive x n_negative, an exact integer
    tp, fp, pro_weight = 0, 0, 0.0  # running sums over scores above the current slab
    pro_area, pro_done = 0.0, n_regions == 0 or n_negative == 0
    last_x = last_y = 0.0  # last point of the PRO curve integrated so far
    buckets = max(max_points - 2, 1)
    last_bucket = 0.0
    curve_x, curve_y = [np.zeros(1)], [np.zeros(1)]
    last_point = (0.0, 0.0)
    upper = [run.size for run in runs]  # per run, rows not yet merged (all below the last slab)
    while any(upper):
        # Start just above the highest score left, so that every slab holds at least one score.
        hi = 1 + max(run.code_at(u - 1) for run, u in zip(runs, upper, strict=True) if u)
        lo = _slab_start(runs, upper, hi, slab_rows)
        lower = [run.position(lo) for run in runs]
        pieces = [run.read(a, b) for run, a, b in zip(runs, lower, upper, strict=True) if b > a]
        keys = np.concatenate([k for k, _ in pieces])
        counts = np.concatenate([c for _, c in pieces]).astype(np.int64)
        del pieces
        upper = lower
        if len(runs) > 1:  # merge the runs' sorted pieces (timsort finds them)
            order = np.argsort(keys, kind="stable")
            keys, counts = keys[order], counts[order]
            del order
        keys, counts = keys[::-1], counts[::-1]  # high to low from here on
        scores = keys >> _SHIFT
        last = np.flatnonzero(scores[1:] != scores[:-1])  # last row of each distinct score
        last = np.append(last, keys.size - 1)
        del scores
        area = keys & _LOW32
        del keys
        negative = area == 0
        # Running sums over the rows, read at each score's last row: the curves' points.
        in_fp = np.cumsum(np.where(negative, counts, 0))[last]
        in_tp = np.cumsum(np.where(negative, 0, counts))[last]
        defect_rows = np.flatnonzero(~negative)
        weight = counts[defect_rows] / area[defect_rows]
        in_w = np.r_[0.0, _running_sum(weight)][np.searchsorted(defect_rows, last, side="right")]
        del area, negative, counts, defect_rows, weight, last

        # ROC: trapezoid area x 2 n_pos n_neg = sum of neg x (tp before + tp after), in integers;
        # within the slab, sum neg x (2 in_tp - pos), plus neg x 2 tp for the tp above it.
        slab_neg, slab_pos = int(in_fp[-1]), int(in_tp[-1])
        neg = np.diff(in_fp, prepend=0)
        tp_sum = 2 * in_tp
        tp_sum -= np.diff(in_tp, prepend=0)
        if 2 * slab_neg * slab_pos < 2**62:
            within = int(np.dot(neg, tp_sum))
        else:  # beyond int64: only for billions of tied pixels in one slab
            within = float(np.dot(neg.astype(np.float64), tp_sum.astype(np.float64)))
        auroc_twice += 2 * tp * slab_neg + within
        del neg, tp_sum

        # The curves' points, made in place (a slab has up to `slab_rows` of them).
        fpr = in_fp.astype(np.float64)
        del in_fp
        fpr += fp
        fpr /= max(n_negative, 1)
        tpr = in_tp.astype(np.float64)
        del in_tp
        tpr += tp
        tpr /= max(n_positive, 1)
        pro = in_w
        pro += pro_weight
        tp, fp, pro_weight = tp + slab_pos, fp + slab_neg, float(pro[-1])
        if not pro_done:
            pro /= n_regions
            end = int(np.searchsorted(fpr, fpr_limit, side="right"))  # points up to the limit
            if end:
                pro_area += (fpr[0] - last_x) * (pro[0] + last_y) / 2
                step, height = np.diff(fpr[:end]), pro[1:end] + pro[: end - 1]
                height *= step
                pro_area += float(height.sum()) / 2
                del step, height
                last_x, last_y = float(fpr[end - 1]), float(pro[end - 1])
            if end < fpr.size:  # cut the curve exactly at fpr_limit, as linear interpolation
                cut = np.interp(fpr_limit, [last_x, fpr[end]], [last_y, pro[end]])
                pro_area += (fpr_limit - last_x) * (cut + last_y) / 2
                pro_done = True
        del pro

        # Thinned ROC curve: the first point in each step of fpr + tpr.
        bucket = fpr + tpr
        bucket *= buckets / 2
        np.floor(bucket, out=bucket)
        new = np.empty(bucket.size, dtype=bool)
        new[0] = bucket[0] != last_bucket
        np.not_equal(bucket[1:], bucket[:-1], out=new[1:])
        curve_x.append(fpr[new])
        curve_y.append(tpr[new])
        last_bucket = float(bucket[-1])
        last_point = (float(fpr[-1]), float(tpr[-1]))
        del bucket, new, fpr, tpr

    fpr_curve, tpr_curve = np.concatenate(curve_x), np.concatenate(curve_y)
    if (fpr_curve[-1], tpr_curve[-1]) != last_point:
        fpr_curve, tpr_curve = np.r_[fpr_curve, last_point[0]], np.r_[tpr_curve, last_point[1]]
    both = n_positive > 0 and n_negative > 0
    metrics = {
        "pixel_auroc": float(auroc_twice / (2 * n_positive * n_negative)) if both else float("nan"),
        "aupro": float(pro_area / fpr_limit) if n_regions and n_negative else float("nan"),
    }
    return metrics, (fpr_curve, tpr_curve)


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> float:
    """Pixel AUROC over all images (see `PixelMetrics`, which this streams through)."""
    with PixelMetrics() as pixels:
        for amap, mask in zip(maps, masks, strict=True):
            pixels.add(amap, mask)
        return pixels.result()["pixel_auroc"]


def aupro(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit`, divided by `fpr_limit`.

    Regions are 8-connected components of each ground-truth mask; FPR counts all defect-free
    pixels of all images (MVTec AD's definition). Streamed through `PixelMetrics`.
    """
    with PixelMetrics(fpr_limit=fpr_limit) as pixels:
        for amap, mask in zip(maps, masks, strict=True):
            pixels.add(amap, mask)
        return pixels.result()["aupro"]
