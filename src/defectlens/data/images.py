"""Decoding images and masks into one consistent form, safely.

Every image becomes RGB uint8 (H, W, 3), whatever it was on disk: 8- or 16-bit, grey, palette,
RGB or RGBA (alpha is composited on black, so a transparent background reads as dark, the same
for fit and score). Masks become boolean (H, W): any non-zero pixel (in any colour channel) is
defective.

Reading is hardened because the files come from the field, and one bad file must not stop a batch:

* Anything wrong with a file raises `DataError` with one line naming the file and the problem
  (missing, a folder, a named pipe or device, a broken or looping symbolic link, permission
  denied, empty, too large, corrupt). PIL raises a zoo of exception types for crafted files
  (OSError, SyntaxError, struct.error, IndexError, ZeroDivisionError, MemoryError, ...); all of
  them are caught per file. Named pipes and devices are refused from `os.stat` without being
  opened, because opening a named pipe blocks until someone writes to it.
* Pixel limit: a 69-byte PNG can claim 50000 x 50000 pixels, and a real 12000 x 12000 JPEG
  already costs tens of seconds and gigabytes. The size in the file's header is checked right
  after `Image.open`, before any pixel is decoded, against `get_max_pixels()`:
  `DEFAULT_MAX_PIXELS` (8192 x 8192), the environment variable `DEFECTLENS_MAX_PIXELS`, or
  `set_max_pixels(n)` (what the CLI's `--max-pixels N` sets). PIL's own decompression-bomb check
  (`Image.MAX_IMAGE_PIXELS`) is switched off when an image is read, so that this limit is the
  only binding one: PIL's check would otherwise refuse images below our limit, or emit a
  `DecompressionBombWarning` (not an error) for some above it; silencing that warning per call
  would need `warnings.catch_warnings`, which is not thread-safe, and images are decoded on a
  background thread. An application that also opens untrusted images with PIL directly should
  check their size itself. EPS files are never opened (PIL would run Ghostscript on them).
* EXIF orientation is applied (as image viewers do), so anomaly maps line up with what the
  operator sees. Only images that carry an orientation other than 1 are transposed (no copy
  otherwise).
* Multi-frame files (animated GIF, multi-page TIFF, APNG) use their first frame, with a
  `DataWarning`: the other pages are never looked at. JPEGs with an MPF preview (MPO) are not
  warned about: their first image is the photo itself.
* 16-bit data is scaled by the full 16-bit range (65535 -> 255), as image viewers do; a
  16-bit file whose brightest pixel is at most 4095 (10- or 12-bit camera data stored in 16 bits)
  reads as nearly black, so it gets a `DataWarning` (the result is not changed).
* A mask with more than half of its pixels non-zero gets a `DataWarning`: its background is
  probably 1 (or 255) instead of 0, which silently ruins pixel-level metrics.
* Float data: NaN reads as 0 (black), +-inf as the largest / smallest finite value; data that
  fits [0, 1] is taken as is, anything else is min-max scaled.
* Arrays (`as_rgb`) are read as files are: RGBA composited on black, integers other than uint8
  by the 16-bit range. An integer array of another type holding only 0..255, or a float array
  outside [0, 1], gets a `DataWarning`: it was probably meant as 8-bit data.

Warnings are issued with `warnings.warn(..., DataWarning)` after the file was decoded, naming the
file; `warnings.warn` is safe to call from a background thread.
"""

from __future__ import annotations

import errno
import io
import numbers
import os
import re
import stat
import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from defectlens.errors import DataError, DataWarning, ParameterError, PixelLimitError, option

IMAGE_SUFFIXES = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".pgm",
    ".ppm",
    ".gif",
)

DEFAULT_MAX_PIXELS = 8192 * 8192
"""Largest image (width x height, from the file's header) decoded by default."""

MAX_PIXELS_ENV = "DEFECTLENS_MAX_PIXELS"
"""Environment variable that overrides `DEFAULT_MAX_PIXELS` (a positive whole number)."""

_max_pixels: int | None = None  # set_max_pixels(); None = environment or default

# Formats PIL can identify that are never opened: EPS runs Ghostscript, an external interpreter,
# on the file's contents, which a crafted file named *.png must not be able to trigger.
_REFUSED_FORMATS = frozenset({"EPS"})

# A 16-bit file whose brightest pixel is at most this is probably 10- or 12-bit data.
_LOW_BIT_DEPTH_PEAK = 4095

_ORIENTATION = int(ExifTags.Base.Orientation)
_MESSAGE_LENGTH = 120


def get_max_pixels() -> int:
    """The current pixel limit: `set_max_pixels`, else `DEFECTLENS_MAX_PIXELS`, else the default.

    Raises `ParameterError` if the environment variable is set but is not a positive integer.
    """
    if _max_pixels is not None:
        return _max_pixels
    raw = os.environ.get(MAX_PIXELS_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw.strip())
    except ValueError:
        value = 0
    if value <= 0:
        raise ParameterError(
            f"{MAX_PIXELS_ENV}={raw!r} is not a positive whole number of pixels "
            f"(the default is {DEFAULT_MAX_PIXELS:,})"
        )
    return value


def set_max_pixels(n: int | None) -> None:
    """Set the pixel limit for this process; None goes back to `DEFECTLENS_MAX_PIXELS`/default."""
    global _max_pixels
    if n is None:
        _max_pixels = None
        return
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or int(n) <= 0:
        raise ParameterError(f"max_pixels must be a positive whole number, got {n!r}")
    _max_pixels = int(n)


_SET_MAX_PIXELS = "defectlens.data.images.set_max_pixels(N)"


def _check_pixels(path: Path, width: int, height: int, limit: int, hint: bool = True) -> None:
    """`hint`: say how to raise the process's limit (not for a limit the caller chose, such
    as the service's, which that setting does not change)."""
    pixels = int(width) * int(height)
    if pixels > limit:
        how = f" (raise it with {option('--max-pixels N', _SET_MAX_PIXELS)} or {MAX_PIXELS_ENV})"
        raise PixelLimitError(
            f"{path}: {width} x {height} = {pixels:,} pixels is over the limit of {limit:,}"
            + (how if hint else "")
        )


def _short(exc: BaseException) -> str:
    """The first line of an exception's message, shortened, for a one-line error."""
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else ""
    if not line:
        line = type(exc).__name__
    elif not isinstance(exc, (OSError, SyntaxError, ValueError)):
        line = f"{type(exc).__name__}: {line}"  # e.g. KeyError: 'x' rather than just 'x'
    if len(line) > _MESSAGE_LENGTH:
        line = line[: _MESSAGE_LENGTH - 3] + "..."
    return line


def _corrupt(path: Path, detail: str) -> DataError:
    return DataError(f"{path}: unreadable or corrupt image ({detail})")


def describe_os_error(path: Path, exc: OSError | ValueError) -> str:
    """What went wrong reaching `path`, in words (used for every file the tool touches)."""
    if isinstance(exc, ValueError):  # e.g. an embedded NUL character in the path
        return f"not a valid file name ({_short(exc)})"
    if isinstance(exc, FileNotFoundError):
        if os.path.islink(path):
            return "broken symbolic link (its target does not exist)"
        return "file not found"
    if isinstance(exc, NotADirectoryError):
        return "file not found (a part of the path is not a folder)"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if exc.errno == errno.ELOOP:
        return "symbolic link loop"
    return f"cannot be read ({exc.strerror or _short(exc)})"


def _open_regular_file(path: Path) -> IO[bytes]:
    """Open `path` for reading after checking, without blocking, that it is a non-empty file."""
    try:
        info = os.stat(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: {describe_os_error(path, exc)}") from None
    _check_regular(path, info)
    # O_NONBLOCK: if the file was swapped for a named pipe since the stat, opening it still
    # returns at once, and the fstat below refuses it.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: {describe_os_error(path, exc)}") from None
    try:
        _check_regular(path, os.fstat(fd))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def describe_special_file(mode: int) -> str:
    """Why a path that is neither a folder nor a regular file cannot be read as an image."""
    if stat.S_ISFIFO(mode):
        kind = "a named pipe"
    elif stat.S_ISSOCK(mode):
        kind = "a socket"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = "a device"
    else:
        kind = "a special file"
    return f"not a regular file ({kind})"


def _check_regular(path: Path, info: os.stat_result) -> None:
    mode = info.st_mode
    if stat.S_ISDIR(mode):
        raise DataError(f"{path}: is a folder, not an image")
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: {describe_special_file(mode)}")
    if info.st_size == 0:
        raise DataError(f"{path}: empty file")


_formats_cache: tuple[int, list[str]] = (-1, [])


def _formats() -> list[str]:
    """Every format PIL can open except the refused ones (recomputed if plugins are added)."""
    global _formats_cache
    Image.init()
    known, formats = _formats_cache
    if known != len(Image.ID):
        formats = [name for name in Image.ID if name not in _REFUSED_FORMATS]
        _formats_cache = (len(Image.ID), formats)
    return formats


def _rawmode(image: Image.Image) -> str:
    """How the first tile is stored on disk (e.g. 'RGB;16B'); '' when unknown."""
    try:
        args = image.tile[0][3]
    except (AttributeError, IndexError, TypeError):
        return ""
    if isinstance(args, tuple):
        args = args[0] if args else ""
    return args if isinstance(args, str) else ""


class _Decoded:
    """A loaded, upright first frame, plus what the readers need to know about the file."""

    __slots__ = ("image", "notes", "sixteen_bit")

    def __init__(self, image: Image.Image, notes: list[str], sixteen_bit: bool) -> None:
        self.image = image
        self.notes = notes
        self.sixteen_bit = sixteen_bit


def probe_image(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file's header, with every check `read_image` makes before it
    decodes pixels (a regular non-empty file, a format we read, under the pixel limit). Costs
    a header read: a long fit checks all its images this way before spending any time."""
    path = Path(path)
    if Image.MAX_IMAGE_PIXELS is not None:
        Image.MAX_IMAGE_PIXELS = None
    limit = get_max_pixels()
    with _open_regular_file(path) as handle:
        try:
            image = Image.open(handle, formats=_formats())
            width, height = image.size
        except UnidentifiedImageError:
            raise _corrupt(path, "not in an image format that can be read") from None
        except Exception as exc:
            raise _corrupt(path, _short(exc)) from None
    if width <= 0 or height <= 0:
        raise DataError(f"{path}: image has zero size")
    _check_pixels(path, width, height, limit)
    return int(height), int(width)


def _open(path: Path) -> _Decoded:
    """Open, size-check, load and orient the first frame; every failure is a DataError."""
    # PIL's limit must never be the binding one (see the module docstring).
    if Image.MAX_IMAGE_PIXELS is not None:
        Image.MAX_IMAGE_PIXELS = None
    limit = get_max_pixels()  # before the try: a bad DEFECTLENS_MAX_PIXELS is a ParameterError
    with _open_regular_file(path) as handle:
        return _decode(handle, path, limit)


def _decode(handle: IO[bytes], path: Path | str, limit: int, hint: bool = True) -> _Decoded:
    """The first frame of an open file (named `path` in messages), loaded and upright."""
    notes: list[str] = []
    try:
        image = Image.open(handle, formats=_formats())
        width, height = image.size
        if width <= 0 or height <= 0:
            raise DataError(f"{path}: image has zero size")
        _check_pixels(path, width, height, limit, hint)
        n_frames = getattr(image, "n_frames", 1)
        if isinstance(n_frames, int) and n_frames > 1 and image.format != "MPO":
            notes.append(f"{path}: has {n_frames} frames/pages; only the first is used")
            if image.tell() != 0:
                image.seek(0)
        rawmode = _rawmode(image)
        sixteen_bit = image.mode.startswith("I;16") or (
            image.format in ("PNG", "TIFF") and ";16" in rawmode
        )
        image.load()
        width, height = image.size  # GIF and TIFF can change size while loading
        if width <= 0 or height <= 0:
            raise DataError(f"{path}: image has zero size")
        _check_pixels(path, width, height, limit, hint)
        try:  # a broken EXIF block is ignored, as viewers do, rather than refusing the image
            orientation = image.getexif().get(_ORIENTATION, 1)
        except Exception:
            orientation = 1
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            image = ImageOps.exif_transpose(image)
    except DataError:
        raise
    except Image.DecompressionBombError as exc:  # only if PIL's limit was set back on
        raise DataError(
            f"{path}: over the pixel limit of PIL's decompression-bomb check ({_short(exc)})"
        ) from None
    except UnidentifiedImageError:
        raise _corrupt(path, "not in an image format that can be read") from None
    except Exception as exc:
        raise _corrupt(path, _short(exc)) from None
    return _Decoded(image, notes, sixteen_bit)


def _bits_guess(peak: int) -> int:
    return 8 if peak <= 255 else 10 if peak <= 1023 else 12


def _low_bit_depth_note(path: Path, peak: int, *, at_most: bool, depth: str = "16-bit") -> str:
    bound = "at most " if at_most else ""
    return (
        f"{path}: {depth} image whose brightest pixel is {bound}{peak} of 65535 "
        f"({_bits_guess(peak)}-bit data?): it is scaled by the full 16-bit range, as documented, "
        "and reads as dark"
    )


def _int_to_uint8(array: np.ndarray, peak: int) -> np.ndarray:
    """16-bit (and 32-bit 'I' mode) data: use the 16-bit range, as image viewers do.

    Data brighter than 65535 uses its type's full range; negative values read as 0.
    """
    top = 65535 if peak <= 65535 else np.iinfo(array.dtype).max
    scaled = array.astype(np.float64) * (255.0 / top) + 0.5
    if array.dtype.kind == "i" and array.min(initial=0) < 0:
        np.clip(scaled, 0.0, 255.0, out=scaled)
    return scaled.astype(np.uint8)


def _float_to_uint8(array: np.ndarray, say_range: bool = False) -> np.ndarray:
    """Float data: [0, 1] if it fits, else min-max; NaN reads as 0, +-inf as the finite extremes.
    `say_range`: warn when it does not fit (see `as_rgb`)."""
    with np.errstate(all="ignore"):
        data = array.astype(np.float64)  # a copy: changed in place below
        finite = np.isfinite(data)
        if finite.all():
            lo, hi = float(data.min()), float(data.max())
        else:
            if say_range:  # a caller's array: a NaN image would score like a black part
                bad = int(data.size - np.count_nonzero(finite))
                warnings.warn(
                    f"an image array holds {bad:,} NaN or infinite value(s) of {data.size:,}: "
                    "NaN reads as black and +-inf as the finite extremes, so its score is not "
                    "the part's",
                    DataWarning,
                    stacklevel=4,
                )
            if finite.any():
                lo, hi = float(data[finite].min()), float(data[finite].max())
            else:
                lo = hi = 0.0
            np.clip(data, lo, hi, out=data)  # NaN stays NaN, +-inf -> hi / lo
        del finite
        if lo < 0.0 or hi > 1.0:
            if say_range:
                warnings.warn(
                    f"an image array of dtype {array.dtype} has values outside [0, 1]: float "
                    "arrays are read as [0, 1], and one outside it is stretched from its own "
                    "minimum to maximum (each image differently); divide 8-bit data by 255",
                    DataWarning,
                    stacklevel=4,
                )
            span = hi - lo
            if not np.isfinite(span):  # e.g. -1e308 .. 1e308: halve everything first
                data *= 0.5
                lo *= 0.5
                span = hi * 0.5 - lo
            data -= lo
            data /= max(span, 1e-12)
        np.nan_to_num(data, copy=False, nan=0.0)
        data *= 255.0
        data += 0.5
        np.clip(data, 0.0, 255.0, out=data)
        return data.astype(np.uint8)


def _to_uint8(array: np.ndarray, say_range: bool = False) -> np.ndarray:
    """Scale integer or float pixel data to uint8 without clipping bright 16-bit images.

    `say_range` (arrays given by a caller): warn when the value range says the data was meant
    otherwise than it is read -- integers other than uint8 holding only 0..255 read as nearly
    black by the 16-bit rule, floats outside [0, 1] are stretched per image. Neither reading is
    changed, so an array and its file still agree."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        peak = int(array.max(initial=0))
        if say_range and int(array.min(initial=0)) < 0:  # before the range note: it says 0..
            warnings.warn(
                f"an image array of dtype {array.dtype} holds negative values (down to "
                f"{int(array.min())}): pixels have none, and they read as black; pass the "
                "pixel values (uint8, or uint16 for 16-bit data)",
                DataWarning,
                stacklevel=3,
            )
        elif say_range and 0 < peak <= 255:
            warnings.warn(
                f"an image array of dtype {array.dtype} holds values of 0..255: integer arrays "
                "other than uint8 are read as 16-bit data (65535 = white), so it reads as "
                "nearly black; pass it as uint8",
                DataWarning,
                stacklevel=3,
            )
        return _int_to_uint8(array, peak)
    return _float_to_uint8(array, say_range)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Accept arrays the way files are accepted: grey (H, W), (H, W, 1|3|4), uint8/uint16/float.

    Booleans, any integer type and any real float type are accepted; anything else (complex,
    object, strings, dates), and arrays that are not 2-D or 3-D or are empty, raise DataError.
    """
    try:
        array = np.asarray(image)
    except Exception as exc:
        raise DataError(f"input is not an array of pixels ({_short(exc)})") from None
    if array.dtype.kind not in "biuf":
        raise DataError(f"array of dtype {array.dtype} is not an image (need bool, int or float)")
    alpha = None
    if array.ndim == 3 and array.shape[2] == 4:
        array, alpha = array[..., :3], array[..., 3]
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3) or 0 in array.shape:
        raise DataError(f"array of shape {array.shape} is not an image (H, W) or (H, W, 3)")
    array = _to_uint8(array, say_range=True)
    if alpha is not None:  # composited on black, as an RGBA file is (PIL's rounding)
        weight = _to_uint8(alpha).astype(np.uint32)[..., None]
        array = ((array.astype(np.uint32) * weight + 127) // 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return array


def _pixels_to_rgb(path: Path, decoded: _Decoded) -> np.ndarray:
    image = decoded.image
    mode = image.mode
    if decoded.sixteen_bit and mode in ("RGB", "RGBA"):
        # PIL keeps the high byte of 16-bit colour: a high byte of at most 15 means <= 4095.
        high = max(band_max for _, band_max in image.getextrema()[:3])
        if 0 < high <= _LOW_BIT_DEPTH_PEAK >> 8:
            decoded.notes.append(_low_bit_depth_note(path, high * 256 + 255, at_most=True))
    if mode == "RGB":
        rgb = np.asarray(image)  # already RGB: no convert() copy
    elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        rgb = np.asarray(Image.alpha_composite(black, rgba).convert("RGB"))
    elif mode in ("L", "P", "CMYK", "YCbCr", "1"):
        rgb = np.asarray(image.convert("RGB"))
    else:
        # 16-bit and float modes ('I;16', 'I', 'F'): scale to 8 bit, then replicate to RGB.
        values = np.asarray(image)
        if values.dtype.kind in "iu":
            peak = int(values.max(initial=0))
            if 0 < peak <= _LOW_BIT_DEPTH_PEAK and values.dtype.itemsize >= 2:
                depth = "16-bit" if decoded.sixteen_bit else f"{8 * values.dtype.itemsize}-bit"
                decoded.notes.append(_low_bit_depth_note(path, peak, at_most=False, depth=depth))
            grey = _int_to_uint8(values, peak)
        else:
            grey = _to_uint8(values)
        if grey.ndim == 3:
            grey = grey[..., :3] if grey.shape[2] >= 3 else grey[..., :1]
        if grey.ndim == 2:
            grey = grey[..., None]
        return np.ascontiguousarray(np.broadcast_to(grey, (*grey.shape[:2], 3)))
    return rgb


def read_image_bytes(
    data: bytes, name: str, max_pixels: int | None = None
) -> tuple[np.ndarray, list[str]]:
    """An image received in memory (an upload), decoded exactly as `read_image` decodes a
    file: RGB uint8 (H, W, 3), and the warnings `read_image` would issue, as text. `name`
    only labels messages. The size in the header is checked against `max_pixels` (default
    `get_max_pixels()`) before any pixel is decoded."""
    if Image.MAX_IMAGE_PIXELS is not None:
        Image.MAX_IMAGE_PIXELS = None
    limit = get_max_pixels() if max_pixels is None else max_pixels
    if not data:
        raise DataError(f"{name}: empty (0 bytes)")
    decoded = _decode(io.BytesIO(data), name, limit, hint=max_pixels is None)
    try:
        rgb = _pixels_to_rgb(Path(name), decoded)
    except DataError:
        raise
    except Exception as exc:
        raise _corrupt(Path(name), _short(exc)) from None
    return rgb, decoded.notes


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(name: object) -> bool:
    """Whether `name` is a URL (`s3://bucket/a.png`, `file:///data/a.png`) rather than a path:
    such names are read through fsspec (on Dask workers, where the images are)."""
    return isinstance(name, str) and _URL.match(name) is not None


def missing_url_package(url: str, exc: ImportError) -> str:
    """Why `url` cannot be read here: its protocol's package (s3fs, aiohttp...) is missing."""
    scheme = url.split("://", 1)[0]
    detail = (str(exc).strip().splitlines() or [""])[0][:160]
    return f"reading {scheme}:// URLs needs a package that is not installed here ({detail})"


def read_url(url: str) -> bytes:
    """The bytes at an fsspec URL; every failure is a one-line DataError naming the URL
    (a missing protocol package, such as s3fs for s3://, included)."""
    try:
        import fsspec
    except ImportError:
        raise DataError(
            f"{url}: reading URLs needs fsspec (pip install 'defectlens[dask]')"
        ) from None
    try:
        with fsspec.open(url, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise DataError(f"{url}: no such file") from None
    except ImportError as exc:  # fsspec's "Install s3fs to access S3"
        raise DataError(f"{url}: {missing_url_package(url, exc)}") from None
    except Exception as exc:  # network, credentials and protocol errors of any fsspec backend
        raise DataError(f"{url}: cannot be read ({_short(exc)})") from None


def read_image(path: str | Path) -> np.ndarray:
    """Read any supported image as RGB uint8 of shape (H, W, 3), upright as viewers show it.

    Raises DataError (one line naming the file) for anything unreadable or over the pixel limit;
    issues a DataWarning for multi-frame files and for 10/12-bit data stored in 16 bits. A URL
    (`is_url`) is read through fsspec and decoded the same way.
    """
    if is_url(path):
        rgb, notes = read_image_bytes(read_url(path), path)
        for note in notes:
            warnings.warn(note, DataWarning, stacklevel=2)
        return rgb
    path = Path(path)
    decoded = _open(path)
    try:
        rgb = _pixels_to_rgb(path, decoded)
    except DataError:
        raise
    except Exception as exc:
        raise _corrupt(path, _short(exc)) from None
    for note in decoded.notes:
        warnings.warn(note, DataWarning, stacklevel=2)
    return rgb


def _mask_values(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("1", "L", "I", "F") or mode.startswith("I;16"):
        return np.asarray(image)
    if mode in ("LA", "La"):
        return np.asarray(image.getchannel(0))
    # Colour or palette: a pixel is non-zero if any colour channel is (alpha is ignored).
    return np.asarray(image.convert("RGB")).max(axis=2)


def read_mask(path: str | Path, expected_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as bool (H, W); check it matches its image's (H, W).

    Any non-zero pixel is defective. A mask that marks more than half of the image gets a
    DataWarning (its background is probably 1 instead of 0).
    """
    path = Path(path)
    decoded = _open(path)
    try:
        mask = _mask_values(decoded.image) > 0
    except Exception as exc:
        raise _corrupt(path, _short(exc)) from None
    if expected_shape is not None and mask.shape != tuple(expected_shape):
        raise DataError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
            f"{expected_shape[1]}x{expected_shape[0]} (width x height)"
        )
    for note in decoded.notes:
        warnings.warn(note, DataWarning, stacklevel=2)
    marked = int(np.count_nonzero(mask))
    if 2 * marked > mask.size:
        warnings.warn(
            f"{path}: mask marks {100.0 * marked / mask.size:.1f} % of the image as defective; "
            "any non-zero pixel counts as defective — is its background 1 instead of 0?",
            DataWarning,
            stacklevel=2,
        )
    return mask
