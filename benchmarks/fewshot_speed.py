"""RegAD's speed next to PaDiM's, measured back to back in one process (issue 9's targets:
scoring at least PaDiM's img/s, fitting a new category with K = 8 in under 30 s).

    python benchmarks/fewshot_speed.py ../shared/data/magnetic_tile --registration REG \
        [--n-channels N]

- fit s: `Detector.fit` wall time. RegAD K = 8 (support augmented, 176 images through the
  registered trunk, Gaussian) with the threshold set on 20 normal images, and the same with
  the threshold set on every other train/good image (what `fit --shots 8` does by default);
  PaDiM on the full train/good (the usual 10 % held out). The registered trunk's graph is
  exported once per registration and cached; the first fit pays that (reported separately).
- model img/s: `Detector.score_batch` on a preloaded batch of 32 (no decoding), 3 rounds each,
  alternating the two models, best round kept.
- e2e img/s: `iter_predict` over the test images (decode, resize, score, maps at full size).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from defectlens import Detector
from defectlens.data import find_test_samples
from defectlens.data.dataset import find_normal_images
from defectlens.data.loader import iter_batches


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--registration", required=True)
    parser.add_argument(
        "--n-channels", type=int, help="RegAD keeps this many random channels (default: all)"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    # A fresh graph cache: the first RegAD fit pays its trunk's export, as on a new machine;
    # the backbone's graph (PaDiM's) is exported before any timing.
    os.environ["DEFECTLENS_CACHE_DIR"] = tempfile.mkdtemp(prefix="defectlens-speed-")
    Detector(method="padim").ensure_extractor()
    images = find_normal_images(args.data)
    regad_params = {
        "method": "regad",
        "shots": 8,
        "method_params": {"registration": args.registration, "n_channels": args.n_channels},
    }
    result: dict = {}
    _, result["regad_fit_first_s"] = timed(
        lambda: Detector(**regad_params).fit(images, val_images=images[-20:])
    )
    regad, result["regad_fit_s"] = timed(
        lambda: Detector(**regad_params).fit(images, val_images=images[-20:])
    )
    _, result["regad_fit_all_val_s"] = timed(lambda: Detector(**regad_params).fit(images))
    padim, result["padim_full_fit_s"] = timed(lambda: Detector(method="padim").fit(images))
    batch = next(iter_batches(images[:32], 256, 32)).images
    rates: dict[str, list[float]] = {"regad": [], "padim": []}
    for _ in range(3):
        for name, det in (("regad", regad), ("padim", padim)):
            det.score_batch(batch)
            _, seconds = timed(lambda d=det: d.score_batch(batch))
            rates[name].append(32 / seconds)
    for name in rates:
        result[f"{name}_model_img_s"] = round(max(rates[name]), 1)
    tests = [s.path for s in find_test_samples(args.data)]
    for name, det in (("regad", regad), ("padim", padim)):
        _, seconds = timed(lambda d=det: sum(1 for _ in d.iter_predict(tests)))
        result[f"{name}_e2e_img_s"] = round(len(tests) / seconds, 1)
    result = {k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}
    result["data"] = Path(args.data).name
    result["regad_n_channels"] = args.n_channels
    print(json.dumps(result))


if __name__ == "__main__":
    main()
