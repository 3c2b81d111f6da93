"""Backends that run a frozen backbone for inference, behind one call: images -> feature maps.

A backend is a callable taking images (B, 3, H, W) float32 in [0, 1] and returning the
extractor's feature maps (one per requested stride, as torch tensors); the `FeatureExtractor`
holds one (`use_backend`) and every method's `fast` path goes through it. Both compute in fp32,
so scores agree to float32 rounding (features within ~3e-6 relative, measured); a backend never
changes a decision by more than that.

- `torch`: eager PyTorch in channels-last memory format, no autograd.
- `onnxruntime` (default): the backbone exported to ONNX (cached, see `onnx_graph`), run by
  onnxruntime's CPU provider with graph optimisations (conv + batch-norm + activation fused):
  about 5x the torch backend (10x eager torch in its default layout) for efficientnet_lite0
  at 256 px on 2 cores.
- `openvino`: the same graph on OpenVINO's CPU plugin, in fp32 (needs `pip install openvino`).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch

from defectlens.backbones import FeatureExtractor
from defectlens.errors import DefectLensError, DefectLensWarning, ParameterError
from defectlens.runtime.onnx_graph import INPUT, backbone_model, module_graph, output_name
from defectlens.runtime.sessions import OnnxRuntimeSession, OpenVinoSession, Session

DEFAULT_BACKEND = "onnxruntime"


def default_backend_name() -> str:
    """$DEFECTLENS_BACKEND if set, else onnxruntime."""
    return os.environ.get("DEFECTLENS_BACKEND") or DEFAULT_BACKEND


class TorchBackend:
    """Eager PyTorch, channels-last, no autograd."""

    name: ClassVar[str] = "torch"

    def __init__(self, extractor: FeatureExtractor) -> None:
        self.extractor = extractor

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.extractor(images.contiguous(memory_format=torch.channels_last))


class SessionBackend:
    """The backbone's cached ONNX graph, cut to the taps in use, on an inference engine."""

    name: ClassVar[str]

    def __init__(
        self, extractor: FeatureExtractor, threads: int | None = None, graph: bytes | None = None
    ) -> None:
        """`graph` replaces the backbone's own (serialised ONNX with the same inputs and
        outputs, e.g. its int8 quantisation)."""
        self.outputs = [output_name(s) for s in extractor.strides]
        if graph is None:
            graph = backbone_model(extractor, self.outputs).SerializeToString()
        self.threads = threads or torch.get_num_threads()
        self.image_size = extractor.image_size
        self.session = self.open(graph, self.threads, self.outputs)

    def open(self, graph: bytes, threads: int, outputs: list[str]) -> Session:
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> list[torch.Tensor]:
        return _run(self.session, images)

    def compile(self, module: torch.nn.Module, key: str, count: int):
        """A method's feature module (images -> `count` maps) exported once to a cached graph
        (named by `key`) and run on this engine; None, with a warning, if it cannot (the
        extractor then runs it in eager torch)."""
        outputs = [f"features{i}" for i in range(count)]
        try:
            path = module_graph(module, key, self.image_size, outputs)
            session = self.open(path.read_bytes(), self.threads, outputs)
        except DefectLensError:
            raise
        except Exception as exc:  # exporters and runtimes raise many types
            _warn_fallback(self.name, "this method's features", exc)
            return None  # the extractor runs it eagerly
        return lambda images: _run(session, images)


def _run(session: Session, images: torch.Tensor) -> list[torch.Tensor]:
    array = images.detach().to("cpu", torch.float32).contiguous().numpy()
    return [torch.from_numpy(o) for o in session.run({INPUT: array})]


class OnnxRuntimeBackend(SessionBackend):
    """onnxruntime's CPU provider, graph optimisations on (conv + batch-norm + activation
    fused)."""

    name = "onnxruntime"

    def open(self, graph: bytes, threads: int, outputs: list[str]) -> Session:
        return OnnxRuntimeSession(graph, outputs, threads)


class OpenVinoBackend(SessionBackend):
    """OpenVINO's CPU plugin, held to fp32 (see `sessions`)."""

    name = "openvino"

    def open(self, graph: bytes, threads: int, outputs: list[str]) -> Session:
        with tempfile.TemporaryDirectory(prefix="defectlens-ov-") as folder:
            path = Path(folder) / "backbone.onnx"  # OpenVINO reads graphs from files
            path.write_bytes(graph)
            return OpenVinoSession(path, outputs, threads)


BACKENDS: dict[str, Callable[..., Callable[[torch.Tensor], list[torch.Tensor]]]] = {
    TorchBackend.name: TorchBackend,
    OnnxRuntimeBackend.name: OnnxRuntimeBackend,
    OpenVinoBackend.name: OpenVinoBackend,
}


def check_backend_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ParameterError(
            f"unknown backend {name!r}; choose one of: {', '.join(sorted(BACKENDS))}"
        )
    return name


def make_backend(name: str, extractor: FeatureExtractor):
    """The named backend for `extractor`; if onnxruntime cannot run this backbone (an export
    failure), torch takes over with a warning rather than stopping the work."""
    check_backend_name(name)
    if name == TorchBackend.name or not extractor.strides:  # no taps: a method on pixels
        return TorchBackend(extractor)
    try:
        return BACKENDS[name](extractor)
    except DefectLensError:  # e.g. OpenVINO asked for but not installed: say so, stop
        raise
    except Exception as exc:  # exporters and runtimes raise many types
        _warn_fallback(name, extractor.spec.name, exc)
        return TorchBackend(extractor)


def _warn_fallback(backend: str, what: str, exc: Exception) -> None:
    """Say, in one line, that `backend` cannot run `what` and eager torch takes over."""
    first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    warnings.warn(
        f"the {backend} backend cannot run {what} ({first}); using torch",
        DefectLensWarning,
        stacklevel=3,
    )
