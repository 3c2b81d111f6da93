"""A bank of feature vectors with nearest-neighbour search: the part SPADE and PatchCore share.

Strategies are injected objects, so a variant is a new small class, not an `if`:
- a *sampler* chooses which vectors to keep (`IdentitySampler`, `GreedyCoresetSampler`),
- an *index* answers nearest-neighbour queries (`ExactIndex`, `IVFIndex`, `HNSWIndex`; all
  faiss). Exact search is the default; the approximate ones trade a little recall for speed on
  large banks.

Saving: the vectors go to safetensors as they are; an approximate index is serialised by faiss
itself into a uint8 tensor, so a loaded bank answers exactly as the saved one did (a rebuilt IVF
index could cluster differently). Nothing is pickled.
"""

from __future__ import annotations

import math
from typing import ClassVar

import faiss
import numpy as np
import torch

from defectlens.errors import ModelFileError


class NearestNeighbourIndex:
    """Base: `build` on vectors (N, d), `search` queries (Q, d) -> (distances, indices)."""

    name: ClassVar[str]
    REGISTRY: ClassVar[dict[str, type[NearestNeighbourIndex]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        NearestNeighbourIndex.REGISTRY[cls.name] = cls

    def __init__(self) -> None:
        self.index: faiss.Index | None = None

    def build(self, vectors: np.ndarray) -> None:
        raise NotImplementedError

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distances (not squared) and indices of the k nearest vectors."""
        distances, indices = self.index.search(np.ascontiguousarray(queries, np.float32), k)
        return np.sqrt(np.maximum(distances, 0.0)), indices

    def serialise(self) -> np.ndarray:
        """Bytes to store; empty when `build` reproduces the index exactly from the vectors."""
        return np.zeros(0, np.uint8)

    def restore(self, vectors: np.ndarray, blob: np.ndarray) -> None:
        if blob.size == 0:
            self.build(vectors)
        else:
            self.index = faiss.deserialize_index(blob)


class ExactIndex(NearestNeighbourIndex):
    """Brute-force L2 search: exact, and fast enough for banks up to ~10^5 vectors on a CPU."""

    name = "exact"

    def build(self, vectors: np.ndarray) -> None:
        self.index = faiss.IndexFlatL2(vectors.shape[1])
        self.index.add(np.ascontiguousarray(vectors, np.float32))


class IVFIndex(NearestNeighbourIndex):
    """Inverted file: k-means cells, only `nprobe` cells are searched per query."""

    name = "ivf"

    def __init__(self, nprobe: int = 8) -> None:
        super().__init__()
        self.nprobe = nprobe

    def build(self, vectors: np.ndarray) -> None:
        n, d = vectors.shape
        cells = max(1, min(int(4 * math.sqrt(n)), n // 39))  # faiss wants >= 39 points per cell
        quantizer = faiss.IndexFlatL2(d)
        self.index = faiss.IndexIVFFlat(quantizer, d, cells)
        self.index.cp.seed = 0
        data = np.ascontiguousarray(vectors, np.float32)
        self.index.train(data)
        self.index.add(data)
        self.index.nprobe = self.nprobe

    def serialise(self) -> np.ndarray:
        return faiss.serialize_index(self.index)

    def restore(self, vectors: np.ndarray, blob: np.ndarray) -> None:
        super().restore(vectors, blob)
        self.index.nprobe = self.nprobe


class HNSWIndex(NearestNeighbourIndex):
    """Hierarchical navigable small-world graph: sub-linear query time, no training."""

    name = "hnsw"

    def __init__(self, neighbours: int = 32, ef_search: int = 64) -> None:
        super().__init__()
        self.neighbours = neighbours
        self.ef_search = ef_search

    def build(self, vectors: np.ndarray) -> None:
        self.index = faiss.IndexHNSWFlat(vectors.shape[1], self.neighbours)
        self.index.add(np.ascontiguousarray(vectors, np.float32))
        self.index.hnsw.efSearch = self.ef_search

    def serialise(self) -> np.ndarray:
        return faiss.serialize_index(self.index)

    def restore(self, vectors: np.ndarray, blob: np.ndarray) -> None:
        super().restore(vectors, blob)
        self.index.hnsw.efSearch = self.ef_search


def make_index(name: str) -> NearestNeighbourIndex:
    try:
        return NearestNeighbourIndex.REGISTRY[name]()
    except KeyError:
        choices = ", ".join(sorted(NearestNeighbourIndex.REGISTRY))
        raise ValueError(f"unknown index {name!r}; choose one of: {choices}") from None


class IdentitySampler:
    """Keep every vector."""

    def select(self, vectors: torch.Tensor) -> torch.Tensor:
        return torch.arange(vectors.shape[0])


class GreedyCoresetSampler:
    """Greedy k-centre coreset (PatchCore), on a seeded Gaussian random projection of the vectors.

    The classic loop updates every point's distance to the coreset after each new centre:
    O(N x k x d), hours on a CPU for a 10 % coreset of ~10^6 patches. Here points are kept in the
    cluster of their nearest centre, with the cluster's radius; by the triangle inequality a new
    centre c can only come closer to points of a cluster j when |c - centre_j| < 2 radius_j, so
    only those clusters are visited. The selection is the same as the classic loop's (exact greedy
    on the projected vectors, first centre drawn at random), and never needs an N x N matrix.
    """

    def __init__(self, ratio: float, projection_dim: int | None = 128, seed: int = 0) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"coreset ratio must be in (0, 1], not {ratio}")
        self.ratio = ratio
        self.projection_dim = projection_dim
        self.seed = seed

    def target_size(self, n: int) -> int:
        return max(1, min(n, math.ceil(self.ratio * n)))

    def project(self, vectors: torch.Tensor) -> np.ndarray:
        d = vectors.shape[1]
        if self.projection_dim is None or self.projection_dim >= d:
            return vectors.float().numpy()
        generator = torch.Generator().manual_seed(self.seed)
        matrix = torch.randn(d, self.projection_dim, generator=generator) / math.sqrt(
            self.projection_dim
        )
        return (vectors.float() @ matrix).numpy()

    def select(self, vectors: torch.Tensor, progress=None) -> torch.Tensor:
        n = vectors.shape[0]
        k = self.target_size(n)
        if k == n:
            return torch.arange(n)
        x = self.project(vectors)
        rng = np.random.default_rng(self.seed)
        first = int(rng.integers(n))
        centres = [first]
        centre_vectors = np.empty((k, x.shape[1]), np.float32)
        centre_vectors[0] = x[first]
        mind = np.sqrt(((x - x[first]) ** 2).sum(axis=1))  # distance to nearest centre
        members = [np.arange(n)]  # points of each cluster
        radius = [float(mind.max())]
        far = [int(mind.argmax())]  # farthest point of each cluster
        radii = np.full(k, -1.0)
        radii[0] = radius[0]
        for step in range(1, k):
            j_best = int(radii[:step].argmax())
            c = far[j_best]
            cv = x[c]
            centre_vectors[step] = cv
            centres.append(c)
            gaps = np.sqrt(((centre_vectors[:step] - cv) ** 2).sum(axis=1))
            near = np.flatnonzero(gaps < 2.0 * radii[:step])
            captured = []
            for j in near.tolist():
                idx = members[j]
                d = np.sqrt(((x[idx] - cv) ** 2).sum(axis=1))
                moved = d < mind[idx]
                if not moved.any():
                    continue
                mind[idx[moved]] = d[moved]
                captured.append(idx[moved])
                keep = idx[~moved]
                members[j] = keep
                if keep.size:
                    arg = int(mind[keep].argmax())
                    far[j], radii[j] = int(keep[arg]), float(mind[keep[arg]])
                else:
                    far[j], radii[j] = -1, -1.0
            new = np.concatenate(captured) if captured else np.array([c])
            members.append(new)
            arg = int(mind[new].argmax())
            far.append(int(new[arg]))
            radii[step] = float(mind[new[arg]])
            if progress is not None:
                progress(1)
        return torch.tensor(centres)


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

    def index_blob(self) -> torch.Tensor:
        """The index's own serialisation as uint8 (empty for indices rebuilt from vectors)."""
        return torch.from_numpy(np.asarray(self.index.serialise(), np.uint8).copy())

    @classmethod
    def restore(
        cls, vectors: torch.Tensor, blob: torch.Tensor, index: NearestNeighbourIndex
    ) -> MemoryBank:
        bank = cls.__new__(cls)
        bank.vectors = vectors.float().contiguous()
        bank.index = index
        try:
            index.restore(bank.vectors.numpy(), blob.numpy())
        except RuntimeError as exc:  # faiss reports a corrupt blob this way
            raise ModelFileError(f"cannot restore the nearest-neighbour index: {exc}") from None
        return bank
