"""Image transformations: DifferNet's differentiable jitter, RegAD's fixed support set.

Written in torch so that a score computed on transformed copies can be differentiated with
respect to the *original* image: the gradients of all copies then land in the original image's
coordinates without inverting any transformation by hand (DifferNet's localisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from defectlens.components.blur import gaussian_blur
from defectlens.components.geometry import rotation, translation, warp


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
    x = warp(x, rotation(p[:, 0] * math.pi / 180.0))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + p[:, 2]).view(-1, 1, 1, 1) + mean  # contrast
    x = x + p[:, 1].view(-1, 1, 1, 1)  # brightness
    blurred = gaussian_blur(x.flatten(0, 1), 1.0).view_as(x)
    x = x + p[:, 3].view(-1, 1, 1, 1) * (x - blurred)  # sharpness (unsharp mask)
    return x.clamp(0.0, 1.0)


# RegAD's support augmentations (Huang et al., ECCV 2022, and the authors' test code): eight
# rotations, eight translations, a horizontal flip, greyscale and three quarter turns.
SUPPORT_ANGLES = tuple(k * math.pi / 16 for k in (-4, -3, -2, -1, 1, 2, 3, 4))
SUPPORT_SHIFTS = tuple(
    (sx * d, sy * d) for d in (0.2, 0.1) for sx, sy in ((1, 1), (-1, 1), (-1, -1), (1, -1))
)
GREY_WEIGHTS = (0.299, 0.587, 0.114)
N_SUPPORT_VERSIONS = 1 + len(SUPPORT_ANGLES) + len(SUPPORT_SHIFTS) + 1 + 1 + 3


def augment_support(images: torch.Tensor) -> torch.Tensor:
    """Every image (B, 3, S, S) and its 21 fixed augmented versions: (B * 22, 3, S, S),
    image-major (the original first). Deterministic, so a few-shot fit is reproducible and
    every method sees the same support set. Quarter turns need square images (`Detector`'s
    are); rotations and shifts sample with reflection at the borders, as RegAD does."""
    b = images.shape[0]
    x = images.repeat_interleave(len(SUPPORT_ANGLES), dim=0)
    angles = images.new_tensor(SUPPORT_ANGLES).repeat(b)
    rotated = warp(x, rotation(angles)).view(b, len(SUPPORT_ANGLES), *images.shape[1:])
    x = images.repeat_interleave(len(SUPPORT_SHIFTS), dim=0)
    shifts = images.new_tensor(SUPPORT_SHIFTS).repeat(b, 1)
    shifted = warp(x, translation(shifts)).view(b, len(SUPPORT_SHIFTS), *images.shape[1:])
    weights = images.new_tensor(GREY_WEIGHTS).view(1, 3, 1, 1)
    grey = (images * weights).sum(dim=1, keepdim=True).expand_as(images)
    turns = [torch.rot90(images, k, dims=(2, 3)) for k in (1, 2, 3)]
    singles = torch.stack([images, images.flip(-1), grey, *turns], dim=1)
    versions = torch.cat([singles[:, :1], rotated, shifted, singles[:, 1:]], dim=1)
    return versions.reshape(b * N_SUPPORT_VERSIONS, *images.shape[1:]).contiguous()
