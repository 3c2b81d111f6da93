"""Few-shot benchmark: leave one category out, train RegAD's registration on the others, fit
every method on the same K support images (same seeded draws, same augmentations), evaluate
on the left-out category's test set.

    python benchmarks/fewshot.py ../shared/data --out benchmarks/results/fewshot.jsonl

Each category in DATA (an MVTec-layout root per folder) is left out in turn. Its train/good
images are split once (seed 0): 20 validation images (thresholds only; they never affect
AUROC) and the rest, from which each draw takes K support images (`--shots`, `shot_seed` =
draw). Methods (`--methods`):
- regad: registration trained on the other categories (cached in --registrations),
- regad_identity: untrained transformers (PaDiM on the augmented supports, RegAD's ablation),
- regad_default: the registration model shipped with defectlens,
- padim, patchcore, spade, differnet: the same supports and augmentation,
- padim_full: PaDiM on every train/good image except the validation ones, no augmentation,
  once per category (the reference the gap is measured to),
- any of these with "@cN" appended (e.g. regad@c100): the same, keeping N random channels of
  the concatenated stages (PaDiM's `n_channels`) instead of all of them. Without it the
  regad family keeps all 176, as every row before 2026-12-07 was measured; RegAD's own default
  since then is 100 channels, which is regad@c100 / regad_default@c100 here. With "@lw" (e.g.
  padim@lw, regad@c100@lw): the covariances shrunk by Ledoit-Wolf (`shrinkage`) instead of
  only the fixed epsilon; with "@jD" (regad and regpatchcore, e.g. regad@j20): the
  registration trained with its training images turned by up to D degrees (`regad train
  --pose-jitter D`), cached as reg-CATEGORY-jD; with "@bL" (regad and regpatchcore, e.g.
  regad@b0.001): the registration trained with its backbone at learning rate L (`regad train
  --backbone-lr L`), cached as reg-CATEGORY-bL, and fitted on that tuned backbone;
  `--reg-seed N` (not 0) trains with that seed, cached with "-sN" appended; with "@pose"
  (e.g. regad@c100@pose): the registration's pool also holds the 15 generated pose categories
  the shipped registration is trained on (public-domain images in random poses), cached as
  reg-CATEGORY-pose: does a larger pool help?
- regpatchcore: PatchCore's memory bank and scoring on RegAD's registered features (the
  stride 8 and 16 stages, returned to the image frame by the registration regad uses): does
  registration help a nearest-neighbour scorer? A benchmark-only variant, defined here.
One JSON line per (category, method, K, draw) is appended to --out; finished rows are skipped
on a rerun, so the run can be resumed. `--summary` prints the Markdown tables from --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from defectlens import Detector
from defectlens.components.registration import (
    BACKBONE_FILE,
    check_registration_fits,
    load_registration,
)
from defectlens.data.dataset import find_normal_images
from defectlens.evaluation import evaluate
from defectlens.methods import PatchCore

N_VAL = 20
FEW_SHOT = ("regad", "regad_identity", "regad_default", "padim", "patchcore", "spade", "differnet")
REGISTERED = ("regad", "regpatchcore")  # the methods that read a trained registration


class RegisteredPatchCore(PatchCore):
    """PatchCore on RegAD's registered features: the extractor taps strides 4, 8 and 16 (the
    registration's stages), and the patch features are built from the 8 and 16 ones returned
    to the image frame, as PatchCore builds them from the plain taps. Eager torch only; not
    saved or exported (benchmark-only)."""

    name = "regpatchcore"
    augments_support = True

    def __init__(self, registration: str, **params) -> None:
        super().__init__(strides=(4, 8, 16), **params)
        self.registration = registration
        self.net = None  # loaded on first use

    def embed(self, extractor, images: torch.Tensor) -> torch.Tensor:
        if self.net is None:
            net, config = load_registration(self.registration)
            check_registration_fits(config, extractor, self.registration)
            self.net = net.eval()
        with torch.no_grad():
            maps = dict(
                zip(self.strides, self.net.image_frame_features(extractor, images), strict=True)
            )
        return self.patch_features([maps[8], maps[16]])


def registration_options(name: str) -> tuple[float, float, bool]:
    """The "@jD", "@bL" and "@pose" options of a method name: degrees of pose jitter, the
    backbone's learning rate (0 when absent), and whether the pool also holds the shipped
    registration's 15 generated pose categories."""
    options = name.split("@")[1:]
    jitter = next((float(o[1:]) for o in options if o.startswith("j")), 0.0)
    backbone_lr = next((float(o[1:]) for o in options if o.startswith("b")), 0.0)
    return jitter, backbone_lr, "pose" in options


def registration_for(
    category: Path, data: list[Path], folder: Path, args, options: tuple[float, float]
) -> Path:
    """The registration trained without `category` (trained now if not cached)."""
    from defectlens.training.registration import RegistrationConfig, build_registration

    jitter, backbone_lr, pose = options
    suffix = (f"-j{jitter:g}" if jitter else "") + (f"-b{backbone_lr:g}" if backbone_lr else "")
    suffix += ("-pose" if pose else "") + (f"-s{args.reg_seed}" if args.reg_seed else "")
    path = folder / f"reg-{category.name}{suffix}"
    if not (path / "config.json").is_file():
        config = RegistrationConfig(
            max_epochs=args.reg_epochs,
            max_minutes=args.reg_minutes,
            pose_jitter=jitter,
            backbone_learning_rate=backbone_lr,
            seed=args.reg_seed,
        )
        pool = [d for d in data if d != category]
        with tempfile.TemporaryDirectory(prefix="defectlens-pose-") as root:
            if pose:  # the shipped registration's generated categories, 48 poses each
                from defectlens.data.synthetic import POSE_SOURCES, make_pose_category

                pool += [make_pose_category(root, n, 48, args.image_size) for n in POSE_SOURCES]
            build_registration(pool, path, image_size=args.image_size, config=config, progress=True)
    return path


def detector_for(name: str, k: int | None, draw: int, registration: Path | None, image_size: int):
    # A name may end in "@cN": the same method keeping N random channels (n_channels=N).
    name, _, variant = name.partition("@")
    # regad_default passes none: the registration shipped with defectlens
    registrations = {
        "regad": str(registration),
        "regpatchcore": str(registration),
        "regad_identity": "identity",
    }
    params = {"registration": registrations[name]} if name in registrations else {}
    if name.startswith("regad"):
        params["n_channels"] = None  # all channels unless "@cN" (see the module docstring)
    for option in filter(None, variant.split("@")):
        if option == "lw":  # Ledoit-Wolf shrinkage of the covariance (PaDiM's `shrinkage`)
            params["shrinkage"] = "ledoit_wolf"
        elif option[0] in "jb" or option == "pose":  # chosen by the registration passed in
            continue
        else:
            params["n_channels"] = int(option.removeprefix("c"))
    tuned = registration / BACKBONE_FILE if registration and name in REGISTERED else None
    return Detector(
        method={"padim_full": "padim"}.get(name, name.split("_")[0]),
        weights=str(tuned) if tuned and tuned.is_file() else None,
        image_size=image_size,
        method_params=params,
        shots=k,
        shot_seed=draw,
        augment_support=name != "padim_full",
    )


def run(args) -> None:
    torch.set_num_threads(2)
    data = sorted(Path(d) for d in args.data)
    if len(data) == 1 and not (data[0] / "train").is_dir():
        data = sorted(p for p in data[0].iterdir() if (p / "train" / "good").is_dir())
    chosen = [d for d in data if d.name in args.categories] if args.categories else data
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.is_file():
        for line in out.read_text().splitlines():
            row = json.loads(line)
            done.add((row["category"], row["method"], row["shots"], row["draw"]))
    folder = Path(args.registrations)
    folder.mkdir(parents=True, exist_ok=True)
    for category in chosen:
        images = find_normal_images(category)
        order = np.random.default_rng(0).permutation(len(images))
        val = [images[i] for i in sorted(order[:N_VAL])]
        candidates = [images[i] for i in sorted(order[N_VAL:])]
        registrations = {
            o: registration_for(category, data, folder, args, o)
            for o in {
                registration_options(m) for m in args.methods if m.partition("@")[0] in REGISTERED
            }
        }
        jobs = [(m, k, d) for k in args.shots for d in range(args.draws) for m in args.methods]
        if "padim_full" in args.methods:
            jobs = [("padim_full", None, 0)] + [j for j in jobs if j[0] != "padim_full"]
        for method, k, draw in jobs:
            if (category.name, method, k, draw) in done:
                continue
            registration = registrations.get(registration_options(method))
            detector = detector_for(method, k, draw, registration, args.image_size)
            start = time.perf_counter()
            detector.fit(candidates, val_images=val)
            fit_seconds = time.perf_counter() - start
            start = time.perf_counter()
            result = evaluate(detector, category, report=False)
            eval_seconds = time.perf_counter() - start
            row = {
                "category": category.name,
                "method": method,
                "shots": k,
                "draw": draw,
                "image_auroc": result.metrics.get("image_auroc"),
                "pixel_auroc": result.metrics.get("pixel_auroc"),
                "aupro": result.metrics.get("aupro"),
                "fit_s": round(fit_seconds, 2),
                "images_per_s": round(len(result.samples) / eval_seconds, 2),
                "support": [Path(p).name for p in detector.fit_images_] if k else None,
            }
            print(json.dumps(row), flush=True)
            with out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")


def summary(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["category"], r["method"], r["shots"])].append(r)
    categories = sorted({r["category"] for r in rows})
    present = {r["method"] for r in rows}
    known = [m for m in ("padim_full", *FEW_SHOT) if m in present]
    methods = known + sorted(present - set(known))
    shots = sorted({r["shots"] for r in rows if r["shots"] is not None})

    def values(c: str, m: str, k: int | None, metric: str) -> list[float]:
        g = groups.get((c, m, None if m == "padim_full" else k), [])
        found = [r[metric] for r in g if r[metric] is not None]
        return [v for v in found if not math.isnan(v)]

    for metric in ("image_auroc", "pixel_auroc"):
        print(f"\n{metric} (mean ± std over support draws)\n")
        print("| left out | K | " + " | ".join(methods) + " |")
        print("|---|---|" + "---|" * len(methods))
        for c in categories:
            for k in shots:
                if not any(groups.get((c, m, k)) for m in methods if m != "padim_full"):
                    continue
                cells = []
                for m in methods:
                    v = values(c, m, k, metric)
                    if not v:
                        cells.append("–")
                    elif len(v) == 1:
                        cells.append(f"{v[0]:.3f}")
                    else:
                        cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f}")
                print(f"| {c} | {k} | " + " | ".join(cells) + " |")
        # The mean over the sets that every method covers at K = 8.
        covered = [c for c in categories if all(values(c, m, 8, metric) for m in methods)]
        if covered:
            means = [np.mean([np.mean(values(c, m, 8, metric)) for c in covered]) for m in methods]
            print(f"| mean of {len(covered)} | 8 | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    print("\ngap to full-data PaDiM (image AUROC, padim_full minus the method), by K\n")
    for m in ("regad", "regad_identity", "padim"):
        # only the sets measured at every K, so that the K columns compare
        sets = [
            c
            for c in categories
            if values(c, "padim_full", None, "image_auroc")
            and all(values(c, m, k, "image_auroc") for k in shots)
        ]
        if not sets:
            continue
        full = {c: np.mean(values(c, "padim_full", None, "image_auroc")) for c in sets}
        gaps = {k: [full[c] - np.mean(values(c, m, k, "image_auroc")) for c in sets] for k in shots}
        cells = [f"K={k}: {np.mean(gaps[k]):+.3f}" for k in shots]
        print(f"- {m} ({', '.join(sets)}): " + ", ".join(cells))
    print("\nfit seconds / evaluate img/s (mean over rows, machine shared with other jobs)\n")
    for m in methods:
        g = [r for r in rows if r["method"] == m]
        fit = np.mean([r["fit_s"] for r in g])
        speed = np.mean([r["images_per_s"] for r in g])
        print(f"- {m}: fit {fit:.1f} s, evaluate {speed:.1f} img/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="+", help="a folder of categories, or category roots")
    parser.add_argument("--out", default="benchmarks/results/fewshot.jsonl")
    parser.add_argument("--categories", nargs="*", help="leave out only these")
    parser.add_argument("--methods", nargs="+", default=["regad", "regad_identity", "padim"])
    parser.add_argument("--shots", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--registrations", default="/tmp/defectlens-fewshot-registrations")
    parser.add_argument("--reg-epochs", type=int, default=10)
    parser.add_argument("--reg-minutes", type=float, default=8.0)
    parser.add_argument(
        "--reg-seed", type=int, default=0, help="registration training seed (cached as -sN)"
    )
    parser.add_argument("--summary", action="store_true", help="only print the tables")
    args = parser.parse_args()
    if args.summary:
        summary(Path(args.out))
        return
    run(args)


if __name__ == "__main__":
    sys.exit(main())
