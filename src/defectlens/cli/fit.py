"""`defectlens fit`."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import click
from click.core import ParameterSource

from defectlens.cli.common import (
    DEFAULT_VAL_FRACTION,
    FiniteFloat,
    apply_max_pixels,
    backbone_option,
    backend_option,
    batch_size_option,
    dask_option,
    device_option,
    echo,
    image_size_option,
    mark_saved,
    max_pixels_option,
    out_option,
    quiet_option,
    target_far_option,
    warn,
    warn_if_rough_threshold,
    weights_option,
)
from defectlens.errors import DefectLensError
from defectlens.params import MAX_SIGMA


@click.command()
@click.argument("data", type=click.Path())
@click.option(
    "--method",
    default="padim",
    show_default=True,
    help="Anomaly-detection method: padim, patchcore, spade (backbone features, fitted in "
    "seconds), regad (few-shot), ensemble (several of them, --param members=...), or one that "
    "trains a network: differnet, memae, mnad, gradcon, ognet, students, patchsvdd, segaided, "
    "nbs (minutes; see the README's method table).",
)
@backbone_option("Pretrained backbone; see `defectlens backbones`.")
@weights_option
@image_size_option("Images are resized to N x N (a multiple of 32, at most 2048) before scoring.")
@out_option("Model folder to write: a new folder, or an existing defectlens model to replace.")
@click.option(
    "--val",
    "val",
    type=click.Path(),
    default=None,
    help="Folder of normal validation images for the threshold (default: hold out "
    "--val-fraction of the training images).",
)
@click.option(
    "--val-fraction",
    type=FiniteFloat(0, 1, max_open=True),
    default=DEFAULT_VAL_FRACTION,
    show_default=True,
    help="Share of training images held out to set the threshold, in [0, 1); at least one "
    "image is held out (0 holds out one).",
)
@target_far_option(
    "Target false-alarm rate on normal images for the decision threshold, in [0, 1).", 0.01
)
@click.option(
    "--sigma",
    type=FiniteFloat(0, MAX_SIGMA),
    default=4.0,
    show_default=True,
    help="Gaussian smoothing of the anomaly map, in pixels of the --image-size grid (0: "
    "none). It steadies maps and scores on textures; for defects only a few pixels wide "
    "(thin scratches, broken traces) try 0 (BENCHMARKS.md: PaDiM on printed circuit boards).",
)
@click.option(
    "--n-channels",
    type=int,
    default=None,
    help="padim, regad: random channel subset size (default: all channels for padim, 100 "
    "for regad; --param n_channels=null keeps all).",
)
@click.option(
    "--shrinkage",
    type=click.Choice(["none", "ledoit_wolf"]),
    default=None,
    help="padim: covariance estimator (default none: sample covariance + 0.01 I).",
)
@click.option(
    "--coreset-ratio",
    type=FiniteFloat(0, 1, min_open=True),
    default=None,
    help="patchcore, patchsvdd: share of training patches kept in the memory bank, in (0, 1] "
    "(default 0.1 for patchcore, 0.01 for patchsvdd).",
)
@click.option(
    "--index",
    "nn_index",
    type=click.Choice(["exact", "ivf", "hnsw"]),
    default=None,
    help="patchcore: nearest-neighbour index (default ivf: image scores still exact, maps "
    "approximate; exact is several times slower).",
)
@click.option(
    "--k-images",
    type=click.IntRange(1, 10_000),
    default=None,
    help="spade: nearest training images per test image (default 5).",
)
@click.option(
    "--members",
    default=None,
    help="ensemble: comma-separated member methods (padim, patchcore, spade) "
    "[default: padim,patchcore].",
)
@click.option(
    "--anomalies",
    default=None,
    metavar="DIR",
    help="nbs: a few labelled defective images with masks, MVTec layout (DIR/test/<defect>/ "
    "and DIR/ground_truth/<defect>/<name>_mask.png). Default: synthetic defects pasted on "
    "held-out training images. Never give the test set you evaluate on.",
)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any other method parameter, VALUE in JSON (e.g. --param embed_dim=256).",
)
@click.option(
    "--shots",
    type=click.IntRange(min=1),
    default=None,
    help="Few-shot mode: fit on only K seeded random normal images of DATA (the others then "
    "set the threshold). Works with every method.",
)
@click.option(
    "--shot-seed",
    type=int,
    default=0,
    show_default=True,
    help="Which K images --shots draws (same seed, same images).",
)
@click.option(
    "--augment-support/--no-augment-support",
    default=None,
    help="Fit on each image plus RegAD's 21 fixed augmented versions (8 rotations, 8 shifts, "
    "flip, grey, 3 quarter turns). Default: on for regad, off for the other methods.",
)
@click.option(
    "--registration",
    default=None,
    metavar="REG",
    help="regad: registration model folder from `defectlens regad train` (default: the one "
    "shipped with defectlens; 'identity' for none).",
)
@batch_size_option(
    "Images read and run through the backbone at once (memory, not results). A method that "
    "trains a network has its own training batch size: --param batch_size=N."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random choice.")
@dask_option(
    "Fit PaDiM on a Dask cluster (tcp://HOST:PORT, or local[:N]): workers embed shares of "
    "the images (paths they see) and their sums are added; the model equals a local fit."
)
@device_option(
    "Where a method that trains a network (differnet, memae, mnad, gradcon, ognet, "
    "students, patchsvdd, segaided, nbs) trains: auto (CUDA when present, else the CPU), "
    "cpu, cuda or cuda:N."
)
@backend_option
@max_pixels_option
@quiet_option
def fit(
    data,
    method,
    backbone,
    weights,
    image_size,
    out,
    val,
    val_fraction,
    target_far,
    sigma,
    n_channels,
    shrinkage,
    coreset_ratio,
    nn_index,
    k_images,
    members,
    anomalies,
    params,
    shots,
    shot_seed,
    augment_support,
    registration,
    batch_size,
    seed,
    dask_address,
    device,
    backend,
    max_pixels,
    quiet,
) -> None:
    """Fit a model on the normal images in DATA and save it to --out.

    With --shots K, only K normal images are fitted on (few-shot); every method supports it,
    and regad is made for it (a registration model trained on other categories, nothing
    trained on DATA).

    DATA is an MVTec-AD-layout root (its train/good is used) or a folder of normal images.
    The destination is checked first: it must be new, empty, or an existing defectlens model
    (replaced atomically when the new one is complete). Interrupting leaves it untouched.
    """
    from defectlens.detector import Detector
    from defectlens.outputs import check_model_target

    apply_max_pixels(max_pixels)
    if shots is not None and val_fraction != DEFAULT_VAL_FRACTION:
        warn(
            f"--val-fraction {val_fraction:g} does not apply with --shots: every normal image "
            "not drawn for the fit validates (or give --val DIR)"
        )
    given_by_user = click.get_current_context().get_parameter_source
    if val is not None and shots is None and val_fraction != DEFAULT_VAL_FRACTION:
        warn(
            f"--val-fraction {val_fraction:g} does not apply with --val: every normal image of "
            "DATA is fitted on, and --val's images validate"
        )
    if shots is None and given_by_user("shot_seed") is not ParameterSource.DEFAULT:
        warn("--shot-seed does not apply without --shots: every normal image is used")
    if val is not None and Path(val).resolve().is_relative_to(Path(data).resolve() / "test"):
        warn(
            f"--val {val} is inside DATA's test split: the threshold now comes from test "
            "images, so an evaluation on that split reports their false alarms near 0 by "
            "construction; validate on normal images kept apart from test/"
        )
    protect = [data] + ([val] if val else []) + ([anomalies] if anomalies else [])
    if anomalies and Path(anomalies).resolve() == Path(data).resolve():
        warn(
            f"--anomalies {anomalies} is DATA itself: its test/ defects now teach the model, "
            "so evaluating on that test split afterwards would score what it learned from"
        )
    if dask_address is not None:
        from defectlens.distributed import DISTRIBUTED_METHODS

        if method not in DISTRIBUTED_METHODS:
            raise DefectLensError(
                f"--dask fits {', '.join(DISTRIBUTED_METHODS)} only; {method} fits on one machine"
            )
        if backend is not None:
            raise DefectLensError("--backend does not apply to --dask: workers use their default")
    check_model_target(out, protect)
    named = {
        "n_channels": n_channels,
        "shrinkage": shrinkage,
        "coreset_ratio": coreset_ratio,
        "index": nn_index,
        "k_images": k_images,
        "registration": registration,
        "anomalies": anomalies,
        "members": None if members is None else [m.strip() for m in members.split(",")],
    }
    method_params = {k: v for k, v in named.items() if v is not None}
    from defectlens.methods import METHODS

    given = dict(method_params)  # what a --param must agree with: the options set by name
    if given_by_user("seed") is not ParameterSource.DEFAULT:
        given["seed"] = seed
    for key, value in _parse_params(params).items():
        if key in given and given[key] != value:
            flag = "--" + key.replace("_", "-")
            raise DefectLensError(
                f"{flag} {given[key]!r} and --param {key}={value!r} disagree; give one"
            )
        method_params[key] = value
    if method in METHODS:  # a named option the method does not take: say which do
        takes = METHODS[method].param_names()
        for key in named:
            if key in method_params and key not in takes:
                users = [n for n, m in sorted(METHODS.items()) if key in m.param_names()]
                article = "an" if method[0] in "aeiou" else "a"
                raise DefectLensError(
                    f"--{key.replace('_', '-')} is not {article} {method} option (it is for "
                    f"{', '.join(users)})"
                )

    if method in METHODS and "seed" in METHODS[method].param_names():
        method_params.setdefault("seed", seed)  # random channels, coresets, initial weights
    detector = Detector(
        method=method,
        backbone=backbone,
        weights=weights,
        image_size=image_size,
        batch_size=batch_size,
        val_fraction=val_fraction,
        target_far=target_far,
        sigma=sigma,
        seed=seed,
        method_params=method_params,
        shots=shots,
        shot_seed=shot_seed,
        augment_support=augment_support,
    )
    if backend is not None:
        detector.use_backend(backend)
    try:
        if dask_address is None:
            detector.fit(data, val_images=val, progress=not quiet, device=device)
        else:
            from defectlens.distributed import connect, fit_on_cluster

            with connect(dask_address) as client:
                fit_on_cluster(client, detector, data, val_images=val, progress=not quiet)
    except KeyboardInterrupt:
        echo(f"interrupted: nothing was saved; {out} is unchanged", err=True)
        raise
    path = detector.save(out, protect=tuple(protect))
    mark_saved(path)
    t = detector.thresholds_
    epochs = [r for r in detector.model_.history if "epoch" in r]
    kept = [r for r in epochs if r.get("best")]
    if kept:  # a method that trained a network: how it went
        loss = kept[-1].get("val_loss", kept[-1]["train_loss"])
        measure = f"validation loss {loss:.4g}"
        if "synthetic_auroc" in kept[-1]:  # chosen by synthetic defects (Patch SVDD)
            measure = f"synthetic-defect AUROC {kept[-1]['synthetic_auroc']:.3f} on validation"
        echo(
            f"trained {len(epochs)} epoch(s), stopped by {epochs[-1].get('stopped')}; kept epoch "
            f"{kept[-1]['epoch'] + 1} ({measure})"
        )
    if shots is not None:
        echo(f"fitted on {shots} image(s): " + ", ".join(detector.fit_images_))
    echo(f"saved {path} (threshold {t.image:.4g} from {t.n_validation} normal images)")
    more = "add normal images" if shots is not None else "hold out more (--val-fraction)"
    warn_if_rough_threshold(t.n_validation, f"{more} or pass --val DIR with more normal images")


def _parse_params(items: tuple[str, ...]) -> dict:
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DefectLensError(f"--param {item!r}: expected KEY=VALUE")
        with contextlib.suppress(json.JSONDecodeError, RecursionError):
            value = json.loads(value)  # else a bare word, e.g. --param index=hnsw
        if key in parsed and parsed[key] != value:
            raise DefectLensError(f"--param {key} is given twice, as {parsed[key]!r} and {value!r}")
        parsed[key] = value
    return parsed
