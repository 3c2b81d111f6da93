"""The last step of an exported model, after its graphs: head outputs -> raw maps and scores.

numpy and faiss only (no torch). Each finish is named by `kind` in the export's config.json,
with its parameters and arrays; every value is checked at load like a model's config is.
- `mahalanobis`: feature maps laid out per position (`components.layout.position_major`) and
  scored against per-position Gaussians (PaDiM), with `components.distances.block_mahalanobis`.
- `patch_knn`: patch features (B, h, w, d) scored against a bank by nearest-neighbour search,
  the index rebuilt from the bank at load (PatchCore), with `components.knn.patch_scores`.
- `gallery_knn`: pooled image features and feature maps (laid out per position) scored against
  the training images' (SPADE), with `components.knn.gallery_scores`.
- `patch_coverage`: patch embeddings at two scales, each scored by its nearest bank vector,
  spread over the pixels each patch covers and multiplied (Patch SVDD), with
  `components.coverage.coverage_product`.
- `image_score`: the head's image scores as they are, no map (DifferNet, whose maps are
  gradients through the backbone and need torch).
- `ensemble`: one finish per member on its share of the head's outputs, each member's scores
  and maps standardised by its validation statistics, brought to the finest member's grid
  (bilinear) and combined by the mean or the maximum (`methods.ensemble`).
Head outputs: the finish's fixed `outputs`, then, for a finish that lays out a pyramid, as many
feature maps as the head returns, named `map0`, `map1`, ... (`output_names`).
The methods call the same functions, so finishing is the same code in both.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from defectlens.components.coverage import coverage_product
from defectlens.components.distances import block_mahalanobis, block_row_views
from defectlens.components.knn import (
    ExactIndex,
    gallery_scores,
    index_names,
    make_index,
    patch_scores,
)
from defectlens.components.layout import position_major
from defectlens.components.resample import bilinear_matrix, smoothed_max
from defectlens.errors import ParameterError
from defectlens.params import check_choice, check_int


class Finish:
    """Base: `outputs` names the fixed head outputs read, `arrays` the arrays needed (and
    `optional_arrays` those it may have); `maps` whether feature maps follow the outputs."""

    kind: ClassVar[str]
    gives_maps: ClassVar[bool] = True  # False: image scores only
    outputs: ClassVar[tuple[str, ...]] = ()
    maps: ClassVar[bool] = False
    arrays: ClassVar[tuple[str, ...]] = ()
    optional_arrays: ClassVar[tuple[str, ...]] = ()
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
        if not set(self.arrays) <= set(arrays) <= {*self.arrays, *self.optional_arrays}:
            raise ParameterError(
                f"{self.kind} needs arrays {sorted(self.arrays)}, found {sorted(arrays)}"
            )

    @classmethod
    def parameters(cls) -> tuple[str, ...]:
        return ()

    @classmethod
    def output_names(cls, count: int) -> list[str]:
        """Names of a head's `count` outputs: the fixed ones, then map0, map1, ..."""
        extra = count - len(cls.outputs)
        if extra < 0 or (extra > 0) != cls.maps:
            raise ParameterError(f"a {cls.kind} head cannot have {count} outputs")
        return [*cls.outputs, *(f"map{i}" for i in range(extra))]

    @classmethod
    def name_head_outputs(cls, spec: dict[str, Any], outputs: Any) -> tuple[dict, list[str]]:
        """At export: the spec to save and the names of a head's outputs, given what the head
        returned on the example images (a tensor, or a tuple of them)."""
        return spec, cls.output_names(len(outputs) if isinstance(outputs, tuple | list) else 1)

    def accepts(self, names: list[str]) -> bool:
        """Whether a head's output names are the ones this finish reads, in order."""
        try:
            return 0 < len(names) <= 64 and names == self.output_names(len(names))
        except ParameterError:  # a count this finish cannot take
            return False

    def __call__(self, outputs: list[np.ndarray]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Raw maps (B, h, w) or None (scores only), and image scores (B,) or None (the maps'
        maxima)."""
        raise NotImplementedError


class MahalanobisFinish(Finish):
    kind = "mahalanobis"
    maps = True
    arrays = ("factors", "projected_mean")
    optional_arrays = ("channel_index",)  # the kept channels; all of them when absent

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
        self.channel_index = arrays.get("channel_index")
        index = self.channel_index
        if index is not None and (
            index.dtype != np.int64
            or index.shape != (channels,)
            or index.min() < 0
            or (channels > 1 and not (np.diff(index) > 0).all())
        ):
            raise ParameterError("channel_index must hold increasing channel indices")

    def __call__(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        try:
            embedding = position_major(outputs, self.channel_index)
        except ValueError as exc:
            raise ParameterError(f"the head's feature maps do not fit: {exc}") from None
        if embedding.shape[:2] != self.projected_mean.shape[:2]:
            raise ParameterError("the head's feature maps do not match the Gaussians")
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
    outputs = ("pooled",)
    maps = True
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
        pooled, *maps = outputs
        try:
            pyramid = position_major(maps).transpose(2, 0, 1)  # (B, P, C)
        except ValueError as exc:
            raise ParameterError(f"the head's feature maps do not fit: {exc}") from None
        if pyramid.shape[1:] != self.pixel_features.shape[1:]:
            raise ParameterError("the head's feature maps do not match the training features")
        maps, scores = gallery_scores(
            self.image_index, self.pixel_features, pooled, pyramid, self.k_images, self.k_pixels
        )
        return maps.reshape(-1, *self.grid), scores


class PatchCoverageFinish(Finish):
    kind = "patch_coverage"
    outputs = ("patches_small", "patches_large")
    arrays = ("bank_small", "bank_large")

    @classmethod
    def parameters(cls) -> tuple[str, ...]:
        return ("index", "patch_sizes", "strides")

    def __init__(self, spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        super().__init__(spec, arrays)
        self.patch_sizes = [
            check_int("finish.patch_sizes", p, 1, 4096) for p in _pair(spec, "patch_sizes")
        ]
        self.strides = [check_int("finish.strides", s, 1, 4096) for s in _pair(spec, "strides")]
        if any(
            p % s or s % self.strides[0]
            for p, s in zip(self.patch_sizes, self.strides, strict=True)
        ):
            raise ParameterError(
                "finish.patch_sizes must be multiples of finish.strides, and the strides "
                "multiples of the first"
            )
        kind = check_choice("finish.index", spec["index"], index_names())
        self.indexes = []
        for name in self.arrays:
            bank = arrays[name]
            if bank.ndim != 2 or bank.dtype != np.float32 or bank.shape[0] < 1:
                raise ParameterError(f"{name} must be a non-empty float32 (N, d) array")
            index = make_index(kind)
            index.build(bank)
            self.indexes.append((index, bank.shape[1]))

    def __call__(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        distances = []
        for patches, (index, dim) in zip(outputs, self.indexes, strict=True):
            b, h, w, d = patches.shape
            if d != dim:
                raise ParameterError(f"patch embeddings have {d} values, the bank {dim}")
            found, _ = index.search(patches.reshape(-1, d), 1)
            distances.append(found.reshape(b, h, w))
        maps = coverage_product(distances, self.patch_sizes, self.strides)
        return maps, maps.reshape(maps.shape[0], -1).max(axis=1)


def _pair(spec: dict[str, Any], key: str) -> list:
    value = spec[key]
    if not (isinstance(value, list) and len(value) == 2):
        raise ParameterError(f"finish.{key} must be a list of two numbers")
    return value


class ImageScoreFinish(Finish):
    kind = "image_score"
    gives_maps = False
    outputs = ("scores",)

    def __call__(self, outputs: list[np.ndarray]) -> tuple[np.ndarray | None, np.ndarray]:
        (scores,) = outputs
        if scores.ndim != 1:
            raise ParameterError("the head's scores must be one value per image")
        return None, scores


class DirectFinish(Finish):
    """The head computes the raw maps itself (networks that reconstruct the image), and the
    image scores too, unless the method scores an image by its map's maximum."""

    kind = "direct"

    @classmethod
    def output_names(cls, count: int) -> list[str]:
        if count not in (1, 2):
            raise ParameterError(f"a {cls.kind} head cannot have {count} outputs")
        return ["anomaly_map", "scores"][:count]

    def __call__(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        maps, scores = outputs[0], (outputs[1] if len(outputs) > 1 else None)
        if maps.ndim != 3 or (scores is not None and scores.shape != maps.shape[:1]):
            raise ParameterError("the head's maps must be (B, h, w) with one score per image")
        return maps, scores


class EnsembleFinish(Finish):
    """Members' finishes on their shares of the head's outputs, then the ensemble's own
    arithmetic (`methods.ensemble.Ensemble.forward`): a member's image score is its own score
    or its map's maximum after smoothing by `score_smoothing` (members,: σ in grid cells;
    absent in exports made before it existed: 0, the raw maximum), standardised by the
    validation statistics in `normalisation` (members, 4: score mean, score sd, map mean, map
    sd); maps are standardised, resized to the finest member's grid (bilinear,
    align_corners=False) and combined as the scores are. Member i's outputs are named
    `m{i}_<name>` and its arrays `member{i}.<name>`."""

    kind = "ensemble"
    arrays = ("normalisation",)
    optional_arrays = ("score_smoothing",)

    @classmethod
    def parameters(cls) -> tuple[str, ...]:
        return ("combine", "members")

    @classmethod
    def name_head_outputs(cls, spec: dict[str, Any], outputs: Any) -> tuple[dict, list[str]]:
        members = spec["members"]
        if not isinstance(outputs, tuple | list) or len(outputs) != len(members):
            raise ParameterError("an ensemble head returns one group of outputs per member")
        spec = {**spec, "members": []}
        for member, group in zip(members, outputs, strict=True):
            count = len(group) if isinstance(group, tuple | list) else 1
            spec["members"].append({**member, "outputs": count})
        names = []
        for i, member in enumerate(spec["members"]):
            kind = Finish.REGISTRY[member["finish"]["kind"]]
            names += [f"m{i}_{name}" for name in kind.output_names(member["outputs"])]
        return spec, names

    def __init__(self, spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        own = {k: v for k, v in arrays.items() if not k.startswith("member")}
        super().__init__(spec, own)
        self.combine = check_choice("finish.combine", spec["combine"], ("mean", "max"))
        members = spec["members"]
        if not (isinstance(members, list) and 2 <= len(members) <= 16):
            raise ParameterError("finish.members must list 2 to 16 members")
        self.parts: list[Finish] = []
        self.counts: list[int] = []
        for i, member in enumerate(members):
            if not (isinstance(member, dict) and set(member) == {"finish", "outputs"}):
                raise ParameterError(f"finish.members[{i}] must give its finish and outputs")
            inner = member["finish"]
            if isinstance(inner, dict) and inner.get("kind") == self.kind:
                raise ParameterError("an ensemble cannot be a member of an ensemble")
            prefix = f"member{i}."
            part = make_finish(
                inner, {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            )
            if not part.gives_maps:
                raise ParameterError(f"ensemble member {part.kind} gives no anomaly maps")
            self.parts.append(part)
            self.counts.append(check_int(f"finish.members[{i}].outputs", member["outputs"], 1, 64))
        stray = [
            k
            for k in arrays
            if k.startswith("member")
            and k.split(".")[0] not in {f"member{i}" for i in range(len(members))}
        ]
        if stray:
            raise ParameterError(f"array {stray[0]!r} names no member")
        stats = arrays["normalisation"]
        if (
            stats.dtype != np.float32
            or stats.shape != (len(members), 4)
            or not (stats[:, 1::2] > 0).all()
        ):
            raise ParameterError("normalisation must be float32 (members, 4), spreads > 0")
        self.stats = stats
        smoothing = arrays.get("score_smoothing", np.zeros(len(members), np.float32))
        if (
            smoothing.dtype != np.float32
            or smoothing.shape != (len(members),)
            or not (np.isfinite(smoothing) & (smoothing >= 0)).all()
        ):
            raise ParameterError("score_smoothing must be float32 (members,), each >= 0")
        self.smoothing = smoothing.tolist()

    def output_names(self, count: int) -> list[str]:  # type: ignore[override]
        if count != sum(self.counts):
            raise ParameterError(f"the ensemble's head has {sum(self.counts)} outputs, not {count}")
        names = []
        for i, (part, n) in enumerate(zip(self.parts, self.counts, strict=True)):
            names += [f"m{i}_{name}" for name in part.output_names(n)]
        return names

    def __call__(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        results, start = [], 0
        for part, n, sigma in zip(self.parts, self.counts, self.smoothing, strict=True):
            maps, scores = part(outputs[start : start + n])
            start += n
            maps = np.asarray(maps, np.float32)
            if scores is None:
                scores = smoothed_max(maps, sigma)
            results.append((np.asarray(scores, np.float32), maps))
        side = max(maps.shape[-1] for _, maps in results)
        scores, maps = [], []
        for (score, amap), (s_mean, s_sd, m_mean, m_sd) in zip(results, self.stats, strict=True):
            scores.append((score - s_mean) / s_sd)
            standard = (amap - m_mean) / m_sd
            if standard.shape[-1] != side:
                rows = bilinear_matrix(side, standard.shape[-2]).astype(np.float32)
                cols = bilinear_matrix(side, standard.shape[-1]).astype(np.float32)
                standard = rows @ standard @ cols.T
            maps.append(standard)
        combine = np.max if self.combine == "max" else np.mean
        return combine(np.stack(maps), axis=0), combine(np.stack(scores), axis=0)


def make_finish(spec: object, arrays: dict[str, np.ndarray]) -> Finish:
    if not isinstance(spec, dict) or spec.get("kind") not in Finish.REGISTRY:
        kinds = ", ".join(sorted(Finish.REGISTRY))
        raise ParameterError(f"finish.kind must be one of: {kinds}")
    return Finish.REGISTRY[spec["kind"]](spec, arrays)
