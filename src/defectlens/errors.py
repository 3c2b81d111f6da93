"""User-facing errors and warnings.

Anything a user can cause (a bad path, a corrupt image, a model directory from another version)
raises `DefectLensError` with one line that names the file and the problem. The CLI prints that
line and exits with status 2; only genuine bugs are internal errors (status 3, traceback with
`--debug`). Data that is usable but probably not what the user meant (an inverted mask, 12-bit
pixels in a 16-bit file, a multi-page TIFF) raises a `DataWarning` naming the file.

Messages that tell the user which setting to change name it the way the user gave it: as a
command-line flag (`--val-fraction`) when the `defectlens` command is running, as the Python
parameter (`val_fraction`) otherwise. `option` renders the name; the command turns the flag
style on for its run (`command_line_messages`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_COMMAND_LINE = [False]  # a list, not a context variable: worker threads see it too


def option(flag: str, name: str | None = None, value: str = "") -> str:
    """A setting as the user gave it: `flag` ("--weights") with " value" on the command line;
    else `name` (default: the flag as a parameter name, "weights") with "=value"."""
    if _COMMAND_LINE[0]:
        return f"{flag} {value}" if value else flag
    name = name or flag.lstrip("-").replace("-", "_")
    return f"{name}={value}" if value else name


def method_param(name: str, value: str = "") -> str:
    """A method parameter as the user sets it: `--param name=value` on the command line, else
    `name=value` (or the bare name without a value)."""
    given = f"{name}={value}" if value else name
    return f"--param {given}" if _COMMAND_LINE[0] else given


@contextlib.contextmanager
def command_line_messages() -> Iterator[None]:
    """Within: messages name command-line flags (the `defectlens` command's run)."""
    before, _COMMAND_LINE[0] = _COMMAND_LINE[0], True
    try:
        yield
    finally:
        _COMMAND_LINE[0] = before


class DefectLensError(Exception):
    """An error caused by the input or the environment, with a message meant for the user."""


class DataError(DefectLensError):
    """An image, mask or dataset folder that cannot be used."""


class PixelLimitError(DataError):
    """An image whose header claims more pixels than the limit (never decoded)."""


class ModelFileError(DefectLensError):
    """A saved model directory that is missing, corrupt or of an unknown format."""


class WeightsError(DefectLensError):
    """Backbone weights that are not available or do not match the architecture. `reason`
    is the problem alone, `hint` how to supply weights where the caller can take them (a
    command without a weights option shows the reason only)."""

    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(f"{reason} ({hint})" if hint else reason)
        self.reason, self.hint = reason, hint


class ScoringError(DataError):
    """An image the model could not score (e.g. a non-finite score): reported and skipped."""


class ParameterError(DefectLensError, ValueError):
    """A parameter of the wrong type or out of its range (also a ValueError, as sklearn does)."""


class OutputError(DefectLensError):
    """An output location that cannot or must not be written (checked before any work)."""


class DefectLensWarning(UserWarning):
    """Something the user should know about that does not stop the work."""


class DataWarning(DefectLensWarning):
    """Input that is readable but probably not what was meant; the message names the file."""
