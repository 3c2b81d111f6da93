"""Differentiable image transformations (rotation, brightness, contrast, sharpness).

Written in torch so that a score computed on transformed copies can be differentiated with
respect to the *original* image: the gradients of all copies then land in the original image's
coordinates without inverting any transformation by hand (DifferNet's localisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from defectlens.components.blur import gaussian_blur


@dataclass(frozen=True)
class TransformRanges:
    """Maximum jitter: rotation in degrees, brightness/contrast/sharpness as +- factors."""

    rotation: float = 20.0
    brightness: float = 0.1
    contrast: float = 0.1
    sharpness: float = 0.3


def sample_parameters(
    n: int, ranges: TransformRanges, generator: torch.Generator, identity_first: bool = False
) -> torch.Tensor:
    """(n, 4) uniform parameters in [-range, range]; row 0 is the identity if asked."""
    limits = torch.tensor([ranges.rotation, ranges.brightness, ranges.contrast, ranges.sharpness])
    params = (torch.rand(n, 4, generator=generator) * 2 - 1) * limits
    if identity_first and n:
        params[0] = 0
    return params


def apply_transforms(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Every image (B, 3, H, W) under every parameter row (T, 4): (B * T, 3, H, W), image-major."""
    b, t = images.shape[0], params.shape[0]
    x = images.repeat_interleave(t, dim=0)
    p = params.repeat(b, 1).to(images)
    angle = p[:, 0] * math.pi / 180.0
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + p[:, 2]).view(-1, 1, 1, 1) + mean  # contrast
    x = x + p[:, 1].view(-1, 1, 1, 1)  # brightness
    blurred = gaussian_blur(x.flatten(0, 1), 1.0).view_as(x)
    x = x + p[:, 3].view(-1, 1, 1, 1) * (x - blurred)  # sharpness (unsharp mask)
    return x.clamp(0.0, 1.0)
