"""Convolutional encoder and decoder blocks for the methods that reconstruct images (MemAE,
MNAD, GradCon, OGNet): one implementation, parameterised by widths, so a method states its
architecture as a list of channel counts instead of carrying its own copy of the layers.

Each encoder stage halves the resolution (a strided 3 x 3 convolution, or 3 x 3 convolutions
then 2 x 2 max-pooling as MNAD's VGG-style encoder does); each decoder stage doubles it with a
4 x 4 stride-2 transposed convolution (no checkerboard overlap imbalance, unlike 3 x 3 with
output padding). Images enter in [-1, 1] and the decoder ends in tanh, so reconstructions live
in the same range.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from defectlens.errors import ParameterError

ACTIVATIONS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.2, inplace=True),
}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ParameterError(f"activation must be one of {sorted(ACTIVATIONS)}, not {name!r}")
    return ACTIVATIONS[name]()


def conv_bn_act(
    c_in: int, c_out: int, stride: int = 1, activation: str = "relu", norm: bool = True
) -> nn.Sequential:
    """3 x 3 convolution, batch-norm (unless `norm` is False), activation."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=not norm),
        nn.BatchNorm2d(c_out) if norm else nn.Identity(),
        _activation(activation),
    )


def up_bn_act(c_in: int, c_out: int, activation: str = "relu", norm: bool = True) -> nn.Sequential:
    """4 x 4 stride-2 transposed convolution (doubles the resolution), batch-norm (unless
    `norm` is False), activation."""
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=not norm),
        nn.BatchNorm2d(c_out) if norm else nn.Identity(),
        _activation(activation),
    )


class ConvEncoder(nn.Module):
    """`len(widths)` stages, each halving the resolution: an image (B, C, S, S) becomes a
    code (B, widths[-1], S / 2^n, S / 2^n).

    `convs` 3 x 3 convolutions per stage; with `pool`, the stage ends in 2 x 2 max-pooling
    (the convolutions keep the resolution), otherwise its first convolution has stride 2."""

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        convs: int = 1,
        pool: bool = False,
        activation: str = "relu",
        norm: bool = True,
    ) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        c = in_channels
        for width in widths:
            layers: list[nn.Module] = []
            for i in range(convs):
                stride = 2 if (i == 0 and not pool) else 1
                layers.append(conv_bn_act(c, width, stride, activation, norm))
                c = width
            if pool:
                layers.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.out_channels = c
        self.downsampling = 2 ** len(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's output, finest first (the last is `forward`'s code): what a decoder
        with skip connections reads."""
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs


class ConvDecoder(nn.Module):
    """The mirror of `ConvEncoder`: a code (B, in_channels, s, s) becomes an image
    (B, out_channels, s 2^n, s 2^n), through `widths` (one doubling stage each, with
    `convs - 1` further 3 x 3 convolutions) and a final 3 x 3 convolution, with tanh (`output`
    "tanh": images in [-1, 1]) or without ("linear": standardised features).

    `skip_channels`: skip connections, U-Net style. Stage i + 1's input is stage i's output
    concatenated with the i-th map passed to `forward` (`skip_channels[i]` channels, at that
    resolution): an encoder's stage outputs from the second-coarsest on."""

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        out_channels: int = 3,
        convs: int = 1,
        activation: str = "relu",
        norm: bool = True,
        output: str = "tanh",
        skip_channels: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if output not in ("tanh", "linear"):
            raise ParameterError(f"output must be tanh or linear, not {output!r}")
        if len(skip_channels) >= len(widths):
            raise ParameterError("a decoder takes fewer skip connections than it has stages")
        self.skip_channels = tuple(skip_channels)
        stages: list[nn.Module] = []
        c = in_channels
        for i, width in enumerate(widths):
            if 0 < i <= len(self.skip_channels):
                c += self.skip_channels[i - 1]
            layers = [up_bn_act(c, width, activation, norm)]
            layers += [conv_bn_act(width, width, 1, activation, norm) for _ in range(convs - 1)]
            stages.append(nn.Sequential(*layers))
            c = width
        last = [nn.Conv2d(c, out_channels, 3, 1, 1)]
        if output == "tanh":
            last.append(nn.Tanh())
        if self.skip_channels:
            self.stages = nn.ModuleList(stages)
            self.out = nn.Sequential(*last)
        else:  # one flat Sequential: the parameter names saved models have
            self.layers = nn.Sequential(*(m for stage in stages for m in stage), *last)

    def forward(self, code: torch.Tensor, skips: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        if not self.skip_channels:
            return self.layers(code)
        x = code
        for i, stage in enumerate(self.stages):
            if 0 < i <= len(skips):
                x = torch.cat([x, skips[i - 1]], dim=1)
            x = stage(x)
        return self.out(x)


def check_widths(name: str, widths: object, input_size: int | None) -> tuple[int, ...]:
    """A tuple of 1 to 6 positive channel counts whose stages `input_size` (if known) can be
    halved by."""
    if (
        not isinstance(widths, (list, tuple))
        or not 1 <= len(widths) <= 6
        or not all(type(w) is int and 1 <= w <= 2048 for w in widths)
    ):
        raise ParameterError(f"{name} must be 1 to 6 channel counts in [1, 2048], not {widths!r}")
    if input_size is not None and input_size % 2 ** len(widths):
        raise ParameterError(
            f"{len(widths)} {name} halve the input {len(widths)} times, so its size "
            f"{input_size} must be divisible by {2 ** len(widths)}"
        )
    return tuple(widths)
