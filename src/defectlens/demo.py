"""`defectlens demo`: the main job end to end on data the library generates itself."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from defectlens.data.synthetic import TEXTURES, make_category
from defectlens.detector import Detector
from defectlens.errors import DefectLensError
from defectlens.evaluation import evaluate
from defectlens.outputs import clear_results, prepare_results_dir, read_results_marker


def run_demo(
    out: Path,
    method: str = "padim",
    image_size: int = 256,
    textures: list[str] | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    **data_kwargs,
) -> dict:
    # 200 training crops, so that the threshold comes from 20 held-out ones: with make_category's
    # 60, six set it (the rough threshold fit warns of) and 40 % of the good grass crops were
    # flagged; with 200, 0-5 % on the three textures (measured 2026-12-08, PaDiM at 256 px).
    data_kwargs.setdefault("n_train", 200)
    textures = textures or list(TEXTURES)
    unknown = [t for t in textures if t not in TEXTURES]
    if unknown:
        raise DefectLensError(f"unknown texture(s) {unknown}; choose from {', '.join(TEXTURES)}")
    Detector(method=method, image_size=image_size)  # a bad method or size: said before writing
    rerun = read_results_marker(Path(out)).get("command") == "demo"
    prepare_results_dir(out, ["data", "summary.json", *textures], "demo")
    if rerun:  # an earlier demo's textures, data and summary: none is left beside this run's
        clear_results(Path(out), ["data", "summary.json", *TEXTURES])
    summary = {}
    for texture in textures:
        root = make_category(out / "data", texture, **data_kwargs)
        start = time.perf_counter()
        detector = Detector(method=method, image_size=image_size).fit(root, progress=progress)
        fit_seconds = time.perf_counter() - start
        detector.save(out / texture / "model")
        result = evaluate(detector, root, out / texture, progress=progress)
        summary[texture] = {**result.metrics, "fit_seconds": fit_seconds}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    echo(
        f"\n{'category':10s} {'img AUROC':>9s} {'pix AUROC':>9s} {'AUPRO':>7s} "
        f"{'false al.':>9s} {'misses':>7s} {'fit s':>6s} {'img/s':>6s}"
    )
    for texture, m in summary.items():
        echo(
            f"{texture:10s} {m['image_auroc']:9.3f} {m['pixel_auroc']:9.3f} {m['aupro']:7.3f} "
            f"{m['false_alarm_rate']:9.3f} {m['miss_rate']:7.3f} {m['fit_seconds']:6.1f} "
            f"{m['images_per_second']:6.1f}"
        )
    echo(f"\nreports: {', '.join(str(out / t / 'report.html') for t in summary)}")
    return summary
