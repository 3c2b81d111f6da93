"""The `defectlens` command line. Every user mistake ends in one 'error:' line and exit status 2."""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
import time
from pathlib import Path

import click
import numpy as np

from defectlens import __version__
from defectlens.errors import DefectLensError

EXAMPLES = """
\b
Typical use:
  defectlens fit data/bottle --method padim --out models/bottle
  defectlens evaluate models/bottle data/bottle --out results/bottle
  defectlens predict models/bottle line-camera/*.png --out flagged/
  defectlens demo                        # everything on built-in synthetic data
"""

quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
weights_option = click.option(
    "--weights",
    type=click.Path(dir_okay=False),
    default=None,
    help="Local backbone weights file (torchvision .pth for resnet18 / wide_resnet50_2).",
)


@click.group(epilog=EXAMPLES)
@click.version_option(__version__, prog_name="defectlens")
def cli() -> None:
    """Industrial visual anomaly detection from normal images only, fully offline.

    Fit a model on images of good parts, then score new images: each gets an anomaly score, a
    pixel anomaly map, a defect mask and a good/defective decision. Thresholds are set from
    held-out normal images, never from test labels.
    """


@cli.command()
@click.argument("data", type=click.Path())
@click.option("--method", default="padim", show_default=True, help="Anomaly-detection method.")
@click.option(
    "--backbone",
    default="efficientnet_lite0",
    show_default=True,
    help="Pretrained backbone; see `defectlens backbones`.",
)
@weights_option
@click.option(
    "--image-size",
    default=256,
    show_default=True,
    help="Images are resized to N x N (multiple of 32) before scoring.",
)
@click.option("--out", "out", required=True, type=click.Path(), help="Model directory to write.")
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
    default=0.1,
    show_default=True,
    help="Share of training images held out to set the threshold.",
)
@click.option(
    "--target-far",
    default=0.01,
    show_default=True,
    help="Target false-alarm rate on normal images for the decision threshold.",
)
@click.option(
    "--n-channels",
    type=int,
    default=None,
    help="padim: random channel subset size (default: all channels).",
)
@click.option(
    "--shrinkage",
    type=click.Choice(["none", "ledoit_wolf"]),
    default=None,
    help="padim: covariance estimator (default none: sample covariance + 0.01 I).",
)
@click.option(
    "--coreset-ratio",
    type=float,
    default=None,
    help="patchcore: share of training patches kept in the memory bank (default 0.1).",
)
@click.option(
    "--index",
    "nn_index",
    type=click.Choice(["exact", "ivf", "hnsw"]),
    default=None,
    help="patchcore: nearest-neighbour index (default exact).",
)
@click.option(
    "--k-images",
    type=int,
    default=None,
    help="spade: nearest training images per test image (default 5).",
)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any other method parameter, VALUE in JSON (e.g. --param embed_dim=256).",
)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--seed", default=0, show_default=True)
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
    n_channels,
    shrinkage,
    coreset_ratio,
    nn_index,
    k_images,
    params,
    batch_size,
    seed,
    quiet,
) -> None:
    """Fit a model on the normal images in DATA.

    DATA is an MVTec-AD-layout root (its train/good is used) or a folder of normal images.
    """
    from defectlens.detector import Detector

    named = {
        "n_channels": n_channels,
        "shrinkage": shrinkage,
        "coreset_ratio": coreset_ratio,
        "index": nn_index,
        "k_images": k_images,
    }
    method_params = {k: v for k, v in named.items() if v is not None}
    method_params.update(_parse_params(params))
    if method in ("padim", "patchcore"):
        method_params.setdefault("seed", seed)
    detector = Detector(
        method=method,
        backbone=backbone,
        weights=weights,
        image_size=image_size,
        batch_size=batch_size,
        val_fraction=val_fraction,
        target_far=target_far,
        seed=seed,
        method_params=method_params,
    )
    detector.fit(data, val_images=val, progress=not quiet)
    path = detector.save(out)
    t = detector.thresholds_
    click.echo(f"saved {path} (threshold {t.image:.4g} from {t.n_validation} normal images)")


def _parse_params(items: tuple[str, ...]) -> dict:
    parsed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DefectLensError(f"--param {item!r}: expected KEY=VALUE")
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value  # a bare word, e.g. --param index=hnsw
    return parsed


@cli.command()
@click.argument("model", type=click.Path())
@click.argument("data", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(), help="Folder for the results.")
@click.option("--save-maps", is_flag=True, help="Also write maps/<path>.npy (float32 raw maps).")
@click.option("--no-report", is_flag=True, help="Skip report.html.")
@weights_option
@quiet_option
def evaluate(model, data, out, save_maps, no_report, weights, quiet) -> None:
    """Score the test images of DATA (MVTec layout) and write metrics, scores and a report."""
    from defectlens.evaluation import evaluate as run_evaluation
    from defectlens.io import load_detector

    detector = load_detector(model, weights=weights)
    result = run_evaluation(
        detector, data, out, save_maps=save_maps, report=not no_report, progress=not quiet
    )
    _print_metrics(result.metrics)
    click.echo(
        f"wrote {Path(out) / 'metrics.json'}, {Path(out) / 'scores.csv'}"
        + ("" if no_report else f", {Path(out) / 'report.html'}")
    )


def _print_metrics(m: dict) -> None:
    def fmt(key):
        value = m.get(key)
        return "n/a" if value is None else f"{value:.4f}"

    click.echo(
        f"image AUROC {fmt('image_auroc')}  pixel AUROC {fmt('pixel_auroc')}  "
        f"AUPRO {fmt('aupro')}  F1-max {fmt('image_f1_max')}  "
        f"false alarms {fmt('false_alarm_rate')}  misses {fmt('miss_rate')}"
    )


def expand_inputs(inputs: tuple[str, ...]) -> list[Path]:
    """Files, folders (their images) and glob patterns, in the order given, without repeats."""
    from defectlens.data.dataset import list_images
    from defectlens.data.images import IMAGE_SUFFIXES

    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(list_images(path, recursive=True))
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            matches = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
            if not matches:
                raise DefectLensError(f"{item}: pattern matches no images")
            found.extend(matches)
        else:
            raise DefectLensError(f"{item}: no such file or directory")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise DefectLensError("no images found in the given inputs")
    return unique


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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image.")
@weights_option
@quiet_option
def predict(model, inputs, out, no_images, as_json, weights, quiet) -> None:
    """Score images: INPUTS are files, folders or glob patterns.

    Unreadable images are reported on stderr, listed in results.csv with their error, and
    skipped; the rest are scored. Exit status 1 if any image was skipped.
    """
    from defectlens.data.images import read_image
    from defectlens.io import load_detector
    from defectlens.report.overlay import draw_outline, overlay

    if out is None and not as_json:
        raise DefectLensError("give --out DIR (or --json to print results)")
    paths = expand_inputs(inputs)
    detector = load_detector(model, weights=weights)
    out_dir = Path(out) if out else None
    base = Path(os.path.commonpath([p.resolve().parent for p in paths]))
    errors: dict[str, str] = {}

    def on_error(name: str, exc: Exception) -> None:
        errors[name] = str(exc)
        click.echo(f"warning: skipped {exc}", err=True)

    rows = []
    start = time.perf_counter()
    for prediction in detector.iter_predict(paths, progress=not quiet, on_error=on_error):
        summary = prediction.summary()
        rows.append(summary)
        if as_json:
            click.echo(json.dumps(summary))
        if out_dir is not None and not no_images:
            stem = Path(prediction.source).resolve().relative_to(base).with_suffix("")
            image = read_image(prediction.source)
            t = detector.thresholds_.pixel
            shaded = draw_outline(overlay(image, prediction.anomaly_map, t), prediction.mask)
            _save_png(shaded, out_dir / "overlays" / f"{stem}.png")
            _save_png((prediction.mask * 255).astype(np.uint8), out_dir / "masks" / f"{stem}.png")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "results.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "score", "predicted", "defect_pixels", "error"])
            by_path = {r["path"]: r for r in rows}
            for p in paths:
                r = by_path.get(str(p))
                if r is None:
                    writer.writerow([p, "", "error", "", errors.get(str(p), "not scored")])
                else:
                    writer.writerow(
                        [p, f"{r['score']:.6g}", r["predicted"], r["defect_pixels"], ""]
                    )
    seconds = time.perf_counter() - start
    flagged = sum(r["predicted"] == "defective" for r in rows)
    click.echo(
        f"scored {len(rows)} image(s) in {seconds:.1f} s ({len(rows) / seconds:.1f} img/s): "
        f"{flagged} defective, {len(rows) - flagged} good"
        + (f", {len(errors)} skipped" if errors else ""),
        err=as_json,
    )
    if errors:
        sys.exit(1)


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@cli.command()
def backbones() -> None:
    """List the registered backbones, their feature taps and whether weights are available."""
    from defectlens.backbones import available_backbones

    for spec in available_backbones():
        taps = ", ".join(f"{s}:{c}" for s, c in sorted(spec.taps.items()))
        click.echo(f"{spec.name:20s} taps(stride:channels) {taps}")
        status = spec.weights_status()
        click.echo(f"{'':20s} {spec.description}; weights {status}")
        if status.startswith("missing"):
            click.echo(f"{'':20s} to supply them: {spec.weights_help}")


@cli.command()
@click.option("--out", "out", default="demo-output", show_default=True, type=click.Path())
@click.option("--method", default="padim", show_default=True)
@click.option("--image-size", default=256, show_default=True)
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

    run_demo(
        Path(out),
        method,
        image_size,
        [t for t in textures.split(",") if t],
        progress=not quiet,
        echo=click.echo,
    )


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except DefectLensError as exc:
        click.echo(f"defectlens: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
