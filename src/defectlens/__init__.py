"""defectlens: industrial visual anomaly detection from normal images only, offline.

from defectlens import Detector, load
detector = Detector(method="padim").fit("data/bottle")      # MVTec root or image folder
result = detector.predict("part.png")[0]                    # score, map, mask, decision
detector.save("model/");  detector = load("model/")
"""

__version__ = "0.1.0"

from defectlens.detector import Detector, Prediction
from defectlens.io import load_detector as load

__all__ = ["Detector", "Prediction", "__version__", "load"]
