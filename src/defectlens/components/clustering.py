"""Seeded k-means on feature vectors, and the soft assignment of vectors to its centres: a
label-free segmentation of backbone maps (what segmentation-aided detection uses as an
industrial image's structure when it works on features)."""

from __future__ import annotations

import torch


def kmeans(
    vectors: torch.Tensor, k: int, iterations: int = 25, seed: int = 0, sample: int = 50_000
) -> torch.Tensor:
    """Centres (k, d) of `vectors` (N, d) by Lloyd's algorithm, deterministic for a seed.

    At most `sample` vectors (a seeded random subset) are clustered: the centres of a 32 x 32
    grid over a few hundred images do not need all of its positions. Initialised by k-means++
    (each next centre drawn with probability proportional to the squared distance to the
    nearest one so far), which avoids the empty or duplicated clusters that a plain random
    start gives on features with a few dominant modes; a cluster that still empties keeps its
    centre."""
    if vectors.ndim != 2 or len(vectors) < k:
        raise ValueError(f"k-means needs at least k={k} vectors (N, d), got {tuple(vectors.shape)}")
    generator = torch.Generator().manual_seed(seed)
    x = vectors.detach().float().cpu()
    if len(x) > sample:
        x = x[torch.randperm(len(x), generator=generator)[:sample]]
    centres = x[torch.randint(len(x), (1,), generator=generator)]
    nearest = torch.cdist(x, centres).squeeze(1).pow(2)
    for _ in range(1, k):
        weights = nearest if float(nearest.sum()) > 0 else torch.ones_like(nearest)
        pick = torch.multinomial(weights, 1, generator=generator)
        centres = torch.cat([centres, x[pick]])
        nearest = torch.minimum(nearest, torch.cdist(x, x[pick]).squeeze(1).pow(2))
    for _ in range(iterations):
        labels = torch.cdist(x, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).unsqueeze(1)
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        if torch.equal(moved, centres):
            break
        centres = moved
    return centres


def assignment_temperature(vectors: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """The mean squared distance of the vectors (N, d) to their nearest centre: the scale at
    which `soft_assignment` tells clusters apart (a 0-dim tensor)."""
    return torch.cdist(vectors.float(), centres.float()).min(dim=1).values.pow(2).mean()


def soft_assignment(
    maps: torch.Tensor, centres: torch.Tensor, temperature: torch.Tensor
) -> torch.Tensor:
    """Maps (B, d, h, w) -> each position's membership of every cluster (B, k, h, w), a
    softmax of minus the squared distances over `temperature`: differentiable, so a network
    can be trained to produce features with the right segmentation."""
    b, d, h, w = maps.shape
    flat = maps.permute(0, 2, 3, 1).reshape(-1, d)
    squared = (
        flat.pow(2).sum(dim=1, keepdim=True)
        - 2 * flat @ centres.T
        + centres.pow(2).sum(dim=1).unsqueeze(0)
    )
    weights = torch.softmax(-squared.clamp_min(0) / temperature, dim=1)
    return weights.reshape(b, h, w, -1).permute(0, 3, 1, 2)
