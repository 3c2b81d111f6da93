"""`defectlens threshold`."""

from __future__ import annotations

import click

from defectlens.cli.common import (
    FiniteFloat,
    echo,
    mark_saved,
    quiet_option,
    target_far_option,
    warn,
    warn_if_rough_threshold,
    weights_option,
)
from defectlens.errors import DefectLensError


@click.command()
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
        warn_if_rough_threshold(
            detector.thresholds_.n_validation, "calibrate on a folder with more normal images"
        )
    after = detector.thresholds_
    path = detector.save(model, protect=() if normal is None else (normal,))
    mark_saved(path)
    echo(f"saved {path}: image threshold {before.image:.6g} -> {after.image:.6g}")
    if after.pixel != before.pixel:
        echo(f"pixel threshold {before.pixel:.6g} -> {after.pixel:.6g}")
    _print_thresholds(path, after, heading=False)
    if after.manual and after.image < after.validation_max:
        warn(
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
        warn(
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
