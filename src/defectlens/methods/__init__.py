"""Anomaly-detection methods, each a plain `torch.nn.Module` holding its fitted state in buffers.

A method is registered by name; adding one is a new module here with one class.
"""

from defectlens.methods.base import METHODS, AnomalyMethod, MethodOutput, get_method
from defectlens.methods.differnet import DifferNet
from defectlens.methods.padim import Padim
from defectlens.methods.patchcore import PatchCore
from defectlens.methods.regad import Regad
from defectlens.methods.spade import Spade

__all__ = [
    "METHODS",
    "AnomalyMethod",
    "DifferNet",
    "MethodOutput",
    "Padim",
    "PatchCore",
    "Regad",
    "Spade",
    "get_method",
]
