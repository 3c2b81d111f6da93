"""Turning image files into model-ready batches, with decoding overlapped with compute.

Images are decoded and resized on a background thread while the model works on the previous
batch (PIL releases the GIL while it decodes and resizes). A file that cannot be read is reported
through `on_error` and skipped; the rest of the batch goes on. `on_error` is always called on
the consumer's thread (the one iterating), so a caller may write its results file from it.
Batches are numpy arrays (no torch), so the torch-free deployment runtime reads images with this
same code; `torch.from_numpy` turns one into a tensor without a copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from defectlens.data.dataset import Sample
from defectlens.data.images import as_rgb, read_image, read_mask
from defectlens.errors import DataError

ImageInput = str | Path | np.ndarray


@dataclass
class Batch:
    """Resized images (B, 3, S, S) in [0, 1], where they came from and their original (H, W)."""

    images: np.ndarray  # float32
    sources: list[ImageInput]
    sizes: list[tuple[int, int]]
    # Every source of the chunk in input order, with its error (None: it is in `images`).
    entries: list[tuple[ImageInput, DataError | None]]


def load_resized(source: ImageInput, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode one image and resize it to size x size (bilinear, antialiased). Returns HWC uint8."""
    if isinstance(source, np.ndarray):
        rgb = as_rgb(source)
    elif isinstance(source, str | Path):
        rgb = read_image(source)
    else:
        raise DataError(f"{type(source).__name__} is not an image: give a file path or an array")
    original = rgb.shape[:2]
    if original != (size, size):
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR))
    return rgb, (int(original[0]), int(original[1]))


def iter_batches(
    sources: Sequence[ImageInput],
    size: int,
    batch_size: int,
    on_error: Callable[[ImageInput, DataError], None] | None = None,
    yield_errors: bool = False,
) -> Iterator[Batch]:
    """Yield batches in order; unreadable sources go to `on_error` (or raise if it is None).

    With `yield_errors`, errors are left in each batch's `entries` for the caller to report in
    input order, and batches whose every image failed are yielded too (with no images).
    """

    def load(chunk: Sequence[ImageInput]) -> Batch:
        arrays, kept, sizes, entries = [], [], [], []
        for source in chunk:
            try:
                rgb, original = load_resized(source, size)
            except DataError as exc:
                if on_error is None and not yield_errors:
                    raise
                entries.append((source, exc))
                continue
            arrays.append(rgb)
            kept.append(source)
            sizes.append(original)
            entries.append((source, None))
        if not arrays:
            return Batch(np.empty((0, 3, size, size), np.float32), [], [], entries)
        stacked = np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2), np.float32)
        stacked /= 255.0  # a division, as torch's div_ did: bit-identical inputs
        return Batch(stacked, kept, sizes, entries)

    chunks = [sources[i : i + batch_size] for i in range(0, len(sources), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, chunks[0]) if chunks else None
        for i in range(len(chunks)):
            batch = pending.result()
            pending = pool.submit(load, chunks[i + 1]) if i + 1 < len(chunks) else None
            if yield_errors:
                yield batch
                continue
            for source, exc in batch.entries:
                if exc is not None:
                    on_error(source, exc)
            if len(batch.sources):
                yield batch


def load_labelled(samples: Sequence[Sample], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Labelled images and their masks, resized to size x size: images (N, 3, S, S) float32
    in [0, 1] and masks (N, S, S) float32 in {0, 1} (a resized pixel is defective when at
    least half of what it covers was). A mask whose size differs from its image's is an
    error naming the mask."""
    images, masks = [], []
    for sample in samples:
        rgb, original = load_resized(sample.path, size)
        if sample.mask is None:
            mask = np.zeros((size, size), np.float32)
        else:
            hard = read_mask(sample.mask, expected_shape=original).astype(np.float32)
            area = Image.fromarray(hard).resize((size, size), Image.Resampling.BOX)
            mask = (np.asarray(area) >= 0.5).astype(np.float32)
        images.append(rgb.transpose(2, 0, 1).astype(np.float32) / 255.0)
        masks.append(mask)
    return np.stack(images), np.stack(masks)
