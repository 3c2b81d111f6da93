"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Locally aware patch features: the backbone's mid-level taps (stride 8 and 16), each averaged
over a 3 x 3 neighbourhood (zero padding, as in the paper), the coarser one upsampled to the
finer grid and concatenated (152 channels for efficientnet_lite0). With `embed_dim`, each tap is
first projected to `embed_dim` channels by adaptive averaging (so the taps weigh equally, the
paper's pre-projection) and the concatenation projected again to `embed_dim`; off by default,
because on kolektorsdd it lowered image AUROC (0.869 -> 0.850 with a full bank). A greedy
k-centre coreset of all training patches (`coreset_ratio`, on a random projection) forms the
memory bank. A test patch scores its distance to the nearest bank vector; the image score is the
largest patch score re-weighted by how isolated its nearest neighbour is in the bank (Eq. 7).

Search: an IVF index by default (`index="ivf"`, faiss, 8 of ~4 sqrt(N) cells probed), with each
image's largest patch distances re-searched exactly (`components.knn.patch_scores`), so image
scores equal exact search's while the map's other patches may be slightly overestimated; chosen
by measurement (BENCHMARKS.md: several times faster than exact search, same image AUROC).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from defectlens.backbones import FeatureExtractor
from defectlens.components.knn import NearestNeighbourIndex, index_names, make_index, patch_scores
from defectlens.components.memory_bank import GreedyCoresetSampler
from defectlens.errors import DefectLensWarning, ModelFileError, ParameterError
from defectlens.methods.base import AnomalyMethod, MethodOutput
from defectlens.params import (
    check_choice,
    check_float,
    check_int,
    check_int_list,
    check_optional,
    check_seed,
)


class PatchCore(AnomalyMethod):
    name = "patchcore"
    fitted_buffers = ("bank",)

    def __init__(
        self,
        strides: Sequence[int] = (8, 16),
        patch_size: int = 3,
        embed_dim: int | None = None,
        coreset_ratio: float = 0.1,
        projection_dim: int | None = 128,
        num_neighbors: int = 9,
        index: str = "ivf",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.strides = tuple(sorted(check_int_list("strides", strides, 1, 64)))
        self.patch_size = check_int("patch_size", patch_size, 1, 15)
        if self.patch_size % 2 == 0:
            raise ParameterError(
                f"patch_size must be odd (a centred neighbourhood), not {patch_size}"
            )
        self.embed_dim = check_optional(check_int, "embed_dim", embed_dim, 1, 8192)
        self.coreset_ratio = check_float("coreset_ratio", coreset_ratio, 0.0, 1.0, low_open=True)
        self.projection_dim = check_optional(check_int, "projection_dim", projection_dim, 1, 8192)
        self.num_neighbors = check_int("num_neighbors", num_neighbors, 1, 1000)
        self.index = check_choice("index", index, index_names())
        self.seed = check_seed("seed", seed)
        self.sampler = GreedyCoresetSampler(coreset_ratio, projection_dim, seed)
        self.search_index: NearestNeighbourIndex | None = None  # rebuilt from `bank`

    def embed(self, extractor: FeatureExtractor, images: torch.Tensor) -> torch.Tensor:
        """Patch features (B, h, w, d) on the finest requested tap's grid."""
        return self.patch_features(extractor.fast(images))

    def patch_features(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Feature maps at `strides` -> patch features (B, h, w, d)."""
        size = features[0].shape[-2:]
        pad = self.patch_size // 2
        parts = []
        for f in features:
            f = F.avg_pool2d(f, self.patch_size, stride=1, padding=pad, count_include_pad=True)
            if f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            parts.append(self._project(f.permute(0, 2, 3, 1)))
        return self._project(torch.cat(parts, dim=-1))

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """Adaptive average over the last (channel) axis down or up to embed_dim."""
        if self.embed_dim is None or x.shape[-1] == self.embed_dim:
            return x
        shape = x.shape
        pooled = F.adaptive_avg_pool1d(x.reshape(-1, 1, shape[-1]), self.embed_dim)
        return pooled.reshape(*shape[:-1], self.embed_dim)

    @torch.no_grad()
    def fit(
        self,
        extractor: FeatureExtractor,
        batches: Iterable[torch.Tensor],
        progress: bool = False,
        val_batches: Callable[[], Iterable[torch.Tensor]] | None = None,
    ) -> None:
        patches = torch.cat([self.embed(extractor, b).flatten(0, 2) for b in batches])
        size = self.sampler.target_size(patches.shape[0])
        with tqdm(total=size - 1, desc="coreset", disable=not progress, unit="pt") as bar:
            keep = self.sampler.select(patches, progress=bar.update)
        self.bank = patches[keep].contiguous()
        del patches
        self.after_load()
        if self.num_neighbors > self.bank.shape[0]:  # saved as given; say what it means here
            warnings.warn(
                f"num_neighbors {self.num_neighbors} is more than the {self.bank.shape[0]} "
                "patches in the memory bank: the score's reweighting uses all of them",
                DefectLensWarning,
                stacklevel=2,
            )

    def after_load(self) -> None:
        if self.bank.ndim != 2 or self.bank.dtype != torch.float32 or self.bank.shape[0] < 1:
            raise ModelFileError("patchcore bank must be a non-empty float32 (N, d) tensor")
        self.search_index = make_index(self.index)  # rebuilt, never deserialised
        self.search_index.build(self.bank.numpy())

    def feature_dim(self, taps: dict[int, int]) -> int:
        """Length of a patch feature for a backbone with these taps."""
        return self.embed_dim or sum(taps[s] for s in self.strides)

    def check_geometry(self, image_size: int, taps: dict[int, int]) -> None:
        if self.bank.shape[1] != self.feature_dim(taps):
            raise ModelFileError(
                f"patchcore bank vectors have {self.bank.shape[1]} values, the backbone's "
                f"features {self.feature_dim(taps)}"
            )

    def export_head(self) -> nn.Module:
        return _PatchCoreHead(self)

    def export_finish(self) -> tuple[dict, dict[str, np.ndarray]]:
        spec = {"kind": "patch_knn", "index": self.index, "num_neighbors": self.num_neighbors}
        return spec, {"bank": self.bank.numpy()}

    @torch.no_grad()
    def forward(self, extractor: FeatureExtractor, images: torch.Tensor) -> MethodOutput:
        embedding = self.embed(extractor, images)
        b, h, w, d = embedding.shape
        maps, scores = patch_scores(
            self.search_index,
            self.bank.numpy(),
            embedding.reshape(b, h * w, d).numpy(),
            self.num_neighbors,
        )
        return MethodOutput(
            maps=torch.from_numpy(maps).view(b, h, w), scores=torch.from_numpy(scores)
        )


class _PatchCoreHead(nn.Module):
    """Patch features as a graph (the bank search stays outside it, in `runtime.finish`)."""

    def __init__(self, patchcore: PatchCore) -> None:
        super().__init__()
        self.owner = (patchcore,)  # not a submodule: its bank must stay out of the graph

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        return self.owner[0].patch_features(list(features))
