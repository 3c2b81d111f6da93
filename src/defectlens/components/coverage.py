"""From patch scores to a pixel map: each pixel gets the mean score of the patches that cover
it (Patch SVDD's rule), computed on the grid of `stride` x `stride` cells the patches are laid
on, with box sums instead of a loop over patches. numpy only, so the torch-free runtime uses the
same function as the fitted model."""

from __future__ import annotations

import numpy as np


def cover_mean(scores: np.ndarray, span: int) -> np.ndarray:
    """Patch scores (B, h, w) on a grid of pitch s, each patch `span` = K / s cells wide ->
    per-cell mean over the covering patches (B, h + span - 1, w + span - 1)."""
    b, h, w = scores.shape
    padded = np.zeros((b, h + 2 * (span - 1), w + 2 * (span - 1)), np.float64)
    padded[:, span - 1 : span - 1 + h, span - 1 : span - 1 + w] = scores
    ones = np.zeros(padded.shape[1:], np.float64)
    ones[span - 1 : span - 1 + h, span - 1 : span - 1 + w] = 1.0
    return (_box_sums(padded, span) / _box_sums(ones[None], span)).astype(np.float32)


def _box_sums(x: np.ndarray, span: int) -> np.ndarray:
    """Sums over every span x span window of the last two axes (valid windows only)."""
    c = np.cumsum(np.cumsum(x, axis=-1), axis=-2)
    c = np.pad(c, [(0, 0)] * (c.ndim - 2) + [(1, 0), (1, 0)])
    return (
        c[..., span:, span:]
        - c[..., :-span, span:]
        - c[..., span:, :-span]
        + c[..., :-span, :-span]
    )


def upsample_cells(maps: np.ndarray, factor: int) -> np.ndarray:
    """Each cell of (B, h, w) repeated factor x factor times: a piecewise-constant map on a
    finer grid of cells (exact, no interpolation)."""
    return np.repeat(np.repeat(maps, factor, axis=1), factor, axis=2)


def coverage_product(
    scores: list[np.ndarray], patch_sizes: list[int], strides: list[int]
) -> np.ndarray:
    """Patch scores at several scales (each (B, h_i, w_i), patches of `patch_sizes[i]` px
    laid `strides[i]` px apart, every stride a multiple of the first) -> the product of each
    scale's coverage mean, on the first scale's cells (Patch SVDD's multi-scale map)."""
    result = None
    for s, size, stride in zip(scores, patch_sizes, strides, strict=True):
        if size % stride or stride % strides[0]:
            raise ValueError(f"patches of {size} px at {stride} px do not tile the first grid")
        cells = upsample_cells(cover_mean(s, size // stride), stride // strides[0])
        result = cells if result is None else result * cells
    return result.astype(np.float32)
