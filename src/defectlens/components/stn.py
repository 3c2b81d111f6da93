"""Spatial transformer (Jaderberg et al., 2015) as RegAD uses it after each backbone stage.

A small localisation network reads a feature map and predicts the parameters of an affine
transform, which is applied with `geometry.warp`. Its last layer starts at zero weights and the
identity's parameters as bias, so an untrained transformer is exactly the identity: RegAD
without registration training is PaDiM on the augmented support set.

Differences from RegAD's released code, on purpose: the localisation features are average-
pooled to a fixed `pooled` x `pooled` grid before the fully connected layers (the authors'
input size is hard-coded for 224 px images, and their first layer alone has 3.2 M parameters),
and the hidden layer has 128 units instead of 1024. The whole registration network then fits
in well under 2 MB, small enough to ship.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from defectlens.components.geometry import warp


def _rotation_scale(p: torch.Tensor) -> torch.Tensor:
    # RegAD's mode: the scales multiply only the diagonal (cos) terms, as in the authors' code.
    a, sx, sy = p[:, 0], p[:, 1], p[:, 2]
    zero = torch.zeros_like(a)
    rows = [
        torch.stack([sx * a.cos(), -a.sin(), zero], 1),
        torch.stack([a.sin(), sy * a.cos(), zero], 1),
    ]
    return torch.stack(rows, 1)


def _rotation(p: torch.Tensor) -> torch.Tensor:
    return _rotation_scale(torch.cat([p, torch.ones_like(p), torch.ones_like(p)], 1))


def _rotation_translation_scale(p: torch.Tensor) -> torch.Tensor:
    theta = _rotation_scale(p[:, [0, 3, 4]])
    return torch.cat([theta[:, :, :2], p[:, 1:3].unsqueeze(2)], 2)


def _affine(p: torch.Tensor) -> torch.Tensor:
    return p.view(-1, 2, 3)


# mode -> (theta from parameters, the identity's parameters)
MODES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], tuple[float, ...]]] = {
    "rotation_scale": (_rotation_scale, (0.0, 1.0, 1.0)),
    "rotation": (_rotation, (0.0,)),
    "rotation_translation_scale": (_rotation_translation_scale, (0.0, 0.0, 0.0, 1.0, 1.0)),
    "affine": (_affine, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)),
}


class _FixedGrid(nn.Module):
    """Pool a map to `size` x `size`: the mean of each cell when the side divides evenly (as
    `AdaptiveAvgPool2d`), else bilinear resampling; unlike adaptive pooling with uneven cells,
    both export to ONNX at every image size."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.size == 0 and w % self.size == 0:
            return F.avg_pool2d(x, (h // self.size, w // self.size))
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)


class SpatialTransformer(nn.Module):
    """Feature map (B, C, H, W) -> (the map warped by a predicted transform, its theta)."""

    def __init__(
        self, channels: int, mode: str = "rotation_scale", hidden: int = 128, pooled: int = 4
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown transform mode {mode!r}; choose one of {sorted(MODES)}")
        self.mode = mode
        to_theta, identity = MODES[mode]
        self.to_theta = to_theta
        self.localise = nn.Sequential(
            nn.Conv2d(channels, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
            nn.Conv2d(64, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            _FixedGrid(pooled),
            nn.Flatten(),
            nn.Linear(16 * pooled * pooled, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, len(identity)),
        )
        last = self.localise[-1]
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.copy_(torch.tensor(identity))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        theta = self.to_theta(self.localise(x))
        return warp(x, theta), theta
