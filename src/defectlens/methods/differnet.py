"""DifferNet (Rudolph, Wandt, Rosenhahn, "Same Same But DifferNet", WACV 2021).

A normalizing flow learns the density of multi-scale image features of normal parts. The frozen
backbone sees the image at 3 scales (full, 1/2, 1/4); its deepest tap is average-pooled per
scale and the three vectors are concatenated (960 values for efficientnet_lite0). The flow is a
chain of GLOW-style affine coupling blocks with soft (atan) clamping and fixed random
permutations, from FrEIA, trained by maximum likelihood on features of randomly transformed
training images; the features are computed once and cached, only the flow trains. Training stops
early when the likelihood of the held-out normal validation images stops improving (never test
labels), and the best epoch's weights are kept.

Score: mean of |z|^2 / D over T transformed copies of the test image (a fixed, seeded set whose
first copy is the image itself). Map: |d score / d image| summed over colour channels, with the
score taken over the first `n_transforms_map` copies (backpropagating through the backbone is
what costs time on a CPU); the transformations are differentiable, so every copy's gradient lands
in the original image's coordinates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from defectlens.backbones import FeatureExtractor
from defectlens.components.augment import TransformRanges, apply_transforms, sample_parameters
from defectlens.components.scale import downscale
from defectlens.errors import ModelFileError, ParameterError
from defectlens.methods.base import AnomalyMethod, MethodOutput
from defectlens.params import check_float, check_int, check_seed
from defectlens.training.trainer import TrainConfig, fit_minibatches

SCALES = (1.0, 0.5, 0.25)


def build_flow(dim: int, blocks: int, hidden: int, clamp: float, seed: int) -> nn.Module:
    """A FrEIA SequenceINN. FrEIA is imported here, not with the module: it pulls in
    scipy.stats (60 MB of memory) that a process serving another method does not need."""
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    def subnet(c_in: int, c_out: int) -> nn.Module:
        out = nn.Linear(hidden, c_out)
        # Zero output layer: each coupling starts as the identity, so an 8-block flow does not
        # start by multiplying features by up to exp(clamp)^8 (an initial loss of ~1e12).
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        return nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(), out)

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # subnet initialisation is part of the seeded model
    flow = Ff.SequenceINN(dim)
    for i in range(blocks):
        flow.append(Fm.PermuteRandom, seed=(seed * 1000 + i) % 2**32)  # numpy's seed range
        flow.append(
            Fm.GLOWCouplingBlock, subnet_constructor=subnet, clamp=clamp, clamp_activation="ATAN"
        )
    torch.random.set_rng_state(generator_state)
    return flow


class DifferNet(AnomalyMethod):
    name = "differnet"
    fitted_buffers = ("feature_mean", "feature_std")
    training_free = False

    def __init__(
        self,
        stride: int = 32,
        blocks: int = 8,
        hidden: int = 512,
        clamp: float = 3.0,
        n_transforms: int = 8,
        n_transforms_test: int = 8,
        n_transforms_map: int = 2,
        rotation: float = 20.0,
        brightness: float = 0.1,
        contrast: float = 0.1,
        sharpness: float = 0.3,
        max_epochs: int = 60,
        patience: int = 6,
        max_minutes: float = 15.0,
        learning_rate: float = 2e-4,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.stride = check_int("stride", stride, 1, 64)
        self.strides = (self.stride,)
        self.blocks = check_int("blocks", blocks, 1, 64)
        self.hidden = check_int("hidden", hidden, 1, 8192)
        self.clamp = check_float("clamp", clamp, 0.0, 20.0, low_open=True)
        self.n_transforms = check_int("n_transforms", n_transforms, 1, 1024)
        self.n_transforms_test = check_int("n_transforms_test", n_transforms_test, 1, 1024)
        self.n_transforms_map = check_int("n_transforms_map", n_transforms_map, 1, 1024)
        if n_transforms_map > n_transforms_test:
            raise ParameterError("n_transforms_map cannot exceed n_transforms_test")
        self.rotation = check_float("rotation", rotation, 0.0, 180.0)
        self.brightness = check_float("brightness", brightness, 0.0, 1.0)
        self.contrast = check_float("contrast", contrast, 0.0, 1.0)
        self.sharpness = check_float("sharpness", sharpness, 0.0, 10.0)
        self.max_epochs = check_int("max_epochs", max_epochs, 1, 100_000)
        self.patience = check_int("patience", patience, 1, 100_000)
        self.max_minutes = check_float("max_minutes", max_minutes, 0.0, 1e6, low_open=True)
        self.learning_rate = check_float("learning_rate", learning_rate, 0.0, 10.0, low_open=True)
        self.batch_size = check_int("batch_size", batch_size, 1, 65_536)
        self.seed = check_seed("seed", seed)
        self.ranges = TransformRanges(rotation, brightness, contrast, sharpness)
        self.flow: nn.Module | None = None  # a FrEIA SequenceINN

    # -- features --------------------------------------------------------------------------
    def features(
        self, extractor: FeatureExtractor, images: torch.Tensor, differentiable: bool = False
    ) -> torch.Tensor:
        """Pooled deepest-tap features at 3 scales, concatenated: (B, 3 C)."""
        if min(images.shape[-2:]) * min(SCALES) < self.stride:
            raise ValueError(
                f"differnet needs an image size of at least {int(self.stride / min(SCALES))} "
                f"(its 1/4 scale must cover one stride-{self.stride} cell)"
            )
        run = extractor if differentiable else extractor.fast
        pooled = []
        for scale in SCALES:
            # Antialiased bilinear, as matrix products: exported graphs then match on every
            # engine (OpenVINO's antialiased Resize does not match torch's).
            x = images if scale == 1.0 else downscale(images, scale)
            pooled.append(run(x)[-1].mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)

    def _test_parameters(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + 1)
        return sample_parameters(
            self.n_transforms_test, self.ranges, generator, identity_first=True
        )

    def _transformed_features(self, extractor, batches, count: int, generator) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for images in batches:
                params = sample_parameters(count, self.ranges, generator, identity_first=True)
                copies = apply_transforms(images, params)
                out.extend(self.features(extractor, chunk) for chunk in copies.split(32))
        return torch.cat(out)

    # -- training --------------------------------------------------------------------------
    def nll(self, features: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood per sample, per dimension (the training loss)."""
        z, log_det = self.flow((features - self.feature_mean) / self.feature_std)
        return (0.5 * z.pow(2).sum(dim=1) - log_det) / z.shape[1]

    def fit(
        self,
        extractor: FeatureExtractor,
        batches: Iterable[torch.Tensor],
        progress: bool = False,
        val_batches: Callable[[], Iterable[torch.Tensor]] | None = None,
    ) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        train = self._transformed_features(extractor, batches, self.n_transforms, generator)
        val = None
        if val_batches is not None:
            val = self._transformed_features(
                extractor,
                val_batches(),
                self.n_transforms_test,
                torch.Generator().manual_seed(self.seed + 1),
            )
        self.feature_mean = train.mean(dim=0)
        self.feature_std = train.std(dim=0).clamp_min(1e-6)
        self.flow = build_flow(train.shape[1], self.blocks, self.hidden, self.clamp, self.seed)
        self._train(train, val, progress)

    def _train(self, train: torch.Tensor, val: torch.Tensor | None, progress: bool) -> None:
        config = TrainConfig(
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            max_epochs=self.max_epochs,
            patience=self.patience,
            max_minutes=self.max_minutes,
            weight_decay=1e-5,
            seed=self.seed + 2,
        )
        self.history = fit_minibatches(
            self,  # the flow trains; the feature statistics travel with it to the device
            lambda batch: self.nll(batch).mean(),
            train,
            val,
            config,
            progress,
            "train flow",
            self.device,
            parameters=self.flow.parameters(),
        )
        self.flow.requires_grad_(False)

    # -- persistence -----------------------------------------------------------------------
    def check_geometry(self, image_size: int, taps: dict[int, int]) -> None:
        if image_size * min(SCALES) < self.stride:
            raise ModelFileError(f"differnet needs an image size of at least {4 * self.stride}")
        if self.feature_mean.shape != (len(SCALES) * taps[self.stride],):
            raise ModelFileError("differnet feature statistics do not match the backbone")
        if not bool((self.feature_std > 0).all()):
            raise ModelFileError("differnet feature_std must be positive")

    @property
    def is_fitted(self) -> bool:
        return super().is_fitted and self.flow is not None

    def fitted_state(self) -> dict[str, torch.Tensor]:
        state = super().fitted_state()
        state.update({f"flow.{k}": v.contiguous() for k, v in self.flow.state_dict().items()})
        return state

    def load_fitted_state(self, tensors: dict[str, torch.Tensor]) -> None:
        flow_state = {k[5:]: v for k, v in tensors.items() if k.startswith("flow.")}
        super().load_fitted_state({k: v for k, v in tensors.items() if not k.startswith("flow.")})
        self.flow = build_flow(
            self.feature_mean.numel(), self.blocks, self.hidden, self.clamp, self.seed
        )
        try:
            self.flow.load_state_dict(flow_state, strict=True)
        except RuntimeError as exc:
            raise ModelFileError(f"differnet flow weights do not match: {exc}") from None
        self.flow.eval().requires_grad_(False)

    # -- scoring ---------------------------------------------------------------------------
    def score_features(self, features: torch.Tensor) -> torch.Tensor:
        """Mean |z|^2 / D per feature vector."""
        z, _ = self.flow((features - self.feature_mean) / self.feature_std)
        return z.pow(2).mean(dim=1)

    def export_features(self, extractor: FeatureExtractor) -> nn.Module:
        return _DifferNetFeatures(self, extractor)

    def export_head(self) -> nn.Module:
        return _DifferNetHead(self)

    def export_finish(self) -> tuple[dict, dict]:
        # Scores only: the maps are gradients through the backbone, which need torch.
        return {"kind": "image_score"}, {}

    def forward(self, extractor: FeatureExtractor, images: torch.Tensor) -> MethodOutput:
        params = self._test_parameters()
        with torch.no_grad():  # scores: all copies, traced backbone, 32 copies at a time
            copies = apply_transforms(images, params)
            scores = (
                torch.cat(
                    [
                        self.score_features(self.features(extractor, chunk))
                        for chunk in copies.split(32)
                    ]
                )
                .view(images.shape[0], -1)
                .mean(dim=1)
            )
        maps = []
        for image in images:  # maps: one image's first copies at a time bounds autograd memory
            x = image.unsqueeze(0).detach().requires_grad_(True)
            with torch.enable_grad():
                copies = apply_transforms(x, params[: self.n_transforms_map])
                score = self.score_features(self.features(extractor, copies, True)).mean()
                (gradient,) = torch.autograd.grad(score, x)
            maps.append(gradient.abs().sum(dim=1)[0])
        return MethodOutput(maps=torch.stack(maps), scores=scores)


class _DifferNetFeatures(nn.Module):
    """The export's first graph: images -> pooled features of every test copy (B, T, 3 C),
    the transformations, three scales and the backbone computed as `forward` computes them."""

    def __init__(self, differnet: DifferNet, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.owner = (differnet,)  # not a submodule: the flow belongs to the head graph
        self.extractor = extractor
        self.register_buffer("params", differnet._test_parameters())

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:  # (images,): heads' convention
        (images,) = inputs
        copies = apply_transforms(images, self.params)
        pooled = self.owner[0].features(self.extractor, copies, differentiable=True)
        return pooled.view(images.shape[0], self.params.shape[0], pooled.shape[1])


class _DifferNetHead(nn.Module):
    """The export's head graph: pooled features (B, T, D) -> image scores (B,) through the
    flow (the method is a submodule: its flow and feature statistics are the graph's weights)."""

    def __init__(self, differnet: DifferNet) -> None:
        super().__init__()
        self.differnet = differnet

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        (features,) = inputs
        b, t, d = features.shape
        return self.differnet.score_features(features.reshape(b * t, d)).view(b, t).mean(dim=1)
