"""Decoding images and masks into one consistent form.

Every image becomes RGB uint8 (H, W, 3), whatever it was on disk: 8- or 16-bit, grey, palette,
RGB or RGBA (alpha is composited on black, so a transparent background reads as dark, the same
for fit and score). Masks become boolean (H, W): any non-zero pixel is defective.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from defectlens.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


def _open(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable or corrupt image ({exc})") from None
    if image.width == 0 or image.height == 0:
        raise DataError(f"{path}: image has zero size")
    return image


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale integer or float pixel data to uint8 without clipping bright 16-bit images."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        # 16-bit (and 32-bit 'I' mode) data: use the type's full range, as image viewers do.
        top = 65535 if array.max(initial=0) <= 65535 else np.iinfo(array.dtype).max
        return (array.astype(np.float64) * (255.0 / top) + 0.5).astype(np.uint8)
    # Float images ('F' mode): assume [0, 1] when they fit, else min-max.
    array = array.astype(np.float64)
    lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
    if lo < 0.0 or hi > 1.0:
        array = (array - lo) / max(hi - lo, 1e-12)
    return (np.nan_to_num(array) * 255.0 + 0.5).astype(np.uint8)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Accept arrays the way files are accepted: grey (H, W), (H, W, 1|3|4), uint8/uint16/float."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[..., :3]
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3) or 0 in array.shape:
        raise DataError(f"array of shape {array.shape} is not an image (H, W) or (H, W, 3)")
    array = _to_uint8(array)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return array


def read_image(path: str | Path) -> np.ndarray:
    """Read any supported image as RGB uint8 of shape (H, W, 3)."""
    path = Path(path)
    image = _open(path)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.asarray(Image.alpha_composite(black, rgba).convert("RGB"))
    if image.mode in ("RGB", "L", "P", "CMYK", "YCbCr", "1"):
        return np.asarray(image.convert("RGB"))
    # 16-bit and float modes ('I;16', 'I', 'F'): scale to 8 bit, then replicate to RGB.
    grey = _to_uint8(np.asarray(image))
    if grey.ndim == 3:
        grey = grey[..., :3] if grey.shape[2] >= 3 else grey[..., :1]
    if grey.ndim == 2:
        grey = grey[..., None]
    return np.ascontiguousarray(np.broadcast_to(grey, (*grey.shape[:2], 3)))


def read_mask(path: str | Path, expected_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as bool (H, W); check it matches its image's (H, W)."""
    path = Path(path)
    image = _open(path)
    array = np.asarray(image.convert("L") if image.mode not in ("I;16", "I", "F") else image)
    mask = array > 0
    if expected_shape is not None and mask.shape != tuple(expected_shape):
        raise DataError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
            f"{expected_shape[1]}x{expected_shape[0]} (width x height)"
        )
    return mask
