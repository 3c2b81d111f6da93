"""Saving and loading detectors: a directory of `config.json` + `model.safetensors`, no pickle.

config.json holds every parameter, the thresholds, the backbone weights' SHA-256 and the
SHA-256 of the tensor file; load refuses a directory whose format version it does not know,
whose tensor file was altered or truncated, or whose backbone weights differ from the ones the
model was fitted with. Saving writes to a temporary sibling directory and renames it into place,
so an interrupted save never leaves a half-written model where a good one was.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from defectlens import __version__
from defectlens.backbones.registry import file_sha256
from defectlens.errors import DefectLensError, ModelFileError
from defectlens.thresholds import Thresholds

FORMAT = "defectlens-model"
FORMAT_VERSION = 1
CONFIG = "config.json"
TENSORS = "model.safetensors"


def save_detector(detector, path: str | Path) -> Path:
    if not detector.model_.is_fitted or detector.thresholds_ is None:
        raise DefectLensError("nothing to save: the detector is not fitted")
    path = Path(path)
    if path.exists() and not (path / CONFIG).is_file() and any(path.iterdir()):
        raise DefectLensError(f"{path}: exists and is not a defectlens model; not overwriting it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(detector.model_.fitted_state(), str(tmp / TENSORS))
        extractor = detector._ensure_extractor()
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "defectlens_version": __version__,
            "detector": detector.params(),
            "backbone_weights": {
                "path": str(extractor.weights_path),
                "sha256": extractor.weights_sha256,
            },
            "thresholds": detector.thresholds_.to_dict(),
            "tensors_sha256": file_sha256(tmp / TENSORS),
        }
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        for item in [tmp, *tmp.iterdir()]:
            item.chmod(0o755 if item.is_dir() else 0o644)  # mkdtemp makes them private
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise ModelFileError(f"{path}: no such model directory")
    config_path = path / CONFIG
    if not config_path.is_file():
        raise ModelFileError(f"{path}: not a defectlens model (missing {CONFIG})")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{config_path}: corrupt JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ModelFileError(f"{config_path}: not a defectlens model config")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{config_path}: model format version {version}, this defectlens "
            f"({__version__}) reads version {FORMAT_VERSION}"
        )
    return config


def load_detector(path: str | Path, weights: str | None = None):
    from defectlens.detector import Detector

    path = Path(path)
    config = read_config(path)
    tensors_path = path / TENSORS
    if not tensors_path.is_file():
        raise ModelFileError(f"{path}: missing {TENSORS}")
    if file_sha256(tensors_path) != config.get("tensors_sha256"):
        raise ModelFileError(f"{tensors_path}: checksum mismatch, the file is corrupt or altered")
    try:
        tensors = load_file(str(tensors_path))
        params = dict(config["detector"])
        stored_weights = config["backbone_weights"]
        thresholds = Thresholds(**config["thresholds"])
    except (SafetensorError, KeyError, TypeError) as exc:
        raise ModelFileError(f"{path}: incomplete or corrupt model ({exc})") from None
    if weights is not None:
        params["weights"] = weights
    detector = Detector(**params)
    detector.model_.load_fitted_state(tensors)
    extractor = detector._ensure_extractor()
    if extractor.weights_sha256 != stored_weights["sha256"]:
        raise ModelFileError(
            f"{path}: fitted with backbone weights {stored_weights['path']} "
            f"(sha256 {stored_weights['sha256'][:12]}…) but {extractor.weights_path} differs; "
            "pass the original file with --weights"
        )
    detector.thresholds_ = thresholds
    return detector
