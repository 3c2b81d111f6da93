"""A bank of feature vectors: the coreset sampler that chooses them (PatchCore) and a torch-side
wrapper that searches them with an index from `components.knn`.

Strategies are injected objects, so a variant is a new small class, not an `if`:
- a *sampler* chooses which vectors to keep (`GreedyCoresetSampler`; ratio 1 keeps all),
- an *index* answers nearest-neighbour queries (`components.knn`: exact, IVF, HNSW).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from defectlens.components.knn import ExactIndex, NearestNeighbourIndex


class GreedyCoresetSampler:
    """Greedy k-centre coreset (PatchCore), on a seeded Gaussian random projection of the vectors.

    The classic loop updates every point's distance to the coreset after each new centre: N x d
    memory traffic per centre, hours on a CPU for a 10 % coreset of ~10^6 patches. Here centres
    are chosen in rounds, with the same result as the classic loop:

    - a round takes the R points farthest from the coreset as candidates; every other point is
      at most tau (the (R+1)-th largest distance) away, and distances only shrink;
    - inside the round, the farthest candidate is picked and the candidates' distances are
      updated, which is the classic step as long as that candidate is at least tau away (then
      no point outside the candidates can be farther); the round ends when that fails;
    - all points are then updated with the round's new centres at once, one matrix product.

    No N x N matrix is ever formed; memory is N x (round size).
    """

    def __init__(
        self,
        ratio: float,
        projection_dim: int | None = 128,
        seed: int = 0,
        candidates: int = 2048,
        max_round: int = 256,
    ) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"coreset ratio must be in (0, 1], not {ratio}")
        self.ratio = ratio
        self.projection_dim = projection_dim
        self.seed = seed
        self.candidates = candidates
        self.max_round = max_round

    def target_size(self, n: int) -> int:
        return max(1, min(n, math.ceil(self.ratio * n)))

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        d = vectors.shape[1]
        if self.projection_dim is None or self.projection_dim >= d:
            return vectors.float()
        generator = torch.Generator().manual_seed(self.seed)
        scale = 1.0 / math.sqrt(self.projection_dim)
        matrix = torch.randn(d, self.projection_dim, generator=generator) * scale
        return vectors.float() @ matrix

    def select(self, vectors: torch.Tensor, progress=None) -> torch.Tensor:
        n = vectors.shape[0]
        k = self.target_size(n)
        if k == n:
            return torch.arange(n)
        x = self.project(vectors).contiguous()
        sq = x.pow(2).sum(dim=1)
        first = int(np.random.default_rng(self.seed).integers(n))
        chosen = [first]
        mind = _distances(x, sq, x[first : first + 1]).squeeze(1)  # distance to the coreset
        while len(chosen) < k:
            r = min(self.candidates, n - 1)
            top = torch.topk(mind, r + 1)
            tau = float(top.values[-1])
            cand = top.indices[:r].numpy()
            # The inner loop is many tiny steps: numpy's per-call overhead is lower than torch's.
            cand_x, cand_sq = x[cand].numpy(), sq[cand].numpy()
            cand_d = top.values[:r].numpy().copy()
            picked: list[int] = []
            while len(chosen) + len(picked) < k and len(picked) < self.max_round:
                best = int(cand_d.argmax())
                if picked and cand_d[best] < tau:
                    break  # a point outside the candidates might now be the farthest
                picked.append(int(cand[best]))
                c = cand_x[best]
                d2 = cand_sq - 2.0 * (cand_x @ c) + cand_sq[best]
                np.minimum(cand_d, np.sqrt(np.maximum(d2, 0.0)), out=cand_d)
            centres = x[picked]
            mind = torch.minimum(mind, _distances(x, sq, centres).min(dim=1).values)
            chosen.extend(picked)
            if progress is not None:
                progress(len(picked))
        return torch.tensor(chosen[:k])


def _distances(x: torch.Tensor, sq: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (N, M) from x (N, d) (squared norms sq) to centres (M, d)."""
    d2 = sq.unsqueeze(1) - 2.0 * (x @ centres.T) + centres.pow(2).sum(dim=1)
    return d2.clamp_min_(0.0).sqrt_()


class MemoryBank:
    """Vectors (N, d) plus a nearest-neighbour index over them."""

    def __init__(self, vectors: torch.Tensor, index: NearestNeighbourIndex | None = None) -> None:
        self.vectors = vectors.float().contiguous()
        self.index = index or ExactIndex()
        self.index.build(self.vectors.numpy())

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean distances and indices (Q, k) of the k nearest vectors (k capped at N)."""
        k = min(k, len(self))
        distances, indices = self.index.search(queries.float().numpy(), k)
        return torch.from_numpy(distances), torch.from_numpy(indices)
