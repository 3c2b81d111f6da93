"""Multi-stride feature maps made ready for `components.layout.position_major` (torch).

Nearest upsampling by whole factors is a replication, which the numpy layout does itself while
it copies (fast, and the same code in exported models). Anything else (bilinear upsampling, or
a tap whose size does not divide the finest one's, e.g. at image sizes that are not multiples of
the deepest stride) is upsampled and concatenated here, as a graph op when exported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from defectlens.components.layout import is_nested


def concat_pyramid(features: Sequence[torch.Tensor], mode: str = "nearest") -> torch.Tensor:
    """Upsample every map to the first (finest) one's size and concatenate: (B, C, h, w)."""
    size = features[0].shape[-2:]
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    upsampled = [features[0]] + [
        F.interpolate(f, size=size, mode=mode, **kwargs) for f in features[1:]
    ]
    return torch.cat(upsampled, dim=1)


def align_pyramid(features: Sequence[torch.Tensor], mode: str = "nearest") -> list[torch.Tensor]:
    """The maps unchanged when `position_major` can replicate them (nearest, nested sizes),
    else one map: the pyramid upsampled and concatenated."""
    if mode == "nearest" and is_nested([tuple(f.shape[-2:]) for f in features]):
        return list(features)
    return [concat_pyramid(features, mode)]
