"""Back-to-back speed of a saved model: bare backbone (eager, traced), model, and `predict`.

    python benchmarks/speed.py MODEL DATA

The shared development machine's speed drifts by up to 2x over a session, so ratios are only
meaningful between figures measured together; this script measures them one after the other.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from defectlens import load
from defectlens.data import find_normal_images
from defectlens.data.loader import iter_batches

sys.path.insert(0, str(Path(__file__).parent))
from bench import rate


def main(model: str, data: str) -> None:
    torch.set_num_threads(2)
    detector = load(model)
    batch = next(iter_batches(find_normal_images(data)[:32], detector.image_size, 32)).images
    extractor = detector.ensure_extractor()
    with torch.no_grad():
        print(f"backbone eager  {rate(extractor, batch):6.1f} img/s")
        print(f"backbone traced {rate(extractor.fast, batch):6.1f} img/s")
        print(f"model           {rate(detector.score_batch, batch):6.1f} img/s")
    command = [
        "defectlens",
        "predict",
        model,
        f"{data}/test",
        "--out",
        "bench-output/speed",
        "--no-images",
        "-q",
    ]
    print(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
