"""ResNet-18 and Wide-ResNet-50-2 with torchvision's parameter names.

torchvision itself is not a dependency (its PyPI build does not import beside the CPU torch
pinned here), so the two architectures are written out; a torchvision `.pth` file then loads
with strict key checking. Weights come from `--weights PATH` or the torch hub cache, never from
the network.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from defectlens.backbones.registry import BackboneSpec, Between, given_weights_file, register
from defectlens.errors import WeightsError, option

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, width: int) -> None:
        super().__init__()
        mid = planes * width // 64
        self.conv1 = nn.Conv2d(inplanes, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _downsample(inplanes: int, outplanes: int, stride: int) -> nn.Module | None:
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(
        nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), nn.BatchNorm2d(outplanes)
    )


class TappedResNet(nn.Module):
    """torchvision-compatible ResNet whose forward returns layer outputs at given strides."""

    _STRIDE_OF_LAYER: ClassVar[dict[int, str]] = {
        4: "layer1",
        8: "layer2",
        16: "layer3",
        32: "layer4",
    }

    def __init__(self, block: type, layers: Sequence[int], width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for index, (planes, count) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if index == 0 else 2
            blocks = []
            for j in range(count):
                blocks.append(block(inplanes, planes, stride if j == 0 else 1, width))
                inplanes = planes * block.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(512 * block.expansion, 1000)

    def forward(
        self, x: torch.Tensor, strides: Sequence[int], between: Between | None = None
    ) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs: dict[int, torch.Tensor] = {}
        for stride in (4, 8, 16, 32):
            if stride > max(strides):
                break
            x = getattr(self, self._STRIDE_OF_LAYER[stride])(x)
            if between is not None and stride in strides:
                x = between(stride, x)
            outs[stride] = x
        return [outs[s] for s in strides]


def _locator(name: str, hub_prefix: str):
    def locate(weights: str | None) -> Path:
        if weights:
            return given_weights_file(weights)
        hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
        candidates = sorted((hub / "hub" / "checkpoints").glob(f"{hub_prefix}-*.pth"))
        if candidates:
            return candidates[-1]
        raise WeightsError(
            f"no weights for {name}: defectlens never downloads them. Copy torchvision's "
            f"{hub_prefix}-*.pth to {hub / 'hub' / 'checkpoints'}",
            hint=f"or pass {option('--weights', value='PATH')}",
        )

    return locate


register(
    BackboneSpec(
        name="resnet18",
        description="ResNet-18, torchvision weights from a local file",
        taps={4: 64, 8: 128, 16: 256, 32: 512},
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        build=lambda size: TappedResNet(BasicBlock, (2, 2, 2, 2)),
        locate_weights=_locator("resnet18", "resnet18"),
        weights_help="--weights resnet18-f37072fd.pth (torchvision)",
    )
)
register(
    BackboneSpec(
        name="wide_resnet50_2",
        description="Wide-ResNet-50-2, torchvision weights from a local file",
        taps={4: 256, 8: 512, 16: 1024, 32: 2048},
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        build=lambda size: TappedResNet(Bottleneck, (3, 4, 6, 3), width=128),
        locate_weights=_locator("wide_resnet50_2", "wide_resnet50_2"),
        weights_help="--weights wide_resnet50_2-95faca4d.pth (torchvision)",
    )
)
