import faiss
import numpy as np
import pytest
import torch

from defectlens.components.knn import ExactIndex, HNSWIndex, IVFIndex, make_index
from defectlens.components.memory_bank import GreedyCoresetSampler, MemoryBank


def _naive_greedy(points: np.ndarray, k: int, first: int) -> list[int]:
    chosen = [first]
    nearest = np.linalg.norm(points - points[first], axis=1)
    for _ in range(k - 1):
        c = int(nearest.argmax())
        chosen.append(c)
        nearest = np.minimum(nearest, np.linalg.norm(points - points[c], axis=1))
    return chosen


def test_coreset_equals_classic_greedy_k_centre():
    x = torch.randn(2000, 40, generator=torch.Generator().manual_seed(0))
    sampler = GreedyCoresetSampler(0.05, projection_dim=16, seed=3)
    chosen = sampler.select(x).tolist()
    projected = sampler.project(x)
    first = int(np.random.default_rng(3).integers(2000))
    assert chosen == _naive_greedy(projected, 100, first)


def test_coreset_size_and_determinism():
    x = torch.randn(1001, 8, generator=torch.Generator().manual_seed(1))
    a = GreedyCoresetSampler(0.1, seed=0).select(x)
    assert a.numel() == 101 and a.unique().numel() == 101  # ceil(0.1 * 1001)
    assert torch.equal(a, GreedyCoresetSampler(0.1, seed=0).select(x))
    assert not torch.equal(a, GreedyCoresetSampler(0.1, seed=1).select(x))
    assert GreedyCoresetSampler(1.0).select(x).numel() == 1001
    with pytest.raises(ValueError):
        GreedyCoresetSampler(0.0)


def test_coreset_covers_the_data():
    """Every point lies within the coreset's covering radius: no far-away outlier is left out."""
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(500, 4, generator=g), torch.tensor([[50.0, 50, 50, 50]])])
    chosen = GreedyCoresetSampler(0.02, projection_dim=None, seed=0).select(x)
    assert 500 in chosen.tolist()


@pytest.mark.parametrize("index", [ExactIndex(), IVFIndex(nprobe=64), HNSWIndex()])
def test_indices_find_nearest_neighbours(index):
    g = torch.Generator().manual_seed(4)
    vectors = torch.randn(3000, 16, generator=g)
    bank = MemoryBank(vectors, index)
    queries = vectors[:50] + 0.001
    distances, found = bank.search(queries, 1)
    assert (found[:, 0] == torch.arange(50)).float().mean() >= 0.95
    exact = torch.cdist(queries, vectors).min(dim=1).values
    assert torch.allclose(distances[:, 0], exact, atol=1e-3) or isinstance(
        index, IVFIndex | HNSWIndex
    )


@pytest.mark.parametrize("name", ["exact", "ivf", "hnsw"])
def test_rebuilt_index_gives_identical_answers(name):
    """Indices are rebuilt from the saved vectors at load, never deserialised: the rebuild must
    answer exactly as the index built at fit time did, whatever the thread count."""
    vectors = torch.randn(3000, 8, generator=torch.Generator().manual_seed(5))
    queries = torch.randn(200, 8, generator=torch.Generator().manual_seed(6))
    bank = MemoryBank(vectors, make_index(name))
    before = torch.get_num_threads()
    answers = [bank.search(queries, 3)]
    for threads in (1, 2):
        faiss.omp_set_num_threads(threads)
        answers.append(MemoryBank(vectors.clone(), make_index(name)).search(queries, 3))
    faiss.omp_set_num_threads(before)
    for other in answers[1:]:
        assert torch.equal(answers[0][0], other[0]) and torch.equal(answers[0][1], other[1])


def test_k_is_capped_at_bank_size_and_unknown_index():
    bank = MemoryBank(torch.randn(3, 4))
    distances, indices = bank.search(torch.randn(2, 4), k=10)
    assert distances.shape == (2, 3) and sorted(indices[0].tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown index"):
        make_index("annoy")
