"""`Detector`: the scikit-learn-style estimator users fit, apply, save and load.

It wires a backbone, a method and thresholds together and owns the pre/post-processing every
method shares: decode, resize to S x S, run the method, upsample its raw map to S x S, Gaussian
smoothing, resize to the image's own resolution. Images may be paths or numpy arrays.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from defectlens.backbones import FeatureExtractor, build_extractor, get_spec
from defectlens.components.augment import N_SUPPORT_VERSIONS, augment_support
from defectlens.components.resample import resample
from defectlens.data.dataset import find_normal_images
from defectlens.data.images import probe_image
from defectlens.data.loader import ImageInput, iter_batches
from defectlens.errors import DataError, DataWarning, DefectLensError, ParameterError, option
from defectlens.methods import AnomalyMethod, get_method
from defectlens.params import (
    MAX_BATCH_SIZE,
    MAX_SIGMA,
    check_float,
    check_image_size,
    check_int,
    check_seed,
)
from defectlens.prediction import Predictor, as_image_inputs
from defectlens.runtime.backends import check_backend_name, default_backend_name, make_backend
from defectlens.thresholds import Thresholds, from_normal_scores
from defectlens.training.loop import resolve_device


def resolve_images(images: str | Path | Sequence[ImageInput]) -> list[ImageInput]:
    """A folder (or MVTec root) becomes its normal images; a list is taken as it is."""
    if isinstance(images, str | Path):
        return list(find_normal_images(images))
    if isinstance(images, np.ndarray):  # a stack of images (N, H, W[, C])
        return list(images)
    return as_image_inputs(images)


def check_readable(images: Sequence[ImageInput]) -> None:
    """Check every image file's header before a long fit starts; one error lists the bad ones.

    Catches missing, empty, corrupt-header, non-image and over-the-pixel-limit files in a
    fraction of a second, instead of after minutes of feature extraction. (A file whose pixel
    data is damaged past its header is still caught when it is decoded.)
    """
    problems = []
    for image in images:
        if isinstance(image, np.ndarray):
            continue
        try:
            probe_image(image)
        except DataError as exc:
            problems.append(str(exc))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)


def _warn_if_overlapping(fit_images: Sequence[ImageInput], val: Sequence[ImageInput]) -> None:
    """Validation images the model also fits on make the threshold too low (more false alarms
    than `target_far` promises): say so, with the count."""
    fitted = {os.path.realpath(p) for p in fit_images if not isinstance(p, np.ndarray)}
    shared = sum(os.path.realpath(p) in fitted for p in val if not isinstance(p, np.ndarray))
    if shared:
        warnings.warn(
            f"{shared} of {len(val)} validation images are also training images: the threshold "
            "will be set too low and flag more good parts than the target false-alarm rate",
            DataWarning,
            stacklevel=3,
        )


class _Replayable:
    """Training batches a method may read more than once (an ensemble reads them once per
    member), decoded again each time rather than held in memory; the bar restarts and says
    which pass it counts, so a restart does not read as lost progress."""

    def __init__(self, make: Callable[[], Iterator[torch.Tensor]], bar: tqdm) -> None:
        self.make, self.bar, self.passes = make, bar, 0
        self.desc = getattr(bar, "desc", "")  # a disabled bar has none

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.passes:
            self.bar.reset()
            self.bar.set_description(f"{self.desc} (pass {self.passes + 1})")
        self.passes += 1
        return self.make()


def _as_json(value: Any) -> str:
    """A parameter's value compared as config.json holds it (tuples and lists alike)."""
    return json.dumps(value, sort_keys=True, default=repr)


class Detector(Predictor):
    """Learn normal appearance from good images, then score, localise and decide.

    Parameters are set in the constructor and saved with the model; attributes ending in `_`
    exist after `fit` (or `load`).
    """

    def __init__(
        self,
        method: str = "padim",
        backbone: str = "efficientnet_lite0",
        weights: str | None = None,
        image_size: int = 256,
        batch_size: int = 32,
        sigma: float = 4.0,
        val_fraction: float = 0.1,
        target_far: float = 0.01,
        seed: int = 0,
        method_params: dict[str, Any] | None = None,
        shots: int | None = None,
        shot_seed: int = 0,
        augment_support: bool | None = None,
    ) -> None:
        method_class = get_method(method)  # "unknown method ...; choose one of ..."
        get_spec(backbone)  # "unknown backbone ...; choose one of ..."
        self.method, self.backbone = method, backbone
        if weights is not None and not isinstance(weights, str | Path):
            raise ParameterError(f"weights must be a file path, not {weights!r}")
        self.weights = None if weights is None else str(weights)
        self.image_size = check_image_size(image_size)
        self.batch_size = check_int("batch_size", batch_size, 1, MAX_BATCH_SIZE)
        self.sigma = check_float("sigma", sigma, 0.0, MAX_SIGMA)
        self.val_fraction = check_float("val_fraction", val_fraction, 0.0, 1.0, high_open=True)
        self.target_far = check_float("target_far", target_far, 0.0, 1.0, high_open=True)
        self.seed = check_seed("seed", seed)
        if method_params is not None and not isinstance(method_params, dict):
            raise ParameterError(f"method_params must be a mapping, not {method_params!r}")
        # kept as given (scikit-learn's clone checks that the constructor stores it unchanged)
        self.method_params = method_params if method_params is not None else {}
        self.shots = None if shots is None else check_int("shots", shots, 1, 100_000)
        self.shot_seed = check_seed("shot_seed", shot_seed)
        if augment_support is None:  # the method's own default: on for RegAD
            augment_support = method_class.augments_support
        if not isinstance(augment_support, bool):
            raise ParameterError(f"augment_support must be true or false, not {augment_support!r}")
        self.augment_support = augment_support
        method_class.check_param_names(self.method_params, f" for method {method}")
        try:
            self.model_: AnomalyMethod = method_class(**self.method_params)
        except ParameterError as exc:
            raise ParameterError(f"{method}: {exc}") from None
        self.extractor_: FeatureExtractor | None = None
        self.thresholds_: Thresholds | None = None
        # How many images the model was fitted on (saved; shown on the service's model card).
        self.n_fit_images_: int | None = None
        # Where the backbone runs: not a model parameter (every backend gives the same scores
        # to float32 precision), so not saved; see `use_backend`.
        self.backend = default_backend_name()

    # -- configuration -------------------------------------------------------------------
    def check_settings(self) -> None:
        """Check the settings again as the constructor does, and against what was fitted:
        attributes may be set after construction, and a model saved with a bad one could not
        be loaded back (or would claim a target_far its threshold was not set for)."""
        self.check_unchanged()
        type(self)(**self.get_params())  # every setting, checked by the constructor's own code
        t = self.thresholds_
        if t is not None and not t.manual and t.target_far != self.target_far:
            raise ParameterError(
                f"target_far is {self.target_far:g} but the threshold was set for "
                f"{t.target_far:g}; calibrate() again after changing it"
            )

    def check_unchanged(self) -> None:
        """What scoring needs to be as fitted: the method, backbone and image size (each a
        clear error here, where a changed one would fail deep inside the scoring)."""
        if self.method != self.model_.name:
            raise ParameterError(
                f"method is {self.method!r} but the fitted model is {self.model_.name!r}; "
                "build a new Detector to change the method"
            )
        extractor = self.extractor_
        if extractor is not None and extractor.spec.name != self.backbone:
            raise ParameterError(
                f"backbone is {self.backbone!r} but the model was fitted on "
                f"{extractor.spec.name!r}; build a new Detector to change it"
            )
        if extractor is not None and extractor.image_size != self.image_size:
            raise ParameterError(
                f"image_size is {self.image_size!r} but the model was fitted at "
                f"{extractor.image_size}; build a new Detector to change it"
            )

    @classmethod
    def param_names(cls) -> list[str]:
        """The constructor's parameters: exactly the keys of `params()` and of a saved config."""
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def params(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "backbone": self.backbone,
            "weights": self.weights,
            "image_size": self.image_size,
            "batch_size": self.batch_size,
            "sigma": self.sigma,
            "val_fraction": self.val_fraction,
            "target_far": self.target_far,
            "seed": self.seed,
            "method_params": self.model_.params(),
            "shots": self.shots,
            "shot_seed": self.shot_seed,
            "augment_support": self.augment_support,
        }

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's arguments as given (scikit-learn's convention, what
        `sklearn.base.clone` rebuilds from); `params()` adds every default of the method."""
        return {**self.params(), "method_params": self.method_params}

    def set_params(self, **params: Any) -> Detector:
        """New settings, checked as the constructor checks them. Like a new Detector, the
        result is unfitted: a fit depends on every setting. A new `method` without new
        `method_params` starts from that method's defaults."""
        unknown = sorted(set(params) - set(self.param_names()))
        if unknown:
            raise ParameterError(
                f"unknown parameter {unknown[0]!r} for Detector; it takes: "
                + ", ".join(self.param_names())
            )
        merged = {**self.get_params(), **params}
        if params.get("method", self.method) != self.method and "method_params" not in params:
            merged["method_params"] = None
        if "method" in params and "augment_support" not in params:
            merged["augment_support"] = None  # the new method's own default
        fresh = type(self)(**merged)  # checked on a new object: a bad value changes nothing
        fresh.backend = self.backend
        self.__dict__.clear()  # nothing of an earlier fit (fit_images_, ...) stays
        self.__dict__.update(fresh.__dict__)
        return self

    def __repr__(self) -> str:
        defaults = {
            name: p.default for name, p in inspect.signature(type(self).__init__).parameters.items()
        }
        defaults["augment_support"] = self.model_.augments_support  # the method's own
        shown = [
            f"{name}={value!r}"
            for name, value in self.params().items()
            if name != "method_params" and value != defaults[name]
        ]
        # What was asked for, not every default of the method (a loaded model holds them all:
        # its config keeps each value, so that a later change of a default cannot move it).
        method_defaults = {
            name: p.default
            for name, p in inspect.signature(type(self.model_).__init__).parameters.items()
        }
        asked = {
            key: value
            for key, value in self.method_params.items()
            if key not in method_defaults or _as_json(value) != _as_json(method_defaults[key])
        }
        if asked:
            shown.append(f"method_params={asked!r}")
        state = "fitted" if self.thresholds_ is not None else "not fitted"
        return f"Detector({', '.join(shown)})  # {state}"

    @property
    def supervision(self) -> str:
        """What the fitted method learned from besides normal images (see `Predictor`)."""
        return self.model_.supervision

    def ensure_extractor(self) -> FeatureExtractor:
        """The frozen backbone, built (and its weights file checked) on first use, running on
        the chosen backend."""
        if self.extractor_ is None:
            extractor = build_extractor(
                self.backbone, self.model_.strides, self.image_size, self.weights
            )
            self.model_.check_backbone(extractor.channels)  # before any graph is exported
            extractor.use_backend(make_backend(self.backend, extractor))
            self.extractor_ = extractor
        return self.extractor_

    def use_backend(self, name: str) -> Detector:
        """Run the backbone on `name` ('onnxruntime' or 'torch') from now on."""
        self.backend = check_backend_name(name)
        if self.extractor_ is not None:
            self.extractor_.use_backend(make_backend(name, self.extractor_))
        return self

    # -- fitting ---------------------------------------------------------------------------
    def split_validation(self, images: list[ImageInput]) -> tuple[list, list]:
        """Hold out a seeded random `val_fraction` of the normal images (at least one)."""
        if len(images) < 2:
            raise DataError(
                f"need at least 2 normal images (one is held out to set the threshold), "
                f"got {len(images)}; add images or pass validation images explicitly"
            )
        n_val = max(1, round(len(images) * self.val_fraction))
        if n_val >= len(images):
            raise DataError(
                f"val_fraction {self.val_fraction:g} holds out all {len(images)} normal images "
                f"and leaves none to fit on; lower it ({option('--val-fraction')}) or pass "
                "validation images"
            )
        order = np.random.default_rng(self.seed).permutation(len(images))
        val = sorted(order[:n_val].tolist())
        fit = sorted(order[n_val:].tolist())
        return [images[i] for i in fit], [images[i] for i in val]

    def split_shots(self, images: list[ImageInput], need_rest: bool) -> tuple[list, list]:
        """Few-shot: `shots` seeded random images (by `shot_seed`) to fit on, in their listed
        order, and all the others (free for validation; `need_rest`: at least one)."""
        need = self.shots + (1 if need_rest else 0)
        if len(images) < need:
            rest = " plus at least one for validation" if need_rest else ""
            raise DataError(
                f"{option('--shots', value=str(self.shots))} needs {self.shots} normal "
                f"images{rest}, but only {len(images)} exist; lower {option('--shots')} or add "
                "images"
            )
        chosen = np.random.default_rng(self.shot_seed).choice(len(images), self.shots, False)
        keep = set(chosen.tolist())
        support = [images[i] for i in sorted(keep)]
        return support, [img for i, img in enumerate(images) if i not in keep]

    def fit(
        self,
        images: str | Path | Sequence[ImageInput],
        val_images: str | Path | Sequence[ImageInput] | None = None,
        progress: bool = False,
        device: str | None = "auto",
    ) -> Detector:
        """Fit on normal images, then set thresholds from normal validation images.

        `device` is where a method that trains a network trains ("auto": CUDA when present,
        "cpu", "cuda", "cuda:N"); the trained model is kept on the CPU either way.

        Without `val_images`, `val_fraction` of `images` is held out (never fitted on). In
        few-shot mode (`shots`), only `shots` seeded images are fitted on and, without
        `val_images`, all the others validate. `augment_support` fits on each fit image and
        its 21 fixed augmented versions (`components.augment.augment_support`).
        """
        resolve_device(device)  # an unknown or absent device: one line, before any work
        fit_images, val = self.plan_fit(images, val_images)
        torch.manual_seed(self.seed)
        extractor = self.ensure_extractor()  # missing weights: said before image problems
        check_readable([*fit_images, *val])
        bar = tqdm(
            total=len(fit_images), desc=f"fit {self.method}", disable=not progress, unit="img"
        )
        self.model_.device = device
        try:
            self.model_.fit(
                extractor,
                _Replayable(lambda: self.fit_batches(fit_images, on_batch=bar.update), bar),
                progress=progress,
                val_batches=lambda: (
                    torch.from_numpy(b.images)
                    for b in iter_batches(val, self.image_size, self.batch_size)
                ),
            )
        except ValueError as exc:
            raise DefectLensError(f"fitting {self.method} failed: {exc}") from None
        finally:
            bar.close()
        return self.finish_fit(fit_images, val, progress)

    def plan_fit(
        self,
        images: str | Path | Sequence[ImageInput],
        val_images: str | Path | Sequence[ImageInput] | None = None,
    ) -> tuple[list[ImageInput], list[ImageInput]]:
        """(images to fit on, validation images), as `fit` chooses them."""
        images = resolve_images(images)
        if self.shots is not None:
            fit_images, rest = self.split_shots(images, need_rest=val_images is None)
            val = rest if val_images is None else resolve_images(val_images)
            if val_images is not None:
                _warn_if_overlapping(fit_images, val)
        elif val_images is None:
            fit_images, val = self.split_validation(images)
        else:
            fit_images, val = images, resolve_images(val_images)
            if not fit_images or not val:
                raise DataError("need at least one fit image and one validation image")
            _warn_if_overlapping(fit_images, val)
        return fit_images, val

    @property
    def images_per_batch(self) -> int:
        """Source images per training batch: with augmentation, fewer, so that a batch of
        them and their augmented versions stays at batch_size."""
        if self.augment_support:
            return max(1, self.batch_size // N_SUPPORT_VERSIONS)
        return self.batch_size

    def fit_batches(
        self, fit_images: Sequence[ImageInput], on_batch: Callable[[int], Any] | None = None
    ) -> Iterator[torch.Tensor]:
        """The training batches of `fit_images` (augmented when `augment_support`);
        `on_batch(n)` is told how many source images each batch held."""
        for batch in iter_batches(fit_images, self.image_size, self.images_per_batch):
            images = torch.from_numpy(batch.images)
            yield augment_support(images) if self.augment_support else images
            if on_batch is not None:
                on_batch(len(batch.sources))

    def finish_fit(
        self, fit_images: Sequence[ImageInput], val: Sequence[ImageInput], progress: bool = False
    ) -> Detector:
        """Record what was fitted on and set the thresholds: what follows the method's fit."""
        self.thresholds_ = None
        # What was fitted on, by name: in few-shot mode, the support set to report.
        self.n_fit_images_ = len(fit_images)
        self.fit_images_ = [
            f"<array {i}>" if isinstance(p, np.ndarray) else str(p)
            for i, p in enumerate(fit_images)
        ]
        return self.calibrate(val, progress=progress)

    def calibrate(
        self, val_images: str | Path | Sequence[ImageInput], progress: bool = False
    ) -> Detector:
        """Set the thresholds from normal validation images (what `fit` ends with): e.g. after
        changing how the fitted method scores, or on new normal images of the same line."""
        # Only each validation image's score and map peak are kept, not its map.
        peaks = [
            (p.score, float(p.anomaly_map.max()))
            for p in self.iter_predict(
                resolve_images(val_images), progress=progress, desc="validate"
            )
        ]
        self.thresholds_ = self._thresholds_from(peaks)
        return self

    def set_threshold(self, image: float, pixel: float | None = None) -> Detector:
        """Set the image threshold by hand (a quality engineer's choice, e.g. after trying it
        on the service's what-if slider); marked `manual` in the saved model. The pixel
        threshold follows as `Thresholds.set_by_hand` says. `calibrate` returns to thresholds
        from normal images."""
        if self.thresholds_ is None:
            raise ParameterError("fit or calibrate the detector before setting its threshold")
        self.thresholds_ = self.thresholds_.set_by_hand(image, pixel)
        return self

    def _thresholds_from(self, scores_and_peaks: list[tuple[float, float]]) -> Thresholds:
        if not scores_and_peaks:
            raise DataError("no validation image could be scored; the threshold needs some")
        scores = np.array([s for s, _ in scores_and_peaks])
        image = from_normal_scores(scores, self.target_far)
        peaks = np.array([p for _, p in scores_and_peaks])
        pixel = from_normal_scores(peaks, self.target_far).image
        return Thresholds(**{**image.to_dict(), "pixel": pixel})

    # -- inference -------------------------------------------------------------------------
    def score_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Smoothed maps (B, S, S) and the method's own image scores (or None) for a batch of
        preprocessed images (B, 3, S, S) float32 in [0, 1], as `data.loader` makes them."""
        raw, scores = self.raw_scores(images)
        size = (self.image_size, self.image_size)
        return resample(raw, size, self.image_size, self.sigma), scores

    def _raw_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The method's raw maps (B, h, w) and own scores. Not under no_grad: a method may
        need autograd (DifferNet's gradient maps); the others disable it themselves."""
        if not self.model_.is_fitted:
            raise DefectLensError("the detector is not fitted: call fit() or load a model")
        output = self.model_(self.ensure_extractor(), images)
        scores = None if output.scores is None else output.scores.detach()
        return output.maps.detach().float(), scores

    def check_before_scoring(self) -> None:
        super().check_before_scoring()
        if self.model_.is_fitted:  # a setting changed since the fit: said now, not mid-batch
            self.check_unchanged()

    def raw_scores(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The raw scorer `Predictor.iter_predict` drives: numpy in, numpy out."""
        raw, scores = self._raw_maps(torch.from_numpy(images))
        return raw.numpy(), None if scores is None else scores.float().numpy()

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path, protect: Sequence[str | Path] = ()) -> Path:
        """Write config.json + model.safetensors to `path` atomically. An existing folder is
        replaced only if it is a defectlens model; `protect` names data folders to refuse."""
        from defectlens.io import save_detector

        return save_detector(self, path, tuple(protect))

    @classmethod
    def load(
        cls, path: str | Path, weights: str | None = None, backend: str | None = None
    ) -> Detector:
        from defectlens.io import load_detector

        return load_detector(path, weights=weights, backend=backend)
