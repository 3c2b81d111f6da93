"""Opening whatever model folder a user points at: a saved model or an exported one.

The CLI's scoring commands and the inspection service accept both kinds, so the choice lives
here, once. An exported folder loads without torch.
"""

from __future__ import annotations

from defectlens.errors import DefectLensError, option
from defectlens.prediction import Predictor


def load_model(model: str, weights: str | None = None, backend: str | None = None) -> Predictor:
    """A saved model (a `Detector`, needs torch) or an exported folder (no torch)."""
    from defectlens.runtime.deployed import ExportedModel, is_export

    if is_export(model):
        if weights is not None:
            raise DefectLensError(
                f"{option('--weights')} does not apply to an exported model: its backbone is in "
                "its graphs"
            )
        if backend == "torch":
            raise DefectLensError(
                f"{model}: an exported model runs on onnxruntime or openvino, not torch"
            )
        if backend is None:
            _check_environment_backend()
        return ExportedModel(model, engine=backend)
    from defectlens.io import load_detector

    return load_detector(model, weights=weights, backend=backend)


def _check_environment_backend() -> None:
    """$DEFECTLENS_BACKEND chooses the backbone's backend for saved models; an export runs on
    its own graphs' engine (`--backend` picks another). A misspelt value is refused here as
    it would be for a model, and a valid one is said not to apply, never silently ignored."""
    import os
    import warnings

    from defectlens.errors import DefectLensWarning
    from defectlens.runtime.sessions import BACKEND_NAMES

    name = os.environ.get("DEFECTLENS_BACKEND")
    if name:
        known = sorted(BACKEND_NAMES)
        if name not in known:
            raise DefectLensError(
                f"unknown backend {name!r} in $DEFECTLENS_BACKEND; choose one of: "
                + ", ".join(known)
            )
        warnings.warn(
            f"$DEFECTLENS_BACKEND={name} applies to saved models, not to an export: it runs on "
            f"its own engine (choose one with {option('--backend')})",
            DefectLensWarning,
            stacklevel=3,
        )
