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
        return ExportedModel(model, engine=backend)
    from defectlens.io import load_detector

    return load_detector(model, weights=weights, backend=backend)
