"""PatchCore's nearest-neighbour index: exact vs IVF vs HNSW on one fitted model, back to back.

    PATH=.venv/bin:$PATH python benchmarks/patchcore_index.py MODEL DATA [--out DIR]

MODEL is a saved PatchCore model (fitted once, e.g. `defectlens fit DATA --method patchcore
--out MODEL`). The index is rebuilt from the saved bank at load, so each variant is the same
model with `method_params.index` changed in a copy of its config.json; each is scored with
`defectlens evaluate` one after the other. Prints, per index: end-to-end img/s (evaluate's
scoring loop: decode, backbone, search, maps), image AUROC, pixel AUROC, AUPRO, and the largest
relative difference of image scores from exact search.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

INDICES = ("exact", "ivf", "hnsw")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--out", default="bench-output/patchcore-index")
    args = parser.parse_args()
    out = Path(args.out)
    scores: dict[str, dict[str, float]] = {}
    for name in INDICES:
        model = out / "models" / name
        shutil.rmtree(model, ignore_errors=True)
        shutil.copytree(args.model, model)
        config = json.loads((model / "config.json").read_text())
        config["detector"]["method_params"]["index"] = name
        (model / "config.json").write_text(json.dumps(config, indent=2))
        results = out / "evaluate" / name
        shutil.rmtree(results, ignore_errors=True)  # a rerun's evaluation replaces the last one
        command = [sys.executable, "-m", "defectlens", "evaluate", str(model), args.data]
        command += ["--out", str(results), "--no-report", "-q"]
        subprocess.run(command, check=True, capture_output=True)
        metrics = json.loads((results / "metrics.json").read_text())
        with open(results / "scores.csv", newline="", encoding="utf-8") as fh:
            scores[name] = {r["path"]: float(r["score"]) for r in csv.DictReader(fh)}
        reference = scores["exact"]
        drift = max(abs(scores[name][p] - s) / abs(s) for p, s in reference.items())
        row = {
            "data": Path(args.data).name,
            "index": name,
            "img_s": round(metrics["images_per_second"], 1),
            "image_auroc": round(metrics["image_auroc"], 4),
            "pixel_auroc": round(metrics["pixel_auroc"], 4),
            "aupro": round(metrics["aupro"], 4),
            "max_score_rel_diff_vs_exact": float(f"{drift:.2g}"),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
