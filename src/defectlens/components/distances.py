"""Mahalanobis distances with block-row inverse-Cholesky factors, in numpy (no torch).

PaDiM's scoring step, shared by the method (its tensors are passed as zero-copy numpy views)
and by exported models (`runtime.finish`), so both compute the same numbers the same way.
numpy's stacked matmul runs one BLAS product per position: as fast as torch's bmm here (145 vs
131 ms for 4096 positions x 176 channels x 32 images) and 4x faster than onnxruntime's batched
MatMul on the same shapes, which is why this step is not in the exported graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def block_row_shapes(size: int, block: int) -> list[tuple[int, int, int]]:
    """(first row, rows, columns) of each block row of lower-triangular (size x size) matrices
    cut into `block`-row slices; `columns` = last row + 1 (nothing right of the diagonal)."""
    return [(s, min(s + block, size) - s, min(s + block, size)) for s in range(0, size, block)]


def block_row_views(flat: np.ndarray, positions: int, size: int, block: int) -> list[np.ndarray]:
    """Views (positions, rows, columns) of each block row stored one after the other in `flat`."""
    views, offset = [], 0
    for _, rows, cols in block_row_shapes(size, block):
        n = positions * rows * cols
        views.append(flat[offset : offset + n].reshape(positions, rows, cols))
        offset += n
    if offset != flat.size:
        raise ValueError("block rows do not match the positions and size")
    return views


def block_mahalanobis(
    rows: Sequence[np.ndarray],
    projected_mean: np.ndarray,
    features: np.ndarray,
    chunk: int = 512,
) -> np.ndarray:
    """Distances (B, P) of embeddings (P, C, B): |W x - W m| per position, W given as block
    rows (P, rows, columns) and W m as `projected_mean` (P, C, 1). Chunked over positions so
    the temporaries stay in cache."""
    p, _, b = features.shape
    out = np.empty((p, b), features.dtype)
    for start in range(0, p, chunk):
        sl = slice(start, start + chunk)
        x = features[sl]
        projected = np.concatenate([np.matmul(r[sl], x[:, : r.shape[2]]) for r in rows], axis=1)
        projected -= projected_mean[sl]
        out[sl] = np.einsum("pcb,pcb->pb", projected, projected)
    return np.sqrt(np.maximum(out, 0.0)).T
