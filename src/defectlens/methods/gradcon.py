"""GradCon (Kwon, Prabhushankar, Temel, AlRegib, "Backpropagated Gradient Representations for
Anomaly Detection", ECCV 2020).

An autoencoder whose training also constrains its *gradients*: the gradient that the
reconstruction error of a batch induces on the decoder's convolution weights must point the
same way (cosine similarity) as the running average of the gradients of all training steps so
far. Normal images then ask the decoder for "the usual" update, and an anomaly asks for a
different one; the test score adds that disagreement to the reconstruction error:

    score = MSE(x, x') + beta * (-mean over decoder layers of cos(dL/dW, average gradient))

The average gradient (a cumulative mean of each step's total-loss gradient, as in the authors'
code) is part of the saved model. Map: the per-pixel squared error.

As in the authors' code: no batch-norm, ReLU, the gradient term from the reconstruction loss
alone, alpha = 0.03 in training and beta = 0.12 at test, errors measured on [0, 1] images, no
gradient term on the very first step (there is no average yet), Adam at 1e-3. Changed: 128 px
colour input (the paper: 28 px), four stride-2 stages of 32-32-64-64 channels with 3 x 3
convolutions (theirs: 4 x 4), 4 x 4 transposed convolutions and a tanh output. The early stopping
watches the validation images' reconstruction error (the gradient term needs autograd, which
validation runs without).

The gradient score needs autograd at test time, one backward pass per image: it cannot be
exported to a graph. `gradient_weight=0` scores by the reconstruction error alone, and that
model exports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defectlens.components.autoencoder import ConvDecoder, ConvEncoder
from defectlens.errors import ParameterError
from defectlens.methods.trained import TrainedImageMethod, squared_error_map
from defectlens.params import check_float


class _GradConNet(nn.Module):
    def __init__(self, channels: int, widths: tuple[int, ...], output: str) -> None:
        super().__init__()
        self.encoder = ConvEncoder(channels, widths, norm=False)
        self.decoder = ConvDecoder(
            widths[-1], (*widths[-2::-1], widths[0]), channels, norm=False, output=output
        )
        for i, weight in enumerate(self.constrained()):
            self.register_buffer(f"average_gradient{i}", torch.zeros_like(weight))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def constrained(self) -> list[nn.Parameter]:
        """The decoder's convolution weights, whose gradients are constrained."""
        return [
            m.weight
            for m in self.decoder.modules()
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
        ]

    def averages(self) -> list[torch.Tensor]:
        return [getattr(self, f"average_gradient{i}") for i in range(len(self.constrained()))]

    def gradient_loss(self, reconstruction_loss: torch.Tensor, create_graph: bool) -> torch.Tensor:
        """-mean cos(d loss / dW, average gradient) over the constrained layers."""
        gradients = torch.autograd.grad(
            reconstruction_loss, self.constrained(), create_graph=create_graph
        )
        cosines = [
            F.cosine_similarity(g.flatten(), a.flatten(), dim=0)
            for g, a in zip(gradients, self.averages(), strict=True)
        ]
        return -torch.stack(cosines).mean()

    @torch.no_grad()
    def accumulate(self) -> None:
        """Fold this step's gradients (of the total loss) into the cumulative means."""
        self.steps += 1
        for weight, average in zip(self.constrained(), self.averages(), strict=True):
            average += (weight.grad - average) / self.steps


def _reconstruction_loss(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Mean squared error of [0, 1] images (the authors' scale; ours are in [-1, 1])."""
    return F.mse_loss(reconstruction, x) / 4


class GradCon(TrainedImageMethod):
    name = "gradcon"
    PIXEL_WIDTHS = (32, 32, 64, 64)
    FEATURE_WIDTHS = (128, 64)  # 152 x 32 x 32 backbone maps -> a 64 x 8 x 8 code

    def __init__(
        self,
        space: str = "pixels",
        input_size: int = 128,
        widths: tuple[int, ...] | None = None,
        constraint_weight: float = 0.03,
        gradient_weight: float = 0.12,
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
        self.constraint_weight = check_float("constraint_weight", constraint_weight, 0, 100)
        self.gradient_weight = check_float("gradient_weight", gradient_weight, 0, 100)

    def build(self) -> nn.Module:
        return _GradConNet(self.in_channels, self.layer_widths, self.output)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        reconstruction_loss = _reconstruction_loss(x, self.net(x))
        if int(self.net.steps) == 0 or self.constraint_weight == 0:
            return reconstruction_loss
        constraint = self.net.gradient_loss(reconstruction_loss, create_graph=True)
        return reconstruction_loss + self.constraint_weight * constraint

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        return _reconstruction_loss(x, self.net(x))

    def after_backward(self) -> None:
        self.net.accumulate()

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = squared_error_map(x, self.net(x))
        scores = maps.mean(dim=(1, 2)) / 4  # the reconstruction loss of each image
        if self.gradient_weight > 0:
            scores = scores + self.gradient_weight * self._gradient_scores(x)
        return maps, scores

    def _gradient_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Each image's gradient term (one backward pass per image, as the authors score)."""
        weights = self.net.constrained()
        out = []
        try:
            with torch.enable_grad():
                for w in weights:
                    w.requires_grad_(True)
                for image in x.split(1):
                    loss = _reconstruction_loss(image, self.net(image))
                    out.append(self.net.gradient_loss(loss, create_graph=False).detach())
        finally:
            for w in weights:
                w.requires_grad_(False)
        return torch.stack(out)

    def export_head(self) -> nn.Module:
        if self.gradient_weight > 0:
            raise ParameterError(
                "gradcon's gradient score needs autograd, which an exported graph cannot run; "
                "a model fitted with gradient_weight=0 (reconstruction error only) exports"
            )
        return super().export_head()
