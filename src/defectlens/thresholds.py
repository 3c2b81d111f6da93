"""Decision thresholds from normal images only.

The image threshold is the (1 - target false-alarm rate) quantile of the anomaly scores of
normal validation images that the model did not fit on ("higher" interpolation, so at most that
fraction of validation images lies strictly above it). Its resolution is 1 / n_validation: with
25 validation images, any target below 4 % means "the highest validation score".

The pixel threshold equals the image threshold. Since the image score is the maximum of the
smoothed map, this makes the two decisions consistent: an image is flagged exactly when its
predicted mask is non-empty, and a good verdict never comes with a defect outline.
Test labels are never used.

A quality engineer may still choose a threshold by hand (`Detector.set_threshold`, `defectlens
threshold --value`), e.g. after trying one on the service's what-if slider; it is then marked
`manual`, and `target_far` no longer describes it. The validation statistics stay, so the
choice can be compared with the normal images' highest score.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from defectlens.errors import ParameterError
from defectlens.params import check_bool, check_float, check_int


@dataclass(frozen=True)
class Thresholds:
    image: float
    pixel: float
    target_far: float
    n_validation: int
    validation_max: float
    validation_median: float
    manual: bool = False  # set by hand, not the target_far quantile (optional when read)

    def to_dict(self) -> dict:
        return asdict(self)

    def set_by_hand(self, image: float, pixel: float | None = None) -> Thresholds:
        """These thresholds with the image one set to `image`, marked manual. The pixel
        threshold is `pixel` if given; else it moves with the image one where the two were
        equal (methods scored by their map's maximum, so a flagged image keeps its outline),
        and stays where the method's image score is on its own scale."""
        image = check_float("image threshold", image)
        if pixel is None:
            pixel = image if self.pixel == self.image else self.pixel
        pixel = check_float("pixel threshold", pixel)
        return replace(self, image=image, pixel=pixel, manual=True)

    @classmethod
    def from_dict(cls, raw: object) -> Thresholds:
        """Thresholds read back from a model's or an export's config.json, every key and value
        checked (ParameterError naming the first problem)."""
        if not isinstance(raw, dict):
            raise ParameterError("thresholds must be an object")
        fields = set(cls.__dataclass_fields__)
        optional = {"manual"}  # models saved before it existed
        missing = fields - set(raw) - optional
        for problem, keys in (("unknown", set(raw) - fields), ("missing", missing)):
            if keys:
                raise ParameterError(f"{problem} key thresholds.{sorted(keys)[0]!r}")
        values = {
            k: check_float(f"thresholds.{k}", raw[k])
            for k in ("image", "pixel", "validation_max", "validation_median")
        }
        values["target_far"] = check_float("thresholds.target_far", raw["target_far"], 0.0, 1.0)
        values["n_validation"] = check_int("thresholds.n_validation", raw["n_validation"], 1)
        values["manual"] = check_bool("thresholds.manual", raw.get("manual", False))
        return cls(**values)


def from_normal_scores(scores: np.ndarray, target_far: float) -> Thresholds:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise ValueError("need at least one normal validation score")
    if not 0.0 <= target_far < 1.0:
        raise ValueError("target false-alarm rate must be in [0, 1)")
    value = float(np.quantile(scores, 1.0 - target_far, method="higher"))
    return Thresholds(
        image=value,
        pixel=value,
        target_far=target_far,
        n_validation=int(scores.size),
        validation_max=float(scores.max()),
        validation_median=float(np.median(scores)),
    )
