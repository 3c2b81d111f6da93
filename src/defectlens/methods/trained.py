"""What every method that trains its own network on the images shares (MemAE, MNAD, GradCon,
OGNet, Uninformed Students, Patch SVDD, segmentation-aided, Neural Batch Sampling): the input
pipeline, a seeded network, training through `training.trainer`, saving the weights as
safetensors, and the export split (input graph, network graph, scores and maps straight from
the network).

Two input spaces (`space`): "pixels", the papers' setting (images resized to `input_size` and
mapped to [-1, 1]), or "features": the frozen backbone's stride-8 and stride-16 maps (the
latter upsampled), standardised per channel with the training images' statistics, which the
network then reconstructs instead of pixels (152 channels on a 32 x 32 grid for
efficientnet_lite0 at 256 px; `input_size` is then unused). Reconstructing pixels spends the
network's capacity on texture detail that normal and defective parts share; features describe
what a part is made of, and a defect changes them more than it changes raw pixels.

A subclass names itself, builds its network (`build`), says what one batch's training loss is
(`loss`) and how a batch is scored (`score`: raw maps at `input_size` and image scores). A
method whose network reads more than the image (Uninformed Students: the teacher's maps too)
overrides `inputs`, which then returns a tuple, and `score` receives its parts. It may
keep extra fitted tensors as buffers (`fitted_buffers`) and compute them before training
(`before_training`, e.g. clusters of the training features) or after it (`after_training`,
e.g. statistics of the validation images).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from defectlens.backbones import FeatureExtractor
from defectlens.components.autoencoder import check_widths
from defectlens.components.pyramid import concat_pyramid
from defectlens.components.scale import resize_to
from defectlens.errors import ModelFileError, ParameterError, method_param, option
from defectlens.methods.base import AnomalyMethod, MethodOutput
from defectlens.params import check_choice, check_float, check_int, check_seed
from defectlens.training.trainer import TrainConfig, fit_minibatches

_NET = "net."
SPACES = ("pixels", "features")
FEATURE_STRIDES = (8, 16)


def squared_error_map(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-pixel squared reconstruction error, mean over colour channels: (B, s, s)."""
    return (reconstruction - x).pow(2).mean(dim=1)


class TrainedImageMethod(AnomalyMethod):
    """Base of the methods that train their own network on the images, in pixel or feature
    space (not registered: it has no `name`)."""

    fitted_buffers: tuple[str, ...] = ()
    training_free = False
    strides: tuple[int, ...] = ()  # pixels: no backbone taps (space=features: FEATURE_STRIDES)

    # Default encoder widths per input space (a subclass sets both).
    PIXEL_WIDTHS: tuple[int, ...] = ()
    FEATURE_WIDTHS: tuple[int, ...] = ()

    def _init_training(
        self,
        space: str,
        input_size: int,
        widths: tuple[int, ...] | None,
        learning_rate: float,
        batch_size: int,
        max_epochs: int,
        patience: int,
        max_minutes: float,
        seed: int,
    ) -> None:
        self.space = check_choice("space", space, SPACES)
        self._init_optimisation(learning_rate, batch_size, max_epochs, patience, max_minutes, seed)
        self.input_size = check_int("input_size", input_size, 16, 1024)
        self.widths = None if widths is None else check_widths("widths", widths, None)
        if space == "pixels":
            check_widths("widths", self.layer_widths, self.input_size)
        else:  # the backbone's maps, standardised with the training images' statistics
            self.strides = FEATURE_STRIDES
            self.fitted_buffers = (*type(self).fitted_buffers, "feature_mean", "feature_std")
            self.register_buffer("feature_mean", None)
            self.register_buffer("feature_std", None)

    def _init_optimisation(
        self,
        learning_rate: float,
        batch_size: int,
        max_epochs: int,
        patience: int,
        max_minutes: float,
        seed: int,
    ) -> None:
        """Check and keep the training parameters every trained method has."""
        self.learning_rate = check_float("learning_rate", learning_rate, 0.0, 10.0, low_open=True)
        self.batch_size = check_int("batch_size", batch_size, 1, 65_536)
        self.max_epochs = check_int("max_epochs", max_epochs, 1, 1_000_000)
        self.patience = check_int("patience", patience, 1, 1_000_000)
        self.max_minutes = check_float("max_minutes", max_minutes, 0.0, 1e6, low_open=True)
        self.seed = check_seed("seed", seed)
        self.net: nn.Module | None = None

    @property
    def layer_widths(self) -> tuple[int, ...]:
        """`widths`, or the method's default for its input space."""
        if self.widths is not None:
            return self.widths
        return self.PIXEL_WIDTHS if self.space == "pixels" else self.FEATURE_WIDTHS

    @property
    def in_channels(self) -> int:
        """The network's input (and output) channels: 3, or the backbone maps' channels."""
        return 3 if self.space == "pixels" else int(self.feature_mean.numel())

    @property
    def output(self) -> str:
        """The decoder's last activation: tanh for [-1, 1] pixels, none for features."""
        return "tanh" if self.space == "pixels" else "linear"

    # -- what a subclass provides -----------------------------------------------------------
    def build(self) -> nn.Module:
        """A freshly initialised network (called under the method's seed)."""
        raise NotImplementedError

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch of prepared inputs (`prepare`'s output)."""
        raise NotImplementedError

    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The loss early stopping watches on the held-out normal images (default: `loss`)."""
        return self.loss(x)

    def validation_measure(self) -> Callable[[], float] | None:
        """A measure of the whole validation set that early stopping watches instead of
        `validation_loss`, lower is better (Patch SVDD's synthetic-defect check); None: the
        loss."""
        return None

    def score(self, *x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw maps (B, s, s) and image scores (B,) of prepared inputs (`prepare`'s tensor, or
        its tensors when it gives several), higher = anomalous; None for the scores: the
        Detector takes each smoothed map's maximum."""
        raise NotImplementedError

    def after_backward(self) -> None:
        """Runs between each training step's backward pass and its update; optional."""

    def before_training(self, train: torch.Tensor) -> None:
        """Compute fitted buffers the network is built or trained on, from the prepared
        training inputs; optional."""

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
    def prepare(
        self, extractor: FeatureExtractor, images: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Images (B, 3, S, S) in [0, 1] -> the network's input, with the backbone run on
        the extractor's fast backend when the method reads its maps."""
        return self.inputs(images, extractor.fast(images) if self.scores_from_backbone else None)

    @property
    def scores_from_backbone(self) -> bool:
        """Whether scoring reads the backbone's maps (a method may need them to fit only)."""
        return bool(self.strides)

    def inputs(
        self, images: torch.Tensor, maps: list[torch.Tensor] | None
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Images (B, 3, S, S) in [0, 1] and the backbone's maps at `strides` (None when the
        method reads none) -> the network's input: (B, 3, s, s) in [-1, 1], or the
        standardised backbone maps. One place for both the fitted model and its export."""
        if self.space == "features":
            return self.standardise(backbone_maps(maps))
        if self.input_size > images.shape[-1]:
            raise ParameterError(
                f"{self.name}'s input_size {self.input_size} is larger than the image size "
                f"{images.shape[-1]}: set {method_param('input_size', str(images.shape[-1]))} "
                f"or raise {option('--image-size')}"
            )
        return resize_to(images, self.input_size) * 2 - 1

    def new_network(self) -> nn.Module:
        """`build()` under the method's seed, without touching the global random state."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self.build()

    def fit_standardisation(self, maps: torch.Tensor) -> None:
        """Per-channel mean and spread of the training images' backbone maps (B, C, h, w)."""
        self.feature_mean = maps.mean(dim=(0, 2, 3))
        self.feature_std = maps.std(dim=(0, 2, 3)).clamp_min(1e-6)

    def standardise(self, maps: torch.Tensor) -> torch.Tensor:
        c = self.feature_mean.numel()
        return (maps - self.feature_mean.view(1, c, 1, 1)) / self.feature_std.view(1, c, 1, 1)

    def _collect(
        self, extractor: FeatureExtractor, batches: Iterable[torch.Tensor]
    ) -> torch.Tensor:
        if self.space == "pixels":
            return torch.cat([self.prepare(extractor, b) for b in batches])
        with torch.no_grad():
            return torch.cat([backbone_maps(extractor.fast(b)) for b in batches])

    def _check_feature_grid(self, side: int) -> None:
        try:
            check_widths("widths", self.layer_widths, side)
        except ParameterError as exc:
            raise ParameterError(f"{exc} (the {side} x {side} feature grid)") from None

    def fit(
        self,
        extractor: FeatureExtractor,
        batches: Iterable[torch.Tensor],
        progress: bool = False,
        val_batches: Callable[[], Iterable[torch.Tensor]] | None = None,
    ) -> None:
        train = self._collect(extractor, batches)
        val = self._collect(extractor, val_batches()) if val_batches is not None else None
        if self.space == "features":
            self._check_feature_grid(train.shape[-1])
            self.fit_standardisation(train)
            train = self.standardise(train)
            val = None if val is None else self.standardise(val)
        with torch.no_grad():
            self.before_training(train)
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
            validate=self.validation_measure(),
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
            # torch's first line only names the class; the second says which weight and how
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            detail = (lines[1] if len(lines) > 1 else lines[0] if lines else "")[:240]
            raise ModelFileError(f"{self.name} network weights do not match: {detail}") from None
        for name, tensor in weights.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ModelFileError(f"{self.name} weight {name!r} holds NaN or infinite values")
        self.net = net.eval().requires_grad_(False)

    def forward(self, extractor: FeatureExtractor, images: torch.Tensor) -> MethodOutput:
        with torch.no_grad():
            prepared = self.prepare(extractor, images)
            maps, scores = self.score(*(prepared if isinstance(prepared, tuple) else (prepared,)))
        return MethodOutput(maps=maps, scores=scores)

    def check_geometry(self, image_size: int, taps: dict[int, int]) -> None:
        if self.space == "features":
            channels = sum(taps[s] for s in FEATURE_STRIDES)
            if self.feature_mean.shape != (channels,) or self.feature_std.shape != (channels,):
                raise ModelFileError(f"{self.name} feature statistics do not match the backbone")
            if not bool((self.feature_std > 0).all()):
                raise ModelFileError(f"{self.name} feature_std must be positive")

    # -- export ------------------------------------------------------------------------------
    def export_features(self, extractor: FeatureExtractor) -> nn.Module:
        return _Prepare(self, extractor)

    def export_head(self) -> nn.Module:
        return _ScoreHead(self)

    def export_finish(self) -> tuple[dict, dict]:
        return {"kind": "direct"}, {}


def backbone_maps(maps: list[torch.Tensor]) -> torch.Tensor:
    """The backbone's maps at FEATURE_STRIDES as one (B, C, h, w) tensor (bilinear)."""
    return concat_pyramid(maps, "bilinear")


class _Prepare(nn.Module):
    """The export's first graph: images in [0, 1] -> the network's input, as `prepare`."""

    def __init__(self, method: TrainedImageMethod, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.owner = (method,)  # not a submodule: the network belongs to the head graph
        self.extractor = extractor

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        (images,) = inputs
        method = self.owner[0]
        maps = self.extractor(images) if method.scores_from_backbone else None
        return method.inputs(images, maps)


class _ScoreHead(nn.Module):
    """The export's head graph: prepared images -> raw maps (and image scores), as `score`."""

    def __init__(self, method: TrainedImageMethod) -> None:
        super().__init__()
        self.method = method

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        maps, scores = self.method.score(*inputs)
        return maps if scores is None else (maps, scores)
