"""Robustness of image and mask decoding: crafted files, limits, EXIF, frames, odd pixel data."""

from __future__ import annotations

import io
import os
import resource
import struct
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from defectlens.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    as_rgb,
    get_max_pixels,
    read_image,
    read_mask,
    set_max_pixels,
)
from defectlens.errors import DataError, DataWarning, ParameterError

MODES = ("L", "RGB", "RGBA", "LA", "P", "I;16", "I", "F", "1")
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "GIF": ".gif", "BMP": ".bmp"}
FORMATS_MORE = {**FORMATS, "WEBP": ".webp", "PPM": ".ppm"}
BYTES_PER_PIXEL = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2, "P": 1, "I;16": 2, "I": 4, "F": 4}
FUZZ_LIMIT = 1_000_000  # keeps fuzzed headers that claim big sizes cheap


def _can_save(mode: str, fmt: str) -> bool:
    buffer = io.BytesIO()
    try:
        Image.new(mode, (3, 2)).save(buffer, format=fmt)
        Image.open(io.BytesIO(buffer.getvalue())).load()
    except Exception:
        return False
    return True


COMBOS = [(m, f) for f in FORMATS_MORE for m in MODES if _can_save(m, f)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("robust")


@pytest.fixture
def fresh_limit(monkeypatch: pytest.MonkeyPatch):
    """The default limit, whatever the environment says; restored after the test."""
    monkeypatch.delenv("DEFECTLENS_MAX_PIXELS", raising=False)
    set_max_pixels(None)
    yield
    set_max_pixels(None)


def _make_image(mode: str, width: int, height: int, seed: int, style: str) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (height, width)).astype(bool))
    n = width * height * BYTES_PER_PIXEL[mode]
    if style == "random":
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    elif style == "zeros":
        data = bytes(n)
    else:
        data = bytes([int(rng.integers(0, 256))]) * n
    image = Image.frombytes(mode, (width, height), data)
    if mode == "P":
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
    return image


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, depth: int, colour: int, idat: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def _check_outcome(path: Path, call) -> np.ndarray | None:
    """`call(path)` returns an array or raises a one-line DataError naming the file."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = call(path)
        except DataError as exc:
            message = str(exc)
            assert str(path) in message and "\n" not in message, message
            result = None
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    return result


def _read_both(path: Path) -> None:
    image = _check_outcome(path, read_image)
    if image is not None:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert image.shape[0] >= 1 and image.shape[1] >= 1
    mask = _check_outcome(path, read_mask)
    if mask is not None:
        assert mask.dtype == bool and mask.ndim == 2


MAGIC = st.sampled_from(
    [
        b"",
        b"\x89PNG\r\n\x1a\n",
        b"\xff\xd8\xff",
        b"II*\x00",
        b"MM\x00*",
        b"GIF89a",
        b"BM",
        b"RIFF\x00\x00\x00\x00WEBPVP8 ",
        b"P5\n",
        b"%!PS-Adobe-3.0 EPSF-3.0\n",
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(magic=MAGIC, body=st.binary(max_size=1024), suffix=st.sampled_from(sorted(IMAGE_SUFFIXES)))
def test_arbitrary_bytes_decode_or_raise_data_error(workdir, magic, body, suffix):
    path = workdir / f"arbitrary{suffix}"
    path.write_bytes(magic + body)
    set_max_pixels(FUZZ_LIMIT)
    try:
        _read_both(path)
    finally:
        set_max_pixels(None)


@st.composite
def encoded_images(draw, combos=COMBOS, max_side=32):
    mode, fmt = draw(st.sampled_from(combos))
    width = draw(st.integers(1, max_side))
    height = draw(st.integers(1, max_side))
    seed = draw(st.integers(0, 2**32 - 1))
    style = draw(st.sampled_from(["random", "zeros", "constant"]))
    return mode, fmt, width, height, _encode(_make_image(mode, width, height, seed, style), fmt)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    encoded=encoded_images(),
    edits=st.lists(
        st.tuples(st.one_of(st.integers(0, 96), st.integers(0, 10**6)), st.integers(0, 255)),
        max_size=8,
    ),
    keep=st.one_of(st.none(), st.floats(0.0, 1.0)),
)
def test_mutated_images_decode_or_raise_data_error(workdir, encoded, edits, keep):
    _, fmt, _, _, data = encoded
    data = bytearray(data)
    for position, value in edits:
        data[position % len(data)] = value
    if keep is not None:
        data = data[: int(len(data) * keep)]
    path = workdir / f"mutated{FORMATS_MORE[fmt]}"
    path.write_bytes(bytes(data))
    set_max_pixels(FUZZ_LIMIT)
    try:
        _read_both(path)
    finally:
        set_max_pixels(None)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(encoded=encoded_images(max_side=64))
def test_valid_images_of_every_mode_decode_to_rgb(workdir, encoded):
    mode, fmt, width, height, data = encoded
    path = workdir / f"valid_{mode.replace(';', '')}{FORMATS_MORE[fmt]}"
    path.write_bytes(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_image(path)
        mask = read_mask(path, (height, width))
    assert all(issubclass(w.category, DataWarning) for w in caught), [str(w) for w in caught]
    assert image.shape == (height, width, 3) and image.dtype == np.uint8
    assert mask.shape == (height, width) and mask.dtype == bool
    if fmt in ("PNG", "TIFF", "BMP", "PPM") and mode in ("L", "RGB"):
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(image, expected)


ARRAY_DTYPES = st.one_of(
    hnp.scalar_dtypes(),
    hnp.byte_string_dtypes(max_len=3),
    hnp.unicode_string_dtypes(max_len=3),
    st.just(np.dtype(object)),
)


@settings(max_examples=300, deadline=None)
@given(
    array=hnp.arrays(ARRAY_DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
)
def test_as_rgb_returns_rgb_uint8_or_raises_data_error(array):
    usable = (
        array.dtype.kind in "biuf"
        and array.ndim in (2, 3)
        and (array.ndim == 2 or array.shape[2] in (1, 3, 4))
        and array.size > 0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from casts of nan/inf/negatives
        warnings.simplefilter("ignore", DataWarning)  # ranges read otherwise than meant: said
        try:
            rgb = as_rgb(array)
        except DataError:
            assert not usable, array
            return
    assert usable
    assert rgb.shape == (*array.shape[:2], 3) and rgb.dtype == np.uint8
    if array.dtype.kind == "f" and array.ndim == 2:
        assert (rgb[np.isnan(array)] == 0).all()


@pytest.mark.parametrize(
    "bad",
    [
        np.array([[object(), None]], dtype=object),
        np.ones((3, 3), complex),
        np.array([["a", "b"], ["c", "d"]]),
        np.array(5.0),
        np.zeros((2, 2, 2, 3)),
        np.zeros((0, 5)),
        np.zeros((4, 0, 3)),
        np.zeros((4, 4, 2)),
        np.array(["2020-01-01"], dtype="datetime64[D]").reshape(1, 1),
    ],
)
def test_as_rgb_refuses_non_images(bad):
    with pytest.raises(DataError, match="not an image"):
        as_rgb(bad)


def test_arrays_read_as_their_files_do_and_odd_ranges_are_said(tmp_path):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (12, 9, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.array_equal(as_rgb(rgba), read_image(tmp_path / "a.png"))  # alpha on black, both
    rgb = rgba[..., :3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the expected readings warn about nothing
        for fine in (rgb, rgb.astype(np.uint16) * 257, rgb / 255.0):
            assert np.array_equal(as_rgb(fine), rgb)
    with pytest.warns(DataWarning, match="dtype int64 holds values of 0..255.*pass it as uint8"):
        as_rgb(rgb.astype(np.int64))
    signed = rgb.astype(np.int16) - 100
    with pytest.warns(DataWarning, match=r"int16 holds negative values \(down to -100\)") as said:
        assert as_rgb(signed).min() == 0
    assert not any("0..255" in str(w.message) for w in said)  # the range note would be wrong
    with pytest.warns(DataWarning, match="negative values"):
        assert not as_rgb(np.full((8, 8, 3), -50, np.int16)).any()  # all black: said
    with pytest.warns(DataWarning, match="outside \\[0, 1\\].*divide 8-bit data by 255"):
        as_rgb(rgb.astype(np.float32))


def test_as_rgb_handles_non_finite_and_negative_values():
    floats = np.array([[np.nan, np.inf, -np.inf, 0.25, 0.75]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", DataWarning)  # ranges outside [0, 1]: said, as above
        out = as_rgb(floats)[0, :, 0]
        np.testing.assert_array_equal(out, [0, 191, 64, 64, 191])
        out = as_rgb(np.array([[np.nan, np.inf, -2.0, 2.0, 0.0]]))[0, :, 0]
        np.testing.assert_array_equal(out, [0, 255, 0, 255, 128])
        assert as_rgb(np.full((2, 2), np.nan)).max() == 0
        assert as_rgb(np.array([[-1e308, 1e308]]))[0, :, 0].tolist() == [0, 255]
        out = as_rgb(np.array([[-5, 0, 65535]], np.int32))[0, :, 0]
        np.testing.assert_array_equal(out, [0, 0, 255])
    # the readings stand, and each array with non-finite values is said to score unlike its part
    with pytest.warns(DataWarning, match="holds 4 NaN or infinite value\\(s\\) of 4"):
        as_rgb(np.full((2, 2), np.nan))


# --- pixel limit ---------------------------------------------------------------------------


def test_tiny_png_claiming_50000_squared_is_refused_fast_without_allocating(
    tmp_path, fresh_limit, monkeypatch
):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # PIL's default: must not bind
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(50000, 50000, 8, 0, zlib.compress(b"\x00")))
    assert len(path.read_bytes()) < 80
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError) as info:
            read_image(path)
        with pytest.raises(DataError, match="over the limit"):
            read_mask(path)
    assert time.perf_counter() - start < 1.0
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kib * (1 if sys.platform != "darwin" else 1 / 1024) < 100_000
    assert not caught, [str(w.message) for w in caught]
    assert str(info.value) == (
        f"{path}: 50000 x 50000 = 2,500,000,000 pixels is over the limit of 67,108,864 "
        "(raise it with defectlens.data.images.set_max_pixels(N) or DEFECTLENS_MAX_PIXELS)"
    )


def test_real_image_over_the_default_limit_is_refused_before_decoding(tmp_path, fresh_limit):
    side = 8200  # 67,240,000 pixels: just over 8192 x 8192
    packer = zlib.compressobj(1)
    rows = bytes(side + 1) * 200
    idat = b"".join(packer.compress(rows) for _ in range(side // 200)) + packer.compress(
        bytes(side + 1) * (side % 200)
    )
    idat += packer.flush()
    path = tmp_path / "big.png"
    path.write_bytes(_png(side, side, 8, 0, idat))
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"big\.png: 8200 x 8200 = 67,240,000 pixels is over"):
        read_image(path)
    assert time.perf_counter() - start < 1.0
    assert get_max_pixels() == DEFAULT_MAX_PIXELS == 8192 * 8192


def test_lowered_limit_refuses_and_raised_limit_accepts(tmp_path, fresh_limit, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # PIL's own limit never binds
    path = tmp_path / "small.png"
    Image.new("L", (11, 10), 7).save(path)
    set_max_pixels(109)
    assert get_max_pixels() == 109
    with pytest.raises(DataError, match=r"11 x 10 = 110 pixels is over the limit of 109"):
        read_image(path)
    set_max_pixels(110)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image(path).shape == (10, 11, 3)
    set_max_pixels(None)
    assert get_max_pixels() == DEFAULT_MAX_PIXELS


def test_limit_from_the_environment(tmp_path, fresh_limit, monkeypatch):
    path = tmp_path / "small.png"
    Image.new("L", (11, 10), 7).save(path)
    monkeypatch.setenv("DEFECTLENS_MAX_PIXELS", "100")
    assert get_max_pixels() == 100
    with pytest.raises(DataError, match="over the limit of 100 "):
        read_image(path)
    set_max_pixels(1000)  # the process setting wins over the environment
    assert read_image(path).shape == (10, 11, 3)
    set_max_pixels(None)
    for bad in ("lots", "0", "-5", "1.5"):
        monkeypatch.setenv("DEFECTLENS_MAX_PIXELS", bad)
        with pytest.raises(ParameterError, match="DEFECTLENS_MAX_PIXELS"):
            read_image(path)
    monkeypatch.setenv("DEFECTLENS_MAX_PIXELS", " 1000 ")
    assert get_max_pixels() == 1000


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "100"])
def test_set_max_pixels_validates(bad, fresh_limit):
    with pytest.raises(ParameterError):
        set_max_pixels(bad)
    assert get_max_pixels() == DEFAULT_MAX_PIXELS


# --- orientation, frames, bit depth, masks -------------------------------------------------


def _halves(width: int, height: int) -> np.ndarray:
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2] = (255, 0, 0)  # left half red
    array[:, width // 2 :] = (0, 0, 255)  # right half blue
    return array


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(_halves(40, 20)).save(path, exif=exif, quality=95)
    image = read_image(path)
    assert image.shape == (40, 20, 3)
    assert image[5, 10, 0] > 200 and image[5, 10, 2] < 50  # stored left (red) is now on top
    assert image[35, 10, 2] > 200 and image[35, 10, 0] < 50

    mask = np.zeros((20, 40), np.uint8)
    mask[:, :5] = 255  # a stripe on the stored left edge: the top after rotation
    mask_path = tmp_path / "rotated_mask.png"
    Image.fromarray(mask).save(mask_path, exif=exif)
    loaded = read_mask(mask_path, (40, 20))
    assert loaded[:5].all() and not loaded[5:].any()


def test_image_without_orientation_is_unchanged(tmp_path):
    path = tmp_path / "plain.png"
    Image.fromarray(_halves(40, 20)).save(path)
    np.testing.assert_array_equal(read_image(path), _halves(40, 20))


def test_animated_gif_uses_first_frame_with_a_warning(tmp_path):
    frames = [Image.new("L", (8, 6), value) for value in (10, 200, 100)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert ".gif" in IMAGE_SUFFIXES
    with pytest.warns(DataWarning, match=r"anim\.gif: has 3 frames/pages; only the first is used"):
        image = read_image(path)
    assert image.shape == (6, 8, 3) and (image == 10).all()


def test_multi_page_tiff_uses_first_page_with_a_warning(tmp_path):
    pages = [Image.new("L", (8, 6), 30), Image.new("L", (8, 6), 220)]
    path = tmp_path / "pages.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    with pytest.warns(DataWarning, match=r"pages\.tif: has 2 frames/pages; only the first"):
        image = read_image(path)
    assert (image == 30).all()
    with pytest.warns(DataWarning) as record:
        mask = read_mask(path)
    assert mask.all()  # all 30: the mask is also warned about as inverted
    messages = [str(w.message) for w in record]
    assert any("has 2 frames/pages" in m for m in messages), messages
    assert any("is its background 1 instead of 0?" in m for m in messages), messages


def test_12_bit_data_in_a_16_bit_png_warns_and_keeps_the_documented_scaling(tmp_path):
    values = np.linspace(0, 4095, 48).astype(np.uint16).reshape(6, 8)
    path = tmp_path / "mono12.png"
    Image.fromarray(values).save(path)
    with pytest.warns(DataWarning) as record:
        image = read_image(path)
    assert str(record[0].message) == (
        f"{path}: 16-bit image whose brightest pixel is 4095 of 65535 (12-bit data?): it is "
        "scaled by the full 16-bit range, as documented, and reads as dark"
    )
    expected = (values.astype(np.float64) * (255.0 / 65535) + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(image[..., 0], expected)

    full = tmp_path / "full16.png"
    Image.fromarray((values.astype(np.uint32) * 16).astype(np.uint16)).save(full)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        read_image(full)


@pytest.mark.parametrize("channels", [3, 4])
def test_12_bit_colour_data_in_a_16_bit_png_warns(tmp_path, channels):
    height, width = 4, 5
    pixels = np.full((height, width, channels), 3000, ">u2")
    if channels == 4:
        pixels[..., 3] = 65535
        pixels[0, 0, 3] = 0  # one transparent pixel: the warning looks at colour, not alpha
    rows = b"".join(b"\x00" + pixels[r].tobytes() for r in range(height))
    path = tmp_path / "colour12.png"
    colour_type = {3: 2, 4: 6}[channels]
    path.write_bytes(_png(width, height, 16, colour_type, zlib.compress(rows)))
    with pytest.warns(DataWarning, match=r"brightest pixel is at most 3071 of 65535 \(12-bit"):
        image = read_image(path)
    assert image.shape == (height, width, 3)
    assert (image[1:] == 3000 >> 8).all()


def test_inverted_mask_warns_and_keeps_its_meaning(tmp_path):
    mask = np.ones((20, 25), np.uint8)
    mask[0, 0] = 0
    path = tmp_path / "inverted_mask.png"
    Image.fromarray(mask).save(path)
    with pytest.warns(DataWarning) as record:
        loaded = read_mask(path, (20, 25))
    assert loaded.sum() == 499
    assert str(record[0].message) == (
        f"{path}: mask marks 99.8 % of the image as defective; any non-zero pixel counts as "
        "defective — is its background 1 instead of 0?"
    )
    ordinary = tmp_path / "ordinary_mask.png"
    mask[:] = 0
    mask[3:6, 3:6] = 255
    Image.fromarray(mask).save(ordinary)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        assert read_mask(ordinary).sum() == 9


def test_colour_mask_counts_any_non_zero_channel(tmp_path):
    mask = np.zeros((4, 4, 3), np.uint8)
    mask[1, 1] = (0, 0, 1)  # luminance rounds to 0, but the pixel is non-zero
    path = tmp_path / "colour_mask.png"
    Image.fromarray(mask).save(path)
    assert read_mask(path).sum() == 1


def test_float_and_signed_tiffs_with_odd_values(tmp_path):
    floats = np.array([[np.nan, np.inf, -np.inf, 0.25, 0.75]], np.float32)
    path = tmp_path / "float.tif"
    Image.fromarray(floats, mode="F").save(path)
    signed = np.array([[-5, 0, 65535, -(2**31)]], np.int32)
    signed_path = tmp_path / "signed.tif"
    Image.fromarray(signed, mode="I").save(signed_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(read_image(path)[0, :, 0], [0, 191, 64, 64, 191])
        np.testing.assert_array_equal(read_image(signed_path)[0, :, 0], [0, 0, 255, 0])
    with pytest.warns(DataWarning, match="mask marks 60.0 %"):
        assert read_mask(path).tolist() == [[False, True, False, True, True]]


# --- files that are not images -------------------------------------------------------------


def _call_with_timeout(func, *args, timeout: float = 10.0):
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = func(*args)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    return thread.is_alive(), outcome


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
@pytest.mark.parametrize("reader", [read_image, read_mask])
def test_named_pipe_is_refused_without_hanging(tmp_path, reader):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    start = time.perf_counter()
    hung, outcome = _call_with_timeout(reader, fifo)
    if hung:  # unblock the reader so the leaked thread ends, then fail
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("reading a named pipe blocked")
    assert time.perf_counter() - start < 2.0
    error = outcome.get("error")
    assert isinstance(error, DataError), outcome
    assert str(error) == f"{fifo}: not a regular file (a named pipe)"


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="no /dev/null")
def test_device_is_refused():
    with pytest.raises(DataError, match=r"^/dev/null: not a regular file \(a device\)$"):
        read_image("/dev/null")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links")
def test_symbolic_links(tmp_path):
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "gone.png")
    with pytest.raises(DataError, match=r"dangling\.png: broken symbolic link"):
        read_image(dangling)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(DataError, match=r"a\.png: symbolic link loop"):
        read_image(a)
    good = tmp_path / "good.png"
    Image.new("RGB", (3, 2), (1, 2, 3)).save(good)
    link = tmp_path / "link.png"
    link.symlink_to(good)
    assert read_image(link).shape == (2, 3, 3)


def test_folder_empty_file_and_missing_file(tmp_path):
    folder = tmp_path / "a.png"
    folder.mkdir()
    with pytest.raises(DataError, match=r"a\.png: is a folder, not an image$"):
        read_image(folder)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.png: empty file$"):
        read_mask(empty)
    with pytest.raises(DataError, match=r"absent\.png: file not found$"):
        read_image(tmp_path / "absent.png")
    not_a_folder = tmp_path / "file.png"
    Image.new("L", (2, 2)).save(not_a_folder)
    with pytest.raises(DataError, match="file not found"):
        read_image(not_a_folder / "inner.png")


def test_permission_denied(tmp_path, monkeypatch):
    """Root reads every file whatever its mode bits, so the refusal is simulated at os.open."""
    import defectlens.data.images as images

    path = tmp_path / "locked.png"
    Image.new("L", (2, 2)).save(path)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images.os, "open", refuse)
    with pytest.raises(DataError, match=r"locked\.png: permission denied$"):
        read_image(path)


def test_corrupt_messages_are_one_short_line(tmp_path):
    path = tmp_path / "text.jpg"
    path.write_text("not an image\nat all\n")
    with pytest.raises(DataError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: unreadable or corrupt image (")
    assert "\n" not in message and len(message) < len(str(path)) + 200


def test_eps_is_never_interpreted(tmp_path):
    path = tmp_path / "script.png"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(DataError, match="unreadable or corrupt image"):
        read_image(path)


def test_a_url_whose_protocol_package_is_missing_says_what_is_missing(monkeypatch):
    """fsspec's ImportError ("Install s3fs to access S3") became "ImportError: ..." in a
    skipped input's row; the message now says it is a package missing here."""
    import fsspec

    from defectlens.data.images import read_url
    from defectlens.data.inputs import expand_inputs

    def missing(*args, **kwargs):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec, "open", missing)
    monkeypatch.setattr(fsspec, "get_fs_token_paths", missing)
    expected = "reading s3:// URLs needs a package that is not installed here (Install s3fs"
    with pytest.raises(DataError, match=r"^s3://b/a\.png: reading s3:// URLs needs a package"):
        read_url("s3://b/a.png")
    [item] = expand_inputs(["s3://b/*.png"])
    assert item.error.startswith(f"cannot list it: {expected}")
