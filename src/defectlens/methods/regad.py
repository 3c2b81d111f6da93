"""RegAD (Huang et al., "Registration based Few-Shot Anomaly Detection", ECCV 2022).

A registration network (`components.registration`), trained once on normal images of *other*
categories (`defectlens regad train`), aligns each backbone stage's features; a new category
then needs only a few normal images and no training: their features, registered and returned
to the image frame, give a per-position Gaussian, and test images are scored by Mahalanobis
distance -- PaDiM's machinery (this class only changes how the embedding is computed). The
support set is augmented with RegAD's 21 fixed transformations by default (`Detector`'s
`augment_support`), which is where most of the covariance comes from when K is small.

`registration`: a folder from `defectlens regad train`, None for the one shipped with
defectlens (efficientnet_lite0 at 256 px), or "identity" for untrained transformers (the
paper's ablation: PaDiM on the augmented support set). The transformers' weights are saved in
the fitted model, so a saved model does not need the registration folder again.

`n_channels` defaults to 100 random channels of the three stages (PaDiM keeps all 176 by
default). RegAD's Gaussian is fitted to K x 22 augmented images, and on the few-shot benchmark
100 channels score as well as all of them or better (registrations retrained 2026-12-07 and the
shipped one, BENCHMARKS.md), while each position's covariance shrinks from 176^2 to 100^2
entries: that step is what lets RegAD, which runs the transformers on top of PaDiM's work, score
at least as fast as PaDiM. `n_channels=None` keeps every channel (models saved before this
default keep theirs: the value is saved with the model).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from defectlens.backbones import FeatureExtractor
from defectlens.components.pyramid import align_pyramid
from defectlens.components.registration import (
    RegistrationNet,
    check_registration_fits,
    load_registration,
    net_from_transformer_state,
    transformer_state,
)
from defectlens.errors import ModelFileError, ParameterError, WeightsError, option
from defectlens.methods.padim import Padim

IDENTITY = "identity"
_PREFIX = "registration."


def default_registration(backbone: str, image_size: int) -> Path | None:
    """The registration model shipped with defectlens for this backbone and size, if any."""
    folder = resources.files("defectlens") / "weights" / f"registration-{backbone}-{image_size}"
    path = Path(str(folder))
    return path if path.is_dir() else None


class Regad(Padim):
    name = "regad"
    augments_support = True

    def __init__(
        self,
        registration: str | None = None,
        strides: Sequence[int] = (4, 8, 16),
        n_channels: int | None = 100,
        epsilon: float = 0.01,
        shrinkage: str = "none",
        upsample: str = "nearest",
        seed: int = 0,
    ) -> None:
        super().__init__(strides, n_channels, epsilon, shrinkage, upsample, seed)
        if registration is not None and (not isinstance(registration, str) or not registration):
            raise ParameterError(f"registration must be a folder path, not {registration!r}")
        self.registration = registration
        self.net: RegistrationNet | None = None
        self._net_key = ""  # names the net's weights for the backend's graph cache

    @property
    def is_fitted(self) -> bool:
        return super().is_fitted and self.net is not None

    def _load_net(self, extractor: FeatureExtractor) -> RegistrationNet:
        if self.registration == IDENTITY:
            return RegistrationNet(extractor.strides, extractor.channels).eval()
        path = self.registration or default_registration(extractor.spec.name, extractor.image_size)
        if path is None:
            raise WeightsError(
                f"no registration model ships for {extractor.spec.name} at "
                f"{extractor.image_size} px: train one with `defectlens regad train` and pass "
                f"{option('--registration', value='REG')}, or pass "
                f"{option('--registration', value='identity')}"
            )
        net, config = load_registration(path)
        check_registration_fits(config, extractor, str(path))
        return net

    def _use(self, net: RegistrationNet) -> None:
        """Take `net` as the registration, with the key its compiled graph is cached under."""
        digest = hashlib.sha256()
        for name, tensor in sorted(transformer_state(net).items()):
            digest.update(name.encode() + tensor.numpy().tobytes())
        self.net, self._net_key = net, f"regad-{digest.hexdigest()[:24]}"

    def _embed(self, extractor: FeatureExtractor, images: torch.Tensor) -> torch.Tensor:
        # The registered trunk on the extractor's backend (a cached onnxruntime graph by
        # default), named by the transformers' weights.
        run = extractor.fast_module(
            _RegisteredFeatures(self.net, extractor), self._net_key, len(self.strides)
        )
        return torch.from_numpy(self._lay_out(align_pyramid(run(images), self.upsample)))

    def fit(
        self,
        extractor: FeatureExtractor,
        batches: Iterable[torch.Tensor],
        progress: bool = False,
        val_batches: Callable[[], Iterable[torch.Tensor]] | None = None,
    ) -> None:
        self._use(self._load_net(extractor).requires_grad_(False))
        super().fit(extractor, batches, progress, val_batches)

    def fitted_state(self) -> dict[str, torch.Tensor]:
        state = super().fitted_state()
        state.update({_PREFIX + k: v for k, v in transformer_state(self.net).items()})
        return state

    def load_fitted_state(self, tensors: dict[str, torch.Tensor]) -> None:
        registration = {k[len(_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_PREFIX)}
        if not registration:
            raise ModelFileError("regad model tensors lack the registration network")
        super().load_fitted_state({k: v for k, v in tensors.items() if not k.startswith(_PREFIX)})
        self._use(net_from_transformer_state({k: v.clone() for k, v in registration.items()}))

    def check_geometry(self, image_size: int, taps: dict[int, int]) -> None:
        super().check_geometry(image_size, taps)
        if self.net.strides != self.strides or self.net.channels != tuple(
            taps[s] for s in self.strides
        ):
            raise ModelFileError("regad registration network does not match the backbone")

    def export_features(self, extractor: FeatureExtractor) -> nn.Module:
        return _RegisteredFeatures(self.net, extractor)


class _RegisteredFeatures(nn.Module):
    """The export's first graph: images -> the registered features in the image frame, one
    output per stride, as `Regad._embed` computes them."""

    def __init__(self, net: RegistrationNet, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.net, self.extractor = net, extractor

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:  # (images,)
        (images,) = inputs
        return tuple(self.net.image_frame_features(self.extractor, images))
