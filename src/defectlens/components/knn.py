"""Nearest-neighbour search over a bank of feature vectors, and the anomaly scores built on it;
numpy and faiss only (no torch), so the deployment runtime scores exactly as the methods do.

Indices are injected strategy objects, chosen by name (`make_index`): `ExactIndex`, `IVFIndex`,
`HNSWIndex`. Saving: only the vectors are saved; every index is rebuilt from them at load.
Deserialising faiss's own index bytes would hand a parser written in C++ whatever a model file
contains: a checksum beside them catches corruption, not a crafted file. Rebuilding costs seconds
(about 5 s for a 64k x 152 bank on 2 cores) and gives the same answers, because every build is
deterministic: IVF trains its k-means on a seeded sample with a fixed seed, and the HNSW graph
is built on one thread (faiss inserts in parallel otherwise, and the graph then depends on thread
timing). Nothing is pickled.

`patch_scores` (PatchCore) and `gallery_scores` (SPADE) are the scoring steps after feature
extraction: the methods call them on their features, and an exported model on its graph's.
"""

from __future__ import annotations

import math
from typing import ClassVar

import faiss
import numpy as np


class NearestNeighbourIndex:
    """Base: `build` on vectors (N, d), `search` queries (Q, d) -> (distances, indices).

    An approximate index (`exact` False) also keeps a brute-force index over the same vectors
    for `exact_search`: the few queries whose exact answer decides a score are re-searched.
    """

    name: ClassVar[str]
    exact: ClassVar[bool] = False
    REGISTRY: ClassVar[dict[str, type[NearestNeighbourIndex]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        NearestNeighbourIndex.REGISTRY[cls.name] = cls

    def __init__(self) -> None:
        self.index: faiss.Index | None = None
        self.flat: faiss.Index | None = None

    def build(self, vectors: np.ndarray) -> None:
        raise NotImplementedError

    def _build_flat(self, vectors: np.ndarray) -> faiss.Index:
        flat = faiss.IndexFlatL2(vectors.shape[1])
        flat.add(np.ascontiguousarray(vectors, np.float32))
        return flat

    def exact_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """As `search`, but exact whatever the index."""
        flat = self.index if self.exact else self.flat
        distances, indices = flat.search(np.ascontiguousarray(queries, np.float32), k)
        return np.sqrt(np.maximum(distances, 0.0)), indices

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distances (not squared) and indices of the k nearest vectors."""
        distances, indices = self.index.search(np.ascontiguousarray(queries, np.float32), k)
        return np.sqrt(np.maximum(distances, 0.0)), indices


class ExactIndex(NearestNeighbourIndex):
    """Brute-force L2 search: exact, and fast enough for banks up to ~10^5 vectors on a CPU."""

    name = "exact"
    exact = True

    def build(self, vectors: np.ndarray) -> None:
        self.index = self._build_flat(vectors)


class IVFIndex(NearestNeighbourIndex):
    """Inverted file: k-means cells, only `nprobe` cells are searched per query."""

    name = "ivf"

    def __init__(self, nprobe: int = 8) -> None:
        super().__init__()
        self.nprobe = nprobe

    def build(self, vectors: np.ndarray) -> None:
        n, d = vectors.shape
        # ~4 sqrt(N) cells (faiss wants >= 39 training points per cell), at most 1024, trained
        # on a seeded sample of <= 64 points per cell so that building stays in seconds.
        cells = max(1, min(int(4 * math.sqrt(n)), n // 39, 1024))
        if cells == 1:  # too few vectors to cluster: one cell is an exact search anyway
            self.index = self.flat = self._build_flat(vectors)
            return
        quantizer = faiss.IndexFlatL2(d)
        self.index = faiss.IndexIVFFlat(quantizer, d, cells)
        self.index.cp.seed = 0
        data = np.ascontiguousarray(vectors, np.float32)
        sample = np.random.default_rng(0).permutation(n)[: 64 * cells]
        self.index.train(data[np.sort(sample)])
        self.index.add(data)
        self.index.nprobe = self.nprobe
        self.flat = self._build_flat(data)


class HNSWIndex(NearestNeighbourIndex):
    """Hierarchical navigable small-world graph: sub-linear query time, no training."""

    name = "hnsw"

    def __init__(self, neighbours: int = 32, ef_search: int = 64) -> None:
        super().__init__()
        self.neighbours = neighbours
        self.ef_search = ef_search

    def build(self, vectors: np.ndarray) -> None:
        self.index = faiss.IndexHNSWFlat(vectors.shape[1], self.neighbours)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # a parallel insertion order makes the graph vary
        try:
            self.index.add(np.ascontiguousarray(vectors, np.float32))
        finally:
            faiss.omp_set_num_threads(threads)
        self.index.hnsw.efSearch = self.ef_search
        self.flat = self._build_flat(vectors)


def index_names() -> list[str]:
    return sorted(NearestNeighbourIndex.REGISTRY)


def make_index(name: str) -> NearestNeighbourIndex:
    try:
        return NearestNeighbourIndex.REGISTRY[name]()
    except KeyError:
        choices = ", ".join(sorted(NearestNeighbourIndex.REGISTRY))
        raise ValueError(f"unknown index {name!r}; choose one of: {choices}") from None


def patch_scores(
    index: NearestNeighbourIndex, bank: np.ndarray, patches: np.ndarray, num_neighbors: int
) -> tuple[np.ndarray, np.ndarray]:
    """PatchCore scoring of patch features (B, P, d) against `bank` (N, d) searched by `index`:
    per-patch distances to the nearest bank vector (B, P), and image scores (B,) = the largest
    patch distance s* re-weighted by how isolated its nearest bank vector m* is,
    s = (1 - softmax over m*'s bank neighbourhood) * s* (the paper's Eq. 7).

    With an approximate index the image scores are still exact (`_refine_maxima`); only the
    other patches' distances in the map may be slightly too large.
    """
    b, p, d = patches.shape
    distances, nearest = index.search(patches.reshape(-1, d), 1)
    maps = distances.reshape(b, p).astype(np.float32)
    nearest = nearest.reshape(b, p)
    if not index.exact:
        _refine_maxima(index, patches, maps, nearest)
    rows = np.arange(b)
    worst = maps.argmax(axis=1)
    s_star = maps[rows, worst]
    k = min(num_neighbors, bank.shape[0])
    if k <= 1:
        return maps, s_star
    _, support = index.exact_search(bank[nearest[rows, worst]], k)  # m* itself first
    test_patch = patches[rows, worst][:, None, :].astype(np.float32)
    spread = np.linalg.norm(test_patch - bank[support], axis=-1).astype(np.float64)
    spread -= spread.max(axis=1, keepdims=True)
    weights = np.exp(spread)
    weight = 1.0 - weights[:, 0] / weights.sum(axis=1)
    return maps, (weight * s_star).astype(np.float32)


def _refine_maxima(
    index: NearestNeighbourIndex,
    patches: np.ndarray,
    maps: np.ndarray,
    nearest: np.ndarray,
    chunk: int = 16,
) -> None:
    """Make each image's largest patch distance (and its nearest vector) exact, in place.

    An approximate index returns a real bank vector, so its distance is never below the true
    nearest distance. Patches are re-searched exactly in decreasing order of approximate
    distance until the next approximate distance is no larger than the largest exact one found:
    no patch left can then exceed it. Typically one chunk per image.
    """
    for i in range(maps.shape[0]):
        order = np.argsort(-maps[i], kind="stable")
        best = -np.inf
        for start in range(0, len(order), chunk):
            todo = order[start : start + chunk]
            if maps[i, todo[0]] <= best:
                break
            distances, found = index.exact_search(patches[i, todo], 1)
            maps[i, todo] = distances[:, 0]
            nearest[i, todo] = found[:, 0]
            best = max(best, float(distances.max()))


def gallery_scores(
    image_index: NearestNeighbourIndex,
    pixel_features: np.ndarray,
    pooled: np.ndarray,
    pyramid: np.ndarray,
    k_images: int,
    k_pixels: int,
) -> tuple[np.ndarray, np.ndarray]:
    """SPADE scoring: image scores (B,) = mean distance of the pooled features (B, C) to their
    k_images nearest training images (`image_index`); per-position scores (B, P) = mean
    distance of each position of `pyramid` (B, P, C) to its k_pixels nearest features in the
    pyramids (N, P, C) of those images."""
    k = min(k_images, pixel_features.shape[0])
    distances, neighbours = image_index.search(pooled, k)
    b, p, c = pyramid.shape
    maps = np.empty((b, p), np.float32)
    for i in range(b):  # one gallery per image (its neighbours differ), never per pixel
        gallery = ExactIndex()
        gallery.build(pixel_features[neighbours[i]].reshape(-1, c).astype(np.float32))
        pixel_distances, _ = gallery.search(pyramid[i], min(k_pixels, k * p))
        maps[i] = pixel_distances.mean(axis=1)
    return maps, distances.mean(axis=1).astype(np.float32)
