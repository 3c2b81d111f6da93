"""What every `defectlens` command shares: exit statuses, option types and factories, and
the one-line output helpers (echo, warnings once per run, "saved" before an interrupt)."""

from __future__ import annotations

import math
import sys

import click

from defectlens.errors import ParameterError
from defectlens.params import MAX_BATCH_SIZE, MAX_IMAGE_SIZE, check_image_size
from defectlens.results import one_line

EXIT_OK, EXIT_SKIPPED, EXIT_USER, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

# The running command's state: --debug, and the path saved (see `mark_saved`).
RUN_STATE: dict = {"debug": False, "saved": None}


def mark_saved(path) -> None:
    """The command's work is on disk: an interrupt from here on (while it prints its summary)
    must not read as a failed change (exit 130, "interrupted") when the change was kept."""
    RUN_STATE["saved"] = path


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
FEW_VALIDATION_IMAGES = 10  # fewer validation images than this: a threshold is rough


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


def apply_max_pixels(value: int | None) -> None:
    from defectlens.data.images import set_max_pixels

    set_max_pixels(value)  # None: the default or $DEFECTLENS_MAX_PIXELS


def echo(message: str, err: bool = False) -> None:
    """click.echo for text that may hold file names with undecodable bytes or line breaks."""
    click.echo("\n".join(one_line(line) for line in message.split("\n")), err=err)


_shown_warnings: set[str] = set()


def warn(message: str) -> None:
    """One line on stderr, above any progress bar; the same message only once per run."""
    from tqdm.auto import tqdm

    line = one_line(f"defectlens: warning: {message}")
    if line not in _shown_warnings:
        _shown_warnings.add(line)
        tqdm.write(line, file=sys.stderr)


def start_run() -> None:
    """A fresh command (the tests run many in one process): nothing saved, no warning shown."""
    _shown_warnings.clear()
    RUN_STATE["saved"] = None


def warn_if_rough_threshold(n_validation: int, more: str) -> None:
    """A threshold from few normal images sits near their highest score, whatever the target
    rate: said wherever one is set from images (`fit`, `threshold --calibrate`). `more`: what
    would give more images."""
    if n_validation < FEW_VALIDATION_IMAGES:
        warn(
            f"a threshold from {n_validation} normal image(s) is rough: it is near their "
            f"highest score, and real false alarms may be far from --target-far; {more}"
        )
