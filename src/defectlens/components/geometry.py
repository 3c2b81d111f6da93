"""Affine warps in normalised coordinates: the one place images and feature maps are rotated.

A warp follows the spatial-transformer convention: `theta` (B, 2, 3) maps each *output*
position (x, y in [-1, 1], pixel centres, `align_corners=False`) to the *input* position it
samples, bilinearly, with reflection at the borders. In that normalised frame the same theta is
the same geometric transform at every resolution, so a transform estimated on a 16 x 16 feature
map can be undone on a 64 x 64 one. Composition and inversion are closed-form 3 x 3 products
on any device (RegAD's released code inverts on the CPU with numpy and copies to CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Sample `x` (B, C, H, W) at `theta` (B, 2, 3) applied to the output grid.

    Eager torch uses `grid_sample`; a graph being exported gets `warp_by_gather` instead (the
    same numbers to float rounding): onnxruntime's GridSample kernel takes 3.8 ms per image for
    a 24 x 64 x 64 map on 2 cores, the gathers 0.5 ms, while in eager torch grid_sample is the
    fast one."""
    if torch.compiler.is_exporting():
        return warp_by_gather(x, theta)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _reflect(coord: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel coordinates reflected about the borders -0.5 and size - 0.5 (align_corners=False),
    then clipped, as grid_sample's reflection padding does."""
    period = 2 * size
    v = torch.remainder(coord + 0.5, period)
    v = torch.where(v > size, period - v, v) - 0.5
    return v.clamp(0, size - 1)


def warp_by_gather(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """`warp` written as four row gathers and two lerps (bilinear, reflection padding).

    The sampling positions come from theta by broadcasting (no (B, H, W, 3) grid), and rows are
    read with `index_select` (ONNX Gather; the advanced-indexing form exports as GatherND, which
    onnxruntime runs 1.6x slower)."""
    b, c, h, w = x.shape
    t = theta.to(x.dtype).reshape(b, 6, 1, 1)
    # pixel centres in normalised coordinates, as affine_grid lays them out
    cols = ((torch.arange(w, device=x.device, dtype=x.dtype) * 2 + 1) / w - 1).view(1, 1, w)
    rows = ((torch.arange(h, device=x.device, dtype=x.dtype) * 2 + 1) / h - 1).view(1, h, 1)
    gx = t[:, 0] * cols + t[:, 1] * rows + t[:, 2]
    gy = t[:, 3] * cols + t[:, 4] * rows + t[:, 5]
    ix = _reflect(((gx + 1) * w - 1) / 2, w)
    iy = _reflect(((gy + 1) * h - 1) / 2, h)
    x0, y0 = ix.floor(), iy.floor()
    wx, wy = (ix - x0).unsqueeze(-1), (iy - y0).unsqueeze(-1)
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    flat = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # one row of channels per pixel
    base = (torch.arange(b, device=x.device) * (h * w)).view(b, 1, 1)

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return torch.index_select(flat, 0, (base + yy * w + xx).reshape(-1)).view(b, h, w, c)

    top_left = at(y0, x0)
    top = top_left + (at(y0, x1) - top_left) * wx
    bottom_left = at(y1, x0)
    bottom = bottom_left + (at(y1, x1) - bottom_left) * wx
    return (top + (bottom - top) * wy).permute(0, 3, 1, 2)


def rotation(angle: torch.Tensor) -> torch.Tensor:
    """Rotations by `angle` (B,) radians as thetas (B, 2, 3)."""
    cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
    return torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)


def translation(shift: torch.Tensor) -> torch.Tensor:
    """Translations by `shift` (B, 2) in normalised units (2 = the whole side) as thetas."""
    b = shift.shape[0]
    theta = torch.eye(2, 3, dtype=shift.dtype, device=shift.device).repeat(b, 1, 1)
    theta[:, :, 2] = shift
    return theta


def _homogeneous(theta: torch.Tensor) -> torch.Tensor:
    bottom = theta.new_tensor([0.0, 0.0, 1.0]).expand(theta.shape[0], 1, 3)
    return torch.cat([theta, bottom], dim=1)


def compose(*thetas: torch.Tensor) -> torch.Tensor:
    """One theta equal to warping by the first, then the result by the second, and so on:
    warp(warp(x, a), b) == warp(x, compose(a, b)) up to resampling (sampling positions
    compose as a @ b). One warp instead of a chain resamples, and blurs, only once."""
    result = _homogeneous(thetas[0])
    for theta in thetas[1:]:
        result = result @ _homogeneous(theta)
    return result[:, :2]


def invert(theta: torch.Tensor) -> torch.Tensor:
    """The inverse transforms (B, 2, 3): A^-1 and -A^-1 t, in closed form."""
    a, t = theta[:, :, :2], theta[:, :, 2:]
    det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]
    adjugate = torch.stack(
        [torch.stack([a[:, 1, 1], -a[:, 0, 1]], 1), torch.stack([-a[:, 1, 0], a[:, 0, 0]], 1)], 1
    )
    inverse = adjugate / det.view(-1, 1, 1)
    return torch.cat([inverse, -inverse @ t], dim=2)
