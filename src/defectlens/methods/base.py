"""The contract between a method and the `Detector` that drives it.

A method turns batches of preprocessed images (B, 3, S, S in [0, 1]) into raw anomaly maps at
its own resolution, optionally with its own image scores. The Detector owns everything around
that: reading and resizing images, validation split, thresholds, upsampling and smoothing, saving.
Constructor arguments are the method's parameters (saved in config.json); fitted tensors are
registered buffers (saved in safetensors) and nothing else, so a save/load round trip is exact.

Export contract (`runtime.export`): a method that can be deployed without torch splits its
scoring into a *head*, a torch module from the backbone's feature maps (or from what
`export_features` computes from the images) to plain tensors that is exported as a graph,
and a *finish* from `runtime.finish` (numpy, and faiss for nearest neighbours) that turns the
head's outputs into raw maps and scores. The exported model must give the same maps and
scores as `forward` within 1e-4 relative, and the same decisions; the parity tests in
tests/test_export.py hold every exportable method to that. A finish may give scores without
maps (DifferNet, whose maps are gradients through the backbone): then the export says so and
predictions from it carry no map.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from defectlens.backbones import FeatureExtractor
from defectlens.errors import ModelFileError, ParameterError
from defectlens.prediction import NORMAL_ONLY


@dataclass
class MethodOutput:
    """Raw maps (B, h, w), higher = more anomalous; `scores` (B,) if the method has its own."""

    maps: torch.Tensor
    scores: torch.Tensor | None = None


METHODS: dict[str, type[AnomalyMethod]] = {}


def get_method(name: str) -> type[AnomalyMethod]:
    if not isinstance(name, str) or name not in METHODS:
        raise ParameterError(
            f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}"
        )
    return METHODS[name]


class AnomalyMethod(nn.Module):
    """Base class: subclasses set `name` and `fitted_buffers`, implement `fit` and `forward`."""

    name: ClassVar[str]
    fitted_buffers: ClassVar[tuple[str, ...]]
    # Fitting only gathers statistics (no network trains): an int8 export can refit it.
    training_free: ClassVar[bool] = True
    # Whether a fit augments its images with RegAD's fixed support set unless told otherwise.
    augments_support: ClassVar[bool] = False
    # Feature strides the method reads from the backbone; a subclass may make it a parameter.
    strides: tuple[int, ...]
    # What fitting learned from besides normal images; a method that reads labelled
    # anomalies says which after `fit` (saved in config.json, written into metrics.json).
    supervision: str = NORMAL_ONLY

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            METHODS[cls.name] = cls

    def __init__(self) -> None:
        super().__init__()
        for n in self.fitted_buffers:
            self.register_buffer(n, None)
        # Per-epoch losses of the last training (trained methods), saved in config.json.
        self.history: list[dict[str, Any]] = []
        # Where a trained method trains: "auto" (CUDA when present), "cpu", "cuda[:N]". A
        # property of the run, not of the model: not a parameter, not saved.
        self.device: str | None = "auto"

    @classmethod
    def param_names(cls) -> list[str]:
        """The constructor's parameters, which `params()` reads back and config.json stores."""
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @classmethod
    def check_param_names(cls, params: dict[str, Any], where: str = "") -> None:
        """Refuse a parameter the method does not take, naming those it does (one message
        for a Detector's method and an ensemble's members; `where` follows the name)."""
        unknown = sorted(set(params) - set(cls.param_names()))
        if unknown:
            raise ParameterError(
                f"unknown parameter {unknown[0]!r}{where}; it takes: "
                + ", ".join(cls.param_names())
            )

    def params(self) -> dict[str, Any]:
        """Constructor arguments, read back from same-named attributes (as scikit-learn does)."""
        return {n: _jsonable(getattr(self, n)) for n in self.param_names()}

    @property
    def is_fitted(self) -> bool:
        return all(getattr(self, n, None) is not None for n in self.fitted_buffers)

    def fitted_state(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n).contiguous() for n in self.fitted_buffers}

    def load_fitted_state(self, tensors: dict[str, torch.Tensor]) -> None:
        expected, found = set(self.fitted_buffers), set(tensors)
        if expected != found:
            raise ModelFileError(
                f"{self.name} model tensors do not match: missing {sorted(expected - found)}, "
                f"unexpected {sorted(found - expected)}"
            )
        for n in self.fitted_buffers:
            tensor = tensors[n]
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ModelFileError(f"{self.name} tensor {n!r} holds NaN or infinite values")
            setattr(self, n, tensor)
        self.after_load()

    def after_load(self) -> None:
        """Check loaded tensors (raise ModelFileError) and rebuild derived state; optional."""

    def check_backbone(self, channels: Sequence[int]) -> None:
        """Raise ParameterError if the parameters cannot work with a backbone whose taps at
        `strides` give `channels`. The Detector asks before the backbone's graph is built (a
        first export takes up to half a minute), so a wrong value is said at once; optional."""

    def check_geometry(self, image_size: int, taps: dict[int, int]) -> None:
        """Raise ModelFileError if the loaded tensors cannot score images of `image_size` with a
        backbone whose taps are `taps` (stride -> channels): catches a config.json whose
        image_size or backbone was edited, which would otherwise crash on the first image."""

    def fit(
        self,
        extractor: FeatureExtractor,
        batches: Iterable[torch.Tensor],
        progress: bool = False,
        val_batches: Callable[[], Iterable[torch.Tensor]] | None = None,
    ) -> None:
        """Learn from batches of normal images (B, 3, S, S) in [0, 1].

        `val_batches` yields the held-out normal validation images; a method may use them for
        early stopping only (DifferNet). The Detector sets its thresholds from them afterwards.
        """
        raise NotImplementedError

    def forward(self, extractor: FeatureExtractor, images: torch.Tensor) -> MethodOutput:
        raise NotImplementedError

    def export_features(self, extractor: FeatureExtractor) -> nn.Module | None:
        """A module from images (B, 3, S, S) in [0, 1] to the head's input (one tensor, batch
        first), for a method that does not read the backbone's feature maps as they are
        (DifferNet: transformed copies at three scales, pooled). None (the default): the
        export's first graph is the backbone itself, cut to `strides`."""
        return None

    def export_head(self) -> nn.Module:
        """A module taking the backbone's feature maps at `strides` (one tensor each, batch
        first) to the tensors the finish reads, computed as `forward` computes them. A method
        that cannot be deployed without torch raises ParameterError saying why."""
        raise ParameterError(f"{self.name} cannot be exported")

    def export_finish(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """How `runtime.finish` turns the head's outputs into raw maps and scores: a JSON
        spec (`kind` names the finish; its outputs and parameters) and the arrays it needs
        (saved beside the graphs, e.g. PatchCore's bank)."""
        raise ParameterError(f"{self.name} cannot be exported")


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
