"""Heat-map overlays on a fixed, model-wide scale, at bounded cost for huge images.

Maps are divided by twice the pixel threshold before colouring, so the threshold always sits at
the middle of the colour scale and colours mean the same thing on every image of a model.

Colouring goes through a 256-entry lookup table and blending through integer maths, a band of
rows at a time: a few bytes per pixel beyond the image itself, where a float colour map costs 32
(a 12000 x 12000 photo needed 11 GB that way). The defect outline is computed inside the mask's
bounding box only, with a separable minimum filter whose cost does not grow with its width.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage

_LUT = (colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255 + 0.5).astype(np.uint8)
_BAND = 512  # rows blended at a time
_ALPHA = 115  # heat-map weight out of 256 (0.45)


def _scale(amap: np.ndarray, threshold: float) -> float:
    if threshold > 0 and np.isfinite(threshold):
        return 2.0 * threshold
    top = float(np.nanmax(amap)) if amap.size else 0.0
    return top if top > 0 and np.isfinite(top) else 1.0


def _levels(amap: np.ndarray, scale: float) -> np.ndarray:
    values = np.nan_to_num(amap.astype(np.float32, copy=False), nan=0.0, posinf=scale, neginf=0.0)
    return (np.clip(values * (255.0 / scale), 0.0, 255.0) + 0.5).astype(np.uint8)


def heat_rgb(amap: np.ndarray, threshold: float) -> np.ndarray:
    return _LUT[_levels(amap, _scale(amap, threshold))]


def overlay(image: np.ndarray, amap: np.ndarray, threshold: float) -> np.ndarray:
    """The image with the heat map blended in (45 %), computed in bands of rows."""
    scale = _scale(amap, threshold)
    out = np.empty_like(image)
    for top in range(0, image.shape[0], _BAND):
        rows = slice(top, top + _BAND)
        heat = _LUT[_levels(amap[rows], scale)].astype(np.uint16)
        blended = image[rows].astype(np.uint16) * (256 - _ALPHA) + heat * _ALPHA
        out[rows] = (blended >> 8).astype(np.uint8)
    return out


def draw_outline(image: np.ndarray, mask: np.ndarray, color=(255, 0, 0)) -> np.ndarray:
    """Draw the boundary of a boolean mask onto a copy of an RGB image.

    The line is about 1/200 of the image's shorter side wide, so it stays visible on large ones.
    """
    out = image.copy()
    if not mask.any():
        return out
    width = max(1, min(mask.shape) // 200)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = (
        slice(max(rows[0] - width, 0), rows[-1] + width + 1),
        slice(max(cols[0] - width, 0), cols[-1] + width + 1),
    )
    region = mask[box]
    # Outside the image counts as background, so a defect at the border is outlined there too.
    inner = ndimage.minimum_filter(region.view(np.uint8), size=2 * width + 1, mode="constant")
    edge = region & ~inner.astype(bool)
    out[box][edge] = color
    return out


def outlined_overlay(
    image: np.ndarray, amap: np.ndarray, mask: np.ndarray, threshold: float
) -> np.ndarray:
    """The heat-map overlay with the predicted defects outlined: what `predict` writes and
    the service returns."""
    return draw_outline(overlay(image, amap, threshold), mask)


def result_pngs(
    image: np.ndarray | None,
    amap: np.ndarray | None,
    mask: np.ndarray | None,
    threshold: float,
    wanted: tuple[str, ...] = ("overlay", "mask"),
    compress_level: int = 6,
) -> dict[str, bytes]:
    """A scored image's pictures as PNG bytes, by kind: "overlay" (outlined heat map over the
    image), "map" (the heat map alone) and "mask" (defects white). What `predict` writes, the
    service returns and Dask workers send back, so all three draw the same pictures. A model
    without maps (`amap` None) has none; `image` is needed for the overlay only."""
    if amap is None or mask is None:
        return {}
    out = {}
    for kind in wanted:
        if kind == "overlay":
            picture = outlined_overlay(image, amap, mask, threshold)
        elif kind == "map":
            picture = heat_rgb(amap, threshold)
        elif kind == "mask":
            picture = mask.astype(np.uint8) * 255
        else:
            raise ValueError(f"unknown picture kind {kind!r}")
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="PNG", compress_level=compress_level)
        out[kind] = buffer.getvalue()
    return out


def panel(
    image: np.ndarray,
    amap: np.ndarray | None,
    mask: np.ndarray | None,
    threshold: float,
    truth: np.ndarray | None = None,
) -> np.ndarray:
    """Image | heat-map overlay | image with predicted (red) and true (green) outlines; for a
    model without maps (`amap` None): image | image with the true outline."""
    marked = image if mask is None else draw_outline(image, mask, (255, 0, 0))
    if truth is not None:
        marked = draw_outline(marked, truth, (0, 255, 0))
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    if amap is None:
        return np.hstack([image, gap, marked])
    return np.hstack([image, gap, overlay(image, amap, threshold), gap, marked])
