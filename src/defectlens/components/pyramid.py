"""Multi-stride feature maps -> one embedding per position, laid out position-major.

Per-position statistics (PaDiM's Gaussians) work on (P, C, B) tensors: positions as the batch
of small matrix products. Each tap is first transposed to (h, w, C, B) at its own resolution (one
cache-friendly pass), then replicated into the finest grid; gathering the batch axis innermost
straight from (B, C, h, w) strides across the whole tensor and took 1.6x as long.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def concat_pyramid(features: Sequence[torch.Tensor], mode: str = "nearest") -> torch.Tensor:
    """Upsample every map to the first (finest) one's size and concatenate: (B, C, h, w)."""
    size = features[0].shape[-2:]
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    upsampled = [features[0]] + [
        F.interpolate(f, size=size, mode=mode, **kwargs) for f in features[1:]
    ]
    return torch.cat(upsampled, dim=1)


def position_major(features: Sequence[torch.Tensor], mode: str = "nearest") -> torch.Tensor:
    """The concatenated pyramid as (P = h*w, C, B), P in row-major order of the finest map."""
    b, _, h, w = features[0].shape
    exact = all(h % f.shape[2] == 0 and w % f.shape[3] == 0 for f in features)
    if mode != "nearest" or not exact:
        return concat_pyramid(features, mode).flatten(2).permute(2, 1, 0).contiguous()
    total = sum(f.shape[1] for f in features)
    out = features[0].new_empty(h, w, total, b)
    start = 0
    for f in features:
        c, fh, fw = f.shape[1:]
        ky, kx = h // fh, w // fw
        source = f.permute(2, 3, 1, 0).contiguous()[:, None, :, None].expand(fh, ky, fw, kx, c, b)
        out.view(fh, ky, fw, kx, total, b)[..., start : start + c, :].copy_(source)
        start += c
    return out.view(h * w, total, b)
