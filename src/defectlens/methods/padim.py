"""PaDiM (Defard et al., ICPR 2021): a Gaussian per feature position, Mahalanobis distance.

Embeddings are the backbone's stride 4/8/16 maps, upsampled to stride 4 and concatenated
(optionally a random channel subset, seeded and stored). Fitting streams: per-position sums are
accumulated batch by batch, so memory does not grow with the number of training images (anomalib
keeps every embedding). The inverse covariance's Cholesky factor is saved packed (its lower
triangle only, half the size of a full inverse) and kept in memory as block rows
(`components.gaussian.BlockRows`, 58 % of the dense size for 176 channels), from which the
Mahalanobis distance is computed directly (282 MB in memory for a 246 MB file at 256 px).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from defectlens.backbones import FeatureExtractor
from defectlens.components.gaussian import (
    BlockRows,
    GaussianAccumulator,
    mahalanobis,
    project_mean,
)
from defectlens.components.layout import position_major
from defectlens.components.pyramid import align_pyramid
from defectlens.errors import ModelFileError, ParameterError
from defectlens.methods.base import AnomalyMethod, MethodOutput
from defectlens.params import (
    check_choice,
    check_float,
    check_int,
    check_int_list,
    check_optional,
    check_seed,
)


class Padim(AnomalyMethod):
    name = "padim"
    fitted_buffers = ("channel_index", "mean", "inv_chol_blocks")  # saved: inv_chol_packed

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
        self.strides = tuple(sorted(check_int_list("strides", strides, 1, 64)))
        self.n_channels = check_optional(check_int, "n_channels", n_channels, 1)
        self.epsilon = check_float("epsilon", epsilon, 0.0, 1e6)
        self.shrinkage = check_choice("shrinkage", shrinkage, ("none", "ledoit_wolf"))
        self.upsample = check_choice("upsample", upsample, ("nearest", "bilinear"))
        self.seed = check_seed("seed", seed)
        self.factors: BlockRows | None = None  # views of inv_chol_blocks
        self._projected_mean: torch.Tensor | None = None  # W m, derived, not saved

    def _embed(self, extractor: FeatureExtractor, images: torch.Tensor) -> torch.Tensor:
        """Embeddings (P, C, B) of a batch, through the fast backbone."""
        return torch.from_numpy(self._lay_out(align_pyramid(extractor.fast(images), self.upsample)))

    def _lay_out(self, maps: list) -> np.ndarray:
        """Aligned feature maps (torch or numpy, see `align_pyramid`) -> the kept channels
        laid out (P, C, B): the step the export runs after its graphs too."""
        arrays = [m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else m for m in maps]
        return position_major(arrays, self._kept_channels)

    @property
    def _kept_channels(self) -> np.ndarray | None:
        """The channel subset to keep, or None for all of them (no gather needed)."""
        if self.n_channels is None:
            return None
        return self.channel_index.numpy()

    def check_backbone(self, channels: Sequence[int]) -> None:
        total = sum(channels)
        if self.n_channels is not None and self.n_channels > total:
            raise ParameterError(
                f"n_channels is {self.n_channels} but the backbone's taps give {total} channels: "
                "pass a smaller n_channels, or n_channels=null to keep them all"
            )

    def _choose_channels(self, total: int) -> torch.Tensor:
        if self.n_channels is None or self.n_channels == total:
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
        self.begin_fit(extractor)
        self.finish_fit(self.accumulate(extractor, batches, GaussianAccumulator()))

    # Fitting in three steps, so that `defectlens.distributed` can run the middle one on many
    # machines and add the partial sums together (`GaussianAccumulator.merge`).
    def begin_fit(self, extractor: FeatureExtractor) -> None:
        """Choose the channels (seeded: every worker chooses the same)."""
        self.check_backbone(extractor.channels)  # for callers that skip the Detector's check
        self.channel_index = self._choose_channels(sum(extractor.channels))

    @torch.no_grad()
    def accumulate(
        self,
        extractor: FeatureExtractor,
        batches: Iterable[torch.Tensor],
        accumulator: GaussianAccumulator,
    ) -> GaussianAccumulator:
        """Add the embeddings of `batches` to the running sums."""
        for images in batches:
            accumulator.update(self._embed(extractor, images))
        return accumulator

    def finish_fit(self, accumulator: GaussianAccumulator) -> None:
        """The Gaussians from the sums of every training image."""
        if accumulator.n < 1:
            raise ValueError("no training image was embedded")
        self.mean = accumulator.mean().float()
        packed = accumulator.precision_factors(self.shrinkage, self.epsilon)
        del accumulator
        self.inv_chol_blocks = BlockRows.from_packed(packed, self.channel_index.numel()).flat
        self.after_load()

    def fitted_state(self) -> dict[str, torch.Tensor]:
        state = super().fitted_state()
        del state["inv_chol_blocks"]
        state["inv_chol_packed"] = self.factors.to_packed()
        return state

    def load_fitted_state(self, tensors: dict[str, torch.Tensor]) -> None:
        # Copies: tensors loaded from a safetensors file are views of one memory map of the
        # whole file, which any kept view would hold (the packed factor's pages) in memory.
        tensors = {name: tensor.clone() for name, tensor in tensors.items()}
        packed, index = tensors.pop("inv_chol_packed", None), tensors.get("channel_index")
        if packed is not None and index is not None:
            c = index.numel()
            if index.ndim != 1 or packed.ndim != 2 or packed.shape[1] != c * (c + 1) // 2:
                raise ModelFileError("padim tensors have inconsistent shapes")
            tensors["inv_chol_blocks"] = BlockRows.from_packed(packed, c).flat
        elif packed is not None:
            tensors["inv_chol_packed"] = packed  # reported as unexpected, channel_index missing
        super().load_fitted_state(tensors)

    def after_load(self) -> None:
        index = self.channel_index
        if index.dtype != torch.int64 or index.ndim != 1 or index.numel() < 1:
            raise ModelFileError("padim channel_index must be a non-empty int64 vector")
        if self.n_channels is not None and index.numel() != self.n_channels:
            raise ModelFileError(
                f"padim keeps {index.numel()} channels but n_channels is {self.n_channels}"
            )
        if index.min() < 0 or (index.numel() > 1 and not bool((index[1:] > index[:-1]).all())):
            raise ModelFileError("padim channel_index must be increasing non-negative indices")
        c = index.numel()
        p = self.mean.shape[0] if self.mean.ndim == 2 else -1
        if self.mean.shape != (p, c):
            raise ModelFileError("padim tensors have inconsistent shapes")
        try:
            self.factors = BlockRows(self.inv_chol_blocks, p, c)
        except ValueError:
            raise ModelFileError("padim tensors have inconsistent shapes") from None
        self._projected_mean = project_mean(self.mean, self.factors)

    def check_geometry(self, image_size: int, taps: dict[int, int]) -> None:
        positions = (image_size // self.strides[0]) ** 2
        total = sum(taps[s] for s in self.strides)
        if self.mean.shape[0] != positions:
            raise ModelFileError(
                f"padim tensors hold {self.mean.shape[0]} positions; image size {image_size} "
                f"needs {positions}"
            )
        if int(self.channel_index.max()) >= total:
            raise ModelFileError(f"padim channel_index exceeds the backbone's {total} channels")

    def forward(self, extractor: FeatureExtractor, images: torch.Tensor) -> MethodOutput:
        with torch.no_grad():
            embedding = self._embed(extractor, images)
            distances = mahalanobis(
                embedding, self.mean, self.factors, projected_mean=self._projected_mean
            )
        side = images.shape[-1] // self.strides[0]
        return MethodOutput(maps=distances.view(images.shape[0], -1, side))

    def export_head(self) -> nn.Module:
        return _PadimHead(self)

    def export_finish(self) -> tuple[dict, dict[str, np.ndarray]]:
        side = math.isqrt(self.mean.shape[0])  # images are square: S x S
        spec = {
            "kind": "mahalanobis",
            "grid": [side, side],
            "channels": self.channel_index.numel(),
            "block": self.factors.block,
        }
        arrays = {
            "factors": self.factors.flat.numpy(),
            "projected_mean": self._projected_mean.numpy(),
        }
        if self.n_channels is not None:
            arrays["channel_index"] = self.channel_index.numpy()
        return spec, arrays


class _PadimHead(nn.Module):
    """The graph part of the embedding: `align_pyramid` (nothing to compute for the default
    nearest upsampling of nested taps: the maps pass through). The layout and the Mahalanobis
    step run after the graph, in `components.layout` and `components.distances` (see there
    why), as `Padim.forward` runs them."""

    def __init__(self, padim: Padim) -> None:
        super().__init__()
        self.upsample = padim.upsample

    def forward(self, *features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(align_pyramid(features, self.upsample))
