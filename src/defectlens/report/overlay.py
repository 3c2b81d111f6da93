"""Heat-map overlays on a fixed, model-wide scale.

Maps are divided by twice the pixel threshold before colouring, so the threshold always sits at
the middle of the colour scale and colours mean the same thing on every image of a model.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from scipy import ndimage


def heat_rgb(amap: np.ndarray, threshold: float) -> np.ndarray:
    scale = 2.0 * threshold if threshold > 0 else float(amap.max()) or 1.0
    values = np.clip(amap / scale, 0.0, 1.0)
    return (colormaps["jet"](values)[..., :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, amap: np.ndarray, threshold: float, alpha: float = 0.45):
    heat = heat_rgb(amap, threshold).astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + heat * alpha).astype(np.uint8)


def draw_outline(image: np.ndarray, mask: np.ndarray, color=(255, 0, 0)) -> np.ndarray:
    """Draw the boundary of a boolean mask onto a copy of an RGB image."""
    out = image.copy()
    if mask.any():
        edge = mask & ~ndimage.binary_erosion(mask, iterations=max(1, min(mask.shape) // 200))
        out[edge] = color
    return out


def panel(
    image: np.ndarray,
    amap: np.ndarray,
    mask: np.ndarray,
    threshold: float,
    truth: np.ndarray | None = None,
) -> np.ndarray:
    """Image | heat-map overlay | image with predicted (red) and true (green) outlines."""
    marked = draw_outline(image, mask, (255, 0, 0))
    if truth is not None:
        marked = draw_outline(marked, truth, (0, 255, 0))
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    return np.hstack([image, gap, overlay(image, amap, threshold), gap, marked])
