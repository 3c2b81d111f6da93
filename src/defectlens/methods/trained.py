"""What every method that trains its own network on the images shares (MemAE, MNAD, GradCon,
OGNet): the input pipeline (resize to the network's `input_size`, map to [-1, 1]), a seeded
network, training through `training.trainer`, saving the weights as safetensors, and the export
split (preprocessing graph, network graph, scores and maps straight from the network).

A subclass names itself, builds its network (`build`), says what one batch's training loss is
(`loss`) and how a batch is scored (`score`: raw maps at `input_size` and image scores). It may
keep extra fitted tensors as buffers (`fitted_buffers`) and compute them after training
(`after_training`, e.g. statistics of the validation images).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from defectlens.backbones import FeatureExtractor
from defectlens.components.scale import resize_to
from defectlens.errors import ModelFileError
from defectlens.methods.base import AnomalyMethod, MethodOutput
from defectlens.params import check_float, check_int, check_seed
from defectlens.training.trainer import TrainConfig, fit_minibatches

_NET = "net."


def squared_error_map(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-pixel squared reconstruction error, mean over colour channels: (B, s, s)."""
    return (reconstruction - x).pow(2).mean(dim=1)


class TrainedImageMethod(AnomalyMethod):
    """Base of the image-space trained methods (not registered: it has no `name`)."""

    fitted_buffers: tuple[str, ...] = ()
    training_free = False
    strides: tuple[int, ...] = ()  # reads pixels, not the backbone

    def _init_training(
        self,
        input_size: int,
        learning_rate: float,
        batch_size: int,
        max_epochs: int,
        patience: int,
        max_minutes: float,
        seed: int,
    ) -> None:
        self.input_size = check_int("input_size", input_size, 16, 1024)
        self.learning_rate = check_float("learning_rate", learning_rate, 0.0, 10.0, low_open=True)
        self.batch_size = check_int("batch_size", batch_size, 1, 65_536)
        self.max_epochs = check_int("max_epochs", max_epochs, 1, 1_000_000)
        self.patience = check_int("patience", patience, 1, 1_000_000)
        self.max_minutes = check_float("max_minutes", max_minutes, 0.0, 1e6, low_open=True)
        self.seed = check_seed("seed", seed)
        self.net: nn.Module | None = None

    # -- what a subclass provides -----------------------------------------------------------
    def build(self) -> nn.Module:
        """A freshly initialised network (called under the method's seed)."""
        raise NotImplementedError

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch of prepared images (B, 3, s, s) in [-1, 1]."""
        raise NotImplementedError

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The loss early stopping watches on the held-out normal images (default: `loss`)."""
        return self.loss(x)

    def score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw maps (B, s, s) and image scores (B,) of prepared images, higher = anomalous;
        None for the scores: the Detector takes each smoothed map's maximum."""
        raise NotImplementedError

    def after_backward(self) -> None:
        """Runs between each training step's backward pass and its update; optional."""

    def after_training(self, train: torch.Tensor, val: torch.Tensor | None) -> None:
        """Compute fitted buffers that need the trained network; optional."""

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            max_epochs=self.max_epochs,
            patience=self.patience,
            max_minutes=self.max_minutes,
            seed=self.seed,
        )

    # -- shared machinery ------------------------------------------------------------------
    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [0, 1] -> the network's input (B, 3, s, s) in [-1, 1]."""
        return resize_to(images, self.input_size) * 2 - 1

    def new_network(self) -> nn.Module:
        """`build()` under the method's seed, without touching the global random state."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self.build()

    def _collect(self, batches: Iterable[torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.prepare(b) for b in batches])

    def fit(
        self,
        extractor: FeatureExtractor,
        batches: Iterable[torch.Tensor],
        progress: bool = False,
        val_batches: Callable[[], Iterable[torch.Tensor]] | None = None,
    ) -> None:
        train = self._collect(batches)
        val = self._collect(val_batches()) if val_batches is not None else None
        self.net = self.new_network()
        self.history = self.train_network(train, val, progress)
        self.net.requires_grad_(False).eval()
        with torch.no_grad():
            self.after_training(train, val)

    def train_network(
        self, train: torch.Tensor, val: torch.Tensor | None, progress: bool
    ) -> list[dict[str, Any]]:
        """The default schedule: one network, one optimiser, `loss` per minibatch."""
        return fit_minibatches(
            self.net,
            self.loss,
            train,
            val,
            self.train_config(),
            progress,
            f"train {self.name}",
            self.device,
            val_loss=self.validation_loss,
            after_backward=self.after_backward,
        )

    @property
    def is_fitted(self) -> bool:
        return super().is_fitted and self.net is not None

    def fitted_state(self) -> dict[str, torch.Tensor]:
        state = super().fitted_state()
        state.update({_NET + k: v.contiguous() for k, v in self.net.state_dict().items()})
        return state

    def load_fitted_state(self, tensors: dict[str, torch.Tensor]) -> None:
        weights = {k[len(_NET) :]: v for k, v in tensors.items() if k.startswith(_NET)}
        super().load_fitted_state({k: v for k, v in tensors.items() if not k.startswith(_NET)})
        net = self.new_network()
        try:
            net.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0][:200]
            raise ModelFileError(f"{self.name} network weights do not match: {first}") from None
        for name, tensor in weights.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ModelFileError(f"{self.name} weight {name!r} holds NaN or infinite values")
        self.net = net.eval().requires_grad_(False)

    def forward(self, extractor: FeatureExtractor, images: torch.Tensor) -> MethodOutput:
        with torch.no_grad():
            maps, scores = self.score(self.prepare(images))
        return MethodOutput(maps=maps, scores=scores)

    # -- export ------------------------------------------------------------------------------
    def export_features(self, extractor: FeatureExtractor) -> nn.Module:
        return _Prepare(self)

    def export_head(self) -> nn.Module:
        return _ScoreHead(self)

    def export_finish(self) -> tuple[dict, dict]:
        return {"kind": "direct"}, {}


class _Prepare(nn.Module):
    """The export's first graph: images in [0, 1] -> the network's input."""

    def __init__(self, method: TrainedImageMethod) -> None:
        super().__init__()
        self.input_size = method.input_size

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        (images,) = inputs
        return resize_to(images, self.input_size) * 2 - 1


class _ScoreHead(nn.Module):
    """The export's head graph: prepared images -> raw maps (and image scores), as `score`."""

    def __init__(self, method: TrainedImageMethod) -> None:
        super().__init__()
        self.method = method

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        (x,) = inputs
        maps, scores = self.method.score(x)
        return maps if scores is None else (maps, scores)
