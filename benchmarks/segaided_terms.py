"""Which part of segaided's score finds the defects: one fitted model (defaults: backbone
features, k-means clusters as the structure), its test maps recomputed from the input
difference alone and from the structure (cluster membership) difference alone, no refit.

    python benchmarks/segaided_terms.py ../shared/data/kolektorsdd --model DIR

`--model`: where the fitted model is saved (fitted there first with the defaults if it is not
a model yet). One JSON line per variant: image / pixel AUROC and AUPRO on the whole test split.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import terms_main

# label -> (weight of the standardised input difference, of the structure difference)
VARIANTS = {
    "as fitted (no change)": None,
    "input + structure (this script's copy of the rule)": (1.0, 1.0),
    "input difference only": (1.0, 0.0),
    "structure difference only": (0.0, 1.0),
}


def scorer(method, input_weight: float, structure_weight: float):
    """`SegAided.score` with the two standardised terms weighted."""

    def score(*x: torch.Tensor):
        image, structure = method.differences(x[0])
        (i_mean, i_std), (s_mean, s_std) = method.difference_stats
        maps = input_weight * (image - i_mean) / i_std
        maps = maps + structure_weight * (structure - s_mean) / s_std
        return maps, maps.mean(dim=(1, 2)) if method.image_score == "mean" else None

    return score


if __name__ == "__main__":
    terms_main(__doc__, "segaided", VARIANTS, scorer)
