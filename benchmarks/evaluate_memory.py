"""Peak memory of `defectlens evaluate --save-maps` on a large test set of large images.

Generates (once, seeded) an MVTec-layout set of 800 x 1600 images: 30 normal training images and
N test images (half defective, with exact masks), all from the scikit-image brick texture so that
nothing from the research datasets is used. Fits PaDiM at 256 px, then runs the CLI's evaluate
in a child process and reports its wall time and peak RSS (the child's own ru_maxrss, printed
by the child at exit, so the model fit before it does not count).

    PATH=.venv/bin:$PATH python benchmarks/evaluate_memory.py --images 200 --work /tmp/evalmem
    # compare another checkout: --src ../old/src (run with that tree's package on PYTHONPATH)
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
from PIL import Image, ImageDraw

HEIGHT, WIDTH = 800, 1600


def _texture_image(texture: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = texture.shape
    y, x = int(rng.integers(0, h - 200)), int(rng.integers(0, w - 400))
    crop = Image.fromarray((texture[y : y + 200, x : x + 400] * 255).astype(np.uint8))
    return np.asarray(crop.resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR))


def make_dataset(root: Path, n_test: int, seed: int = 0) -> None:
    from defectlens.data.synthetic import load_texture

    if (root / "done.json").exists():
        return
    texture = load_texture("brick")
    rng = np.random.default_rng(seed)
    for folder in ("train/good", "test/good", "test/blob", "ground_truth/blob"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(30):
        Image.fromarray(_texture_image(texture, rng)).save(root / "train/good" / f"{i:03d}.png")
    for i in range(n_test):
        image = _texture_image(texture, rng)
        if i % 2 == 0:
            Image.fromarray(image).save(root / "test/good" / f"{i:03d}.png")
            continue
        mask = Image.new("L", (WIDTH, HEIGHT), 0)
        cx, cy = int(rng.integers(100, WIDTH - 100)), int(rng.integers(100, HEIGHT - 100))
        r = int(rng.integers(20, 60))
        ImageDraw.Draw(mask).ellipse((cx - r, cy - r // 2, cx + r, cy + r // 2), fill=255)
        m = np.asarray(mask) > 0
        image = image.copy()
        image[m] = 255 - image[m] // 3
        Image.fromarray(image).save(root / "test/blob" / f"{i:03d}.png")
        mask.save(root / "ground_truth/blob" / f"{i:03d}_mask.png")
    (root / "done.json").write_text(json.dumps({"n_test": n_test, "seed": seed}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="test images")
    parser.add_argument("--work", type=Path, default=Path("/tmp/defectlens-evalmem"))
    parser.add_argument("--src", type=Path, default=None, help="another checkout's src/")
    parser.add_argument("--no-save-maps", action="store_true")
    args = parser.parse_args()
    data = args.work / f"data-{args.images}"
    make_dataset(data, args.images)
    env = dict(os.environ)
    if args.src is not None:
        env["PYTHONPATH"] = str(args.src.resolve())
    cli = [sys.executable, "-c", "from defectlens.cli import main; main()"]
    measured = [
        sys.executable,
        "-c",
        "import atexit, resource, sys; atexit.register(lambda: print('PEAK_KIB', "
        "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)); "
        "from defectlens.cli import main; main()",
    ]
    # Each checkout fits its own model (model formats differ between versions).
    model = args.work / ("model" if args.src is None else f"model-{args.src.resolve().parent.name}")
    if not (model / "config.json").exists():
        fit = [*cli, "fit", str(data), "--out", str(model), "-q"]
        subprocess.run(fit, env=env, check=True)
    out = args.work / f"eval-{args.images}-{int(time.time())}"
    command = [*measured, "evaluate", str(model), str(data), "--out", str(out), "-q"]
    if not args.no_save_maps:
        command.append("--save-maps")
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak_lines = [line for line in result.stderr.splitlines() if line.startswith("PEAK_KIB")]
    peak_kib = int(peak_lines[-1].split()[1]) if peak_lines else -1
    print(result.stdout.strip(), result.stderr.strip()[-500:], sep="\n")
    report = {
        "images": args.images,
        "size": f"{HEIGHT}x{WIDTH}",
        "save_maps": not args.no_save_maps,
        "src": str(args.src or "this checkout"),
        "exit": result.returncode,
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(peak_kib / 1024**2, 2),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
