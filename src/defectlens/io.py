"""Saving and loading detectors: a directory of `config.json` + `model.safetensors`, no pickle.

config.json holds every parameter, the thresholds, the backbone weights' SHA-256 and the
SHA-256 of the tensor file. Loading trusts nothing in it: the format marker and version, every
key (unknown ones are refused by name), every value's type and range (the same checks the
constructors apply at fit time), the tensors' checksum, names, shapes (against the image size),
and finiteness. A model that loads therefore scores like the one that was saved, or not at all:
an edited `sigma: 1e6` or `image_size: 65536` is refused instead of running for minutes.

Saving goes through `defectlens.outputs`: the destination is checked first, the model is written
into a temporary sibling and swapped in atomically, and a folder that is not a defectlens model
is never replaced.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from defectlens import __version__
from defectlens.backbones.registry import get_spec
from defectlens.errors import DefectLensError, ModelFileError, option
from defectlens.outputs import (
    MODEL_CONFIG,
    MODEL_FORMAT,
    MODEL_TENSORS,
    check_model_target,
    file_sha256,
    read_folder_config,
    write_folder,
)
from defectlens.prediction import NORMAL_ONLY
from defectlens.thresholds import Thresholds

FORMAT = MODEL_FORMAT
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: PatchCore also stored a serialised faiss index (now rebuilt)
CONFIG = MODEL_CONFIG
TENSORS = MODEL_TENSORS
_TOP_KEYS = {
    "format",
    "format_version",
    "defectlens_version",
    "detector",
    "backbone_weights",
    "thresholds",
    "tensors_sha256",
}
# Detector parameters added after format version 2 was fixed, with the value that reproduces
# the older models' behaviour.
_ADDED_DETECTOR_KEYS = {"shots": None, "shot_seed": 0, "augment_support": False}
# Method parameters added after models were saved, with the value those models were fitted with.
_ADDED_METHOD_PARAMS = {
    "segaided": {"space": "pixels", "structure_clusters": 8},
    "patchsvdd": {"select_by": "loss"},  # its epoch was chosen by the loss before 2026-12-07
    "students": {"normalise": "global"},  # the paper's rule, the only one before 2026-12-07
}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def save_detector(detector, path: str | Path, protect: tuple[str | Path, ...] = ()) -> Path:
    """Write the fitted detector to `path` atomically; never replaces a non-model folder."""
    if not detector.model_.is_fitted or detector.thresholds_ is None:
        raise DefectLensError("nothing to save: the detector is not fitted")
    detector.check_settings()  # what load would refuse is refused here, before writing
    path = check_model_target(path, protect)
    extractor = detector.ensure_extractor()
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
    }
    if detector.n_fit_images_ is not None:
        config["fit_images"] = detector.n_fit_images_
    if detector.model_.history:  # trained methods: the per-epoch losses
        config["training"] = {"history": detector.model_.history}
    if detector.model_.supervision != NORMAL_ONLY:  # nbs: which labelled anomalies
        config.setdefault("training", {"history": []})["supervision"] = detector.supervision
    state = detector.model_.fitted_state()
    write_folder(path, lambda target: save_file(state, str(target)), config, "model")
    return path


def _reject(config_path: Path, problem: str) -> ModelFileError:
    return ModelFileError(f"{config_path}: {problem}")


def _check_keys(
    config_path: Path, where: str, found: dict, allowed: set[str], optional: set[str] = frozenset()
) -> None:
    """Every key of `allowed` present, nothing else but keys of `optional`."""
    unknown = sorted(set(found) - allowed - optional)
    missing = sorted(allowed - set(found))
    if unknown:
        raise _reject(config_path, f"unknown key {where}{unknown[0]!r}")
    if missing:
        raise _reject(config_path, f"missing key {where}{missing[0]!r}")


def _object(config_path: Path, config: dict, key: str) -> dict:
    value = config[key]
    if not isinstance(value, dict):
        raise _reject(config_path, f"{key!r} must be an object, not {type(value).__name__}")
    return value


def _checked_thresholds(config_path: Path, raw: dict) -> Thresholds:
    try:
        return Thresholds.from_dict(raw)
    except DefectLensError as exc:
        raise _reject(config_path, str(exc)) from None


def read_config(path: str | Path) -> dict:
    """config.json of a model folder, with its structure and simple values checked."""
    config_path, config = read_folder_config(Path(path), "model", FORMAT)
    version = config.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise ModelFileError(
            f"{config_path}: model format version {version!r}, this defectlens "
            f"({__version__}) reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    _check_keys(config_path, "", config, _TOP_KEYS, optional={"training", "fit_images"})
    fit_images = config.get("fit_images", 0)
    if isinstance(fit_images, bool) or not isinstance(fit_images, int) or fit_images < 0:
        raise _reject(config_path, "fit_images must be a whole number of images")
    detector = _object(config_path, config, "detector")
    if "training" in config:
        training = _object(config_path, config, "training")
        history = training.get("history")
        if not {"history"} <= set(training) <= {"history", "supervision"} or not (
            isinstance(history, list) and all(isinstance(r, dict) for r in history)
        ):
            raise _reject(config_path, "training must hold a history: a list of objects")
        if not isinstance(training.get("supervision", ""), str):
            raise _reject(config_path, "training.supervision must be a string")
    _object(config_path, config, "thresholds")
    weights = _object(config_path, config, "backbone_weights")
    _check_keys(config_path, "backbone_weights.", weights, {"path", "sha256"})
    for key, value in (
        ("backbone_weights.sha256", weights["sha256"]),
        ("tensors_sha256", config["tensors_sha256"]),
    ):
        if not isinstance(value, str) or not _SHA256.fullmatch(value):
            raise _reject(config_path, f"{key} must be a SHA-256 hex digest")
    if not isinstance(weights["path"], str):
        raise _reject(config_path, "backbone_weights.path must be a string")
    if not isinstance(detector.get("method_params"), dict):
        raise _reject(config_path, "detector.method_params must be an object")
    return config


def _migrate(config: dict, tensors: dict[str, Any]) -> None:
    """Bring an older format's tensors up to date (version 1 -> 2)."""
    if config["format_version"] == 1 and config["detector"].get("method") == "patchcore":
        tensors.pop("bank_index", None)  # the index is rebuilt from the vectors, never read


def load_detector(path: str | Path, weights: str | None = None, backend: str | None = None):
    """Load a saved model; every problem is a one-line ModelFileError naming the file.

    `backend` chooses where the backbone runs (default: `runtime.default_backend_name()`)."""
    from defectlens.detector import Detector

    path = Path(path)
    config = read_config(path)
    config_path = path / CONFIG
    thresholds = _checked_thresholds(config_path, config["thresholds"])
    params = dict(config["detector"])
    for key, default in _ADDED_DETECTOR_KEYS.items():  # models saved before they existed
        params.setdefault(key, default)
    added = _ADDED_METHOD_PARAMS.get(str(params.get("method")), {})
    params["method_params"] = {**added, **params["method_params"]}
    _check_keys(config_path, "detector.", params, set(Detector.param_names()))
    if weights is not None:
        params["weights"] = weights
    try:
        detector = Detector(**params)
    except DefectLensError as exc:
        raise _reject(config_path, str(exc)) from None
    if backend is not None:
        detector.use_backend(backend)
    stored_params = set(params["method_params"])
    _check_keys(
        config_path, "detector.method_params.", stored_params, set(detector.model_.params())
    )
    tensors_path = path / TENSORS
    if not tensors_path.is_file():
        raise ModelFileError(f"{path}: missing {TENSORS}")
    if file_sha256(tensors_path) != config["tensors_sha256"]:
        raise ModelFileError(f"{tensors_path}: checksum mismatch, the file is corrupt or altered")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{tensors_path}: corrupt tensor file ({str(exc)[:120]})") from None
    _migrate(config, tensors)
    try:
        detector.model_.load_fitted_state(tensors)
    except ModelFileError as exc:
        raise ModelFileError(f"{tensors_path}: {exc}") from None
    taps = get_spec(detector.backbone).taps
    missing = sorted(set(detector.model_.strides) - set(taps))
    if missing:
        raise _reject(config_path, f"backbone {detector.backbone} has no tap at stride {missing}")
    try:
        detector.model_.check_geometry(detector.image_size, taps)
    except ModelFileError as exc:
        raise _reject(config_path, f"does not match {TENSORS}: {exc}") from None
    extractor = detector.ensure_extractor()
    stored = config["backbone_weights"]
    if extractor.weights_sha256 != stored["sha256"]:
        raise ModelFileError(
            f"{path}: fitted with backbone weights {stored['path']} "
            f"(sha256 {stored['sha256'][:12]}…) but {extractor.weights_path} differs; "
            f"pass the original file as {option('--weights')}"
        )
    detector.thresholds_ = thresholds
    detector.model_.history = config.get("training", {}).get("history", [])
    detector.n_fit_images_ = config.get("fit_images")
    if "supervision" in config.get("training", {}):
        detector.model_.supervision = config["training"]["supervision"]
    return detector
