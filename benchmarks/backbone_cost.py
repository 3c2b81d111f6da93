"""What a larger backbone or image size costs: fit time and scoring rate per configuration.

    python benchmarks/backbone_cost.py DATA [--images 200] [--out FILE.jsonl]

For each backbone (efficientnet_lite0/1/2) and image size (256, 320), PaDiM and PatchCore
(defaults) are fitted on the same DATA/train/good images (the first `--images`, decoded once
per configuration) and then timed scoring one batch of 32 with `Detector.score_batch`
(backbone on the default onnxruntime backend, method head, smoothing; no decoding), 2 torch
threads, back to back in one process so the figures compare. One JSON line per
configuration. Accuracy is not measured here: `selection_study.py` gives each configuration's
real and synthetic AUROC.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from bench import rate

from defectlens import Detector
from defectlens.data.dataset import find_normal_images
from defectlens.data.loader import iter_batches

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
SIZES = (256, 320)
METHODS = ("padim", "patchcore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/backbone_cost.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    images = find_normal_images(args.data)[: args.images]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # One throwaway fit first: the first configuration must not pay for imports, thread-pool
    # and engine start-up (measured: 18.7 s instead of 12.0 s for PaDiM lite0/256 without it).
    Detector(method="padim", backbone=BACKBONES[-1], image_size=SIZES[0]).fit(images[:16])
    for backbone in BACKBONES:
        for size in SIZES:
            batch = next(iter_batches(images[:32], size, 32)).images
            for method in METHODS:
                detector = Detector(method=method, backbone=backbone, image_size=size)
                start = time.perf_counter()
                detector.fit(images)
                fit_s = time.perf_counter() - start
                with torch.no_grad():
                    img_s = rate(detector.score_batch, batch)
                line = {
                    "data": args.data.name,
                    "backbone": backbone,
                    "image_size": size,
                    "method": method,
                    "fit_images": len(images),
                    "fit_s": round(fit_s, 1),
                    "model_img_s": round(img_s, 1),
                }
                print(json.dumps(line), flush=True)
                with args.out.open("a") as f:
                    f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
