"""SPADE (Cohen & Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid Correspondences").

Image level: each training image is stored as its globally pooled deepest feature (stride 32);
a test image scores the mean distance to its K nearest training images.
Pixel level: the feature pyramids (stride 4/8/16 taps, upsampled and concatenated) of those K
images form a gallery; each test position scores the mean distance to its kappa nearest gallery
features. K is capped at the number of training images, so one training image works (then K = 1).
Pyramids are stored in float16 to halve the model; distances are computed in float32.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from defectlens.backbones import FeatureExtractor
from defectlens.components.knn import ExactIndex, gallery_scores
from defectlens.components.layout import position_major
from defectlens.components.pyramid import align_pyramid
from defectlens.errors import DefectLensWarning, ModelFileError
from defectlens.methods.base import AnomalyMethod, MethodOutput
from defectlens.params import check_int, check_int_list


class Spade(AnomalyMethod):
    name = "spade"
    fitted_buffers = ("image_features", "pixel_features")

    def __init__(
        self,
        k_images: int = 5,
        k_pixels: int = 1,
        pyramid_strides: Sequence[int] = (4, 8, 16),
        image_stride: int = 32,
    ) -> None:
        super().__init__()
        self.k_images = check_int("k_images", k_images, 1, 10_000)
        self.k_pixels = check_int("k_pixels", k_pixels, 1, 1_000)
        self.pyramid_strides = tuple(
            sorted(check_int_list("pyramid_strides", pyramid_strides, 1, 64))
        )
        self.image_stride = check_int("image_stride", image_stride, 1, 64)
        self.strides = tuple(sorted({*self.pyramid_strides, image_stride}))
        self.image_index: ExactIndex | None = None  # rebuilt from `image_features`

    def _features(self, extractor: FeatureExtractor, images: torch.Tensor):
        """Pooled (B, C_img), pyramid (B, P, C) as numpy, grid (h, w)."""
        pooled, *maps = self.pooled_and_maps(extractor.fast(images))
        pyramid = position_major([m.cpu().numpy() for m in maps]).transpose(2, 0, 1)
        return pooled.cpu().numpy(), pyramid, maps[0].shape[-2:]

    def pooled_and_maps(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Feature maps at `strides` -> pooled (B, C_img), then the pyramid's maps as
        `align_pyramid` leaves them (laid out per position after the graph when exported)."""
        by_stride = dict(zip(self.strides, features, strict=True))
        pooled = by_stride[self.image_stride].mean(dim=(2, 3))  # (B, C_img)
        return pooled, *align_pyramid([by_stride[s] for s in self.pyramid_strides])

    @property
    def effective_k(self) -> int:
        """K actually used: `k_images` capped at the number of training images."""
        return min(self.k_images, self.image_features.shape[0])

    @torch.no_grad()
    def fit(
        self,
        extractor: FeatureExtractor,
        batches: Iterable[torch.Tensor],
        progress: bool = False,
        val_batches: Callable[[], Iterable[torch.Tensor]] | None = None,
    ) -> None:
        pooled, pyramids = [], []
        for images in batches:
            p, pyr, _ = self._features(extractor, images)
            pooled.append(torch.from_numpy(p))
            pyramids.append(torch.from_numpy(pyr).half())
        self.image_features = torch.cat(pooled)
        self.pixel_features = torch.cat(pyramids)  # (N, P, C) float16
        self.after_load()
        if self.k_images > self.effective_k:  # saved as given; say what it means here
            warnings.warn(
                f"k_images {self.k_images} is more than the {self.effective_k} image(s) fitted "
                f"on: each image is compared with all {self.effective_k}",
                DefectLensWarning,
                stacklevel=2,
            )

    def after_load(self) -> None:
        if self.image_features.ndim != 2 or self.pixel_features.ndim != 3:
            raise ModelFileError("spade tensors have unexpected shapes")
        if self.image_features.shape[0] < 1:
            raise ModelFileError("spade model holds no training image")
        if self.image_features.shape[0] != self.pixel_features.shape[0]:
            raise ModelFileError("spade image and pixel features disagree on the image count")
        self.image_index = ExactIndex()
        self.image_index.build(self.image_features.float().numpy())

    def check_geometry(self, image_size: int, taps: dict[int, int]) -> None:
        positions = (image_size // self.pyramid_strides[0]) ** 2
        expected = (positions, sum(taps[s] for s in self.pyramid_strides))
        if tuple(self.pixel_features.shape[1:]) != expected:
            raise ModelFileError(
                f"spade pixel features are {tuple(self.pixel_features.shape[1:])} per image; "
                f"image size {image_size} with this backbone needs {expected}"
            )
        if self.image_features.shape[1] != taps[self.image_stride]:
            raise ModelFileError("spade image features do not match the backbone's channels")

    def export_head(self) -> nn.Module:
        return _SpadeHead(self)

    def export_finish(self) -> tuple[dict, dict[str, np.ndarray]]:
        side = math.isqrt(self.pixel_features.shape[1])  # images are square: S x S
        spec = {
            "kind": "gallery_knn",
            "k_images": self.k_images,
            "k_pixels": self.k_pixels,
            "grid": [side, side],
        }
        arrays = {
            "image_features": self.image_features.float().numpy(),
            "pixel_features": self.pixel_features.numpy(),
        }
        return spec, arrays

    @torch.no_grad()
    def forward(self, extractor: FeatureExtractor, images: torch.Tensor) -> MethodOutput:
        pooled, pyramid, (h, w) = self._features(extractor, images)
        maps, scores = gallery_scores(
            self.image_index,
            self.pixel_features.numpy(),
            pooled,
            pyramid,
            self.k_images,
            self.k_pixels,
        )
        return MethodOutput(
            maps=torch.from_numpy(maps).view(-1, h, w), scores=torch.from_numpy(scores)
        )


class _SpadeHead(nn.Module):
    """Pooled features and the pyramid's maps as a graph (the layout and the nearest-neighbour
    searches run after it, in `runtime.finish`, as `Spade.forward` runs them)."""

    def __init__(self, spade: Spade) -> None:
        super().__init__()
        self.owner = (spade,)  # not a submodule: its feature banks must stay out of the graph

    def forward(self, *features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.owner[0].pooled_and_maps(list(features))
