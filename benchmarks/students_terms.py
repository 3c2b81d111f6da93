"""Which part of Uninformed Students' score localises: one fitted Students model (defaults),
its test maps recomputed from each scale alone and from each term alone (regression error,
predictive variance), no refit (issue 11's pixel target).

    python benchmarks/students_terms.py ../shared/data/kolektorsdd --model DIR

`--model`: where the fitted model is saved (fitted there first if it is not a model yet).
One JSON line per variant: image / pixel AUROC and AUPRO on the whole test split.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from defectlens.methods.students import mean_of_scales

sys.path.insert(0, str(Path(__file__).parent))
from bench import terms_main

# label -> (scales kept (None: all), error weight, variance weight)
VARIANTS = {
    "as fitted (no change)": None,
    "every scale, error + variance (this script's copy of the rule)": (None, 1.0, 1.0),
    "17 px only": ([0], 1.0, 1.0),
    "65 px only": ([1], 1.0, 1.0),
    "error only": (None, 1.0, 0.0),
    "variance only": (None, 0.0, 1.0),
}


def scorer(method, scales, error_weight, variance_weight):
    """`Students.score` with some scales or terms left out."""

    def score(*x: torch.Tensor):
        maps = method.scale_maps(x[0], x[1:], error_weight, variance_weight)
        return mean_of_scales(
            [m for k, m in enumerate(maps) if scales is None or k in scales]
        ), None

    return score


if __name__ == "__main__":
    terms_main(__doc__, "students", VARIANTS, scorer)
