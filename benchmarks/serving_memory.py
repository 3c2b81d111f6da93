"""Resident memory of a process serving one model: load it, score one image, read VmRSS.

    PATH=.venv/bin:$PATH python benchmarks/serving_memory.py MODEL_OR_EXPORT IMAGE

Run once per model in a fresh process (what a service does at start). Prints the model's size
on disk, the process's RSS after loading and after the first image, and their difference.
An exported folder is loaded with the torch-free runtime; a saved model with `defectlens.load`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    model, image = sys.argv[1], sys.argv[2]
    from defectlens.runtime.deployed import ExportedModel, is_export

    start = rss_mb()
    if is_export(model):
        loaded = ExportedModel(model)
        kind = "export"
    else:
        import torch

        torch.set_num_threads(2)
        from defectlens import load

        loaded = load(model)
        kind = "model"
    after_load = rss_mb()
    loaded.predict(image)
    after_first = rss_mb()
    size = sum(f.stat().st_size for f in Path(model).iterdir()) / 2**20
    print(
        json.dumps(
            {
                "model": model,
                "kind": kind,
                "torch_imported": "torch" in sys.modules,
                "files_mb": round(size, 1),
                "rss_start_mb": round(start, 1),
                "rss_loaded_mb": round(after_load, 1),
                "rss_after_first_image_mb": round(after_first, 1),
                "rss_minus_files_mb": round(after_first - size, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
