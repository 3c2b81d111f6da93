"""Scored images, and the scoring loop every model shares, in numpy (no torch).

A model, whether a `Detector` (torch methods) or an exported deployment folder (onnxruntime or
OpenVINO, no torch), is reduced to a *raw scorer*: a batch of preprocessed images
(B, 3, S, S) float32 in [0, 1] -> raw anomaly maps (B, h, w) and the method's own image scores
(or None). Everything around it is here, once: decoding and resizing (overlapped with scoring,
`data.loader`), upsampling and smoothing each map to the image's own size (`components.resample`),
the image score (the method's own or the map's maximum), non-finite output turned into an error,
and the decision at the thresholds. An exported model therefore differs from the model it came
from only by what its graphs compute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from defectlens.components.resample import resample
from defectlens.data.loader import ImageInput, iter_batches
from defectlens.errors import DataError, ScoringError
from defectlens.params import MAX_BATCH_SIZE, MAX_SIGMA, check_float, check_int
from defectlens.thresholds import Thresholds

RawScorer = Callable[[np.ndarray], tuple[np.ndarray | None, np.ndarray | None]]


@dataclass
class Prediction:
    """One scored image. `anomaly_map` and `mask` have the image's own `size` (H, W); both are
    None when the model scores images without maps (an exported DifferNet)."""

    source: str
    score: float
    is_anomalous: bool
    anomaly_map: np.ndarray | None
    mask: np.ndarray | None
    size: tuple[int, int]

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.source,
            "score": self.score,
            "predicted": "defective" if self.is_anomalous else "good",
            "defect_pixels": None if self.mask is None else int(self.mask.sum()),
            "height": int(self.size[0]),
            "width": int(self.size[1]),
        }


def source_name(source: ImageInput, index: int) -> str:
    return f"<array {index}>" if isinstance(source, np.ndarray) else str(source)


def decide(
    name: str,
    score: float,
    amap: np.ndarray | None,
    thresholds: Thresholds | None,
    size: tuple[int, int],
) -> Prediction:
    """The decision at the thresholds for an image of `size` (H, W); without thresholds (fit's
    validation pass) nothing is flagged."""
    if amap is None:
        mask = None
    elif thresholds is None:
        mask = np.zeros(amap.shape, bool)
    else:
        mask = amap > thresholds.pixel
    flagged = thresholds is not None and bool(score > thresholds.image)
    return Prediction(name, score, flagged, amap, mask, (int(size[0]), int(size[1])))


def iter_predictions(
    images: Sequence[ImageInput],
    scorer: RawScorer,
    image_size: int,
    batch_size: int,
    sigma: float,
    thresholds: Thresholds | None,
    progress: bool = False,
    on_error: Callable[[str, DataError], None] | None = None,
    desc: str = "score",
) -> Iterator[Prediction]:
    """Score images in order, streaming. Unreadable ones go to `on_error` (default: raise)."""
    names = {id(s): source_name(s, i) for i, s in enumerate(images)}
    bar = tqdm(total=len(images), desc=desc, disable=not progress, unit="img")

    def handler(source: ImageInput, error: DataError) -> None:
        if on_error is None:
            raise error
        on_error(names[id(source)], error)

    try:
        for batch in iter_batches(images, image_size, batch_size, yield_errors=True):
            if batch.sources:
                raw, scores = scorer(batch.images)
            entries = iter(batch.entries)
            for i, (source, size) in enumerate(zip(batch.sources, batch.sizes, strict=True)):
                # Report the unreadable inputs that came before this one, in input order.
                for earlier, error in entries:
                    if error is None:
                        break
                    handler(earlier, error)
                # Upsampled, smoothed and resized to the image's own size in one step.
                amap = None
                if raw is not None:
                    amap = resample(raw[i : i + 1], tuple(size), image_size, sigma)[0]
                score = float(amap.max()) if scores is None else float(scores[i])
                name = names[id(source)]
                if not (np.isfinite(score) and (amap is None or np.isfinite(amap).all())):
                    # Never let NaN compare as "good": the image gets an error instead.
                    problem = ScoringError(
                        f"{name}: the model produced a non-finite score or map (NaN or "
                        "infinity); the model or the image is unusable"
                    )
                    handler(source, problem)
                    continue
                yield decide(name, score, amap, thresholds, tuple(size))
            for earlier, error in entries:
                handler(earlier, error)
            bar.update(len(batch.entries))
    finally:
        bar.close()


# What a model learned from, when nothing but normal images (every method but nbs).
NORMAL_ONLY = "normal images only"


class Predictor:
    """`iter_predict` and `predict` for any model that provides `raw_scores` and the
    attributes below: a `Detector` (torch) and an `ExportedModel` (no torch) share them, and
    evaluation, prediction and (later) serving take either."""

    image_size: int
    batch_size: int
    sigma: float
    thresholds_: Thresholds | None
    method: str  # names, for reports and model cards
    backbone: str
    # What the model learned from besides normal images (nbs: labelled anomalies, real or
    # synthetic), for metrics.json and model cards.
    supervision: str = NORMAL_ONLY
    n_fit_images_: int | None = None  # how many images it was fitted on, if known
    kind: str = "model"  # "model" (a saved Detector) or "export" (an exported folder)

    def raw_scores(self, images: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Raw maps (B, h, w) and the method's own scores (or None) for preprocessed images
        (B, 3, S, S) float32 in [0, 1]. Maps may be None if scores are given (see
        `has_maps`)."""
        raise NotImplementedError

    @property
    def has_maps(self) -> bool:
        """Whether predictions carry anomaly maps and masks (all torch models do)."""
        return True

    def check_before_scoring(self) -> None:
        """Settings that may have been set after fitting or loading, checked before a batch
        is read: a bad one is a one-line ParameterError, not a failure deep in the scoring."""
        check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        check_float("sigma", self.sigma, 0.0, MAX_SIGMA)

    def iter_predict(
        self,
        images: Sequence[ImageInput],
        progress: bool = False,
        on_error: Callable[[str, DataError], None] | None = None,
        desc: str = "score",
    ) -> Iterator[Prediction]:
        """Score images in order, streaming. Unreadable ones go to `on_error` (default: raise).
        One path or array is one image, as in `predict`."""
        self.check_before_scoring()
        return iter_predictions(
            as_image_inputs(images),
            self.raw_scores,
            self.image_size,
            self.batch_size,
            self.sigma,
            self.thresholds_,
            progress=progress,
            on_error=on_error,
            desc=desc,
        )

    def predict(
        self, images: str | Path | ImageInput | Sequence[ImageInput], progress: bool = False
    ) -> list[Prediction]:
        """Score one image (path or array) or many; always returns a list."""
        return list(self.iter_predict(images, progress=progress))


def as_image_inputs(images: Any) -> list[ImageInput]:
    """One input (a path or an array) or a sequence of them, as a list; a folder becomes the
    images in it and below it, sorted (as `defectlens predict FOLDER` reads it); anything else
    (a PIL image, bytes, a tensor, None) is a one-line DataError saying what to pass instead,
    where it would otherwise fail deep inside (a path string would be walked a character at a
    time)."""
    if isinstance(images, str | Path) and Path(images).is_dir():
        from defectlens.data.dataset import list_images

        found = list_images(Path(images), recursive=True)
        if not found:
            raise DataError(f"{images}: no images in this folder")
        return list(found)
    if isinstance(images, str | Path | np.ndarray):
        return [images]
    if isinstance(images, bytes | bytearray) or not isinstance(images, Sequence | Iterator):
        raise DataError(_not_an_input(images))
    items = list(images)
    for i, item in enumerate(items):
        if not isinstance(item, str | Path | np.ndarray):
            raise DataError(f"image {i}: " + _not_an_input(item))
    return items


def _not_an_input(value: Any) -> str:
    hint = ""
    if hasattr(value, "convert") and hasattr(value, "size"):  # a PIL image
        hint = " (for a PIL image: np.asarray(image.convert('RGB')))"
    elif type(value).__module__.startswith("torch"):
        hint = " (for a tensor: its .numpy(), H x W x 3 or H x W)"
    return (
        f"{type(value).__name__} is not an image input: give a file path or a numpy array, "
        f"or a list of them{hint}"
    )
