"""`defectlens demo`."""

from __future__ import annotations

from pathlib import Path

import click

from defectlens.cli.common import (
    ImageSize,
    echo,
    quiet_option,
)
from defectlens.errors import DefectLensError


@click.command()
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
