"""Uninformed Students (Bergmann, Fauser, Sattlegger, Steger, "Uninformed Students:
Student-Teacher Anomaly Detection with Discriminative Latent Embeddings", CVPR 2020).

A teacher describes every patch of an image; an ensemble of students, each a patch network
with the same receptive field from its own random initialisation, learns on normal images
only to regress the teacher's descriptors (standardised per channel with the training
images' statistics). Where a part looks as in training the students agree with the teacher
and with each other; on a defect they have never seen what to answer, so their mean misses
the teacher (regression error) and they disagree (predictive variance). Per position, score =
error + variance, each standardised by its mean and spread over the normal validation
images' positions; multi-scale = the mean of the scales' maps. With `normalise="position"`
(not the paper's; off by default) that map is standardised once more, per position, by its
mean and spread over the training images (`normalise_per_position` says why).

The teacher (`teacher`). The paper distils a 128-d teacher per patch size from an ImageNet
ResNet-18, which cannot be downloaded here. Our offline backbone's maps at the matching
receptive field stand in for the ResNet: efficientnet_lite0's stride-4 map sees 19 px (the
paper's 17 px scale) and its stride-8 map 67 px (the 65 px scale).
- "distilled" (default): as in the paper, a teacher network of the students' architecture is
  first trained (`teacher_minutes`) to regress those maps (standardised) on the training
  images, and the students regress the teacher. The whole training then ends within
  `teacher_minutes` + `max_minutes` of the fit's start: the students get what reading the
  maps and distilling left. Students of the teacher's own architecture
  can match it closely on normal patches, which keeps the normal error small.
- "backbone": the students regress the backbone's maps directly (no distillation; the
  backbone then runs at scoring time too).

The students (`components.patchnet.PatchNet`, padding-free, so one pass over an image
gives every patch's descriptor on the teacher's grid; LeakyReLU 5e-3 as in the paper):
- 65 px: the paper's network (5x5 conv, pool, 5x5 conv, pool, 5x5 conv, pool, 4x4 conv,
  1x1 conv), stride 8, a 60 px field;
- 17 px: the paper's network has no pooling, so a dense pass at 256 px costs about 50 GMACs
  per student; here it is the 65 px network's first two stages and a 2x2 convolution
  (stride 4, a 20 px field, the teacher's 19 px).

Changed for a 2-core CPU, besides the teacher: `width` 32 channels instead of 128 (256 in
the paper's deeper layers: 2 x `width` here); descriptors of the teacher's size (24 and 40
channels) instead of 128; training on random `crop` x `crop` px windows of the training
images instead of whole images (a padding-free network gives the same descriptors on a
window as on the whole image, so each step costs a quarter as much for the same kind of
signal); Adam at 1e-3 instead of 1e-4 (weight decay 1e-5 as in the paper), early stopping
on the regression loss of the whole normal validation images.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from defectlens.backbones import FeatureExtractor
from defectlens.components.patchnet import PatchNet
from defectlens.errors import ModelFileError, ParameterError
from defectlens.methods.trained import TrainedImageMethod
from defectlens.params import check_choice, check_float, check_int, check_int_list
from defectlens.training.trainer import TrainConfig, fit_minibatches

# The paper's patch sizes -> the backbone stride whose map sees about as much.
TEACHER_STRIDE = {17: 4, 65: 8}
SLOPE = 5e-3
TEACHERS = ("distilled", "backbone")
NORMALISE = ("global", "position")


def student_layers(patch_size: int, width: int, channels: int) -> list[tuple]:
    """The student network for a patch size (see the module docstring)."""
    stages = [("conv", 5, width), ("pool",), ("conv", 5, width), ("pool",)]
    if patch_size == 17:
        return [*stages, ("conv", 2, 2 * width), ("conv", 1, channels)]
    return [*stages, ("conv", 5, width), ("pool",), ("conv", 4, 2 * width), ("conv", 1, channels)]


def _minutes_until(deadline: float) -> float:
    """Minutes left before a `time.monotonic()` deadline; a phase whose time is gone still
    gets its one epoch (the training loop always runs the first)."""
    return max((deadline - time.monotonic()) / 60.0, 1e-6)


def error_and_variance(outputs: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Students' descriptors (B, M, C, h, w) and the teacher's (B, C, h, w) -> per position,
    the squared error of the students' mean and the students' predictive variance (B, h, w)."""
    mean = outputs.mean(dim=1)
    error = (mean - teacher).pow(2).sum(dim=1)
    variance = outputs.pow(2).sum(dim=2).mean(dim=1) - mean.pow(2).sum(dim=1)
    return error, variance


class Students(TrainedImageMethod):
    name = "students"
    fitted_buffers = ("teacher_channels", "teacher_mean", "teacher_std", "score_stats")

    def __init__(
        self,
        patch_sizes: Sequence[int] = (17, 65),
        teacher: str = "distilled",
        students: int = 3,
        width: int = 32,
        crop: int = 128,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-5,
        batch_size: int = 8,
        max_epochs: int = 100,
        patience: int = 10,
        max_minutes: float = 10.0,
        teacher_minutes: float = 4.0,
        normalise: str = "global",
        seed: int = 0,
    ) -> None:
        super().__init__()
        sizes = check_int_list("patch_sizes", patch_sizes, 1, 1000)
        if set(sizes) - set(TEACHER_STRIDE):
            raise ParameterError(
                f"patch_sizes must be values from {sorted(TEACHER_STRIDE)}, not "
                f"{list(patch_sizes)!r}"
            )
        self.patch_sizes = tuple(sorted(sizes))
        self.strides = tuple(TEACHER_STRIDE[p] for p in self.patch_sizes)
        self.teacher = check_choice("teacher", teacher, TEACHERS)
        self.students = check_int("students", students, 2, 32)  # a variance needs two
        self.width = check_int("width", width, 1, 1024)
        self.crop = check_int("crop", crop, 8, 4096)
        if self.crop % max(self.strides):
            raise ParameterError(f"crop must be a multiple of {max(self.strides)}, not {crop}")
        self.weight_decay = check_float("weight_decay", weight_decay, 0.0, 1.0, high_open=True)
        self._init_optimisation(learning_rate, batch_size, max_epochs, patience, max_minutes, seed)
        self.teacher_minutes = check_float(
            "teacher_minutes", teacher_minutes, 0.0, 1e6, low_open=True
        )
        self.space = "pixels"  # students read pixels; the teacher's maps come as extra inputs
        self.normalise = check_choice("normalise", normalise, NORMALISE)
        if self.normalise == "position":
            self.fitted_buffers = (*self.fitted_buffers, "position_stats")
            self.register_buffer("position_stats", None)

    def _scale_nets(self, count: int) -> nn.ModuleList:
        """Per patch size, `count` networks, each with its own initialisation."""
        channels = self.teacher_channels.tolist()
        return nn.ModuleList(
            nn.ModuleList(
                PatchNet(3, student_layers(p, self.width, c), SLOPE) for _ in range(count)
            )
            for p, c in zip(self.patch_sizes, channels, strict=True)
        )

    def build(self) -> nn.Module:
        """The students, and with a distilled teacher, the teacher networks (one per scale)."""
        nets = {"students": self._scale_nets(self.students)}
        if self.teacher == "distilled":
            nets["teachers"] = self._scale_nets(1)
        return nn.ModuleDict(nets)

    def train_config(self) -> TrainConfig:
        return dataclasses.replace(super().train_config(), weight_decay=self.weight_decay)

    # -- inputs and scores -------------------------------------------------------------------
    def inputs(
        self, images: torch.Tensor, maps: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor, ...]:
        """(pixels in [-1, 1], the teacher's standardised map for each patch size)."""
        pixels = images * 2 - 1
        return (pixels, *self._standardise(self._teacher_maps(pixels, maps)))

    @property
    def scores_from_backbone(self) -> bool:
        """A distilled teacher replaces the backbone at scoring time."""
        return self.teacher == "backbone"

    def _teacher_maps(
        self, pixels: torch.Tensor, maps: list[torch.Tensor] | None
    ) -> list[torch.Tensor]:
        if self.teacher == "backbone":
            return list(maps)
        return [scale[0].dense(pixels) for scale in self.net["teachers"]]

    def _standardise(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        channels = self.teacher_channels.tolist()
        means, stds = self.teacher_mean.split(channels), self.teacher_std.split(channels)
        return [
            (m - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
            for m, mean, std in zip(maps, means, stds, strict=True)
        ]

    def _descriptors(self, scale: int, pixels: torch.Tensor) -> torch.Tensor:
        """The students' dense descriptors at one scale: (B, M, C, h, w)."""
        students = self.net["students"][scale]
        return torch.stack([student.dense(pixels) for student in students], dim=1)

    def scale_maps(
        self,
        pixels: torch.Tensor,
        teachers: Sequence[torch.Tensor],
        error_weight: float = 1.0,
        variance_weight: float = 1.0,
    ) -> list[torch.Tensor]:
        """Each scale's map (B, h, w), finest first: weighted standardised error + variance.
        Public so that a study can score by one scale or one term of the fitted model
        (`benchmarks/students_terms.py`); `score` uses both terms at weight 1, the paper's."""
        maps = []
        for k, teacher in enumerate(teachers):
            error, variance = error_and_variance(self._descriptors(k, pixels), teacher)
            e_mean, e_std, v_mean, v_std = self.score_stats[k]
            maps.append(
                error_weight * (error - e_mean) / e_std
                + variance_weight * (variance - v_mean) / v_std
            )
        return maps

    def score(self, *x: torch.Tensor) -> tuple[torch.Tensor, None]:
        maps = mean_of_scales(self.scale_maps(x[0], x[1:]))
        if self.normalise == "position":
            maps = (maps - self.position_stats[0]) / self.position_stats[1]
        return maps, None

    # -- fitting -----------------------------------------------------------------------------
    def fit(
        self,
        extractor: FeatureExtractor,
        batches: Iterable[torch.Tensor],
        progress: bool = False,
        val_batches: Callable[[], Iterable[torch.Tensor]] | None = None,
    ) -> None:
        # One deadline for the whole training: what reading the maps and distilling the
        # teacher took comes out of the students' share, so a fit on a large set stays
        # within teacher_minutes + max_minutes (it ran 1-2 minutes past it before). The
        # students never get more than max_minutes: a teacher that stops early does not
        # hand its unused minutes on (a quick try with max_minutes=0.1 ran a minute).
        budget = self.max_minutes + (self.teacher_minutes if self.teacher == "distilled" else 0)
        deadline = time.monotonic() + 60.0 * budget
        train_pixels, train_maps = _images_and_maps(extractor, batches)
        val_pixels, val_maps = (None, None)
        if val_batches is not None:
            val_pixels, val_maps = _images_and_maps(extractor, val_batches())
        side = train_pixels.shape[-1]
        if side % max(self.strides):
            raise ParameterError(f"the image size must be a multiple of {max(self.strides)}")
        self.teacher_channels = torch.tensor([m.shape[1] for m in train_maps])
        self._set_statistics(train_maps)
        self.net = self.new_network()
        train_pixels, val_pixels = train_pixels * 2 - 1, _maybe(val_pixels, lambda v: v * 2 - 1)
        history = []
        if self.teacher == "distilled":  # the teachers learn the backbone's maps first
            teachers = self.net["teachers"]
            records = self._regress(
                teachers,
                (train_pixels, *self._standardise(train_maps)),
                _maybe(val_pixels, lambda v: (v, *self._standardise(val_maps))),
                min(self.teacher_minutes, _minutes_until(deadline)),
                progress,
                "distil teacher",
            )
            history += [{"teacher_epoch": r.pop("epoch"), **r} for r in records]
            teachers.requires_grad_(False).eval()
            with torch.no_grad():
                train_maps = _dense_maps(teachers, train_pixels)
                val_maps = _maybe(val_pixels, lambda v: _dense_maps(teachers, v))
            self._set_statistics(train_maps)
        train = (train_pixels, *self._standardise(train_maps))
        val = _maybe(val_pixels, lambda v: (v, *self._standardise(val_maps)))
        history += self._regress(
            self.net["students"], train, val,
            min(self.max_minutes, _minutes_until(deadline)), progress,
            f"train {self.name}",
        )  # fmt: skip
        self.history = history
        self.net.requires_grad_(False).eval()
        with torch.no_grad():
            self.score_stats = self._score_statistics(val if val is not None else train)
            if self.normalise == "position":  # from the training images, not validation's:
                self.normalise_per_position(train)  # the threshold comes from those

    def _set_statistics(self, maps: Sequence[torch.Tensor]) -> None:
        """The teacher's per-channel mean and spread over the training images' positions."""
        self.teacher_mean = torch.cat([m.mean(dim=(0, 2, 3)) for m in maps])
        self.teacher_std = torch.cat([m.std(dim=(0, 2, 3)) for m in maps]).clamp_min(1e-6)

    def _regress(
        self,
        nets: nn.ModuleList,
        train: tuple[torch.Tensor, ...],
        val: tuple[torch.Tensor, ...] | None,
        minutes: float,
        progress: bool,
        desc: str,
    ) -> list[dict]:
        """Train `nets` (per scale, a list of networks) to regress the targets in `train` (the
        pixels, then one standardised map per scale) on random windows, stopping on the loss
        over the whole validation images."""
        windows = _Windows(
            [scale[0] for scale in nets], train, min(self.crop, train[0].shape[-1]), self.seed
        )

        def loss(indices: torch.Tensor) -> torch.Tensor:
            inputs, targets = windows.take(indices)
            device = indices.device
            return _regression_loss(
                nets,
                lambda n, x: n(x),
                [x.to(device) for x in inputs],
                [t.to(device) for t in targets],
            )

        def validation_loss(indices: torch.Tensor) -> torch.Tensor:
            pixels, *targets = (t[indices.cpu()].to(indices.device) for t in val)
            return _regression_loss(nets, lambda n, x: n.dense(x), [pixels] * len(targets), targets)

        config = dataclasses.replace(self.train_config(), max_minutes=minutes)
        return fit_minibatches(
            nets,
            loss,
            torch.arange(len(train[0])),
            None if val is None else torch.arange(len(val[0])),
            config,
            progress,
            desc,
            self.device,
            val_loss=validation_loss,
        )

    def _score_statistics(self, data: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(scales, 4): mean and std of the error, then of the variance, over every position
        of these normal images."""
        pixels, teachers = data[0], data[1:]
        rows = []
        for k, teacher in enumerate(teachers):
            errors, variances = [], []
            for start in range(0, len(pixels), 16):
                e, v = error_and_variance(
                    self._descriptors(k, pixels[start : start + 16]), teacher[start : start + 16]
                )
                errors.append(e.flatten())
                variances.append(v.flatten())
            e, v = torch.cat(errors), torch.cat(variances)
            spreads = e.std().clamp_min(1e-6), v.std().clamp_min(1e-6)
            rows.append(torch.stack([e.mean(), spreads[0], v.mean(), spreads[1]]))
        return torch.stack(rows)

    @torch.no_grad()
    def normalise_per_position(self, data: tuple[torch.Tensor, ...]) -> None:
        """Set `normalise="position"` and its statistics (2, h, w) from these normal images'
        inputs (pixels in [-1, 1], then the teacher's standardised maps, as `inputs` gives
        them): per position of the finest grid, the mean and spread of the paper's score.
        `fit` calls it with that option on the training images: statistics from the
        validation images would centre exactly the scores the threshold is then taken from,
        and set it too low (measured: 19-37 % false alarms against 2-9 %). It is public so
        that a study can turn a fitted model over to it without retraining, since training
        does not depend on it (`benchmarks/students_position.py`; the model's params then say
        "position", so it saves and loads as such).

        Where normal parts vary by position, e.g. the varied edges at magnetic tiles' borders,
        the global statistics let those positions hold every normal image's maximum; per
        position they count as anomalous only against their own normal range, as PaDiM's
        per-position Gaussians do. The spread is floored at a tenth of its median, so that a
        position where the images happen to agree does not amplify noise."""
        pixels, teachers = data[0], data[1:]
        maps = torch.cat(
            [
                mean_of_scales(
                    self.scale_maps(pixels[i : i + 16], [t[i : i + 16] for t in teachers])
                )
                for i in range(0, len(pixels), 16)
            ]
        )
        spread = maps.std(dim=0)
        spread = spread.clamp_min(max(0.1 * float(spread.median()), 1e-6))
        if "position_stats" not in self.fitted_buffers:  # a model fitted with "global"
            self.fitted_buffers = (*self.fitted_buffers, "position_stats")
            self.register_buffer("position_stats", None)
        self.normalise = "position"
        self.position_stats = torch.stack([maps.mean(dim=0), spread])

    def after_load(self) -> None:
        scales = len(self.patch_sizes)
        if self.teacher_channels.shape != (scales,) or self.score_stats.shape != (scales, 4):
            raise ModelFileError("students model statistics do not match its patch sizes")

    def check_geometry(self, image_size: int, taps: dict[int, int]) -> None:
        expected = [taps[s] for s in self.strides]
        if self.teacher_channels.tolist() != expected or self.teacher_mean.shape != (
            sum(expected),
        ):
            raise ModelFileError("students model does not match the backbone's feature maps")
        if not bool((self.teacher_std > 0).all()) or not bool(
            (self.score_stats[:, 1::2] > 0).all()
        ):
            raise ModelFileError("students model statistics must have positive spreads")
        if image_size % max(self.strides):
            raise ModelFileError(f"the image size must be a multiple of {max(self.strides)}")
        if self.normalise == "position":
            side = image_size // self.strides[0]
            stats = self.position_stats
            if stats.shape != (2, side, side) or not bool((stats[1] > 0).all()):
                raise ModelFileError(
                    f"students position statistics must be 2 x {side} x {side} with positive "
                    "spreads"
                )


def _regression_loss(
    nets: nn.ModuleList,
    run: Callable[[PatchNet, torch.Tensor], torch.Tensor],
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Mean over positions of the squared distance to the target, summed over scales and
    averaged over each scale's networks (each network's gradient is its own loss's)."""
    total = inputs[0].new_zeros(())
    for scale, x, target in zip(nets, inputs, targets, strict=True):
        for net in scale:
            total = total + (run(net, x) - target).pow(2).sum(dim=1).mean()
    return total / len(nets[0])


def _dense_maps(nets: nn.ModuleList, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Each scale's first network's dense maps of these pixels, in chunks."""
    return [
        torch.cat([scale[0].dense(pixels[i : i + 16]) for i in range(0, len(pixels), 16)])
        for scale in nets
    ]


def _maybe(value: Any, function: Callable[[Any], Any]) -> Any:
    return None if value is None else function(value)


def _images_and_maps(
    extractor: FeatureExtractor, batches: Iterable[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Images in [0, 1] and the backbone's maps at the extractor's strides."""
    pixels, maps = [], []
    with torch.no_grad():
        for batch in batches:
            pixels.append(batch)
            maps.append([torch.as_tensor(m).float() for m in extractor.fast(batch)])
    return torch.cat(pixels), [torch.cat(per_stride) for per_stride in zip(*maps, strict=True)]


def mean_of_scales(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Scale maps (B, h, w), finest first -> their mean on the finest grid (the paper's
    multi-scale score; patch sizes ascend, and so do strides)."""
    side = maps[0].shape[-1]
    return torch.stack(
        [
            m
            if m.shape[-1] == side
            else F.interpolate(m[:, None], size=(side, side), mode="bilinear")[:, 0]
            for m in maps
        ]
    ).mean(dim=0)


class _Windows:
    """Random training windows: `crop` x `crop` px of an image at a random position on the
    coarsest grid, each scale's input for exactly that window (the image padded as `dense`
    pads it, then cut), and the teacher's cells under it. A padding-free network gives the
    window's cells the descriptors a whole-image pass gives them."""

    def __init__(
        self, nets: Sequence[PatchNet], data: tuple[torch.Tensor, ...], crop: int, seed: int
    ) -> None:
        self.pads = [net.padding() for net in nets]
        self.strides = [net.stride for net in nets]
        before, after = max(p[0] for p in self.pads), max(p[1] for p in self.pads)
        pixels, self.teachers = data[0], data[1:]
        self.padded = F.pad(pixels, (before, after, before, after), mode="reflect")
        self.before, self.crop, self.side = before, crop, pixels.shape[-1]
        self.step = max(self.strides)
        self.generator = torch.Generator().manual_seed(seed)

    def take(self, indices: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cells = (self.side - self.crop) // self.step + 1
        corners = torch.randint(cells, (len(indices), 2), generator=self.generator) * self.step
        inputs: list[list[torch.Tensor]] = [[] for _ in self.pads]
        targets: list[list[torch.Tensor]] = [[] for _ in self.pads]
        for i, (y, x) in zip(indices.tolist(), corners.tolist(), strict=True):  # per image
            for k, ((before, after), s) in enumerate(zip(self.pads, self.strides, strict=True)):
                o, size = self.before - before, self.crop + before + after
                inputs[k].append(self.padded[i, :, y + o : y + o + size, x + o : x + o + size])
                cut = slice(y // s, (y + self.crop) // s), slice(x // s, (x + self.crop) // s)
                targets[k].append(self.teachers[k][i, :, cut[0], cut[1]])
        return [torch.stack(v) for v in inputs], [torch.stack(v) for v in targets]
