"""Back-to-back speed and accuracy of a saved model on every backend and as every export.

    PATH=.venv/bin:$PATH python benchmarks/speed.py MODEL DATA [--out bench-output/speed]

Measured one after the other in one run, on the same real images (the shared development
machine's speed drifts by up to 2x over a session, so only figures measured together compare):
- backbone img/s: eager torch in the default memory layout (the reference), then the torch
  (eager, channels-last), onnxruntime and openvino backends; batch of 32, no decoding;
- model img/s: `Detector.score_batch` (backbone + method head + smoothing) on each backend;
- exports: `defectlens export MODEL` as onnx, openvino and onnx --int8 (calibrated and refitted
  on DATA's training images), with the time each took;
- predict img/s: `defectlens predict M DATA/test --no-images` for the model on each backend and
  for each export (the rate the command prints: decoding, resizing, scoring, maps at full
  resolution, results.csv), and its ratio to the eager reference backbone alone;
- image AUROC: `defectlens evaluate` of each on DATA's test set;
- decisions: how many test images each export decides differently from the model on the first
  of `--backends` (torch by default), and the largest relative score difference.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from defectlens import load
from defectlens.data import find_normal_images
from defectlens.data.loader import iter_batches

sys.path.insert(0, str(Path(__file__).parent))
from bench import rate

BACKENDS = ("torch", "onnxruntime", "openvino")
EXPORTS = {
    "export-onnx": ["--format", "onnx"],
    "export-openvino": ["--format", "openvino"],
    "export-int8": ["--format", "onnx", "--int8", "--calibration"],  # + DATA
}


def _cli(*args: str) -> str:
    command = [sys.executable, "-m", "defectlens", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return done.stdout


def _rows(path: Path) -> dict[str, dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {row["path"]: row for row in csv.DictReader(fh)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--out", default="bench-output/speed")
    parser.add_argument(
        "--backends", default=",".join(BACKENDS), help="the model's backends to run; the first "
        "is the reference for decisions (DifferNet: onnxruntime, its maps are slow on any)"
    )  # fmt: skip
    parser.add_argument(
        "--exports", default=",".join(EXPORTS), help="exports to make (DifferNet: export-onnx)"
    )
    args = parser.parse_args()
    backends = args.backends.split(",")
    exports = {name: EXPORTS[name] for name in args.exports.split(",")}
    torch.set_num_threads(2)
    out_root = Path(args.out)
    detector = load(args.model, backend="torch")
    images = find_normal_images(args.data)[:32]
    batch_np = next(iter_batches(images, detector.image_size, 32)).images
    batch = torch.from_numpy(batch_np)
    extractor = detector.ensure_extractor()
    reference = copy.deepcopy(extractor).eval()
    reference.net.to(memory_format=torch.contiguous_format)  # the layout torch gives by default
    result: dict = {"model": args.model, "data": args.data}
    with torch.no_grad():
        result["backbone_eager_default_layout"] = round(rate(reference, batch), 1)
        for backend in backends:
            detector.use_backend(backend)
            result[f"backbone_{backend}"] = round(rate(extractor.fast, batch), 1)
            result[f"model_{backend}"] = round(rate(detector.score_batch, batch_np), 1)
    del detector, extractor, reference
    runs = {f"model-{b}": (args.model, ["--backend", b]) for b in backends}
    for name, options in exports.items():
        target = out_root / name
        options = [*options, args.data] if name == "export-int8" else options
        start = time.perf_counter()
        printed = _cli("export", args.model, "--out", str(target), "-q", *options)
        result[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
        result[f"{name}_printed"] = printed.strip().splitlines()
        runs[name] = (str(target), [])
    for name, (model, options) in runs.items():
        out = out_root / "predict" / name
        printed = _cli(
            "predict", model, f"{args.data}/test", "--out", str(out), "--no-images",
            "--overwrite", "-q", *options,
        )  # fmt: skip
        result[f"predict_{name}"] = float(re.search(r"\(([\d.]+) img/s\)", printed).group(1))
        result[f"predict_{name}_vs_eager_backbone"] = round(
            result[f"predict_{name}"] / result["backbone_eager_default_layout"], 2
        )
        shutil.rmtree(out_root / "evaluate" / name, ignore_errors=True)  # a rerun replaces it
        printed = _cli(
            "evaluate", model, args.data, "--out", str(out_root / "evaluate" / name),
            "--no-report", "-q", *options,
        )  # fmt: skip
        result[f"image_auroc_{name}"] = float(re.search(r"image AUROC ([\d.]+)", printed)[1])
    reference_rows = _rows(out_root / "predict" / f"model-{backends[0]}" / "results.csv")
    for name in runs:
        rows = _rows(out_root / "predict" / name / "results.csv")
        assert rows.keys() == reference_rows.keys()
        differ = sum(rows[p]["predicted"] != reference_rows[p]["predicted"] for p in rows)
        drift = max(
            abs(float(rows[p]["score"]) - float(r["score"])) / abs(float(r["score"]))
            for p, r in reference_rows.items()
        )
        result[f"decisions_differing_{name}"] = f"{differ}/{len(rows)}"
        result[f"max_score_rel_diff_{name}"] = float(f"{drift:.2g}")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
