"""PatchCore feature choices, scored with a full memory bank (no coreset) for speed of trial.

    python benchmarks/patchcore_ablation.py ../shared/data/kolektorsdd

Prints the image AUROC (max nearest-neighbour distance over patches) for: zero-padded vs
border-renormalised 3 x 3 averaging, and for no channel projection vs `embed_dim` 128 / 256.
"""

from __future__ import annotations

import sys

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from defectlens.backbones import build_extractor
from defectlens.data import find_normal_images, find_test_samples
from defectlens.data.loader import iter_batches
from defectlens.methods.patchcore import PatchCore
from defectlens.metrics import auroc


def main(root: str) -> None:
    torch.set_num_threads(2)
    extractor = build_extractor("efficientnet_lite0", [8, 16], 256)
    train = find_normal_images(root)
    test = find_test_samples(root)
    labels = np.array([s.label for s in test])

    def image_auroc(embed) -> float:
        bank = torch.cat([embed(torch.from_numpy(b.images)) for b in iter_batches(train, 256, 32)])
        queries = torch.cat(
            [
                embed(torch.from_numpy(b.images))
                for b in iter_batches([s.path for s in test], 256, 32)
            ]
        )
        d = bank.shape[-1]
        index = faiss.IndexFlatL2(d)
        index.add(bank.reshape(-1, d).numpy())
        distances, _ = index.search(queries.reshape(-1, d).numpy(), 1)
        return auroc(np.sqrt(distances).reshape(len(test), -1).max(axis=1), labels)

    def padded(include_pad: bool):
        def embed(images):
            parts = []
            for f in extractor.fast(images):
                f = F.avg_pool2d(f, 3, 1, 1, count_include_pad=include_pad)
                parts.append(F.interpolate(f, size=(32, 32), mode="bilinear", align_corners=False))
            return torch.cat(parts, 1).permute(0, 2, 3, 1)

        return embed

    for include_pad in (True, False):
        print(
            f"count_include_pad={include_pad}: image AUROC {image_auroc(padded(include_pad)):.4f}"
        )
    for embed_dim in (None, 128, 256):
        method = PatchCore(embed_dim=embed_dim)
        score = image_auroc(lambda images, m=method: m.embed(extractor, images))
        print(f"embed_dim={embed_dim}: image AUROC {score:.4f}")


if __name__ == "__main__":
    main(sys.argv[1])
