"""Multi-stride feature maps -> one embedding per position, laid out position-major, in numpy.

Per-position statistics (PaDiM's Gaussians) and per-position searches (SPADE's pyramids) read
(P, C, B) arrays: positions as the batch of small matrix products. Each map is transposed to
(h, w, C, B) at its own resolution (one cache-friendly pass) and replicated into the finest grid
by a broadcast copy; gathering the batch axis innermost straight from (B, C, h, w) strides across
the whole array and took 1.6x as long. This runs after the graphs in exported models too (an
ONNX Runtime graph doing the same upsample/concat/transpose took 0.46 s of a 0.82 s batch), so
the method and its export lay features out with the same code.

Maps whose sizes do not divide the finest one's, or pyramids upsampled bilinearly, are first
made into one concatenated map by `components.pyramid.align_pyramid` (torch, inside the graph).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def is_nested(shapes: Sequence[tuple[int, int]]) -> bool:
    """Whether every (h, w) divides the first (finest) one, so nearest upsampling is a
    replication by whole factors."""
    h, w = shapes[0]
    return all(fh > 0 and fw > 0 and h % fh == 0 and w % fw == 0 for fh, fw in shapes)


def position_major(maps: Sequence[np.ndarray], channels: np.ndarray | None = None) -> np.ndarray:
    """Maps (B, C_i, h_i, w_i), the first the finest and every size dividing it -> float32
    (P = h*w, C, B), P in row-major order of the finest map: each map replicated to the finest
    grid (nearest) and the channels concatenated. `channels` (increasing indices into the
    concatenated channels) keeps a subset."""
    b, _, h, w = maps[0].shape
    if not is_nested([m.shape[2:] for m in maps]) or any(m.shape[0] != b for m in maps):
        raise ValueError("feature maps must share the batch and divide the finest map's size")
    offsets = np.cumsum([0] + [m.shape[1] for m in maps])
    keep = []
    for i, m in enumerate(maps):
        if channels is None:
            keep.append(None)
            continue
        own = channels[(channels >= offsets[i]) & (channels < offsets[i + 1])] - offsets[i]
        keep.append(None if own.size == m.shape[1] else own)
    total = sum(m.shape[1] if k is None else k.size for m, k in zip(maps, keep, strict=True))
    if channels is not None and total != channels.size:
        raise ValueError("channel indices exceed the feature maps' channels")
    out = np.empty((h, w, total, b), np.float32)
    start = 0
    for m, k in zip(maps, keep, strict=True):
        c, fh, fw = (m.shape[1] if k is None else k.size), m.shape[2], m.shape[3]
        source = m.transpose(2, 3, 1, 0)  # (fh, fw, C, B) view
        source = np.ascontiguousarray(source if k is None else np.take(source, k, axis=2))
        view = out.reshape(fh, h // fh, fw, w // fw, total, b)
        view[..., start : start + c, :] = source[:, None, :, None]
        start += c
    return out.reshape(h * w, total, b)
