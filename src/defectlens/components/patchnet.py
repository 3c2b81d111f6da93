"""Patch networks: padding-free CNNs that map one image patch to one descriptor (Uninformed
Students' teacher and students, Patch SVDD's encoder).

Because no layer pads, such a network is translation-equivariant: run on a whole image it
computes, in one pass, the descriptor of every patch on a grid of pitch `stride` -- the same
numbers as cropping each patch and running it alone (Bailer et al.'s "fast dense feature
extraction" reaches the same result for every pixel; a grid at the network's own stride is
what the scoring here needs, and costs stride^2 times less). `dense` pads the image by
reflection so that the grid has exactly one descriptor per `stride` x `stride` cell of the
image, centred on the cell as a backbone's feature map is.

A network is described by a list of layers, so each method states its architecture as data:
``("conv", kernel, channels)``, ``("conv", kernel, channels, stride)`` or ``("pool",)``
(2 x 2 max-pooling). Every layer but the last is followed by LeakyReLU(`slope`); the last
convolution is linear or followed by tanh (`output`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from defectlens.errors import ParameterError

Layer = tuple


def _conv_spec(layer: Layer) -> tuple[int, int, int]:
    """(kernel, channels, stride) of a ("conv", ...) layer."""
    kernel, channels = layer[1], layer[2]
    stride = layer[3] if len(layer) > 3 else 1
    return kernel, channels, stride


class PatchNet(nn.Module):
    """A padding-free patch network; see the module docstring for `layers`."""

    def __init__(
        self,
        in_channels: int,
        layers: Sequence[Layer],
        slope: float = 0.01,
        output: str = "linear",
    ) -> None:
        super().__init__()
        if not layers or layers[-1][0] != "conv":
            raise ParameterError("a patch network must end with a convolution")
        if output not in ("linear", "tanh"):
            raise ParameterError(f"output must be 'linear' or 'tanh', not {output!r}")
        self.layers = tuple(tuple(layer) for layer in layers)
        blocks: list[nn.Module] = []
        channels = in_channels
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            if layer[0] == "pool":
                blocks.append(nn.MaxPool2d(2))
                continue
            if layer[0] != "conv":
                raise ParameterError(f"unknown patch-network layer {layer!r}")
            kernel, out, stride = _conv_spec(layer)
            blocks.append(nn.Conv2d(channels, out, kernel, stride))
            if not last:
                blocks.append(nn.LeakyReLU(slope))
            channels = out
        if output == "tanh":
            blocks.append(nn.Tanh())
        self.body = nn.Sequential(*blocks)
        self.out_channels = channels

    @property
    def stride(self) -> int:
        """Pixels between neighbouring descriptors of a dense pass."""
        stride = 1
        for layer in self.layers:
            stride *= 2 if layer[0] == "pool" else _conv_spec(layer)[2]
        return stride

    @property
    def field(self) -> int:
        """The patch side that gives exactly one descriptor (the receptive field)."""
        size = 1
        for layer in reversed(self.layers):
            if layer[0] == "pool":
                size = 2 * size
            else:
                kernel, _, stride = _conv_spec(layer)
                size = (size - 1) * stride + kernel
        return size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Descriptors of `x`'s patches: (B, C, (H - field) // stride + 1, ...)."""
        return self.body(x)

    def padding(self) -> tuple[int, int]:
        """Reflection padding (before, after) that makes `dense` give one descriptor per cell."""
        total = self.field - self.stride
        return total // 2, total - total // 2

    def dense(self, images: torch.Tensor) -> torch.Tensor:
        """Descriptors on the image's grid of `stride` x `stride` cells: (B, C, H/s, W/s)."""
        h, w = images.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ParameterError(
                f"image sides ({h} x {w}) must be multiples of the patch network's stride "
                f"{self.stride}"
            )
        before, after = self.padding()
        if max(before, after) >= min(h, w):
            raise ParameterError(
                f"images of {h} x {w} px are too small for {self.field} px patches"
            )
        return self(F.pad(images, (before, after, before, after), mode="reflect"))
