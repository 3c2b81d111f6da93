"""`defectlens evaluate`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from defectlens.blas import numpy_blas_single_threaded
from defectlens.cli.common import (
    EXIT_SKIPPED,
    apply_max_pixels,
    backend_option,
    echo,
    mark_saved,
    max_pixels_option,
    quiet_option,
    warn,
    weights_option,
)
from defectlens.errors import DefectLensError
from defectlens.loading import load_model
from defectlens.results import has_scored_rows


@click.command()
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

    apply_max_pixels(max_pixels)
    if Path(out).resolve().is_relative_to(Path(data).resolve()):
        # Written into the dataset, its files would be read with the images by later runs.
        raise DefectLensError(
            f"{out}: is DATA or inside it ({data}); results go in a folder of their own"
        )
    with results_dir(out, PRODUCES, "evaluate") as out_dir:
        earlier = [name for name in PRODUCES if (out_dir / name).exists()]
        if earlier == ["scores.csv"] and not has_scored_rows(out_dir / "scores.csv"):
            earlier = []  # a run that scored nothing: its corrected rerun just replaces it
        if earlier and not overwrite:
            raise DefectLensError(
                f"{out_dir}: holds an earlier evaluation ({', '.join(earlier)}); pass "
                "--overwrite to replace it, or choose another --out"
            )
        numpy_blas_single_threaded()  # see defectlens.blas: OpenBLAS's idle threads spin
        detector = load_model(model, weights=weights, backend=backend)

        def on_skip(path: str, error: str) -> None:
            warn(f"skipped {path}: {error}")

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
    mark_saved(out_dir)
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
