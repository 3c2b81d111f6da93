"""The `defectlens` command line.

Exit statuses: 0 success; 1 some inputs were skipped (listed in the results with their error);
2 a user error (one line `defectlens: error: ...`); 3 an internal error (one line, and the
traceback with `--debug`); 130 interrupted (Ctrl-C or SIGTERM), with what was finished saved.
Outputs are checked before any work, so a bad `--out` fails in a second, not after an hour.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shlex
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import click
from click.core import ParameterSource

from defectlens import __version__
from defectlens.blas import numpy_blas_single_threaded
from defectlens.data.images import is_url
from defectlens.errors import (
    DefectLensError,
    DefectLensWarning,
    ParameterError,
    command_line_messages,
)
from defectlens.loading import load_model
from defectlens.params import MAX_BATCH_SIZE, MAX_IMAGE_SIZE, MAX_SIGMA, check_image_size
from defectlens.results import one_line, safe_text

EXIT_OK, EXIT_SKIPPED, EXIT_USER, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# What `pip install defectlens` (the deployment runtime) leaves out and `[full]` brings.
FULL_INSTALL_MODULES = {"torch", "efficientnet_lite_pytorch", "FrEIA", "onnx", "onnxscript"}

EXAMPLES = """
\b
Typical use:
  defectlens fit data/bottle --method padim --out models/bottle
  defectlens evaluate models/bottle data/bottle --out results/bottle
  defectlens predict models/bottle line-camera/*.png --out flagged/
  defectlens export models/bottle --out deploy/bottle   # scores without torch
  defectlens demo                        # everything on built-in synthetic data
\b
Exit status: 0 ok, 1 some inputs skipped (listed with their error), 2 user error,
3 internal error (rerun as `defectlens --debug COMMAND ...` for the traceback), 130 interrupted,
141 the output pipe was closed (e.g. `predict --json ... | head`).
"""

_STATE: dict = {"debug": False, "saved": None}


def _saved(path) -> None:
    """The command's work is on disk: an interrupt from here on (while it prints its summary)
    must not read as a failed change (exit 130, "interrupted") when the change was kept."""
    _STATE["saved"] = path


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or Ctrl-C): stop, keep what is finished, exit 130. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way mistakes it for a bad file."""


class FiniteFloat(click.FloatRange):
    """A number, optionally in a range, never nan or inf: click's own float lets them
    through, and a nan passes every range check."""

    name = "float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):  # said as such, not as "inf is not in the range"
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)

    def _describe_range(self) -> str:
        unbounded = self.min is None and self.max is None
        return "" if unbounded else super()._describe_range()


quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")


def backbone_option(help_text: str):
    return click.option(
        "--backbone", default="efficientnet_lite0", show_default=True, help=help_text
    )


DEFAULT_VAL_FRACTION = 0.1
FEW_VALIDATION_IMAGES = 10  # fewer validation images than this: the fit warns


class ImageSize(click.IntRange):
    """`params.check_image_size` as a click type, so the error names the flag."""

    def __init__(self) -> None:
        super().__init__(32, MAX_IMAGE_SIZE)

    def convert(self, value, param, ctx):
        size = super().convert(value, param, ctx)
        try:
            return check_image_size(size)
        except ParameterError:
            self.fail(f"{size} is not a multiple of 32", param, ctx)


def image_size_option(help_text: str):
    return click.option(
        "--image-size", type=ImageSize(), default=256, show_default=True, help=help_text,
    )  # fmt: skip


def out_option(help_text: str):
    return click.option("--out", "out", required=True, type=click.Path(), help=help_text)


def target_far_option(help_text: str, default: float | None = None):
    return click.option(
        "--target-far", type=FiniteFloat(0, 1, max_open=True), default=default,
        show_default=default is not None, help=help_text,
    )  # fmt: skip


def batch_size_option(help_text: str, default: int = 32, most: int = MAX_BATCH_SIZE):
    return click.option(
        "--batch-size", type=click.IntRange(1, most), default=default, show_default=True,
        help=help_text,
    )  # fmt: skip


def dask_option(help_text: str):
    return click.option(
        "--dask", "dask_address", default=None, metavar="ADDRESS|local[:N]", help=help_text
    )


def device_option(help_text: str):
    return click.option("--device", default="auto", show_default=True, help=help_text)


backend_option = click.option(
    "--backend",
    type=click.Choice(["onnxruntime", "openvino", "torch"]),
    default=None,
    help="Where the backbone runs: onnxruntime (default, or $DEFECTLENS_BACKEND; about 5x "
    "faster than torch on a CPU), openvino (if installed) or eager torch. All compute in fp32 "
    "and give the same scores to float32 precision. An exported model runs on onnxruntime or "
    "openvino.",
)
weights_option = click.option(
    "--weights",
    type=click.Path(dir_okay=False),
    default=None,
    help="Local backbone weights file: a torchvision .pth for resnet18 / wide_resnet50_2, or "
    "a .safetensors state dict (e.g. a backbone tuned by `regad train --backbone-lr`).",
)
max_pixels_option = click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=None,
    help="Refuse images with more pixels than this (default 67108864 = 8192 x 8192, or "
    "$DEFECTLENS_MAX_PIXELS); protects against decompression bombs.",
)


def _apply_max_pixels(value: int | None) -> None:
    from defectlens.data.images import set_max_pixels

    set_max_pixels(value)  # None: the default or $DEFECTLENS_MAX_PIXELS


def echo(message: str, err: bool = False) -> None:
    """click.echo for text that may hold file names with undecodable bytes or line breaks."""
    click.echo("\n".join(one_line(line) for line in message.split("\n")), err=err)


@click.group(epilog=EXAMPLES)
@click.version_option(__version__, prog_name="defectlens")
@click.option("--debug", is_flag=True, help="Show the traceback of an internal error.")
def cli(debug: bool) -> None:
    """Industrial visual anomaly detection from normal images only, fully offline.

    Fit a model on images of good parts, then score new images: each gets an anomaly score, a
    pixel anomaly map, a defect mask and a good/defective decision. Thresholds are set from
    held-out normal images, never from test labels.
    """
    _STATE["debug"] = debug


# -- fit ------------------------------------------------------------------------------------------
@cli.command()
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

    _apply_max_pixels(max_pixels)
    if shots is not None and val_fraction != DEFAULT_VAL_FRACTION:
        _warn(
            f"--val-fraction {val_fraction:g} does not apply with --shots: every normal image "
            "not drawn for the fit validates (or give --val DIR)"
        )
    protect = [data] + ([val] if val else []) + ([anomalies] if anomalies else [])
    if anomalies and Path(anomalies).resolve() == Path(data).resolve():
        _warn(
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
    if click.get_current_context().get_parameter_source("seed") is not ParameterSource.DEFAULT:
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
    _saved(path)
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
    if t.n_validation < FEW_VALIDATION_IMAGES:
        more = "add normal images" if shots is not None else "hold out more (--val-fraction)"
        _warn(
            f"a threshold from {t.n_validation} normal image(s) is rough: it is near their "
            f"highest score, and real false alarms may be far from --target-far; {more} or "
            "pass --val DIR with more normal images"
        )


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


# -- evaluate -------------------------------------------------------------------------------------
@cli.command()
@click.argument("model", type=click.Path())
@click.argument("data", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(), help="Folder for the results.")
@click.option("--save-maps", is_flag=True, help="Also write maps/<path>.npy (float32 raw maps).")
@click.option("--no-report", is_flag=True, help="Skip report.html.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an earlier evaluation in --out (its metrics, scores, report and maps).",
)
@weights_option
@backend_option
@max_pixels_option
@quiet_option
def evaluate(
    model, data, out, save_maps, no_report, overwrite, weights, backend, max_pixels, quiet
) -> None:
    """Score the test images of DATA (MVTec layout) and write metrics, scores and a report.

    Unreadable images or masks are listed in scores.csv and metrics.json with their error and
    left out of the metrics (exit status 1). scores.csv is written as images are scored.
    A folder holding an earlier evaluation is replaced only with --overwrite.
    """
    from defectlens.evaluation import PRODUCES
    from defectlens.evaluation import evaluate as run_evaluation
    from defectlens.outputs import results_dir

    _apply_max_pixels(max_pixels)
    with results_dir(out, PRODUCES, "evaluate") as out_dir:
        earlier = [name for name in PRODUCES if (out_dir / name).exists()]
        if earlier and not overwrite:
            raise DefectLensError(
                f"{out_dir}: holds an earlier evaluation ({', '.join(earlier)}); pass "
                "--overwrite to replace it, or choose another --out"
            )
        numpy_blas_single_threaded()  # see defectlens.blas: OpenBLAS's idle threads spin
        detector = load_model(model, weights=weights, backend=backend)

        def on_skip(path: str, error: str) -> None:
            _warn(f"skipped {path}: {error}")

        try:
            result = run_evaluation(
                detector,
                data,
                out_dir,
                save_maps=save_maps,
                report=not no_report,
                progress=not quiet,
                on_skip=on_skip,
            )
        except KeyboardInterrupt:
            if (out_dir / "metrics.json").exists():  # only the report was left to write
                said = f"{out_dir / 'metrics.json'} and scores.csv are complete; no report.html"
            else:
                said = f"scores so far are in {out_dir / 'scores.csv'}; metrics were not computed"
            echo(f"interrupted: {said}", err=True)
            raise
    _saved(out_dir)
    _print_metrics(result.metrics)
    echo(
        f"wrote {out_dir / 'metrics.json'}, {out_dir / 'scores.csv'}"
        + ("" if no_report else f", {out_dir / 'report.html'}")
    )
    if result.skipped:
        echo(f"{len(result.skipped)} image(s) skipped; see scores.csv", err=True)
        sys.exit(EXIT_SKIPPED)


def _print_metrics(m: dict) -> None:
    def fmt(key):
        value = m.get(key)
        return "n/a" if value is None or value != value else f"{value:.4f}"

    echo(
        f"image AUROC {fmt('image_auroc')}  pixel AUROC {fmt('pixel_auroc')}  "
        f"AUPRO {fmt('aupro')}  F1-max {fmt('image_f1_max')}  "
        f"false alarms {fmt('false_alarm_rate')}  misses {fmt('miss_rate')}"
    )


# -- predict --------------------------------------------------------------------------------------
@cli.command()
@click.argument("model", type=click.Path())
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--out",
    "out",
    type=click.Path(),
    default=None,
    help="Folder for results.csv, overlays/ and masks/ (required unless --json).",
)
@click.option("--no-images", is_flag=True, help="Write results.csv only.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per input.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted run into the same --out: images already in its "
    "results.csv are not scored again.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Start again in an --out that holds the results of an earlier run.",
)
@dask_option(
    "Score on a Dask cluster: the scheduler's tcp://HOST:PORT, or local[:N] for N worker "
    "processes here. Workers read the inputs (paths they see, or fsspec URLs such as "
    "s3://bucket/*.png); results are the same as a local run's."
)
@click.option(
    "--chunk-size",
    type=click.IntRange(1, 100_000),
    default=None,
    help="Images per Dask task [default: 4 batches of the model]. A multiple of the "
    "model's batch size scores in the same batches as a local run (the same bits).",
)
@weights_option
@backend_option
@max_pixels_option
@quiet_option
def predict(
    model,
    inputs,
    out,
    no_images,
    as_json,
    resume,
    overwrite,
    dask_address,
    chunk_size,
    weights,
    backend,
    max_pixels,
    quiet,
) -> None:
    """Score images: INPUTS are files, folders (searched recursively) or glob patterns.

    Every input gets a row in results.csv, written as soon as it is scored: unreadable images,
    broken links and files that are not images are listed with their error and skipped, the
    rest are scored (exit status 1 if any was skipped). Overlays and masks are named after the
    input's path (a.png -> overlays/a.png.png), so a.png and a.jpg do not collide. With --dask,
    the model is checked here, sent to each worker once, and the workers score.
    """
    if out is None and not as_json:
        raise DefectLensError("give --out DIR (or --json to print results)")
    if resume and overwrite:
        raise DefectLensError("--resume and --overwrite exclude each other")
    if resume and out is None:
        raise DefectLensError("--resume needs the --out folder of the run to continue")
    if chunk_size is not None and dask_address is None:
        raise DefectLensError("--chunk-size is for --dask")
    if dask_address is not None and backend is not None:
        raise DefectLensError("--backend does not apply to --dask: workers use their default")
    _apply_max_pixels(max_pixels)
    from defectlens.data.inputs import expand_inputs
    from defectlens.outputs import clear_results, is_results_folder, results_dir
    from defectlens.results import ResultsTable
    from defectlens.scoring import RESULT_COLUMNS

    with contextlib.ExitStack() as stack:
        client = None
        if dask_address is not None:  # an unreachable cluster: said before anything is written
            from defectlens.distributed import connect

            client = stack.enter_context(connect(dask_address))
        out_dir = None
        if out is not None:
            out_dir = stack.enter_context(
                results_dir(out, ["results.csv", "overlays", "masks"], "predict", inputs)
            )
            earlier = out_dir / "results.csv"
            if earlier.exists() and not (resume or overwrite) and _has_scored_rows(earlier):
                raise DefectLensError(
                    f"{out_dir}: holds results.csv of an earlier run; pass --resume to "
                    "continue it or --overwrite to start again"
                )
        items = expand_inputs(inputs, skip_folder=is_results_folder)
        # Without anything to score, the model is not needed: say so before loading it.
        detector = None
        if not all(i.error for i in items):
            numpy_blas_single_threaded()  # see defectlens.blas: OpenBLAS's idle threads spin
            detector = load_model(model, weights=weights, backend=backend)
        if out_dir is not None and detector is not None:
            _check_same_run(out_dir, model, detector, resume, not no_images, inputs)
        table = None
        if out_dir is not None:
            if not resume:  # a new run: no picture of an earlier one is left beside its own
                clear_results(out_dir, ["overlays", "masks"])
            table = ResultsTable(
                out_dir / "results.csv",
                RESULT_COLUMNS,
                resume=resume,
                is_done=_is_scored,
            )
        score = None
        if client is not None and detector is not None:
            from defectlens.distributed import score_on_cluster

            def score(pending, pictures):
                return score_on_cluster(
                    client,
                    model,
                    pending,
                    pictures,
                    chunk_size=chunk_size or 4 * detector.batch_size,
                    progress=not quiet,
                    weights=weights,
                )

        try:
            outcome = _run_predict(
                detector, items, table, out_dir, no_images, as_json, quiet, score
            )
        finally:
            if table is not None:
                table.close()
        if outcome["skipped"]:
            sys.exit(EXIT_SKIPPED)


@cli.command()
@click.argument("model", type=click.Path())
@out_option("Folder to write: a new folder, or an earlier export to replace.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["onnx", "openvino"]),
    default="onnx",
    show_default=True,
    help="onnx (runs on onnxruntime, or OpenVINO) or openvino (OpenVINO IR, fp32 weights).",
)
@click.option(
    "--int8",
    is_flag=True,
    help="Quantise the backbone to int8 (static, calibrated on --calibration), refit the "
    "method's statistics and thresholds on int8 features, and report the score drift. Opt-in: "
    "faster, but scores differ from the fp32 model's.",
)
@click.option(
    "--calibration",
    type=click.Path(),
    default=None,
    help="Normal images for --int8 (an MVTec root or a folder of good images; usually the "
    "training data). With an MVTec root, the AUROC change on its test set is reported.",
)
@weights_option
@quiet_option
def export(model, out, fmt, int8, calibration, weights, quiet) -> None:
    """Write MODEL as a deployment folder that scores without torch.

    The folder holds the backbone and head graphs, what the method needs beside them (e.g.
    PatchCore's bank), and config.json with preprocessing, thresholds and every file's SHA-256.
    Score it with `defectlens predict OUT ...` or `defectlens evaluate OUT ...` on a machine
    with only `pip install defectlens` (onnxruntime, numpy, pillow, faiss). Before it is
    written, the export is checked against the model: maps and scores within 1e-4 relative.
    A DifferNet export gives scores and decisions only: its maps are gradients through the
    backbone, which need torch (score the saved model for them).
    """
    from defectlens.io import load_detector
    from defectlens.outputs import check_model_target
    from defectlens.runtime.export import export_detector

    if calibration is not None and not int8:
        raise DefectLensError("--calibration is for --int8")
    if int8 and calibration is None:
        raise DefectLensError("--int8 needs --calibration DATA (normal images)")
    protect = [model] if calibration is None else [model, calibration]
    check_model_target(out, protect, kind="export")  # before minutes of quantising
    detector = load_detector(model, weights=weights)
    if int8:
        from defectlens.runtime.quantize import export_int8

        report = export_int8(detector, out, calibration, fmt, protect=protect, progress=not quiet)
    else:
        report = export_detector(detector, out, fmt, protect=protect)
    _saved(report.path)
    total = sum(report.files.values())
    echo(
        f"wrote {report.path} ({len(report.files)} files, {total / 1e6:.1f} MB) in "
        f"{report.seconds:.1f} s"
    )
    if int8:
        for line in report.extra.get("summary", []):
            echo(line)
    else:
        what = "maps and scores" if report.has_maps else "scores (no maps: they need torch)"
        echo(
            f"checked against the model: largest relative difference of {what} "
            f"{report.max_relative_difference:.1e}"
        )


def _check_same_run(
    out_dir: Path, model: str, loaded, resume: bool, pictures: bool, inputs: tuple[str, ...]
) -> None:
    """--resume must continue with the model that wrote the earlier rows, never mix two, with
    the same pictures choice (a run resumed without --no-images would write no pictures for
    its done rows, so "done" must mean the same thing), and on the same INPUTS: other inputs
    would be appended to the earlier run's table as if they were one run. The inputs are
    compared as written and as the files they name (order ignored): rows are keyed by the
    path as written, so the same file written another way would be scored again, and the
    same relative path from another folder is another file. A folder that gained images
    since is still the same run, and its new images are scored."""
    from defectlens.outputs import read_results_marker, write_results_marker
    from defectlens.runtime.deployed import ExportedModel

    if isinstance(loaded, ExportedModel):
        identity = loaded.identity  # its files were hashed once, at load
    else:
        from defectlens.io import read_config

        identity = read_config(model)["tensors_sha256"]
    marker = read_results_marker(out_dir)
    if resume and marker.get("model_sha256") not in (None, identity):
        if marker.get("model") == str(model):
            raise DefectLensError(
                f"{out_dir}: its results.csv was written by {model} before it was refitted or "
                "replaced; use --overwrite or another --out to start again"
            )
        raise DefectLensError(
            f"{out_dir}: its results.csv was written by another model ({marker.get('model')}); "
            "resume with that model, or use --overwrite or another --out to start again"
        )
    thresholds = loaded.thresholds_.to_dict() if loaded.thresholds_ is not None else None
    if resume and marker.get("thresholds") not in (None, thresholds):
        raise DefectLensError(
            f"{out_dir}: {model}'s thresholds changed since the earlier rows were decided "
            f"(image threshold then {_threshold_text(marker['thresholds'])}, now "
            f"{_threshold_text(thresholds)}); one results.csv would mix two thresholds: use "
            "--overwrite or another --out to start again"
        )
    if resume and marker.get("pictures") not in (None, pictures):
        was = "with" if pictures else "without"
        raise DefectLensError(
            f"{out_dir}: the earlier run was started {was} --no-images; resume it the same way, "
            "or use --overwrite or another --out to start again"
        )
    given = sorted(
        {(s, s if is_url(s) else os.path.abspath(os.path.expanduser(s))) for s in inputs}
    )
    if resume and marker.get("inputs") not in (None, [list(pair) for pair in given]):
        recorded = marker["inputs"] if isinstance(marker["inputs"], list) else ["?"]
        earlier = [str(pair[0]) if isinstance(pair, list) and pair else "?" for pair in recorded]
        shown = ", ".join(earlier[:3]) + (", ..." if len(earlier) > 3 else "")
        raise DefectLensError(
            f"{out_dir}: the earlier run scored other inputs ({shown}); resume it with the "
            "same INPUTS, or use --overwrite or another --out to start again"
        )
    info = {"model": str(model), "model_sha256": identity, "pictures": pictures, "inputs": given}
    info["thresholds"] = thresholds
    write_results_marker(out_dir, {**marker, **info})


def _threshold_text(thresholds: object) -> str:
    image = thresholds.get("image") if isinstance(thresholds, dict) else None
    return f"{image:.6g}" if isinstance(image, float | int) else "unknown"


def _picture_path(source: str, base: Path) -> Path:
    """Where an input's mask and overlay go, relative to the results folder: its path below the
    inputs' common folder, or for a URL its scheme, host and path (never a way out of --out)."""
    if is_url(source):
        scheme, rest = source.split("://", 1)
        parts = [p for p in [scheme, *rest.split("/")] if p not in ("", ".", "..")]
        return Path(*parts)
    return Path(os.path.abspath(source)).relative_to(base)


def _run_predict(detector, items, table, out_dir, no_images, as_json, quiet, score=None) -> dict:
    """Score the inputs not yet done and write their rows and pictures as they come. `score`
    (pending sources, pictures wanted) -> ScoredFile stream: the Dask runner; by default the
    images are scored here."""
    from defectlens.scoring import iter_scored_files, write_row

    done = table.done if table is not None else {}
    errors: dict[str, str] = {}

    def record_error(name: str, message: str) -> None:
        errors[name] = message
        if detector is not None:  # else the one error line below says it all
            _warn(f"skipped {message}")
        if table is not None:
            table.write([name, "", "error", "", message])
        if as_json:  # a pipeline reading stdout learns of every input, as results.csv does
            row = {"path": name, "score": None, "predicted": "error", "defect_pixels": None}
            echo(json.dumps({**row, "error": message}))

    pending = []
    for item in items:
        name = safe_text(str(item.path))
        if item.error is not None:
            record_error(name, f"{name}: {item.error}")
        elif name not in done:
            pending.append(item.path)
    # Pictures are named relative to the inputs' common folder: the same names on --resume.
    local = [p for p in (i.path for i in items if i.error is None) if not is_url(p)]
    base = Path(os.path.commonpath([os.path.abspath(p.parent) for p in local or [Path("x")]]))
    if detector is None:
        _nothing_scored(errors, out_dir)
    if done:
        _warn(f"resuming: {len(done)} image(s) already scored, {len(pending)} to go")
    if not detector.has_maps:
        _warn(
            f"this {detector.method} export scores images without anomaly maps (its maps are "
            "gradients through the backbone, which need torch): no masks or overlays, "
            "defect_pixels left empty; score the saved model for maps"
        )
        no_images = True
    pictures = out_dir is not None and not no_images
    if score is None:
        results = iter_scored_files(detector, pending, pictures, progress=not quiet)
    else:
        results = score(pending, pictures)
    scored = flagged = 0
    start = time.perf_counter()
    try:
        for result in results:
            if result.summary is None:
                record_error(result.name, result.error)
                continue
            for note in result.notes:
                _warn(note)
            # Pictures first, then the row: a row on disk means its pictures are complete.
            for kind, folder in (("mask", "masks"), ("overlay", "overlays")):
                if kind in result.pngs:
                    relative = _picture_path(result.source, base)
                    _save_bytes(result.pngs[kind], out_dir / folder / f"{relative}.png")
            if table is not None:
                write_row(table.write, result)
            if as_json:
                echo(json.dumps(result.summary))
            scored += 1
            flagged += result.summary["predicted"] == "defective"
    except KeyboardInterrupt:
        where = f"; rows so far are in {out_dir / 'results.csv'}" if out_dir else ""
        resume = " (rerun the same command with --resume to finish)" if out_dir else ""
        echo(f"interrupted after {scored} of {len(pending)} image(s){where}{resume}", err=True)
        raise
    if not scored and not done and errors:  # every input failed, found late: as if found early
        _nothing_scored(errors, out_dir)
    seconds = time.perf_counter() - start
    echo(
        f"scored {scored} image(s) in {seconds:.1f} s ({scored / max(seconds, 1e-9):.1f} img/s): "
        f"{flagged} defective, {scored - flagged} good"
        + (f", {len(errors)} skipped" if errors else "")
        + (f", {len(done)} done earlier" if done else ""),
        err=as_json,
    )
    return {"scored": scored, "skipped": len(errors)}


def _is_scored(row: dict[str, str]) -> bool:
    """A results.csv row of an image that was scored (not an input that failed)."""
    return row.get("predicted") in ("good", "defective")


def _has_scored_rows(path: Path) -> bool:
    """Whether an earlier results.csv holds a scored image (not only inputs that failed): a
    run that scored nothing is not worth --resume or --overwrite, its rerun just replaces it."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return any(map(_is_scored, csv.DictReader(fh)))
    except (OSError, ValueError, csv.Error):
        return True  # unreadable: kept, as any earlier run's


def _nothing_scored(errors: dict[str, str], out_dir: Path | None) -> None:
    """No input could be scored (all missing, unreadable or not images): a user error, exit
    status 2, whether the model was needed to find out or not (each input's row stays in
    results.csv, and the corrected rerun may use the same --out)."""
    first = next(iter(errors.values()), "no inputs")
    listed = f"; see {out_dir / 'results.csv'}" if out_dir is not None else ""
    more = f" (and {len(errors) - 1} more{listed})" if len(errors) > 1 else ""
    raise DefectLensError(f"nothing could be scored: {first}{more}")


def _save_bytes(data: bytes, path: Path) -> None:
    """Written beside its name, then renamed: a kill never leaves a torn picture."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


# -- other commands -------------------------------------------------------------------------------
# -- regad ----------------------------------------------------------------------------------------
@cli.group()
def regad() -> None:
    """RegAD few-shot detection: train the registration network it fits with.

    A registration model is trained once, on normal images of other categories; then
    `defectlens fit NEW --method regad --shots 8 --registration REG` needs 8 images of the new
    category and no training. One registration model ships with defectlens (efficientnet_lite0,
    256 px), trained on freely licensed images only.
    """


@regad.command("train")
@click.argument("pool", nargs=-1, required=True, type=click.Path())
@out_option("Registration folder to write: a new folder, or an earlier registration to replace.")
@click.option(
    "--exclude",
    multiple=True,
    metavar="CATEGORY",
    help="Leave this pool category out (by folder name), e.g. the one you will test on.",
)
@backbone_option("Frozen backbone the registration is for; fits must use the same one.")
@weights_option
@image_size_option("Image size the registration is for; fits must use the same one.")
@click.option(
    "--shots", type=click.IntRange(1, 64), default=2, show_default=True,
    help="Supports per query image.",
)  # fmt: skip
@batch_size_option("Queries per step.", default=8, most=1024)
@click.option(
    "--steps", type=click.IntRange(min=1), default=50, show_default=True, help="Steps per epoch."
)
@click.option(
    "--epochs", type=click.IntRange(min=1), default=20, show_default=True,
    help="At most this many.",
)  # fmt: skip
@click.option(
    "--patience",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Stop after this many epochs without a better validation loss.",
)
@click.option(
    "--max-minutes", type=FiniteFloat(0, 1e6, min_open=True), default=30.0, show_default=True,
    help="Wall-clock budget.",
)  # fmt: skip
@click.option(
    "--lr", type=FiniteFloat(0, 10, min_open=True), default=0.01, show_default=True,
    help="Initial SGD rate.",
)  # fmt: skip
@click.option(
    "--pose-jitter",
    type=FiniteFloat(0, 180),
    default=0.0,
    show_default=True,
    help="Rotate training images by up to this many degrees, for parts that turn on the line "
    "when the pool's do not (on parts that do not turn it lowered accuracy: BENCHMARKS.md).",
)
@click.option(
    "--backbone-lr",
    type=FiniteFloat(0, 10),
    default=0.0,
    show_default=True,
    help="Also train the backbone, at this SGD rate (the paper's way; 0 keeps it frozen). "
    "The tuned backbone is saved in OUT as backbone.safetensors; fits then pass it with "
    "--weights.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@device_option("Where to train: auto (CUDA when present, else the CPU), cpu, cuda or cuda:N.")
@quiet_option
def regad_train(
    pool, out, exclude, backbone, weights, image_size, shots, batch_size, steps, epochs,
    patience, max_minutes, lr, pose_jitter, backbone_lr, seed, device, quiet,
) -> None:  # fmt: skip
    """Train a registration network on the normal images of the POOL categories.

    Each POOL entry is one category: an MVTec-layout root (its train/good is read) or a folder
    of normal images. Each category holds out 10 % of its images; the loss on those picks the
    epoch (never a test set). By default the backbone stays frozen and only the spatial
    transformers and the head train; --backbone-lr trains the backbone too. Interrupting saves
    nothing.
    """
    from defectlens.components.registration import BACKBONE_FILE
    from defectlens.training.registration import RegistrationConfig, build_registration

    config = RegistrationConfig(
        shots=shots,
        batch_size=batch_size,
        steps_per_epoch=steps,
        max_epochs=epochs,
        patience=patience,
        max_minutes=max_minutes,
        learning_rate=lr,
        pose_jitter=pose_jitter,
        backbone_learning_rate=backbone_lr,
        seed=seed,
    )
    try:
        path, record = build_registration(
            pool, out, backbone, weights, image_size, config, exclude, not quiet, device
        )
    except KeyboardInterrupt:
        echo(f"interrupted: nothing was saved; {out} is unchanged", err=True)
        raise
    _saved(path)
    best = min(record["history"], key=lambda r: r["val_loss"])
    echo(
        f"saved {path}: {len(record['categories'])} categories, {len(record['history'])} epochs "
        f"in {record['seconds']:.0f} s, best validation loss {best['val_loss']:.4f} "
        f"(epoch {best['epoch'] + 1})"
    )
    if backbone_lr > 0:
        echo(f"fit with: --registration {path} --weights {path / BACKBONE_FILE}")


@cli.command()
@click.argument("data", type=click.Path())
@out_option(
    "Where to save the chosen model: a new folder, or an existing defectlens model to replace."
)
@click.option(
    "--methods",
    default="padim,patchcore",
    show_default=True,
    help="Comma-separated methods to try.",
)
@click.option(
    "--backbones",
    "backbone_names",
    default="efficientnet_lite0",
    show_default=True,
    help="Comma-separated backbones to try (see `defectlens backbones`), or `installed`: "
    "every backbone whose weights are on this machine.",
)
@click.option(
    "--image-sizes",
    default="256",
    show_default=True,
    help="Comma-separated image sizes to try (multiples of 32).",
)
@click.option(
    "--budget-minutes",
    type=FiniteFloat(0, min_open=True),
    default=None,
    help="Stop trying new candidates after this long (the ones tried are ranked).",
)
@click.option(
    "--report",
    type=click.Path(),
    default=None,
    help="Folder for selection.csv and selection.html [default: OUT.selection].",
)
@click.option(
    "--defects",
    default="drawn",
    show_default=True,
    help="Synthetic defect kinds of the task, comma-separated: scratch, spot, hole, patch, "
    "smudge (drawn), cutpaste, scar, blob, stain (the image's own texture), or the groups "
    "`drawn`, `self`, `all`.",
)
@batch_size_option("Images read and run through the backbone at once (memory, not results).")
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the held-out split, the synthetic defects and the fits.",
)
@device_option("Where a method that trains a network trains (auto, cpu, cuda, cuda:N).")
@quiet_option
def select(
    data, out, methods, backbone_names, image_sizes, budget_minutes, report, defects, batch_size,
    seed, device, quiet,
) -> None:  # fmt: skip
    """Choose a configuration for DATA from its normal images only, and save it to --out.

    Every combination of --methods, --backbones and --image-sizes is fitted on 80 % of
    DATA's normal images (train/good of an MVTec root; test/ is never read) and scored on
    the other 20 %, each of them also once with each kind of synthetic defect (--defects).
    Candidates are ranked by image AUROC on that task, then AUPRO; the table is printed and
    written to --report. The winner is then fitted on all of DATA as `defectlens fit` would
    and saved.
    """
    import numpy as np
    from tqdm.auto import tqdm

    from defectlens.backbones import get_spec
    from defectlens.data.dataset import find_normal_images
    from defectlens.data.synthetic import MIN_PASTE_SIZE, defect_kinds
    from defectlens.methods import get_method
    from defectlens.outputs import check_model_target, results_dir
    from defectlens.report.html import write_selection_report
    from defectlens.selection import TIE_AUROC, Candidate, near_ties, split_for_selection
    from defectlens.selection import select as run_selection

    def names(text: str, what: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise DefectLensError(f"--{what}: give at least one")
        return list(dict.fromkeys(items))

    sizes = []
    for item in names(image_sizes, "image-sizes"):
        if not item.isdigit():
            raise DefectLensError(f"--image-sizes: {item!r} is not a whole number")
        if int(item) < MIN_PASTE_SIZE:
            raise DefectLensError(
                f"--image-sizes {item}: select pastes synthetic defects into the images, which "
                f"needs at least {MIN_PASTE_SIZE} px"
            )
        sizes.append(int(item))
    kinds = defect_kinds(names(defects, "defects"))
    backbone_list = names(backbone_names, "backbones")
    if "installed" in (b.lower() for b in backbone_list):
        if len(backbone_list) > 1:
            raise DefectLensError(
                "--backbones: `installed` already means every backbone here; give it alone"
            )
        backbone_list = _installed_backbones()
    candidates = []
    for method in names(methods, "methods"):
        for backbone in backbone_list:
            for size in sizes:
                takes_seed = "seed" in get_method(method).param_names()  # unknown: said here
                params = (("seed", seed),) if takes_seed else ()
                candidate = Candidate(method, backbone, size, params)
                candidate.detector(batch_size, seed)  # an unknown name or size: said now
                candidates.append(candidate)
    for backbone in backbone_list:  # select finds weights only where `backbones` lists them
        status = get_spec(backbone).weights_status(hint=False)
        if not status.startswith("available"):
            reason = status.removeprefix("missing: ")
            raise DefectLensError(
                f"--backbones {backbone}: {reason} (select has no --weights: it uses the "
                "weights `defectlens backbones` finds)"
            )
    check_model_target(out, [data])
    split_for_selection(find_normal_images(data), seed)  # too few images: said before writing
    report_name = report or f"{out}.selection"
    if Path(report_name).absolute() == Path(out).absolute():
        raise DefectLensError(
            f"--report {report}: is the --out model folder; the report goes in a folder of its own"
        )
    # interrupted before the table is written: no folder holding only our marker is left
    with results_dir(report_name, ["selection.csv", "selection.html"], "select", [data]) as (
        report_dir
    ):
        bar = tqdm(total=len(candidates), desc="select", disable=quiet, unit="config")
        try:
            ranked = run_selection(
                data,
                candidates,
                budget_s=None if budget_minutes is None else 60 * budget_minutes,
                batch_size=batch_size,
                seed=seed,
                device=device,
                on_outcome=lambda outcome: bar.update(1),
                defects=kinds,
            )
        finally:
            bar.close()
        rows = [{"rank": i + 1, **o.row()} for i, o in enumerate(ranked)]
        _write_csv(report_dir / "selection.csv", rows)
    winner = ranked[0]
    if not np.isfinite(winner.image_auroc):
        raise DefectLensError(f"no candidate could be fitted: {winner.error}")
    write_selection_report(
        rows, report_dir / "selection.html", str(data), winner.candidate.label, kinds
    )
    echo(f"{'rank':>4}  {'synthetic AUROC':>15}  {'AUPRO':>6}  {'fit s':>6}  candidate")
    for row in rows:
        auroc, pro = row["synthetic_image_auroc"], row["synthetic_aupro"]
        echo(
            f"{row['rank']:>4}  {auroc:>15.4f}  {pro:>6.3f}  {row['fit_s']:>6.1f}  "
            f"{row['candidate']}" + (f"  ({row['error']})" if row["error"] else "")
        )
    ties = near_ties(ranked)
    if ties:
        echo(
            f"note: {len(ties)} other candidate(s) within {TIE_AUROC} synthetic AUROC of the "
            f"winner ({', '.join(o.candidate.label for o in ties)}): the task cannot tell them "
            "apart. If you have a few real defects, compare them with `defectlens evaluate`."
        )
    echo(f"chosen: {winner.candidate.label}; fitting it on all of {data}")
    detector = winner.candidate.detector(batch_size, seed)
    try:
        detector.fit(data, progress=not quiet, device=device)
    except KeyboardInterrupt:  # the ranking is kept: say how to get the model without it
        echo(
            f"interrupted while fitting the winner: nothing was saved to {out}; the ranking is "
            f"in {report_dir / 'selection.csv'}. To fit the winner without selecting again: "
            f"{_fit_command(winner.candidate, data, out, seed, batch_size)}",
            err=True,
        )
        raise
    path = detector.save(out, protect=(data,))
    _saved(path)
    echo(f"saved {path}; ranking in {report_dir / 'selection.csv'} and selection.html")


def _fit_command(candidate, data: str, out: str, seed: int, batch_size: int) -> str:
    """The `defectlens fit` command line that fits `candidate` as select's final fit does."""
    words = ["defectlens", "fit", str(data), "--method", candidate.method]
    words += ["--backbone", candidate.backbone, "--image-size", str(candidate.image_size)]
    words += ["--seed", str(seed), "--batch-size", str(batch_size), "--out", str(out)]
    for key, value in candidate.method_params:  # JSON, as --param reads it (tuples as lists)
        words += ["--param", f"{key}={json.dumps(value)}"]
    return shlex.join(words)


def _installed_backbones() -> list[str]:
    """Every registered backbone whose weights can be found without a download, in registry order.

    `select --backbones installed` tries them all: what pays off depends on the data
    (BENCHMARKS.md), so the pool is what the user has, not a list we guessed.
    """
    from defectlens.backbones import available_backbones

    found = [s.name for s in available_backbones() if s.weights_status().startswith("available")]
    if not found:
        raise DefectLensError("--backbones installed: no backbone has its weights on this machine")
    return found


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv
    import io

    from defectlens.outputs import write_text_atomic

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


@cli.command()
def backbones() -> None:
    """List the registered backbones, their feature taps and whether weights are available."""
    from defectlens.backbones import available_backbones

    for spec in available_backbones():
        taps = ", ".join(f"{s}:{c}" for s, c in sorted(spec.taps.items()))
        echo(f"{spec.name:20s} taps(stride:channels) {taps}")
        status = spec.weights_status()
        echo(f"{'':20s} {spec.description}; weights {status}")
        if status.startswith("missing"):
            echo(f"{'':20s} to supply them: {spec.weights_help}")


@cli.command()
@click.argument("model", type=click.Path())
@click.option(
    "--value",
    type=FiniteFloat(),
    default=None,
    help="Set the image threshold to this score by hand (e.g. one tried on the service's "
    "what-if slider); config.json marks it manual.",
)
@click.option(
    "--pixel",
    type=FiniteFloat(),
    default=None,
    help="With --value: the pixel threshold [default: follows --value where the two were "
    "equal (methods scored by their map's maximum), else unchanged].",
)
@click.option(
    "--calibrate",
    "normal",
    type=click.Path(),
    default=None,
    help="Set both thresholds again from these normal images (a folder; images the model "
    "was not fitted on), as fit does.",
)
@target_far_option("With --calibrate: the target false-alarm rate [default: the model's].")
@weights_option
@quiet_option
def threshold(model, value, pixel, normal, target_far, weights, quiet) -> None:
    """Show a model's thresholds, or change them in place.

    Without options, prints the image and pixel thresholds and the normal validation scores
    they came from. --value sets the image threshold by hand; --calibrate sets both again from
    normal images (thresholds never come from defect labels). The model folder is rewritten
    atomically: an interrupted change leaves the old model. An export keeps the thresholds of
    the model it was made from: change the model's, then export again (an --int8 export sets
    its own from normal images). A running `defectlens serve` reads thresholds at start:
    restart it to use the new ones.
    """
    from defectlens.io import load_detector

    if value is not None and normal is not None:
        raise DefectLensError("--value and --calibrate exclude each other")
    if pixel is not None and value is None:
        raise DefectLensError("--pixel is for --value")
    if target_far is not None and normal is None:
        raise DefectLensError("--target-far is for --calibrate (a --value has no target rate)")
    detector = load_detector(model, weights=weights)
    before = detector.thresholds_
    if value is None and normal is None:
        _print_thresholds(model, before)
        return
    if value is not None:
        detector.set_threshold(value, pixel)
    else:
        if target_far is not None:
            detector.target_far = target_far
        detector.calibrate(normal, progress=not quiet)
        _warn_if_fitted_on(before, detector.thresholds_)
    after = detector.thresholds_
    path = detector.save(model, protect=() if normal is None else (normal,))
    _saved(path)
    echo(f"saved {path}: image threshold {before.image:.6g} -> {after.image:.6g}")
    if after.pixel != before.pixel:
        echo(f"pixel threshold {before.pixel:.6g} -> {after.pixel:.6g}")
    _print_thresholds(path, after, heading=False)
    if after.manual and after.image < after.validation_max:
        _warn(
            f"{after.image:.6g} is below the highest of the {after.n_validation} normal "
            f"validation scores ({after.validation_max:.6g}): some good parts will be flagged"
        )


def _warn_if_fitted_on(before, after) -> None:
    """Label-free: images the model was fitted on score far below unseen normal ones, and a
    threshold from them flags good parts (a saved model does not record its fitted images by
    name, so this is the check that remains). "Far": the new median below the earlier one by
    half the earlier median-to-highest gap (free of the scores' shift and scale). Here, not in
    `Detector.calibrate`: there the scoring may have changed on purpose since."""
    gap = before.validation_max - before.validation_median
    if after.validation_median < before.validation_median - 0.5 * gap:
        _warn(
            f"these {after.n_validation} normal images score far below the {before.n_validation} "
            f"the threshold came from before (median {after.validation_median:.6g} against "
            f"{before.validation_median:.6g}): were they fitted on? The new threshold would "
            "flag good parts; calibrate on normal images the model has not seen"
        )


def _print_thresholds(model, t, heading: bool = True) -> None:
    if heading:
        echo(f"{model}:")
    how = "set by hand" if t.manual else f"target_far {t.target_far:g}"
    echo(f"  image threshold {t.image:.6g} ({how})")
    echo(f"  pixel threshold {t.pixel:.6g}")
    echo(
        f"  normal validation scores: {t.n_validation} image(s), highest {t.validation_max:.6g}, "
        f"median {t.validation_median:.6g}"
    )


# -- serve ---------------------------------------------------------------------------------------
def _check_port_free(host: str, port: int) -> None:
    """A taken port or an unknown address is a one-line error before any model is served."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise DefectLensError(f"--host {host}: cannot resolve it ({exc})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            reason = "in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise DefectLensError(
                f"cannot listen on {host}:{port} ({reason}); choose another --port or --host"
            ) from None


@cli.command()
@click.argument("models", nargs=-1, required=True, metavar="MODEL_DIR...")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. The default answers this machine only; use 0.0.0.0 (with "
    "--api-key-file) for cameras on the network.",
)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="File holding an API key that every /v1 and /metrics request must send (X-API-Key "
    "header or 'Authorization: Bearer KEY'). Default: no key.",
)
@click.option(
    "--max-upload-mb",
    type=FiniteFloat(min=0.001),
    default=20.0,
    show_default=True,
    help="Largest request body; larger ones get 413 before they are read.",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=50_000_000,
    show_default=True,
    help="Largest image (width x height from its header); larger ones get 413 before any "
    "pixel is decoded (decompression bombs). Lower than the other commands' 67108864: a "
    "service reads images from the network.",
)
@click.option(
    "--max-images",
    type=click.IntRange(1, 1024),
    default=32,
    show_default=True,
    help="Most images in one request.",
)
@click.option(
    "--max-batch",
    type=click.IntRange(1, 1024),
    default=16,
    show_default=True,
    help="Most images scored together; concurrent requests are batched up to this.",
)
@click.option(
    "--max-wait-ms",
    type=FiniteFloat(0, 1000),
    default=20.0,
    show_default=True,
    help="Most a batch waits for company: for requests still being read, and for as many "
    "requests as were recently in the service at once (a lone client never waits). 0 "
    "scores whatever is queued at once.",
)
@click.option(
    "--queue-size",
    type=click.IntRange(1, 100_000),
    default=64,
    show_default=True,
    help="Requests waiting per model; when full, new ones get 503 at once.",
)
@click.option(
    "--timeout",
    type=FiniteFloat(min=0.1),
    default=30.0,
    show_default=True,
    help="Seconds a request may wait for its scores before it gets 504 (and the grace "
    "period for in-flight requests at shutdown).",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    metavar="ORIGIN",
    help="Allow browser pages from ORIGIN (e.g. https://line-pc:3000) to call the API. "
    "Default: none (CORS off).",
)
@backend_option
def serve(
    models,
    host,
    port,
    api_key_file,
    max_upload_mb,
    max_pixels,
    max_images,
    max_batch,
    max_wait_ms,
    queue_size,
    timeout,
    cors_origins,
    backend,
) -> None:
    """Serve models over HTTP: a REST API under /v1 (OpenAPI page at /docs), Prometheus
    metrics at /metrics, and the dashboard at /.

    Each MODEL_DIR is a saved model or an exported folder; its folder name is its name in
    the API (POST /v1/models/NAME/predict). A metrics.json placed in a model folder (from
    `defectlens evaluate`) is shown on its model card if it was made with that model's
    threshold. Ctrl-C or SIGTERM stops accepting
    requests and finishes the ones in flight.
    """
    import uvicorn

    from defectlens.allocator import limit_arenas
    from defectlens.serve.app import MODEL_NAME, ServeSettings, card_metrics, create_app

    limit_arenas()  # before loading starts the engines' threads: memory levels off under load
    numpy_blas_single_threaded()  # single images: 25 instead of 35 ms (defectlens.blas)

    api_key = None
    if api_key_file is not None:
        try:
            api_key = Path(api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise DefectLensError(f"{api_key_file}: cannot read the API key ({exc})") from None
        if not api_key:
            raise DefectLensError(f"{api_key_file}: empty; put the API key in it")
    loaded, metrics = {}, {}
    for folder in models:
        name = Path(folder).resolve().name
        if not MODEL_NAME.fullmatch(name):
            raise DefectLensError(
                f"{folder}: its folder name {name!r} is its API name and must use letters, "
                "digits, '_', '.' or '-' (rename the folder)"
            )
        if name in loaded:
            raise DefectLensError(f"two models are named {name!r}: rename one folder")
        predictor = load_model(folder, backend=backend)
        if predictor.thresholds_ is None:
            raise DefectLensError(f"{folder}: the model has no thresholds")
        loaded[name] = predictor
        metrics_file = Path(folder) / "metrics.json"
        if metrics_file.is_file():
            try:
                text = metrics_file.read_text(encoding="utf-8")
                metrics[name] = card_metrics(text, predictor)
            except (OSError, ValueError, RecursionError) as exc:
                _warn(f"{metrics_file}: not shown on the model card ({exc})")
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        _warn(f"serving on {host} without --api-key-file: anyone who reaches it can use it")
    settings = ServeSettings(
        max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        max_pixels=max_pixels,
        max_images=max_images,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        queue_size=queue_size,
        timeout_s=timeout,
        api_key=api_key,
        cors_origins=tuple(cors_origins),
    )
    _check_port_free(host, port)
    app = create_app(loaded, settings, metrics)
    shown = f"[{host}]" if ":" in host else host
    echo(f"serving {', '.join(loaded)} on http://{shown}:{port}/ (API docs: /docs)")
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=max(1, int(timeout)),
    )


@cli.command()
@click.option(
    "--out",
    "out",
    default="demo-output",
    show_default=True,
    type=click.Path(),
    help="Folder for the generated data, the models and their reports; an earlier demo's "
    "results there are replaced.",
)
@click.option(
    "--method", default="padim", show_default=True, help="Method to fit (see `fit --help`)."
)
@click.option(
    "--image-size",
    type=ImageSize(),
    default=256,
    show_default=True,
    help="Images are resized to N x N (a multiple of 32).",
)
@click.option(
    "--textures",
    default="brick,gravel,grass",
    show_default=True,
    help="Comma-separated scikit-image textures to generate.",
)
@quiet_option
def demo(out, method, image_size, textures, quiet) -> None:
    """Generate the embedded synthetic dataset, fit, evaluate and write reports."""
    from defectlens.demo import run_demo

    chosen = [t.strip() for t in textures.split(",") if t.strip()]
    if not chosen:  # an empty list would mean every texture to run_demo
        raise DefectLensError("--textures: give at least one")
    run_demo(
        Path(out),
        method,
        image_size,
        chosen,
        progress=not quiet,
        echo=echo,
    )


# -- entry point ----------------------------------------------------------------------------------
_shown_warnings: set[str] = set()


def _warn(message: str) -> None:
    """One line on stderr, above any progress bar; the same message only once per run."""
    from tqdm.auto import tqdm

    line = one_line(f"defectlens: warning: {message}")
    if line not in _shown_warnings:
        _shown_warnings.add(line)
        tqdm.write(line, file=sys.stderr)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, DefectLensWarning):
        _warn(str(message))
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def _command_named(args: list[str]) -> str:
    """The command path in `args` ("defectlens regad train"), for a usage error click raised
    without its context (a missing option value, e.g. `predict MODEL X --out`)."""
    path, group = ["defectlens"], cli
    for arg in args:
        if arg.startswith("-"):  # e.g. --debug before the command
            continue
        sub = group.commands.get(arg) if isinstance(group, click.Group) else None
        if sub is None:
            break
        path.append(arg)
        group = sub
    return " ".join(path)


def _on_sigterm(signum, frame) -> None:
    raise Interrupted()


def main() -> None:
    warnings.showwarning = _show_warning
    _shown_warnings.clear()
    _STATE["saved"] = None
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        # click's own main() turns a broken pipe into a silent exit 1 ("some inputs skipped"
        # here) and prints usage errors over several lines: run the command directly instead.
        with command_line_messages(), cli.make_context("defectlens", sys.argv[1:]) as context:
            cli.invoke(context)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except BrokenPipeError:  # e.g. `defectlens predict ... --json | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)
    except (click.exceptions.Abort, KeyboardInterrupt):
        if _STATE["saved"] is not None:  # only the summary was left to print
            echo(f"defectlens: interrupted after {_STATE['saved']} was saved; it is kept", err=True)
            sys.exit(0)
        echo("defectlens: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except getattr(click.exceptions, "NoArgsIsHelpError", ()) as exc:  # bare `defectlens`
        click.echo(exc.format_message(), err=True)
        sys.exit(EXIT_USER)
    except click.UsageError as exc:  # one line too, pointing at the right --help
        command = exc.ctx.command_path if exc.ctx is not None else _command_named(sys.argv[1:])
        message = f"defectlens: error: {exc.format_message()} (see '{command} --help')"
        click.echo(one_line(message), err=True)
        sys.exit(EXIT_USER)
    except click.ClickException as exc:
        click.echo(one_line(f"defectlens: error: {exc.format_message()}"), err=True)
        sys.exit(EXIT_USER)
    except DefectLensError as exc:
        click.echo(one_line(f"defectlens: error: {exc}"), err=True)
        sys.exit(EXIT_USER)
    except OSError as exc:  # the environment: disk full, permission, a file that vanished
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(one_line(f"defectlens: error: {where}{exc.strerror or exc}"), err=True)
        sys.exit(EXIT_USER)
    except RuntimeError as exc:
        if "can't allocate memory" not in str(exc) and "not enough memory" not in str(exc):
            _internal_error(exc)
        _out_of_memory()
    except MemoryError:
        _out_of_memory()
    except ModuleNotFoundError as exc:
        if exc.name not in FULL_INSTALL_MODULES:
            _internal_error(exc)
        echo(
            f"defectlens: error: this needs {exc.name}, which the deployment-only install "
            "leaves out: pip install 'defectlens[full]' (an exported model scores without it)",
            err=True,
        )
        sys.exit(EXIT_USER)
    except Exception as exc:
        _internal_error(exc)


def _out_of_memory() -> None:
    echo(
        "defectlens: error: out of memory; try a smaller --batch-size or --image-size, "
        "or lower --max-pixels",
        err=True,
    )
    sys.exit(EXIT_USER)


def _internal_error(exc: BaseException) -> None:
    if _STATE["debug"]:
        traceback.print_exception(exc)
    first = str(exc).splitlines()[0] if str(exc) else ""
    echo(
        f"defectlens: internal error: {type(exc).__name__}: {first[:300]} "
        "(a bug: rerun as `defectlens --debug COMMAND ...` for the traceback and please report it)",
        err=True,
    )
    sys.exit(EXIT_INTERNAL)
