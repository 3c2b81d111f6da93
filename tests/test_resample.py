"""Maps are upsampled, smoothed and resized by two matrix products: the same numbers as doing
the steps one by one with torch's interpolation and the Gaussian blur."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from defectlens.components.blur import gaussian_blur
from defectlens.components.resample import resample


def step_by_step(raw, out, image_size, sigma):
    maps = F.interpolate(raw.unsqueeze(1), size=(image_size, image_size), mode="bilinear")
    maps = gaussian_blur(maps.squeeze(1), sigma)
    if tuple(out) != (image_size, image_size):
        maps = F.interpolate(maps.unsqueeze(1), size=out, mode="bilinear").squeeze(1)
    return maps


@pytest.mark.parametrize(
    ("raw_size", "image_size", "out", "sigma"),
    [
        ((64, 64), 256, (256, 256), 4.0),  # PaDiM at 256 on a 256 image
        ((32, 32), 256, (300, 170), 4.0),  # upsample, smooth, shrink one axis, grow the other
        ((8, 8), 64, (37, 500), 2.0),
        ((64, 64), 64, (64, 64), 4.0),  # DifferNet: raw maps already at the input size
        ((16, 16), 64, (128, 128), 0.0),  # no smoothing
        ((2, 2), 64, (64, 64), 20.0),  # kernel wider than the map: replicate padding
    ],
)
def test_matches_interpolate_blur_interpolate(raw_size, image_size, out, sigma):
    raw = torch.rand(3, *raw_size, generator=torch.Generator().manual_seed(0)) * 50
    expected = step_by_step(raw, out, image_size, sigma)
    got = resample(raw.numpy(), out, image_size, sigma)
    assert got.shape == expected.shape
    assert got.dtype == np.float32
    error = float(np.abs(got - expected.numpy()).max())
    assert error <= 2e-6 * float(expected.abs().max())
