"""OGNet (Zaheer, Lee, Astrid, Lee, "Old is Gold: Redefining the Adversarially Learned
One-Class Classifier Training Paradigm", CVPR 2020).

Phase one trains a generator (an autoencoder that removes noise from its input) against a
discriminator, which learns to tell normal images from reconstructions; the generator as it was
after the first epoch is kept as the "old" generator. Phase two then trains the discriminator
alone, briefly, to call normal images *and the current generator's good reconstructions*
normal, and the old generator's poor reconstructions and pseudo-anomalies (the current
generator's reconstruction of the mean of two old reconstructions) anomalous. The result is a
classifier whose output on a reconstruction, D(G(x)), is the image score (0 = normal, 1 =
anomalous, the authors' labels; the score is its logit, which orders images the same way).

The paper scores images only. The map here is the generator's per-pixel squared
reconstruction error, so flagged images come with a location; it is not what D looks at.

As in the authors' code: input noise N(0, 0.81) in phase one (their sigma 0.9, squared),
discriminator loss 0.5 (BCE(D(G(x~)), 1) + BCE(D(x), 0)), generator loss 0.5 MSE + 0.5
BCE(D(G(x~)), 0), Adam at 1e-3 (generator) and 1e-4 (discriminator); phase two: 75 steps at
5e-5 with weights 0.1 on real images, 0.9 on G(x), 0.001 on the old reconstructions and 0.999
on pseudo-anomalies. Changed for a 2-core CPU: 128 px colour input (the paper: 45 px grey),
stride-2 3 x 3 stages of 32-64-128-256 channels in both networks (theirs: stride-1 5 x 5
convolutions up to 512 channels, far too slow at 128 px), 4 x 4 transposed convolutions and
tanh; phase one stops early on the validation images' reconstruction error (the code runs a
fixed number of epochs).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from defectlens.components.autoencoder import ConvDecoder, ConvEncoder
from defectlens.methods.trained import TrainedImageMethod, squared_error_map
from defectlens.params import check_float, check_int
from defectlens.training.loop import resolve_device, train_epochs
from defectlens.training.trainer import mean_loss, minibatches


class _Generator(nn.Module):
    def __init__(self, channels: int, widths: tuple[int, ...], output: str) -> None:
        super().__init__()
        self.encoder = ConvEncoder(channels, widths)
        decoder_widths = (*widths[-2::-1], widths[0])
        self.decoder = ConvDecoder(widths[-1], decoder_widths, channels, output=output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class _Discriminator(nn.Module):
    """Convolution stages, then one linear layer over the flattened last map (pixels, whose
    size `input_size` fixes), or over it average-pooled to 2 x 2 (features, whose grid
    depends on the image size)."""

    def __init__(self, channels: int, widths: tuple[int, ...], input_size: int | None) -> None:
        super().__init__()
        self.features = ConvEncoder(channels, widths)
        side = 2 if input_size is None else input_size // self.features.downsampling
        self.pool = nn.Identity() if input_size is not None else nn.AdaptiveAvgPool2d(2)
        self.classify = nn.Linear(widths[-1] * side * side, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B,): positive = anomalous."""
        return self.classify(self.pool(self.features(x)).flatten(1)).squeeze(1)


class _OGNetNet(nn.Module):
    def __init__(
        self, channels: int, widths: tuple[int, ...], input_size: int | None, output: str
    ) -> None:
        super().__init__()
        self.generator = _Generator(channels, widths, output)
        self.discriminator = _Discriminator(channels, widths, input_size)


def _bce(logits: torch.Tensor, label: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))


NORMAL, ANOMALOUS = 0.0, 1.0


class OGNet(TrainedImageMethod):
    name = "ognet"
    PIXEL_WIDTHS = (32, 64, 128, 256)
    FEATURE_WIDTHS = (192, 256)

    def __init__(
        self,
        space: str = "pixels",
        input_size: int = 128,
        widths: tuple[int, ...] | None = None,
        noise_std: float = 0.81,
        adversarial_weight: float = 0.5,
        discriminator_learning_rate: float = 1e-4,
        phase_two_steps: int = 75,
        phase_two_learning_rate: float = 5e-5,
        real_weight: float = 0.1,
        old_weight: float = 0.001,
        learning_rate: float = 1e-3,
        batch_size: int = 16,
        max_epochs: int = 100,
        patience: int = 10,
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
        self.noise_std = check_float("noise_std", noise_std, 0.0, 10.0)
        self.adversarial_weight = check_float("adversarial_weight", adversarial_weight, 0, 1)
        self.discriminator_learning_rate = check_float(
            "discriminator_learning_rate", discriminator_learning_rate, 0, 10, low_open=True
        )
        self.phase_two_steps = check_int("phase_two_steps", phase_two_steps, 1, 1_000_000)
        self.phase_two_learning_rate = check_float(
            "phase_two_learning_rate", phase_two_learning_rate, 0, 10, low_open=True
        )
        self.real_weight = check_float("real_weight", real_weight, 0.0, 1.0)
        self.old_weight = check_float("old_weight", old_weight, 0.0, 1.0)

    def build(self) -> nn.Module:
        size = self.input_size if self.space == "pixels" else None
        return _OGNetNet(self.in_channels, self.layer_widths, size, self.output)

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self.net.generator(x), x)

    def train_network(
        self, train: torch.Tensor, val: torch.Tensor | None, progress: bool
    ) -> list[dict[str, Any]]:
        device = resolve_device(self.device)
        net = self.net.to(device)
        generator, discriminator = net.generator, net.discriminator
        g_opt = torch.optim.Adam(generator.parameters(), lr=self.learning_rate)
        d_opt = torch.optim.Adam(discriminator.parameters(), lr=self.discriminator_learning_rate)
        order = torch.Generator().manual_seed(self.seed)
        noise = torch.Generator(device=device).manual_seed(self.seed + 1)
        old: list[nn.Module] = []
        w = self.adversarial_weight

        def run_epoch(epoch: int) -> float:
            total = 0.0
            for batch in minibatches(train, self.batch_size, order):
                x = batch.to(device)
                jitter = torch.randn(x.shape, generator=noise, device=device)
                noisy = (x + self.noise_std * jitter).clamp(-1, 1)
                fake = generator(noisy)
                d_loss = 0.5 * (
                    _bce(discriminator(fake.detach()), ANOMALOUS) + _bce(discriminator(x), NORMAL)
                )
                d_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                d_opt.step()
                g_loss = (1 - w) * F.mse_loss(fake, x) + w * _bce(discriminator(fake), NORMAL)
                value = g_loss.item()
                if not math.isfinite(value):
                    return float("nan")
                g_opt.zero_grad(set_to_none=True)
                g_loss.backward()
                g_opt.step()
                total += value * x.shape[0]
            if epoch == 0:  # the "old" generator: after the first epoch
                old.append(copy.deepcopy(generator).eval().requires_grad_(False))
            return total / train.shape[0]

        def validate() -> float:
            return mean_loss(self.validation_loss, val, self.batch_size, device)

        try:
            history = train_epochs(
                net,
                run_epoch,
                None if val is None else validate,
                self.train_config().rule,
                progress,
                "train ognet (phase one)",
            )
            history.append(self._phase_two(train, old[0], device))
        finally:
            net.cpu()
        return history

    def _phase_two(
        self, train: torch.Tensor, old: nn.Module, device: torch.device
    ) -> dict[str, Any]:
        """The discriminator alone learns good reconstructions as normal and poor ones and
        pseudo-anomalies as anomalous."""
        generator, discriminator = self.net.generator.eval(), self.net.discriminator.train()
        optimiser = torch.optim.Adam(discriminator.parameters(), lr=self.phase_two_learning_rate)
        draw = torch.Generator().manual_seed(self.seed + 2)
        a, b = self.real_weight, self.old_weight
        losses = []
        for _ in range(self.phase_two_steps):
            x, xi, xj = (
                train[torch.randint(train.shape[0], (self.batch_size,), generator=draw)].to(device)
                for _ in range(3)
            )
            with torch.no_grad():
                good, poor = generator(x), old(x)
                pseudo = generator((old(xi) + old(xj)) / 2)
            loss = (
                a * _bce(discriminator(x), NORMAL)
                + (1 - a) * _bce(discriminator(good), NORMAL)
                + b * _bce(discriminator(poor), ANOMALOUS)
                + (1 - b) * _bce(discriminator(pseudo), ANOMALOUS)
            )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        discriminator.eval()
        return {"phase": 2, "steps": len(losses), "train_loss": sum(losses) / len(losses)}

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reconstruction = self.net.generator(x)
        # the logit of D(G(x)): the same order as the probability, without its saturation
        # at 0 and 1 in float32 (which would turn confident scores into ties)
        return squared_error_map(x, reconstruction), self.net.discriminator(reconstruction)
