"""k-means and the soft segmentation of feature maps (segmentation-aided detection's structure)."""

import pytest
import torch

from defectlens.components.clustering import assignment_temperature, kmeans, soft_assignment


def _blobs() -> torch.Tensor:
    """Three tight, well separated clusters of 200 points each in 5 dimensions."""
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0] * 5, [10.0] * 5, [0, 10.0, 0, -10.0, 0]])
    return torch.cat([c + 0.1 * torch.randn(200, 5, generator=g) for c in centres])


def test_kmeans_finds_separated_clusters_and_is_seeded():
    x = _blobs()
    centres = kmeans(x, 3, seed=0)
    found = sorted(centres.round().tolist())
    assert found == sorted([[0.0] * 5, [10.0] * 5, [0, 10.0, 0, -10.0, 0]])
    assert torch.equal(centres, kmeans(x, 3, seed=0))
    with pytest.raises(ValueError, match="at least k=3"):
        kmeans(x[:2], 3)


def test_soft_assignment_is_a_membership_that_follows_the_nearest_centre():
    x = _blobs()
    centres = kmeans(x, 3, seed=0)
    temperature = assignment_temperature(x, centres)
    maps = x.T.reshape(1, 5, 30, 20)  # 600 positions on a 30 x 20 grid
    weights = soft_assignment(maps, centres, temperature)
    assert weights.shape == (1, 3, 30, 20)
    assert torch.allclose(weights.sum(dim=1), torch.ones(1, 30, 20))
    nearest = torch.cdist(x, centres).argmin(dim=1).reshape(30, 20)
    assert torch.equal(weights[0].argmax(dim=0), nearest)
    assert float(weights.max(dim=1).values.min()) > 0.99  # tight clusters: near-hard labels
