"""Which synthetic defects rank configurations as real defects do? (issue 15)

    python benchmarks/defect_kinds_study.py DATA... [--candidates ...] [--cache DIR]

The selection study (`selection_study.py`) found the drawn defects (scratch, spot, hole,
patch, smudge) far easier than real ones, so the synthetic task saturates on some sets. This
study scores every defect kind separately on the same fitted candidates: the split, seeds and
candidates are `selection_study.py`'s, so each fit equals the one there. Each held-out normal
image is scored as it is and once with a defect of each kind (`selection.make_task`, seeded
per kind), so a group of kinds (`drawn`, `self`, `all`) gives exactly the task
`defectlens select --defects GROUP` scores on. For each set of kinds
the summary gives what `defectlens select` would have picked with it: the Spearman rank
correlation of synthetic and real image AUROC over the candidates, and the pick's real image
AUROC against the best in hindsight. Fitted models are kept under --cache, so a changed
generator is re-scored without refitting; their real test metrics are computed once at fit.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from selection_study import DEFAULT_CANDIDATES, parse  # benchmarks/ is on the path when run

from defectlens.data.dataset import find_normal_images
from defectlens.data.synthetic import ALL_DEFECTS, DEFECT_GROUPS
from defectlens.detector import Detector
from defectlens.evaluation import evaluate
from defectlens.metrics import aupro, auroc
from defectlens.selection import make_task, split_for_selection

# The selection study's candidates and its lite2 rows, in its order (so fits equal its fits).
CANDIDATES = [
    *DEFAULT_CANDIDATES,
    "padim/efficientnet_lite2/256",
    "patchcore/efficientnet_lite2/256",
]


def fitted(text: str, root: Path, fit_images, held_out, cache: Path) -> tuple[Detector, dict]:
    """The candidate fitted as `select` fits it (from the cache when there), and its real
    test metrics."""
    folder = cache / root.name / re.sub(r"[^a-z0-9]+", "_", text)
    meta_path = folder.with_suffix(".json")
    if meta_path.exists():
        return Detector.load(folder), json.loads(meta_path.read_text())
    detector = parse(text).detector(batch_size=32, seed=0)  # as the selection study builds it
    started = time.perf_counter()
    detector.fit(list(fit_images), val_images=list(held_out))
    fit_s = time.perf_counter() - started
    metrics = evaluate(detector, root, report=False).metrics
    meta = {
        "fit_s": fit_s,
        "real_image_auroc": metrics["image_auroc"],
        "real_pixel_auroc": metrics.get("pixel_auroc"),
    }
    detector.save(folder)
    meta_path.write_text(json.dumps(meta))
    return detector, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="+", type=Path)
    parser.add_argument("--candidates", nargs="+", default=CANDIDATES)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/defect_kinds_cache"))
    parser.add_argument("--scores", type=Path, default=None, help="save raw scores (.npz) here")
    parser.add_argument(
        "--kinds", nargs="+", default=list(ALL_DEFECTS), help="score only these kinds"
    )
    args = parser.parse_args()
    side = max(int(c.split("/")[2]) for c in args.candidates)
    saved = {}
    for root in args.data:
        fit_images, held_out = split_for_selection(find_normal_images(root), seed=0)
        full = make_task(held_out, side, seed=0, kinds=args.kinds)  # what select pastes
        task = {
            kind: (
                [im for im, k in zip(full.images, full.kinds, strict=True) if k == name],
                [m for m, k in zip(full.masks, full.kinds, strict=True) if k == name],
            )
            for kind, name in [("normal", ""), *((k, k) for k in args.kinds)]
        }
        groups = {n: ks for n, ks in DEFECT_GROUPS.items() if set(ks) <= set(args.kinds)}
        groups["asked"] = tuple(args.kinds)
        rows = []
        for text in args.candidates:
            detector, meta = fitted(text, root, fit_images, held_out, args.cache)
            scores, maps = {}, {}
            for kind, (images, _) in task.items():
                predictions = detector.predict(images)
                scores[kind] = np.array([p.score for p in predictions])
                maps[kind] = [p.anomaly_map for p in predictions]
            row = {"data": root.name, "candidate": text, **meta}
            normal = scores["normal"]
            for kind in args.kinds:
                labels = np.repeat([0, 1], [len(normal), len(scores[kind])])
                row[f"auroc_{kind}"] = auroc(np.concatenate([normal, scores[kind]]), labels)
                saved[f"{root.name}|{text}|{kind}"] = scores[kind]
            saved[f"{root.name}|{text}|normal"] = normal
            for name, kinds in groups.items():
                pooled = np.concatenate([normal] + [scores[k] for k in kinds])
                labels = np.repeat([0, 1], [len(normal), len(pooled) - len(normal)])
                row[f"auroc_{name}"] = auroc(pooled, labels)
                if all(m is not None for m in maps["normal"]):
                    all_maps = maps["normal"] + [m for k in kinds for m in maps[k]]
                    masks = [np.zeros(m.shape, bool) for m in maps["normal"]]
                    masks += [m for k in kinds for m in task[k][1]]
                    row[f"aupro_{name}"] = aupro(all_maps, masks)
            print(json.dumps(row), flush=True)
            rows.append(row)
        for name in groups:
            synthetic = [r[f"auroc_{name}"] for r in rows]
            real = [r["real_image_auroc"] for r in rows]
            pick = max(rows, key=lambda r: (r[f"auroc_{name}"], r.get(f"aupro_{name}") or 0))
            best = max(rows, key=lambda r: r["real_image_auroc"])
            print(json.dumps({
                "data": root.name, "summary": name,
                "spearman_synthetic_vs_real": float(spearmanr(synthetic, real).statistic),
                "synthetic_range": [min(synthetic), max(synthetic)],
                "pick": pick["candidate"], "pick_real_image_auroc": pick["real_image_auroc"],
                "best": best["candidate"], "best_real_image_auroc": best["real_image_auroc"],
                "pick_minus_best": pick["real_image_auroc"] - best["real_image_auroc"],
            }), flush=True)  # fmt: skip
    if args.scores:
        np.savez(args.scores, **saved)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
