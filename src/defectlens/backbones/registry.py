"""Backbone registry and the frozen feature extractor built from it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file as load_safetensors
from torch import nn

from defectlens.errors import WeightsError
from defectlens.outputs import file_sha256

# A hook between a backbone's stages: (stride, feature map) -> the map the next stage reads and
# the tap returns (RegAD registers each stage's output with a spatial transformer).
Between = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BackboneSpec:
    """What defectlens needs to know about one pretrained network.

    `taps` maps a stride (input pixels per feature cell) to the channel count of the feature map
    the network produces there. `mean`/`std` normalise images given in [0, 1].
    """

    name: str
    description: str
    taps: dict[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    build: Callable[[int], nn.Module] = field(repr=False)
    locate_weights: Callable[[str | None], Path] = field(repr=False)
    weights_help: str = ""

    def weights_status(self, hint: bool = True) -> str:
        """'available (<path>)' or 'missing: ' and the reason the weights cannot be found,
        with how to supply them unless `hint` is off (for a caller that takes no weights)."""
        try:
            return f"available ({self.locate_weights(None)})"
        except WeightsError as exc:
            return f"missing: {exc if hint else exc.reason}"


_REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    _REGISTRY[spec.name] = spec
    return spec


def available_backbones() -> list[BackboneSpec]:
    _load_builtin()
    return list(_REGISTRY.values())


def get_spec(name: str) -> BackboneSpec:
    _load_builtin()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise WeightsError(
            f"unknown backbone {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def _load_builtin() -> None:
    # Imported lazily so that the registry module has no import cycle with the architectures.
    from defectlens.backbones import efficientnet, resnet  # noqa: F401


def load_state_dict_strict(net: nn.Module, path: Path, backbone: str) -> None:
    """Load a weights file with strict key/shape checking: safetensors (what defectlens
    writes, e.g. a backbone fine-tuned by `regad train --backbone-lr`) or a torch file read
    with `weights_only=True` (never unpickling code)."""
    try:
        if path.suffix == ".safetensors":
            state = load_safetensors(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:  # permissions, a folder, a vanished file
        raise WeightsError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except Exception as exc:  # torch and safetensors raise many types for a bad file
        # Their texts (a cut-off paragraph about weights_only, "KeyError: 174812789") say
        # nothing to the user; what the file is not, and what to do, does.
        what = "not a PyTorch (.pth) or safetensors weights file"
        if "unsupported global" in str(exc).lower():  # a pickled class, not a bad byte
            what = (
                "it holds pickled Python objects, not only tensors (a whole saved model?), "
                "which are never unpickled here: save the network's state_dict() instead"
            )
        raise WeightsError(f"{path}: cannot read weights for {backbone}: {what}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: not a state dict of tensors (found {type(state).__name__})")
    own = getattr(net, "weights_state", None)  # a net whose file keys differ says so
    expected = set(own() if own else net.state_dict())
    missing = sorted(expected - set(state), key=str)
    unexpected = sorted(set(state) - expected, key=str)  # a file's keys need not be strings
    if missing or unexpected:  # name a few: a wrong file misses hundreds
        parts = [
            f"{len(found)} {what} (e.g. {', '.join(map(str, found[:3]))})"
            for found, what in ((missing, "missing"), (unexpected, "unexpected"))
            if found
        ]
        raise WeightsError(
            f"{path}: does not match the {backbone} architecture: of the "
            f"{len(expected)} tensors {backbone} needs, {' and '.join(parts)}; is it a weights "
            f"file for {backbone}?"
        )
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # same names, other shapes
        first = " ".join(str(exc).splitlines()[0:3])[:300]
        raise WeightsError(
            f"{path}: does not match the {backbone} architecture ({first})"
        ) from None


class FeatureExtractor(nn.Module):
    """A frozen backbone that maps images in [0, 1] to feature maps at the requested strides.

    `forward` is eager torch with autograd available (DifferNet differentiates through it).
    `fast` is inference without autograd, on the backend set with `use_backend` (an object from
    `defectlens.runtime`, e.g. onnxruntime, about 5x faster than eager torch on a CPU); without
    one it runs eager torch in channels-last memory format (about 1.5x faster than the default
    layout for these convolution stacks).
    """

    def __init__(
        self,
        spec: BackboneSpec,
        strides: Sequence[int],
        image_size: int,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        unknown = [s for s in strides if s not in spec.taps]
        if unknown:
            raise WeightsError(
                f"backbone {spec.name} has no feature tap at stride(s) {unknown}; "
                f"taps: {sorted(spec.taps)}"
            )
        self.spec = spec
        self.strides = tuple(sorted(strides))
        self.image_size = image_size
        self.weights_path = spec.locate_weights(weights)
        self.weights_sha256 = file_sha256(self.weights_path)
        self.net = spec.build(image_size)
        load_state_dict_strict(self.net, self.weights_path, spec.name)
        self.net.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.backend: Callable[[torch.Tensor], list[torch.Tensor]] | None = None
        # key -> a method's feature module compiled for `backend` (see `fast_module`)
        self._compiled: dict[str, Callable[[torch.Tensor], list[torch.Tensor]]] = {}

    @property
    def channels(self) -> list[int]:
        return [self.spec.taps[s] for s in self.strides]

    def forward(self, images: torch.Tensor, between: Between | None = None) -> list[torch.Tensor]:
        """Maps at `strides`; `between(stride, map)`, if given, replaces each tapped map, both
        as returned and as the next stage's input."""
        normalised = (images - self.mean) / self.std
        if between is None:
            return self.net(normalised, self.strides)
        return self.net(normalised, self.strides, between)

    def weights_state(self) -> dict[str, torch.Tensor]:
        """The backbone's tensors under its weights file's keys: saved as safetensors, they are
        a file `--weights` reads (how a fine-tuned backbone travels)."""
        own = getattr(self.net, "weights_state", None)  # a net whose file keys differ says so
        # .contiguous(): the convolutions are kept channels-last, which safetensors cannot write
        return {k: v.contiguous() for k, v in (own() if own else self.net.state_dict()).items()}

    def train(self, mode: bool = True) -> FeatureExtractor:
        # The backbone is frozen: BatchNorm must keep its ImageNet statistics whatever the caller
        # does with .train() on a parent module.
        super().train(False)
        return self

    def use_backend(self, backend: Callable[[torch.Tensor], list[torch.Tensor]] | None) -> None:
        """Run `fast` on `backend` (images (B, 3, H, W) in [0, 1] -> maps at `strides`)."""
        self.backend = backend
        self._compiled = {}

    @torch.no_grad()
    def fast(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.backend is not None:
            return self.backend(images)
        return self.forward(images.contiguous(memory_format=torch.channels_last))

    def fast_module(
        self, module: nn.Module, key: str, count: int
    ) -> Callable[[torch.Tensor], list[torch.Tensor]]:
        """`module` (images in [0, 1] -> `count` maps, computed with this extractor) on the
        same backend as `fast`: a method whose features are not the backbone's taps (RegAD's
        registered stages) runs them as fast as the others. `key` must identify the module's
        weights; the backend may cache a compiled graph under it. Compiled once per key."""
        cache = self._compiled
        if key not in cache:
            compile_module = getattr(self.backend, "compile", None)
            compiled = None
            if compile_module is not None:  # None from a backend that cannot: run eagerly
                name = f"{key}-{self.spec.name}-{self.weights_sha256}-{self.image_size}"
                compiled = compile_module(module, name, count)
            cache[key] = compiled or _eager(module)
        return cache[key]

    def all_taps(self) -> nn.Module:
        """A module mapping images in [0, 1] to a tuple of every tap of the backbone, in
        stride order: the form exporters take (one graph then serves every method)."""
        return _AllTaps(self)


def _eager(module: nn.Module) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    @torch.no_grad()
    def run(images: torch.Tensor) -> list[torch.Tensor]:
        return list(module(images.contiguous(memory_format=torch.channels_last)))

    return run


class _AllTaps(nn.Module):
    def __init__(self, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.extractor = extractor
        self.taps = tuple(sorted(extractor.spec.taps))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        normalised = (images - self.extractor.mean) / self.extractor.std
        return tuple(self.extractor.net(normalised, self.taps))


def build_extractor(
    name: str, strides: Sequence[int], image_size: int, weights: str | None = None
) -> FeatureExtractor:
    return FeatureExtractor(get_spec(name), strides, image_size, weights)


def given_weights_file(weights: str) -> Path:
    """A weights file the user named (`--weights`): it must exist and be a regular file (a
    device such as /dev/null or a folder is not "not found", and is said to be what it is)."""
    path = Path(weights).expanduser()
    if not path.exists():
        raise WeightsError(f"{path}: weights file not found")
    if not path.is_file():
        raise WeightsError(f"{path}: is not a regular file; give the weights file itself")
    return path
