"""`defectlens export`."""

from __future__ import annotations

import click

from defectlens.cli.common import (
    echo,
    mark_saved,
    out_option,
    quiet_option,
    weights_option,
)
from defectlens.errors import DefectLensError


@click.command()
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
    mark_saved(report.path)
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
