"""Concatenating multi-stride feature maps into one embedding per position."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def concat_pyramid(features: Sequence[torch.Tensor], mode: str = "nearest") -> torch.Tensor:
    """Upsample every map to the first (finest) one's size and concatenate along channels."""
    size = features[0].shape[-2:]
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    upsampled = [features[0]] + [
        F.interpolate(f, size=size, mode=mode, **kwargs) for f in features[1:]
    ]
    return torch.cat(upsampled, dim=1)
