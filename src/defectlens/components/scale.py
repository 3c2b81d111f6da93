"""Antialiased bilinear downscaling as two matrix products (torch): DifferNet's scales, and the
input size of the networks trained on pixels.

The same numbers as `F.interpolate(..., mode="bilinear", antialias=True)` (tests compare them),
but made of MatMul only, so an exported graph computes it identically on every engine:
OpenVINO 2026.4's antialiased Resize differs from torch's and onnxruntime's by up to 0.4 on
[0, 1] images, which moved DifferNet's scores by 8 %. The weights are computed in numpy (a
constant of the graph when exported, never a traced tensor that a cache could keep).
"""

from __future__ import annotations

import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=16)
def axis_weights(size: int, scale: float) -> np.ndarray:
    """(floor(size * scale), size) float32: row i holds the weights of output sample i along one
    axis. A triangle filter stretched by 1/scale, centred on the output sample's position in
    input coordinates, truncated at the borders and renormalised (torch's antialiased bilinear
    for downscaling; its coordinate mapping uses `scale` itself, not the rounded size ratio)."""
    out = int(size * scale)
    support = 1.0 / scale  # the triangle's half-width in input samples
    weights = np.zeros((out, size), np.float64)
    for i in range(out):  # one row per output sample: O(out), not per pixel
        centre = (i + 0.5) / scale
        first = max(int(centre - support + 0.5), 0)
        last = min(int(centre + support + 0.5), size)
        taps = np.arange(first, last)
        w = np.maximum(1.0 - np.abs((taps - centre + 0.5) * scale), 0.0)
        weights[i, first:last] = w / w.sum()
    return weights.astype(np.float32)  # cached and shared: never written to


def downscale(images: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, floor(H * scale), floor(W * scale)), antialiased bilinear, as
    `F.interpolate(images, scale_factor=scale, mode="bilinear", antialias=True)`."""
    h, w = images.shape[-2:]
    rows = torch.from_numpy(axis_weights(h, scale)).to(images)
    cols = torch.from_numpy(axis_weights(w, scale)).to(images)
    return rows @ images @ cols.T


def resize_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square images (B, C, S, S) -> (B, C, size, size) with size <= S, as `downscale`; the
    images themselves when size == S."""
    side = images.shape[-1]
    if size == side:
        return images
    if size > side:
        raise ValueError(f"cannot downscale {side} px images to {size} px")
    scale = size / side
    if int(side * scale) != size:  # float rounding just below the size
        scale = (size + 1e-6) / side
    return downscale(images, scale)
