"""User-facing errors.

Anything a user can cause (a bad path, a corrupt image, a model directory from another version)
raises `DefectLensError` with one line that names the file and the problem. The CLI prints that
line and exits non-zero; only genuine bugs produce a traceback.
"""


class DefectLensError(Exception):
    """An error caused by the input or the environment, with a message meant for the user."""


class DataError(DefectLensError):
    """An image, mask or dataset folder that cannot be used."""


class ModelFileError(DefectLensError):
    """A saved model directory that is missing, corrupt or of an unknown format."""


class WeightsError(DefectLensError):
    """Backbone weights that are not available or do not match the architecture."""
