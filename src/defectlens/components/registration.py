"""RegAD's registration network (Huang et al., ECCV 2022) and its file format.

A spatial transformer after each tapped stage of a frozen backbone registers the features
(the next stage reads the warped map), and a SimSiam-style head on the last stage trains the
transformers: a query and the mean of its same-category supports must agree position by
position, which they can only do once both are aligned. At inference the head is not used;
each stage's output is returned to the image frame by one composed inverse warp (not RegAD's
chain of inverse warps of the registered maps, so features are resampled at most once, and
the first stage not at all) and the maps feed a per-position Gaussian (`methods.regad`).

By default only the transformers and the head are trained; the backbone stays frozen (its
ImageNet batch-norm statistics included, as CPU batch sizes cannot re-estimate them), so a
registration model is a few hundred kB of safetensors plus a JSON config naming the backbone,
its weights' hash and the image size it was trained for. A registration trained with its
backbone (the paper's way, `regad train --backbone-lr`) also holds the tuned backbone as a
weights file, `BACKBONE_FILE`, which its config's hash names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from defectlens.backbones import FeatureExtractor
from defectlens.components.geometry import compose, invert, warp
from defectlens.components.stn import MODES, SpatialTransformer
from defectlens.errors import ModelFileError, option
from defectlens.outputs import (
    MODEL_TENSORS,
    REGISTRATION_FORMAT,
    check_model_target,
    file_sha256,
    read_folder_config,
    write_folder,
)

REGISTRATION_VERSION = 1
BACKBONE_FILE = "backbone.safetensors"  # a backbone tuned with the transformers, if any


def _head(channels: int, layers: int) -> nn.Sequential:
    """1x1 convolutions, batch-norm + ReLU between them (SimSiam's projector and predictor,
    per position)."""
    modules: list[nn.Module] = []
    for i in range(layers):
        last = i == layers - 1
        modules.append(nn.Conv2d(channels, channels, 1, bias=last))
        if not last:
            modules += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*modules)


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """-cos(p, sg(z)) over channels, averaged over images and positions."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


class RegistrationNet(nn.Module):
    """Transformers after the stages at `strides` (with `channels`), head on the last one."""

    def __init__(
        self,
        strides: Sequence[int],
        channels: Sequence[int],
        mode: str = "rotation_scale",
        hidden: int = 128,
        pooled: int = 4,
    ) -> None:
        super().__init__()
        self.strides = tuple(strides)
        self.channels = tuple(channels)
        self.mode, self.hidden, self.pooled = mode, hidden, pooled
        self.transformers = nn.ModuleDict(
            {
                str(s): SpatialTransformer(c, mode, hidden, pooled)
                for s, c in zip(strides, channels, strict=True)
            }
        )
        self.encoder = _head(self.channels[-1], 3)
        self.predictor = _head(self.channels[-1], 2)

    def architecture(self) -> dict[str, Any]:
        return {
            "strides": list(self.strides),
            "channels": list(self.channels),
            "mode": self.mode,
            "hidden": self.hidden,
            "pooled": self.pooled,
        }

    def register(
        self, extractor: FeatureExtractor, images: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Registered maps at `strides` and each stage's transform (B, 2, 3)."""
        thetas: list[torch.Tensor] = []

        def between(stride: int, x: torch.Tensor) -> torch.Tensor:
            warped, theta = self.transformers[str(stride)](x)
            thetas.append(theta)
            return warped

        return extractor(images, between=between), thetas

    @staticmethod
    def to_image_frame(
        stage_maps: list[torch.Tensor], thetas: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Each stage's own output (before its transformer) in the image frame. Stage i reads
        the registered map of stage i - 1, which was sampled at T_1 ... T_(i-1) p, so one warp
        by T_(i-1)^-1 ... T_1^-1 undoes it; the first stage is already in the image frame.

        Warping stage i's *registered* map back instead (RegAD's way) would apply T_i and then
        its inverse: the same transform up to resampling, at the cost of two more bilinear
        resamplings (blur) and, for the 64 x 64 first stage, most of the registered trunk's
        run time. The last transformer's theta is therefore never needed here."""
        inverses = [invert(t) for t in thetas]
        return [
            m if i == 0 else warp(m, compose(*reversed(inverses[:i])))
            for i, m in enumerate(stage_maps)
        ]

    def image_frame_features(
        self, extractor: FeatureExtractor, images: torch.Tensor
    ) -> list[torch.Tensor]:
        """The features RegAD's Gaussian reads: each stage computed on the registered map of
        the stage before, then returned to the image frame (`to_image_frame`). The last
        transformer is skipped: its warp would be undone exactly."""
        stage_maps: list[torch.Tensor] = []
        thetas: list[torch.Tensor] = []
        last = self.strides[-1]

        def between(stride: int, x: torch.Tensor) -> torch.Tensor:
            stage_maps.append(x)
            if stride == last:
                return x
            warped, theta = self.transformers[str(stride)](x)
            thetas.append(theta)
            return warped

        extractor(images, between=between)
        return self.to_image_frame(stage_maps, thetas)

    def loss(self, query: torch.Tensor, supports: torch.Tensor) -> torch.Tensor:
        """Symmetric SimSiam loss between registered last-stage maps of queries (B, C, h, w)
        and the means of their supports (B, C, h, w), per position."""
        z1, z2 = self.encoder(query), self.encoder(supports)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)


def transformer_state(net: RegistrationNet) -> dict[str, torch.Tensor]:
    """What inference needs (the transformers; not the training head)."""
    return {k: v.contiguous() for k, v in net.transformers.state_dict().items()}


def net_from_transformer_state(state: dict[str, torch.Tensor]) -> RegistrationNet:
    """Rebuild the transformers from their tensors alone (shapes give the architecture), for a
    saved detector that must not depend on the registration folder it was fitted with."""
    try:
        strides = sorted({int(k.split(".")[0]) for k in state})
        first = {s: state[f"{s}.localise.0.weight"] for s in strides}
        fc1 = state[f"{strides[0]}.localise.9.weight"]
        n_params = state[f"{strides[0]}.localise.11.weight"].shape[0]
    except (KeyError, ValueError):
        raise ModelFileError("registration tensors are incomplete") from None
    modes = [m for m, (_, identity) in MODES.items() if len(identity) == n_params]
    pooled = math.isqrt(fc1.shape[1] // 16)
    if not modes:
        raise ModelFileError("registration tensors have an unknown transform")
    net = RegistrationNet(
        strides, [first[s].shape[1] for s in strides], modes[0], fc1.shape[0], pooled
    )
    try:
        net.transformers.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"registration tensors do not match: {str(exc)[:160]}") from None
    return net.eval().requires_grad_(False)


def save_registration(
    net: RegistrationNet,
    path: str | Path,
    info: dict[str, Any],
    protect: Sequence[str | Path] = (),
    files: dict[str, bytes] | None = None,
) -> Path:
    """Write config.json + model.safetensors, and `files` (name -> content, e.g. a tuned
    backbone) atomically (an existing registration folder is replaced, anything else refused).
    `info`: backbone, weights' hash, image size, training."""
    path = check_model_target(path, protect, kind="registration")
    state = {f"transformers.{k}": v for k, v in transformer_state(net).items()}
    for name, head in (("encoder", net.encoder), ("predictor", net.predictor)):
        state.update({f"{name}.{k}": v.contiguous() for k, v in head.state_dict().items()})
    config = {
        "format": REGISTRATION_FORMAT,
        "format_version": REGISTRATION_VERSION,
        "architecture": net.architecture(),
        **info,
    }

    def write(target: Path) -> None:
        save_file(state, str(target))
        for name, content in (files or {}).items():
            (target.parent / name).write_bytes(content)

    write_folder(path, write, config, "registration")
    return path


def load_registration(path: str | Path) -> tuple[RegistrationNet, dict[str, Any]]:
    """A registration folder -> (the net in eval mode, its config); one-line errors."""
    path = Path(path)
    config_path, config = read_folder_config(path, "registration model", REGISTRATION_FORMAT)
    if config.get("format_version") != REGISTRATION_VERSION:
        raise ModelFileError(
            f"{config_path}: registration format version {config.get('format_version')!r}; "
            f"this defectlens reads version {REGISTRATION_VERSION}"
        )
    tensors_path = path / MODEL_TENSORS
    if not tensors_path.is_file():
        raise ModelFileError(f"{path}: missing {MODEL_TENSORS}")
    if file_sha256(tensors_path) != config.get("tensors_sha256"):
        raise ModelFileError(f"{tensors_path}: checksum mismatch, the file is corrupt or altered")
    try:
        tensors = load_file(str(tensors_path))
        arch = config["architecture"]
        net = RegistrationNet(
            arch["strides"], arch["channels"], arch["mode"], arch["hidden"], arch["pooled"]
        )
        net.load_state_dict({k: v.clone() for k, v in tensors.items()}, strict=True)
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ModelFileError(
            f"{path}: not a usable registration model ({str(exc)[:160]})"
        ) from None
    for key in ("backbone", "weights_sha256", "image_size"):
        if key not in config:
            raise ModelFileError(f"{config_path}: missing key {key!r}")
    return net.eval().requires_grad_(False), config


def check_registration_fits(
    config: dict[str, Any], extractor: FeatureExtractor, where: str
) -> None:
    """Refuse a registration trained for another backbone, weights, image size or taps."""
    arch = config["architecture"]
    problems = []
    if config["backbone"] != extractor.spec.name:
        problems.append(f"backbone {config['backbone']}, not {extractor.spec.name}")
    elif config["weights_sha256"] != extractor.weights_sha256:
        tuned = config.get("backbone_weights")
        if tuned:  # trained with its backbone: that file must be the backbone's weights
            raise ModelFileError(
                f"{where}: this registration tuned its backbone; fit with "
                f"{option('--weights', value=str(Path(where) / tuned))} (that file, unaltered)"
            )
        problems.append("other backbone weights (sha256 differs)")
    if config["image_size"] != extractor.image_size:
        problems.append(f"image size {config['image_size']}, not {extractor.image_size}")
    if tuple(arch["strides"]) != tuple(extractor.strides):
        problems.append(f"strides {arch['strides']}, not {list(extractor.strides)}")
    if problems:
        raise ModelFileError(
            f"{where}: this registration model was trained for {'; '.join(problems)}. "
            "Train one for this setup with `defectlens regad train`, or fit with "
            f"{option('--registration', value='identity')}"
        )
