"""MemAE (Gong et al., "Memorizing Normality to Detect Anomaly: Memory-augmented Deep
Autoencoder for Unsupervised Anomaly Detection", ICCV 2019).

A convolutional autoencoder whose decoder never sees the encoder's code itself: every position
of the code is replaced by a sparse attention read of a memory of normal prototypes
(`components.memory.SparseMemory`), so an anomalous part can only be rebuilt from normal
patterns and its reconstruction error is large. Loss: mean squared reconstruction error plus
`entropy_weight` times the entropy of the addressing weights. Map: the per-pixel squared error
(mean over colour channels); image score: its mean over the image, the paper's reconstruction
error (`image_score="map_max"` uses the smoothed map's maximum instead, as the feature methods
do; small defects then count).

Changed from the paper for a 2-core CPU (the authors' released code is the 3-D video model;
the image networks are 2-D versions of it): 128 px colour input, four stride-2 stages of 32 to
256 channels (a 256 x 8 x 8 code), batch-norm and LeakyReLU as in the authors' code, a tanh
output, and Adam at 1e-3 instead of 1e-4 because a 10-minute budget gives about 2000 steps,
not the video model's hundreds of thousands. Memory: 500 items (the paper's CIFAR-10 size)
with λ = 2/N, addressing by cosine similarity (paper eq. 5; the released code uses dot
products), entropy weight 2e-4 as in both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defectlens.components.autoencoder import ConvDecoder, ConvEncoder
from defectlens.components.memory import SparseMemory, addressing_entropy
from defectlens.methods.trained import TrainedImageMethod, squared_error_map
from defectlens.params import check_choice, check_float, check_int, check_optional


class _MemAENet(nn.Module):
    def __init__(
        self, channels: int, widths: tuple[int, ...], items: int, shrink: float, output: str
    ) -> None:
        super().__init__()
        self.encoder = ConvEncoder(channels, widths, activation="leaky_relu")
        self.memory = SparseMemory(items, widths[-1], shrink)
        self.decoder = ConvDecoder(
            widths[-1],
            (*widths[-2::-1], widths[0]),
            channels,
            activation="leaky_relu",
            output=output,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rebuilt, weights = self.memory(self.encoder(x))
        return self.decoder(rebuilt), weights


class MemAE(TrainedImageMethod):
    name = "memae"
    PIXEL_WIDTHS = (32, 64, 128, 256)
    FEATURE_WIDTHS = (192, 256)  # 152 x 32 x 32 backbone maps -> a 256 x 8 x 8 code

    def __init__(
        self,
        space: str = "pixels",
        input_size: int = 128,
        widths: tuple[int, ...] | None = None,
        memory_items: int = 500,
        shrink_threshold: float | None = None,
        entropy_weight: float = 2e-4,
        image_score: str = "mean",
        learning_rate: float = 1e-3,
        batch_size: int = 16,
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
        self.memory_items = check_int("memory_items", memory_items, 2, 100_000)
        self.shrink_threshold = check_optional(
            check_float, "shrink_threshold", shrink_threshold, 0.0, 1.0, high_open=True
        )
        self.entropy_weight = check_float("entropy_weight", entropy_weight, 0.0, 100.0)
        self.image_score = check_choice("image_score", image_score, ("mean", "map_max"))

    @property
    def shrink(self) -> float:
        """λ: the given threshold, or 2/N (the middle of the paper's [1/N, 3/N])."""
        if self.shrink_threshold is None:
            return 2.0 / self.memory_items
        return self.shrink_threshold

    def build(self) -> nn.Module:
        return _MemAENet(
            self.in_channels, self.layer_widths, self.memory_items, self.shrink, self.output
        )

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        reconstruction, weights = self.net(x)
        return F.mse_loss(reconstruction, x) + self.entropy_weight * addressing_entropy(weights)

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.net(x)[0], x)

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        maps = squared_error_map(x, self.net(x)[0])
        return maps, maps.mean(dim=(1, 2)) if self.image_score == "mean" else None
