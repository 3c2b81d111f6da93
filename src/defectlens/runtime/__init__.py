"""Inference backends: where the frozen backbone runs (eager torch or onnxruntime), chosen by
name, with scores that match to float32 precision whichever runs."""

from defectlens.runtime.backends import (
    BACKENDS,
    DEFAULT_BACKEND,
    OnnxRuntimeBackend,
    TorchBackend,
    check_backend_name,
    default_backend_name,
    make_backend,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "OnnxRuntimeBackend",
    "TorchBackend",
    "check_backend_name",
    "default_backend_name",
    "make_backend",
]
