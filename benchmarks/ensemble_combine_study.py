"""How should an ensemble combine its members? Label-free rules compared on real test sets.

    python benchmarks/ensemble_combine_study.py DATA... --out benchmarks/results/ensemble_combine

Per dataset, the split `defectlens select` uses (80 % of train/good to fit, the other 20 % as
validation images and, each with one synthetic defect, as the synthetic task). One ensemble of
padim + patchcore + spade is fitted (every member on the same images); then, for the
validation images, the synthetic task and the real test/ set, each member's image score is
recorded two ways: its raw map's maximum or own score (`raw`: the ensemble run with
`score_sigma=0`, the rule before 2026-12-05), and the maximum of its map smoothed as a detector
smooths it (`smooth`). `alone` takes, per member, what it scores on its own (PatchCore and
SPADE their own score, PaDiM its smoothed maximum: what `Ensemble` reads now). The
arrays go to `<out>/<dataset>.npz`; combination rules are then compared from those arrays (one
JSON line per dataset and rule). Every rule uses validation (normal) images or the synthetic
task only; the test labels are read for the AUROC printed, never by a rule.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from defectlens.components.resample import resample
from defectlens.data.dataset import find_normal_images, find_test_samples
from defectlens.data.loader import iter_batches
from defectlens.metrics import auroc
from defectlens.selection import Candidate, make_task, split_for_selection

MEMBERS = ("padim", "patchcore", "spade")
OWN_SCORES = ("patchcore", "spade")  # members that score images themselves (PaDiM: map max)


def member_scores(detector, sources, size: int) -> dict[str, np.ndarray]:
    """Per member: raw-map max (or own score) and smoothed-map max, for every source."""
    model, extractor = detector.model_, detector.ensure_extractor()
    out: dict[str, list[np.ndarray]] = {}
    for batch in iter_batches(list(sources), size, 32):
        images = torch.from_numpy(batch.images)
        outputs = model._member_outputs(extractor, images)  # study only: the members' raw view
        for name, (score, maps) in zip(model.members, outputs, strict=True):
            smooth = resample(maps.numpy(), (size, size), size, detector.sigma)
            out.setdefault(f"{name}_raw", []).append(score.numpy())
            out.setdefault(f"{name}_smooth", []).append(smooth.reshape(len(smooth), -1).max(1))
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}


def collect(root: Path, out: Path) -> Path:
    target = out / f"{root.name}.npz"
    if target.exists():
        return target
    fit_images, held_out = split_for_selection(find_normal_images(root), seed=0)
    task = make_task(held_out, 256, seed=0)
    params = (("members", MEMBERS), ("score_sigma", 0.0))  # raw maps' maxima: smoothed below
    candidate = Candidate("ensemble", "efficientnet_lite0", 256, params)
    detector = candidate.detector(32, 0)
    started = time.perf_counter()
    detector.fit(list(fit_images), val_images=task.sources)
    fit_s = time.perf_counter() - started
    samples = find_test_samples(root)
    arrays = {}
    for split, sources in (("val", task.sources), ("task", task.images)):
        for key, values in member_scores(detector, sources, 256).items():
            arrays[f"{split}_{key}"] = values
    for key, values in member_scores(detector, [s.path for s in samples], 256).items():
        arrays[f"test_{key}"] = values
    arrays["task_labels"] = task.labels
    arrays["test_labels"] = np.array([s.label for s in samples])
    arrays["fit_s"] = np.array(fit_s)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(target, **arrays)
    return target


def standardise(values: np.ndarray, val: np.ndarray, robust: bool) -> np.ndarray:
    if robust:
        centre = np.median(val)
        spread = 1.4826 * np.median(np.abs(val - centre))
    else:
        centre, spread = val.mean(), val.std(ddof=1)
    return (values - centre) / max(spread, 1e-12)


def rules(z: np.ndarray, synthetic: np.ndarray) -> dict[str, np.ndarray]:
    """Combined scores (N,) from standardised member scores z (M, N). `synthetic`: each
    member's synthetic-task AUROC (label-free weights)."""
    weights = np.clip(synthetic - 0.5, 1e-3, None)
    best = int(np.argmax(synthetic))
    return {
        "mean": z.mean(0),
        "max": z.max(0),
        "synthetic_weighted_mean": (weights[:, None] * z).sum(0) / weights.sum(),
        "synthetic_best_member": z[best],
    }


def compare(path: Path) -> list[dict]:
    data = dict(np.load(path))
    lines = []
    for m in MEMBERS:  # what each member scores on its own
        data[f"val_{m}_alone"], data[f"task_{m}_alone"], data[f"test_{m}_alone"] = (
            data[f"{split}_{m}_{'raw' if m in OWN_SCORES else 'smooth'}"]
            for split in ("val", "task", "test")
        )
    for variant, robust in itertools.product(("raw", "alone", "smooth"), (False, True)):
        for subset in [s for r in (2, 3) for s in itertools.combinations(MEMBERS, r)]:
            z_task, z_test, single = [], [], {}
            for m in subset:
                val = data[f"val_{m}_{variant}"]
                z_task.append(standardise(data[f"task_{m}_{variant}"], val, robust))
                z_test.append(standardise(data[f"test_{m}_{variant}"], val, robust))
                single[m] = auroc(data[f"test_{m}_alone"], data["test_labels"])
            z_task, z_test = np.stack(z_task), np.stack(z_test)
            synthetic = np.array([auroc(t, data["task_labels"]) for t in z_task])
            task_rules = rules(z_task, synthetic)
            for name, combined in rules(z_test, synthetic).items():
                real = auroc(combined, data["test_labels"])
                lines.append(
                    {
                        "data": path.stem,
                        "members": "+".join(subset),
                        "scores": variant,
                        "standardise": "median/MAD" if robust else "mean/sd",
                        "rule": name,
                        "synthetic_auroc": auroc(task_rules[name], data["task_labels"]),
                        "real_image_auroc": real,
                        "best_member": max(single, key=single.get),
                        "best_member_auroc": max(single.values()),
                        "minus_best_member": real - max(single.values()),
                    }
                )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    np.seterr(all="ignore")
    for root in args.data:
        for line in compare(collect(root, args.out)):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
