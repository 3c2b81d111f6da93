"""Anomaly-detection methods, each a plain `torch.nn.Module` holding its fitted state in buffers.

A method is registered by name; adding one is a new module here with one class.
"""

from defectlens.methods.base import METHODS, AnomalyMethod, MethodOutput, get_method
from defectlens.methods.differnet import DifferNet
from defectlens.methods.ensemble import Ensemble
from defectlens.methods.gradcon import GradCon
from defectlens.methods.memae import MemAE
from defectlens.methods.mnad import MNAD
from defectlens.methods.nbs import NBS
from defectlens.methods.ognet import OGNet
from defectlens.methods.padim import Padim
from defectlens.methods.patchcore import PatchCore
from defectlens.methods.patchsvdd import PatchSVDD
from defectlens.methods.regad import Regad
from defectlens.methods.segaided import SegAided
from defectlens.methods.spade import Spade
from defectlens.methods.students import Students

__all__ = [
    "METHODS",
    "MNAD",
    "NBS",
    "AnomalyMethod",
    "DifferNet",
    "Ensemble",
    "GradCon",
    "MemAE",
    "MethodOutput",
    "OGNet",
    "Padim",
    "PatchCore",
    "PatchSVDD",
    "Regad",
    "SegAided",
    "Spade",
    "Students",
    "get_method",
]
