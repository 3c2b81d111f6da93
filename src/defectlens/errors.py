"""User-facing errors and warnings.

Anything a user can cause (a bad path, a corrupt image, a model directory from another version)
raises `DefectLensError` with one line that names the file and the problem. The CLI prints that
line and exits with status 2; only genuine bugs are internal errors (status 3, traceback with
`--debug`). Data that is usable but probably not what the user meant (an inverted mask, 12-bit
pixels in a 16-bit file, a multi-page TIFF) raises a `DataWarning` naming the file.
"""


class DefectLensError(Exception):
    """An error caused by the input or the environment, with a message meant for the user."""


class DataError(DefectLensError):
    """An image, mask or dataset folder that cannot be used."""


class PixelLimitError(DataError):
    """An image whose header claims more pixels than the limit (never decoded)."""


class ModelFileError(DefectLensError):
    """A saved model directory that is missing, corrupt or of an unknown format."""


class WeightsError(DefectLensError):
    """Backbone weights that are not available or do not match the architecture."""


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
