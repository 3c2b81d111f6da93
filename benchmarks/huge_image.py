"""Cost of `defectlens predict` on one very large photo, with and without overlays.

Writes (once) a 12000 x 12000 JPEG made from the scikit-image brick texture, fits a small PaDiM
model on 256 px crops of the same texture, then runs `predict` in a child process and reports
wall time and the child's own peak RSS. The default pixel limit (8192 x 8192) refuses this image
at once; `--max-pixels` lets it through to measure the cost.

    PATH=.venv/bin:$PATH python benchmarks/huge_image.py --work /tmp/huge
    PATH=.venv/bin:$PATH python benchmarks/huge_image.py --work /tmp/huge --src ../old/src
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 12_000
MEASURED = (
    "import atexit, resource, sys; atexit.register(lambda: print('PEAK_KIB', "
    "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); "
    "from defectlens.cli import main; main()"
)


def prepare(work: Path) -> Path:
    from defectlens.data.synthetic import load_texture

    image = work / "huge.jpg"
    if not image.exists():
        work.mkdir(parents=True, exist_ok=True)
        texture = (load_texture("brick") * 255).astype(np.uint8)
        big = Image.fromarray(texture).resize((SIDE, SIDE), Image.Resampling.BILINEAR)
        big.save(image, quality=90)
        train = work / "train"
        train.mkdir()
        rng = np.random.default_rng(0)
        for i in range(20):
            y, x = (int(v) for v in rng.integers(0, texture.shape[0] - 256, 2))
            Image.fromarray(texture[y : y + 256, x : x + 256]).save(train / f"{i:03d}.png")
    return image


def run(command: list[str], env: dict) -> dict:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peaks = [line for line in result.stderr.splitlines() if line.startswith("PEAK_KIB")]
    other = [line for line in result.stderr.splitlines() if not line.startswith("PEAK_KIB")]
    return {
        "exit": result.returncode,
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(int(peaks[-1].split()[1]) / 1024**2, 2) if peaks else None,
        "stderr": " | ".join(other)[-300:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/defectlens-huge"))
    parser.add_argument("--src", type=Path, default=None, help="another checkout's src/")
    args = parser.parse_args()
    image = prepare(args.work)
    env = dict(os.environ)
    tag = "this" if args.src is None else args.src.resolve().parent.name
    if args.src is not None:
        env["PYTHONPATH"] = str(args.src.resolve())
    cli = [sys.executable, "-c", MEASURED]
    model = args.work / f"model-{tag}"
    if not (model / "config.json").exists():
        fit = [*cli, "fit", str(args.work / "train"), "--out", str(model), "-q"]
        subprocess.run(fit, env=env, check=True, capture_output=True)
    limit = [] if args.src is not None else ["--max-pixels", str(SIDE * SIDE)]
    cases = {"overlays": [], "no-images": ["--no-images"]}
    if args.src is None:
        cases["default limit"] = ["--no-images", "DEFAULT"]
    for name, extra in cases.items():
        out = args.work / f"out-{tag}-{name.replace(' ', '-')}-{int(time.time())}"
        options = [e for e in extra if e != "DEFAULT"] + ([] if "DEFAULT" in extra else limit)
        command = [*cli, "predict", str(model), str(image), "--out", str(out), "-q", *options]
        print(json.dumps({"code": tag, "case": name, **run(command, env)}), flush=True)


if __name__ == "__main__":
    main()
