"""Back-to-back speed of a saved model on each backend: bare backbone, model, `predict`, AUROC.

    PATH=.venv/bin:$PATH python benchmarks/speed.py MODEL DATA [--out bench-output/speed]

Measured one after the other in one run, on the same 32 real images (the shared development
machine's speed drifts by up to 2x over a session, so only figures measured together compare):
- backbone img/s: eager torch in the default memory layout (the reference), the torch backend
  (eager, channels-last) and the onnxruntime backend, batch of 32, no decoding;
- model img/s: `Detector.score_batch` (backbone + method head + smoothing) on each backend;
- predict img/s: `defectlens predict MODEL DATA/test --no-images --backend B`, the rate the
  command prints (decoding, resizing, scoring, maps at full resolution, results.csv);
- image AUROC: `defectlens evaluate --backend B` on DATA's test set.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from defectlens import load
from defectlens.data import find_normal_images
from defectlens.data.loader import iter_batches

sys.path.insert(0, str(Path(__file__).parent))
from bench import rate

BACKENDS = ("torch", "onnxruntime")


def _cli(*args: str) -> str:
    command = [sys.executable, "-m", "defectlens", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--out", default="bench-output/speed")
    args = parser.parse_args()
    torch.set_num_threads(2)
    detector = load(args.model, backend="torch")
    images = find_normal_images(args.data)[:32]
    batch_np = next(iter_batches(images, detector.image_size, 32)).images
    batch = torch.from_numpy(batch_np)
    extractor = detector.ensure_extractor()
    reference = copy.deepcopy(extractor).eval()
    reference.net.to(memory_format=torch.contiguous_format)  # the layout torch gives by default
    result = {"model": args.model, "data": args.data}
    with torch.no_grad():
        result["backbone_eager_default_layout"] = round(rate(reference, batch), 1)
        for backend in BACKENDS:
            detector.use_backend(backend)
            result[f"backbone_{backend}"] = round(rate(extractor.fast, batch), 1)
            result[f"model_{backend}"] = round(rate(detector.score_batch, batch_np), 1)
    for backend in BACKENDS:
        out = Path(args.out) / backend
        printed = _cli(
            "predict", args.model, f"{args.data}/test", "--out", str(out), "--no-images",
            "--overwrite", "-q", "--backend", backend,
        )  # fmt: skip
        result[f"predict_{backend}"] = float(re.search(r"\(([\d.]+) img/s\)", printed).group(1))
        printed = _cli(
            "evaluate", args.model, args.data, "--out", str(out / "eval"), "--no-report",
            "-q", "--backend", backend,
        )  # fmt: skip
        result[f"image_auroc_{backend}"] = float(re.search(r"image AUROC ([\d.]+)", printed)[1])
    reference_rate = result["backbone_eager_default_layout"]
    for backend in BACKENDS:
        result[f"predict_{backend}_vs_eager_backbone"] = round(
            result[f"predict_{backend}"] / reference_rate, 2
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
