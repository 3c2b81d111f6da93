"""MNAD, reconstruction variant (Park, Noh, Ham, "Learning Memory-guided Normality for Anomaly
Detection", CVPR 2020).

An encoder turns the image into a grid of L2-normalised queries; a memory of a few normal
prototypes (`components.memory.ItemMemory`) is read by attention at every position and the
read is concatenated with the query for the decoder. The items are not learned by gradient:
after each training step they move towards the queries nearest to them. Two losses shape the
queries: compactness (close to their nearest item) and separateness (a triplet margin to the
second-nearest), added to the reconstruction error with weights 0.01 each (the authors' setting
for reconstruction). The decoder has no skip connections, which would let it copy the input.

Score: the paper combines the reconstruction PSNR and the query-to-item distance, each min-max
normalised per test video; with no videos here, each is normalised by its range on the normal
validation images, and the anomaly score is α (1 - PSNR') + (1 - α) D' with α = 0.7. Map: the
per-pixel squared error. The memory can follow images scored as normal at test time
(`test_time_update`, the paper's rule with γ = 0.015); it is off by default, because scores
would then depend on what was scored before. With it on, the memory first follows the normal
validation images until it settles, and the normalisation ranges and the threshold are measured
in that state (`_settle_memory` says why); `save` keeps the memory as it is at that moment.

Changed for a 2-core CPU: 128 px input (256 in the paper), the VGG-style encoder at half width
(32-64-128 with two 3 x 3 convolutions and max-pooling per stage, then 256-channel queries on a
16 x 16 grid instead of 512 on 32 x 32), 4 x 4 transposed convolutions to upsample, Adam at 2e-4
with a cosine schedule as in the authors' code, batch 8 (4 in the paper).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from defectlens.components.autoencoder import ConvDecoder, ConvEncoder, conv_bn_act
from defectlens.components.memory import ItemMemory
from defectlens.errors import ModelFileError
from defectlens.methods.trained import TrainedImageMethod, squared_error_map
from defectlens.params import check_bool, check_float, check_int
from defectlens.training.trainer import TrainConfig


class _MNADNet(nn.Module):
    def __init__(
        self, channels: int, widths: tuple[int, ...], query_channels: int, items: int, output: str
    ) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            ConvEncoder(channels, widths, convs=2, pool=True),
            conv_bn_act(widths[-1], query_channels),
            nn.Conv2d(query_channels, query_channels, 3, 1, 1),  # the queries: no BN/ReLU
        )
        self.memory = ItemMemory(items, query_channels)
        self.decoder = nn.Sequential(
            conv_bn_act(2 * query_channels, query_channels),
            ConvDecoder(query_channels, widths[::-1], channels, convs=2, output=output),
        )

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder(x), dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction, the queries, and each query's distance to its nearest item."""
        queries = self.queries(x)
        read, distance = self.memory.read(queries)
        return self.decoder(read), queries, distance


def psnr(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per image, with both in [-1, 1] mapped to [0, 1] (the authors' convention)."""
    mse = ((reconstruction - x) / 2).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


class MNAD(TrainedImageMethod):
    name = "mnad"
    # the normal validation images' ranges of PSNR and query distance
    fitted_buffers = ("psnr_range", "distance_range")
    PIXEL_WIDTHS = (32, 64, 128)
    FEATURE_WIDTHS = (192,)  # 152 x 32 x 32 backbone maps -> 256-channel queries on 16 x 16

    def __init__(
        self,
        space: str = "pixels",
        input_size: int = 128,
        widths: tuple[int, ...] | None = None,
        query_channels: int = 256,
        memory_items: int = 10,
        compactness_weight: float = 0.01,
        separateness_weight: float = 0.01,
        alpha: float = 0.7,
        test_time_update: bool = False,
        update_threshold: float = 0.015,
        learning_rate: float = 2e-4,
        batch_size: int = 8,
        max_epochs: int = 300,
        patience: int = 20,
        max_minutes: float = 10.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._init_training(
            space,
            input_size,
            widths,
            learning_rate,
            batch_size,
            max_epochs,
            patience,
            max_minutes,
            seed,
        )
        self.query_channels = check_int("query_channels", query_channels, 1, 4096)
        self.memory_items = check_int("memory_items", memory_items, 2, 10_000)
        self.compactness_weight = check_float("compactness_weight", compactness_weight, 0, 100)
        self.separateness_weight = check_float("separateness_weight", separateness_weight, 0, 100)
        self.alpha = check_float("alpha", alpha, 0.0, 1.0)
        self.test_time_update = check_bool("test_time_update", test_time_update)
        self.update_threshold = check_float("update_threshold", update_threshold, 0.0, 1.0)

    def build(self) -> nn.Module:
        return _MNADNet(
            self.in_channels, self.layer_widths, self.query_channels, self.memory_items, self.output
        )

    def train_config(self) -> TrainConfig:
        return replace(super().train_config(), schedule="cosine")

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        reconstruction, queries, _ = self.net(x)
        compactness, separateness = self.net.memory.losses(queries)
        if self.net.training:  # the items follow the queries after each training step
            self.net.memory.update(queries.detach())
        return (
            F.mse_loss(reconstruction, x)
            + self.compactness_weight * compactness
            + self.separateness_weight * separateness
        )

    def _raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Error maps, PSNR and mean query distance per image."""
        reconstruction, _, distance = self.net(x)
        return squared_error_map(x, reconstruction), psnr(x, reconstruction), distance.mean((1, 2))

    def after_training(self, train: torch.Tensor, val: torch.Tensor | None) -> None:
        images = val if val is not None and val.shape[0] > 1 else train
        if self.test_time_update:
            self._settle_memory(images)
        psnrs, distances = [], []
        for batch in images.split(self.batch_size):
            _, p, d = self._raw(batch)
            psnrs.append(p)
            distances.append(d)
        p, d = torch.cat(psnrs), torch.cat(distances)
        self.psnr_range = torch.stack([p.min(), p.max()])
        self.distance_range = torch.stack([d.min(), d.max()])

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps, p, d = self._raw(x)
        p_low, p_high = self.psnr_range[0], self.psnr_range[1]
        d_low, d_high = self.distance_range[0], self.distance_range[1]
        psnr_norm = (p - p_low) / (p_high - p_low).clamp_min(1e-8)
        distance_norm = (d - d_low) / (d_high - d_low).clamp_min(1e-8)
        scores = self.alpha * (1 - psnr_norm) + (1 - self.alpha) * distance_norm
        if self.test_time_update and not torch.compiler.is_exporting():
            self._follow_normal(x, maps)
        return maps, scores

    def _settle_memory(
        self, images: torch.Tensor, passes: int = 5, tolerance: float = 1e-3
    ) -> None:
        """Let the memory follow the normal validation images, as it will follow normal test
        images, until it stops moving (at most `passes` passes). The items were last moved
        by training-mode queries (batch statistics in the batch norms); the first test-time
        update would move them to the scoring-mode queries at once, and every query distance
        would drop below the normal range the scores are normalised by: after a short fit
        the scores fell to about -800 and nothing was flagged. Settled first, the ranges and
        the threshold are measured in the state that test-time updates keep."""
        for _ in range(passes):
            before = self.net.memory.items
            for batch in images.split(self.batch_size):
                self.net.memory.update(self.net.queries(batch))
            if (self.net.memory.items - before).abs().max() < tolerance:
                break

    def _follow_normal(self, x: torch.Tensor, maps: torch.Tensor) -> None:
        """The paper's test-time update: images whose error-weighted error (in [0, 1] units)
        is below `update_threshold` move the memory, as in training."""
        error = maps / 4  # squared error of [-1, 1] images -> of [0, 1] images
        weight = 1 - torch.exp(-error)
        point = (weight * error).sum((1, 2)) / weight.sum((1, 2)).clamp_min(1e-12)
        normal = point < self.update_threshold
        if bool(normal.any()):
            self.net.memory.update(self.net.queries(x[normal]))

    def check_geometry(self, image_size: int, taps: dict[int, int]) -> None:
        super().check_geometry(image_size, taps)
        for name in type(self).fitted_buffers:  # its own, not the feature statistics
            if getattr(self, name).shape != (2,):
                raise ModelFileError(f"mnad {name} must hold two values")
