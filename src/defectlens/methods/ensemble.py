"""Ensembles: several training-free methods on one backbone pass, scores made comparable.

No single method wins on every dataset (BENCHMARKS.md: PatchCore on one, PaDiM on another).
An ensemble fits each member on the same images, then measures each member's image scores and
raw map values on the normal validation images, and scores new images by the members'
*standardised* scores (minus the validation mean, over the validation standard deviation):
members whose scores live on different scales (Mahalanobis distances, kNN distances) become
comparable without a single defect label. Combined by the mean (default) or the maximum; maps
are standardised the same way and brought to the finest member's grid (bilinear) first.

A member's image score is the one it gives alone: its own score (PatchCore, SPADE), or, for a
member without one (PaDiM), the maximum of its map smoothed as the detector smooths maps
(`score_sigma` image pixels, applied on the member's own grid: σ / stride there). The raw
map's maximum (`score_sigma=0`, the rule of models saved before 2026-12-05) scores PaDiM by its
noisiest position; BENCHMARKS.md compares the two.

The backbone runs once per batch when scoring: every member reads its own strides of one
shared pass. Members: the training-free methods (padim, patchcore, spade). Exported like any
method: one backbone graph, a head graph holding every member's head (each on its strides),
and the `ensemble` finish (`runtime.finish`), which runs each member's finish and then this
module's standardise-and-combine arithmetic, so each member keeps its own parity contract.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectlens.backbones import FeatureExtractor
from defectlens.components.resample import smoothed_max
from defectlens.errors import ModelFileError, ParameterError
from defectlens.methods.base import AnomalyMethod, MethodOutput, get_method
from defectlens.params import check_choice, check_float, check_seed

MEMBERS = ("padim", "patchcore", "spade")
_PREFIX = "member"


class _MemberView:
    """The backbone as one member sees it: only the maps at its strides, either computed on
    demand (fitting) or taken from one pass shared by every member (scoring)."""

    def __init__(
        self,
        extractor: FeatureExtractor,
        strides: Sequence[int],
        shared: list[torch.Tensor] | None = None,
    ) -> None:
        self._extractor, self._shared = extractor, shared
        self._index = [extractor.strides.index(s) for s in strides]

    @property
    def channels(self) -> list[int]:
        return [self._extractor.channels[i] for i in self._index]

    def fast(self, images: torch.Tensor) -> list[torch.Tensor]:
        maps = self._shared if self._shared is not None else self._extractor.fast(images)
        return [maps[i] for i in self._index]


class Ensemble(AnomalyMethod):
    name = "ensemble"
    # normalisation (members, 4): score mean, score sd, map mean, map sd. score_smoothing
    # (members,): the Gaussian σ on each member's own map grid for its image score (0: none).
    fitted_buffers = ("normalisation", "score_smoothing")

    def __init__(
        self,
        members: Sequence[str] = ("padim", "patchcore"),
        combine: str = "mean",
        seed: int = 0,
        member_params: dict[str, dict[str, Any]] | None = None,
        score_sigma: float = 4.0,
    ) -> None:
        super().__init__()
        if isinstance(members, str) or not isinstance(members, Sequence):
            raise ParameterError(f"members must be a list of method names, not {members!r}")
        members = tuple(members)
        for member in members:
            check_choice("members", member, MEMBERS)
        if len(members) < 2 or len(set(members)) != len(members):
            raise ParameterError(
                f"an ensemble needs at least two different members, not {list(members)}"
            )
        self.members = members
        self.combine = check_choice("combine", combine, ("mean", "max"))
        self.seed = check_seed("seed", seed)
        self.score_sigma = check_float("score_sigma", score_sigma, 0.0, 64.0)
        if member_params is not None and not isinstance(member_params, dict):
            raise ParameterError(f"member_params must be a mapping, not {member_params!r}")
        given = dict(member_params or {})
        unknown = sorted(set(given) - set(members))
        if unknown:
            raise ParameterError(f"member_params names {unknown[0]!r}, which is not a member")
        models = []
        for member in members:
            method = get_method(member)
            params = dict(given.get(member) or {})
            try:  # named as Detector names a method's, not by Python's TypeError
                method.check_param_names(params)
            except ParameterError as exc:
                raise ParameterError(f"ensemble member {member}: {exc}") from None
            if "seed" in method.param_names():
                params.setdefault("seed", seed)
            try:
                models.append(method(**params))
            except (TypeError, ParameterError) as exc:
                raise ParameterError(f"ensemble member {member}: {exc}") from None
        self.models = nn.ModuleList(models)
        # Saved in full, so that a loaded ensemble rebuilds exactly these members.
        self.member_params = {m: model.params() for m, model in zip(members, models, strict=True)}
        self.strides = tuple(sorted({s for model in models for s in model.strides}))

    # -- fitting ---------------------------------------------------------------------------
    def fit(
        self,
        extractor: FeatureExtractor,
        batches: Iterable[torch.Tensor],
        progress: bool = False,
        val_batches: Callable[[], Iterable[torch.Tensor]] | None = None,
    ) -> None:
        if iter(batches) is batches:
            raise ValueError("an ensemble needs training batches it can read once per member")
        if val_batches is None:
            raise ValueError("an ensemble needs normal validation images to standardise scores")
        for model in self.models:
            model.fit(_MemberView(extractor, model.strides), batches, progress, val_batches)
        self.normalisation = None
        self.score_smoothing = self._smoothing(extractor, next(iter(val_batches()))[:1])
        outputs = [self._member_outputs(extractor, images) for images in val_batches()]
        rows = []
        for i in range(len(self.models)):
            scores = torch.cat([out[i][0] for out in outputs]).double()
            values = torch.cat([out[i][1].reshape(-1) for out in outputs]).double()
            if len(scores) < 2:
                raise ValueError("an ensemble needs at least 2 validation images")
            rows.append([scores.mean(), scores.std(), values.mean(), values.std()])
        stats = torch.tensor(rows, dtype=torch.float64)
        stats[:, 1::2] = stats[:, 1::2].clamp_min(1e-12)
        self.normalisation = stats.float()

    @torch.no_grad()
    def _smoothing(self, extractor: FeatureExtractor, image: torch.Tensor) -> torch.Tensor:
        """Per member, `score_sigma` in cells of its map grid (0 for a member with its own
        image score): a cell spans image side / map side pixels."""
        sigmas = []
        for model in self.models:
            result = model(_MemberView(extractor, model.strides), image)
            cells = result.maps.shape[-1] / image.shape[-1]  # map cells per image pixel
            sigmas.append(0.0 if result.scores is not None else self.score_sigma * cells)
        return torch.tensor(sigmas, dtype=torch.float32)

    @torch.no_grad()
    def _member_outputs(
        self, extractor: FeatureExtractor, images: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per member: (image scores (B,), raw maps (B, h, w)) from one backbone pass. A
        member without its own scores is scored by its smoothed map's maximum."""
        shared = extractor.fast(images)
        out = []
        for model, sigma in zip(self.models, self.score_smoothing.tolist(), strict=True):
            result = model(_MemberView(extractor, model.strides, shared), images)
            maps = result.maps.float()
            scores = result.scores
            if scores is None:
                scores = torch.from_numpy(smoothed_max(maps.numpy(), sigma))
            out.append((scores.float(), maps))
        return out

    # -- scoring ---------------------------------------------------------------------------
    def forward(self, extractor: FeatureExtractor, images: torch.Tensor) -> MethodOutput:
        outputs = self._member_outputs(extractor, images)
        side = max(maps.shape[-1] for _, maps in outputs)
        stats = self.normalisation
        scores, maps = [], []
        for i, (score, amap) in enumerate(outputs):
            scores.append((score - stats[i, 0]) / stats[i, 1])
            standard = ((amap - stats[i, 2]) / stats[i, 3])[:, None]
            if standard.shape[-1] != side:
                standard = F.interpolate(
                    standard, size=(side, side), mode="bilinear", align_corners=False
                )
            maps.append(standard[:, 0])
        scores, maps = torch.stack(scores), torch.stack(maps)
        if self.combine == "max":
            return MethodOutput(maps=maps.amax(dim=0), scores=scores.amax(dim=0))
        return MethodOutput(maps=maps.mean(dim=0), scores=scores.mean(dim=0))

    # -- persistence -----------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self.normalisation is not None and all(m.is_fitted for m in self.models)

    def fitted_state(self) -> dict[str, torch.Tensor]:
        state = {
            "normalisation": self.normalisation.contiguous(),
            "score_smoothing": self.score_smoothing.contiguous(),
        }
        for i, model in enumerate(self.models):
            for name, tensor in model.fitted_state().items():
                state[f"{_PREFIX}{i}.{name}"] = tensor
        return state

    def load_fitted_state(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        parts: list[dict[str, torch.Tensor]] = [{} for _ in self.models]
        for key in [k for k in tensors if k.startswith(_PREFIX)]:
            index, _, name = key[len(_PREFIX) :].partition(".")
            if not index.isdigit() or int(index) >= len(self.models) or not name:
                raise ModelFileError(f"ensemble tensor {key!r} names no member")
            parts[int(index)][name] = tensors.pop(key)
        for model, part in zip(self.models, parts, strict=True):
            model.load_fitted_state(part)
        if "score_smoothing" not in tensors and "normalisation" in tensors:
            # Saved before members were scored through smoothed maps: raw maxima, as then.
            tensors["score_smoothing"] = torch.zeros(len(self.models))
            self.score_sigma = 0.0
        super().load_fitted_state(tensors)

    def after_load(self) -> None:
        stats = self.normalisation
        if stats.shape != (len(self.models), 4) or not bool((stats[:, 1::2] > 0).all()):
            raise ModelFileError("ensemble normalisation must be (members, 4), spreads > 0")
        smoothing = self.score_smoothing
        if smoothing.shape != (len(self.models),) or not bool((smoothing >= 0).all()):
            raise ModelFileError("ensemble score_smoothing must be (members,), each >= 0")

    def check_geometry(self, image_size: int, taps: dict[int, int]) -> None:
        for model in self.models:
            model.check_geometry(image_size, taps)

    def export_head(self) -> nn.Module:
        return _EnsembleHead(self)

    def export_finish(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        members, arrays = (
            [],
            {
                "normalisation": self.normalisation.float().numpy(),
                "score_smoothing": self.score_smoothing.float().numpy(),
            },
        )
        for i, model in enumerate(self.models):
            spec, member_arrays = model.export_finish()
            members.append({"finish": spec})  # each member's output count is added at export
            arrays |= {f"{_PREFIX}{i}.{name}": array for name, array in member_arrays.items()}
        return {"kind": "ensemble", "combine": self.combine, "members": members}, arrays


class _EnsembleHead(nn.Module):
    """Every member's export head, each on its own strides of the backbone's maps: one group
    of outputs per member (flattened in order by the exporter)."""

    def __init__(self, ensemble: Ensemble) -> None:
        super().__init__()
        self.heads = nn.ModuleList(model.export_head() for model in ensemble.models)
        self.index = [[ensemble.strides.index(s) for s in m.strides] for m in ensemble.models]

    def forward(self, *features: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], ...]:
        groups = []
        for head, index in zip(self.heads, self.index, strict=True):
            out = head(*[features[i] for i in index])
            groups.append(tuple(out) if isinstance(out, tuple | list) else (out,))
        return tuple(groups)
