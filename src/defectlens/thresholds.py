"""Decision thresholds from normal images only.

The image threshold is the (1 - target false-alarm rate) quantile of the anomaly scores of
normal validation images that the model did not fit on ("higher" interpolation, so at most that
fraction of validation images lies strictly above it). Its resolution is 1 / n_validation: with
25 validation images, any target below 4 % means "the highest validation score".

The pixel threshold equals the image threshold. Since the image score is the maximum of the
smoothed map, this makes the two decisions consistent: an image is flagged exactly when its
predicted mask is non-empty, and a good verdict never comes with a defect outline.
Test labels are never used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from defectlens.errors import ParameterError
from defectlens.params import check_float, check_int


@dataclass(frozen=True)
class Thresholds:
    image: float
    pixel: float
    target_far: float
    n_validation: int
    validation_max: float
    validation_median: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: object) -> Thresholds:
        """Thresholds read back from a model's or an export's config.json, every key and value
        checked (ParameterError naming the first problem)."""
        if not isinstance(raw, dict):
            raise ParameterError("thresholds must be an object")
        fields = set(cls.__dataclass_fields__)
        for problem, keys in (("unknown", set(raw) - fields), ("missing", fields - set(raw))):
            if keys:
                raise ParameterError(f"{problem} key thresholds.{sorted(keys)[0]!r}")
        values = {
            k: check_float(f"thresholds.{k}", raw[k])
            for k in ("image", "pixel", "validation_max", "validation_median")
        }
        values["target_far"] = check_float("thresholds.target_far", raw["target_far"], 0.0, 1.0)
        values["n_validation"] = check_int("thresholds.n_validation", raw["n_validation"], 1)
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
