"""Map post-processing: `components.resample` (two matrix products) against the step-by-step
path it replaced (bilinear upsampling, Gaussian blur, bilinear resize), on a batch of raw maps.

    PATH=.venv/bin:$PATH python benchmarks/postprocess.py
"""

from __future__ import annotations

import json
import time

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


def timed(fn, repeats: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    torch.set_num_threads(2)
    raw = torch.rand(32, 64, 64, generator=torch.Generator().manual_seed(0))
    raw_np = raw.numpy()
    for out in ((256, 256), (800, 1600)):
        old = timed(lambda out=out: step_by_step(raw, out, 256, 4.0))
        new = timed(lambda out=out: resample(raw_np, out, 256, 4.0))
        a, b = step_by_step(raw, out, 256, 4.0).numpy(), resample(raw_np, out, 256, 4.0)
        error = float(abs(a - b).max() / abs(a).max())
        row = {"maps": 32, "raw": [64, 64], "out": list(out), "step_by_step_ms": round(old, 1)}
        print(json.dumps({**row, "resample_ms": round(new, 1), "max_rel_diff": error}))


if __name__ == "__main__":
    main()
