"""PaDiM (Defard et al., ICPR 2021): a Gaussian per feature position, Mahalanobis distance.

Embeddings are the backbone's stride 4/8/16 maps, upsampled to stride 4 and concatenated
(optionally a random channel subset, seeded and stored). Fitting streams: per-position sums are
accumulated batch by batch, so memory does not grow with the number of training images (anomalib
keeps every embedding). The inverse covariance is stored as its packed Cholesky factor, half the
size of a full inverse, and unpacked once on load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from defectlens.backbones import FeatureExtractor
from defectlens.components.gaussian import (
    GaussianAccumulator,
    mahalanobis,
    unpack_lower,
)
from defectlens.components.pyramid import position_major
from defectlens.errors import ModelFileError
from defectlens.methods.base import AnomalyMethod, MethodOutput


class Padim(AnomalyMethod):
    name = "padim"
    fitted_buffers = ("channel_index", "mean", "inv_chol_packed")

    def __init__(
        self,
        strides: Sequence[int] = (4, 8, 16),
        n_channels: int | None = None,
        epsilon: float = 0.01,
        shrinkage: str = "none",
        upsample: str = "nearest",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if shrinkage not in ("none", "ledoit_wolf"):
            raise ValueError(f"shrinkage must be 'none' or 'ledoit_wolf', not {shrinkage!r}")
        self.strides = tuple(sorted(strides))
        self.n_channels = n_channels
        self.epsilon = epsilon
        self.shrinkage = shrinkage
        self.upsample = upsample
        self.seed = seed
        self._inv_chol: torch.Tensor | None = None  # unpacked cache, not saved

    def _embed(self, extractor: FeatureExtractor, images: torch.Tensor) -> torch.Tensor:
        """Embeddings (P, C, B) of a batch, through the traced backbone."""
        embedding = position_major(extractor.fast(images), self.upsample)
        if self.channel_index.numel() < embedding.shape[1]:
            embedding = embedding.index_select(1, self.channel_index)
        return embedding

    def _choose_channels(self, total: int) -> torch.Tensor:
        if self.n_channels is None or self.n_channels >= total:
            return torch.arange(total)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(total, generator=generator)[: self.n_channels].sort().values

    @torch.no_grad()
    def fit(
        self,
        extractor: FeatureExtractor,
        batches: Iterable[torch.Tensor],
        progress: bool = False,
        val_batches: Callable[[], Iterable[torch.Tensor]] | None = None,
    ) -> None:
        self.channel_index = self._choose_channels(sum(extractor.channels))
        accumulator = GaussianAccumulator()
        for images in batches:
            accumulator.update(self._embed(extractor, images))
        self.mean = accumulator.mean().float()
        self.inv_chol_packed = accumulator.precision_factors(self.shrinkage, self.epsilon)
        self._inv_chol = None

    def after_load(self) -> None:
        c = self.channel_index.numel()
        p = self.mean.shape[0]
        if self.mean.shape != (p, c) or self.inv_chol_packed.shape != (p, c * (c + 1) // 2):
            raise ModelFileError("padim tensors have inconsistent shapes")
        self._inv_chol = None

    def forward(self, extractor: FeatureExtractor, images: torch.Tensor) -> MethodOutput:
        if self._inv_chol is None:
            self._inv_chol = unpack_lower(self.inv_chol_packed, self.channel_index.numel())
        with torch.no_grad():
            embedding = self._embed(extractor, images)
            distances = mahalanobis(embedding, self.mean, self._inv_chol)
        side = images.shape[-1] // self.strides[0]
        return MethodOutput(maps=distances.view(images.shape[0], -1, side))
