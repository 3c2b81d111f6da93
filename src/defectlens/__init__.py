"""defectlens: industrial visual anomaly detection from normal images only, offline.

from defectlens import Detector, load
detector = Detector(method="padim").fit("data/bottle")      # MVTec root or image folder
result = detector.predict("part.png")[0]                    # score, map, mask, decision
detector.save("model/");  detector = load("model/")

The names are imported on first use (PEP 562), so that the torch-free deployment runtime
(`defectlens.runtime.deployed`) can be imported where torch is not installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from defectlens.detector import Detector
    from defectlens.io import load_detector as load
    from defectlens.prediction import Prediction

__all__ = ["Detector", "Prediction", "__version__", "load"]


def __getattr__(name: str) -> Any:
    if name == "Detector":
        from defectlens.detector import Detector

        return Detector
    if name == "Prediction":
        from defectlens.prediction import Prediction

        return Prediction
    if name == "load":
        from defectlens.io import load_detector

        return load_detector
    raise AttributeError(f"module 'defectlens' has no attribute {name!r}")
