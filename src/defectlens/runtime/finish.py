"""The last step of an exported model, after its graphs: head outputs -> raw maps and scores.

numpy and faiss only (no torch). Each finish is named by `kind` in the export's config.json,
with its parameters and arrays; every value is checked at load like a model's config is.
- `mahalanobis`: embeddings (P, C, B) scored against per-position Gaussians (PaDiM), with
  `components.distances.block_mahalanobis`.
- `patch_knn`: patch features (B, h, w, d) scored against a bank by nearest-neighbour search,
  the index rebuilt from the bank at load (PatchCore), with `components.knn.patch_scores`.
- `gallery_knn`: pooled image features and feature pyramids scored against the training
  images' (SPADE), with `components.knn.gallery_scores`.
The methods call the same functions, so finishing is the same code in both.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from defectlens.components.distances import block_mahalanobis, block_row_views
from defectlens.components.knn import (
    ExactIndex,
    gallery_scores,
    index_names,
    make_index,
    patch_scores,
)
from defectlens.errors import ParameterError
from defectlens.params import check_choice, check_int


class Finish:
    """Base: `outputs` names the head outputs read, `arrays` the arrays needed."""

    kind: ClassVar[str]
    outputs: ClassVar[tuple[str, ...]]
    arrays: ClassVar[tuple[str, ...]] = ()
    REGISTRY: ClassVar[dict[str, type[Finish]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Finish.REGISTRY[cls.kind] = cls

    def __init__(self, spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        allowed = {"kind", *self.parameters()}
        unknown = sorted(set(spec) - allowed)
        missing = sorted(allowed - set(spec))
        if unknown or missing:
            key = (unknown or missing)[0]
            raise ParameterError(f"{'unknown' if unknown else 'missing'} key finish.{key!r}")
        if set(arrays) != set(self.arrays):
            raise ParameterError(
                f"{self.kind} needs arrays {sorted(self.arrays)}, found {sorted(arrays)}"
            )

    @classmethod
    def parameters(cls) -> tuple[str, ...]:
        return ()

    def __call__(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError


class MahalanobisFinish(Finish):
    kind = "mahalanobis"
    outputs = ("embedding",)
    arrays = ("factors", "projected_mean")

    @classmethod
    def parameters(cls) -> tuple[str, ...]:
        return ("grid", "channels", "block")

    def __init__(self, spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        super().__init__(spec, arrays)
        self.grid = _grid(spec["grid"])
        channels = check_int("finish.channels", spec["channels"], 1, 1 << 16)
        block = check_int("finish.block", spec["block"], 1, 1 << 16)
        positions = self.grid[0] * self.grid[1]
        factors, mean = arrays["factors"], arrays["projected_mean"]
        if factors.dtype != np.float32 or mean.dtype != np.float32:
            raise ParameterError("the Gaussian arrays must be float32")
        if mean.shape != (positions, channels, 1):
            raise ParameterError("projected_mean does not match the grid and channels")
        try:
            self.rows = block_row_views(factors.reshape(-1), positions, channels, block)
        except ValueError as exc:
            raise ParameterError(str(exc)) from None
        self.projected_mean = mean

    def __call__(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        embedding = outputs[0]
        distances = block_mahalanobis(self.rows, self.projected_mean, embedding)
        return distances.reshape(-1, *self.grid), None


def _grid(grid: object) -> tuple[int, int]:
    if not (isinstance(grid, list) and len(grid) == 2):
        raise ParameterError("finish.grid must be [height, width]")
    return tuple(check_int("finish.grid", g, 1, 4096) for g in grid)


class PatchKnnFinish(Finish):
    kind = "patch_knn"
    outputs = ("patches",)
    arrays = ("bank",)

    @classmethod
    def parameters(cls) -> tuple[str, ...]:
        return ("index", "num_neighbors")

    def __init__(self, spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        super().__init__(spec, arrays)
        self.num_neighbors = check_int("finish.num_neighbors", spec["num_neighbors"], 1, 1000)
        bank = arrays["bank"]
        if bank.ndim != 2 or bank.dtype != np.float32 or bank.shape[0] < 1:
            raise ParameterError("the bank must be a non-empty float32 (N, d) array")
        self.bank = bank
        self.index = make_index(check_choice("finish.index", spec["index"], index_names()))
        self.index.build(bank)

    def __call__(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        patches = outputs[0]
        b, h, w, d = patches.shape
        if d != self.bank.shape[1]:
            raise ParameterError(f"patch features have {d} values, the bank {self.bank.shape[1]}")
        maps, scores = patch_scores(
            self.index, self.bank, patches.reshape(b, h * w, d), self.num_neighbors
        )
        return maps.reshape(b, h, w), scores


class GalleryKnnFinish(Finish):
    kind = "gallery_knn"
    outputs = ("pooled", "pyramid")
    arrays = ("image_features", "pixel_features")

    @classmethod
    def parameters(cls) -> tuple[str, ...]:
        return ("k_images", "k_pixels", "grid")

    def __init__(self, spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        super().__init__(spec, arrays)
        self.k_images = check_int("finish.k_images", spec["k_images"], 1, 10_000)
        self.k_pixels = check_int("finish.k_pixels", spec["k_pixels"], 1, 1_000)
        self.grid = _grid(spec["grid"])
        images, pixels = arrays["image_features"], arrays["pixel_features"]
        if (
            images.ndim != 2
            or pixels.ndim != 3
            or images.shape[0] < 1
            or images.shape[0] != pixels.shape[0]
            or pixels.shape[1] != self.grid[0] * self.grid[1]
        ):
            raise ParameterError("the image and pixel feature arrays do not fit together")
        self.pixel_features = pixels
        self.image_index = ExactIndex()
        self.image_index.build(images.astype(np.float32))

    def __call__(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        pooled, pyramid = outputs
        maps, scores = gallery_scores(
            self.image_index, self.pixel_features, pooled, pyramid, self.k_images, self.k_pixels
        )
        return maps.reshape(-1, *self.grid), scores


def make_finish(spec: object, arrays: dict[str, np.ndarray]) -> Finish:
    if not isinstance(spec, dict) or spec.get("kind") not in Finish.REGISTRY:
        kinds = ", ".join(sorted(Finish.REGISTRY))
        raise ParameterError(f"finish.kind must be one of: {kinds}")
    return Finish.REGISTRY[spec["kind"]](spec, arrays)
