"""Choosing a trained network's epoch by how well it finds synthetic defects on normal
validation images, for self-supervised methods whose own loss says little about detection.

Patch SVDD is the case in point: on a near-uniform texture its position classifier stays at
chance for the whole CPU budget, and the loss that is lowest there can belong to embeddings
that have drawn together -- with PyTorch's default initialisation, choosing the epoch by that
loss kept a network at chance (kolektorsdd: image AUROC 0.52 after training, 0.74 after one
epoch). The check pastes one of the project's synthetic defects (`data.synthetic`) on each of
a few normal validation images and asks the network's maps to find them; nothing of the test
set is used. It is Patch SVDD's `select_by=synthetic` option, not its default: once the
encoder was He-initialised, the loss chose as well or better on the dev sets (BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from defectlens.data.synthetic import DEFECTS, with_synthetic_defects
from defectlens.metrics import auroc


class SyntheticCheck:
    """At most `max_images` normal images (B, 3, S, S) in [0, 1], each as it is and with one
    seeded synthetic defect of `kinds`: `images` (2B, 3, S, S), and `measure` for their maps."""

    def __init__(
        self,
        images: torch.Tensor,
        seed: int,
        kinds: Sequence[str] = DEFECTS,
        max_images: int = 16,
    ) -> None:
        chosen = images[:max_images].cpu().float().numpy()
        pasted, masks = with_synthetic_defects(chosen, np.random.default_rng(seed), kinds)
        self.images = torch.from_numpy(pasted)
        self.masks = torch.from_numpy(masks) > 0.5
        self.labels = np.r_[np.zeros(len(chosen)), np.ones(len(chosen))]

    def measure(self, maps: torch.Tensor) -> float:
        """Anomaly maps (2B, h, w) of `images`, on any grid -> the mean of the image AUROC
        (each map's maximum) and the pixel AUROC (maps resized bilinearly to the masks):
        1 when every defect scores above every normal image and pixel."""
        maps = maps.detach().float().cpu()
        image = auroc(maps.flatten(1).max(dim=1).values.numpy(), self.labels)
        full = F.interpolate(maps[:, None], size=self.masks.shape[-2:], mode="bilinear")
        pixel = auroc(full.numpy().ravel(), self.masks.numpy().ravel())
        return 0.5 * (image + pixel)
