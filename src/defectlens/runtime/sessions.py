"""Inference-engine sessions behind one call, numpy in and out (no torch): onnxruntime and
OpenVINO, both held to fp32.

onnxruntime runs in fp32 on its CPU provider. OpenVINO would not by default: on CPUs with bf16
units it computes in bf16 (PaDiM scores off by up to 1.5 %, measured), so every compiled model
gets the precision hint f32. Either way the features match torch's to float32 rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from defectlens.errors import DefectLensError, ModelFileError

ENGINES = ("onnxruntime", "openvino")
# Every backbone backend (`runtime.backends.BACKENDS`), named here where torch is not imported.
BACKEND_NAMES = (*ENGINES, "torch")


class Session:
    """A compiled graph: `run(feeds)` -> its outputs named `outputs`, in that order."""

    engine: ClassVar[str]

    def __init__(self, outputs: list[str]) -> None:
        self.outputs = list(outputs)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def input_shapes(self) -> dict[str, tuple[int | None, ...]]:
        """Each input's shape as the graph declares it; None where a dimension is dynamic."""
        raise NotImplementedError


class OnnxRuntimeSession(Session):
    engine = "onnxruntime"

    def __init__(self, graph: str | Path | bytes, outputs: list[str], threads: int | None = None):
        super().__init__(outputs)
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # warnings about unused initialisers are noise here
        # onnxruntime's threads otherwise keep spinning after each run, taking the cores from
        # what follows it (faiss search, the head, numpy post-processing).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        source = graph if isinstance(graph, bytes) else str(graph)
        self.session = onnxruntime.InferenceSession(
            source, options, providers=["CPUExecutionProvider"]
        )
        missing = set(self.outputs) - {o.name for o in self.session.get_outputs()}
        if missing:  # checked here, not at the first image
            raise ValueError(f"the graph has no output {sorted(missing)[0]!r}")

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.outputs, feeds)

    def input_shapes(self) -> dict[str, tuple[int | None, ...]]:
        return {
            i.name: tuple(d if isinstance(d, int) else None for d in i.shape)
            for i in self.session.get_inputs()
        }


class OpenVinoSession(Session):
    engine = "openvino"

    def __init__(self, graph: str | Path, outputs: list[str], threads: int | None = None):
        super().__init__(outputs)
        core = openvino_core()
        config = {"INFERENCE_PRECISION_HINT": "f32"}  # never bf16 behind the user's back
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(str(graph)), "CPU", config)
        self.ports = [self.compiled.output(name) for name in self.outputs]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.compiled(feeds)
        return [np.asarray(result[port]) for port in self.ports]

    def input_shapes(self) -> dict[str, tuple[int | None, ...]]:
        return {
            port.get_any_name(): tuple(
                d.get_length() if d.is_static else None for d in port.get_partial_shape()
            )
            for port in self.compiled.inputs
        }


def openvino_core():
    """An OpenVINO Core, or a one-line error saying how to install OpenVINO."""
    try:
        import openvino
    except ImportError:
        raise DefectLensError(
            "OpenVINO is not installed: pip install 'defectlens[openvino]'"
        ) from None
    return openvino.Core()


SESSIONS: dict[str, type[Session]] = {
    OnnxRuntimeSession.engine: OnnxRuntimeSession,
    OpenVinoSession.engine: OpenVinoSession,
}


def open_session(
    engine: str, graph: str | Path, outputs: list[str], threads: int | None = None
) -> Session:
    """A session for the graph file, with any failure of the engine to read or compile it
    turned into one line naming the file (a truncated or hand-edited graph lands here)."""
    if engine not in SESSIONS:
        raise DefectLensError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    try:
        return SESSIONS[engine](graph, outputs, threads)
    except DefectLensError:
        raise
    except Exception as exc:  # engines raise their own exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelFileError(f"{graph}: {engine} cannot load this graph ({first})") from None
