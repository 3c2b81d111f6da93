"""PatchCore's and SPADE's scoring steps (numpy + faiss, shared by the methods and exported
models) against direct computations from their definitions."""

from __future__ import annotations

import numpy as np
import pytest

from defectlens.components.knn import (
    ExactIndex,
    HNSWIndex,
    IVFIndex,
    gallery_scores,
    patch_scores,
)


def _index(vectors: np.ndarray) -> ExactIndex:
    index = ExactIndex()
    index.build(vectors)
    return index


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a[:, None, :].astype(np.float64) - b[None]) ** 2).sum(-1))


def test_patch_scores_follow_the_papers_reweighting():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(200, 8)).astype(np.float32)
    patches = rng.normal(size=(3, 50, 8)).astype(np.float32)
    patches[1, 7] += 4.0  # one clearly anomalous patch
    k = 5
    maps, scores = patch_scores(_index(bank), bank, patches, k)
    for b in range(3):
        d = _distances(patches[b], bank)
        np.testing.assert_allclose(maps[b], d.min(axis=1), rtol=1e-4)
        worst = int(d.min(axis=1).argmax())
        m_star = int(d[worst].argmin())
        support = np.argsort(_distances(bank[m_star : m_star + 1], bank)[0])[:k]
        spread = _distances(patches[b][worst : worst + 1], bank[support])[0]
        weight = 1.0 - np.exp(spread[0]) / np.exp(spread).sum()
        assert abs(scores[b] - weight * d[worst].min()) <= 1e-4 * scores[b]
    assert scores.argmax() == 1
    # One neighbour: no re-weighting, the score is the largest patch distance.
    _, plain = patch_scores(_index(bank), bank, patches, 1)
    np.testing.assert_allclose(plain, maps.max(axis=1))


def test_gallery_scores_search_only_the_nearest_images():
    rng = np.random.default_rng(1)
    n, p, c = 6, 9, 4
    pixel_features = rng.normal(size=(n, p, c)).astype(np.float16)
    image_features = rng.normal(size=(n, 3)).astype(np.float32)
    pooled = rng.normal(size=(2, 3)).astype(np.float32)
    pyramid = rng.normal(size=(2, p, c)).astype(np.float32)
    maps, scores = gallery_scores(
        _index(image_features), pixel_features, pooled, pyramid, k_images=2, k_pixels=3
    )
    for b in range(2):
        d_img = _distances(pooled[b : b + 1], image_features)[0]
        nearest = np.argsort(d_img)[:2]
        assert abs(scores[b] - d_img[nearest].mean()) <= 1e-5
        gallery = pixel_features[nearest].reshape(-1, c).astype(np.float32)
        expected = np.sort(_distances(pyramid[b], gallery), axis=1)[:, :3].mean(axis=1)
        np.testing.assert_allclose(maps[b], expected, rtol=1e-4)
    # k_images beyond the training set is capped, not an error.
    capped, _ = gallery_scores(
        _index(image_features), pixel_features, pooled, pyramid, k_images=99, k_pixels=1
    )
    assert capped.shape == (2, p)


@pytest.mark.parametrize("index", [IVFIndex(nprobe=1), HNSWIndex(neighbours=4, ef_search=4)])
def test_approximate_indices_give_exact_image_scores(index):
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(40, 16)) * 4
    bank = (centres[rng.integers(40, size=4000)] + rng.normal(size=(4000, 16))).astype(np.float32)
    patches = (centres[rng.integers(40, size=(6, 300))] + rng.normal(size=(6, 300, 16))).astype(
        np.float32
    )
    patches[2, 5] += 6.0
    index.build(bank)
    exact_maps, exact_scores = patch_scores(_index(bank), bank, patches, 9)
    approx = index.search(patches.reshape(-1, 16), 1)[0].reshape(6, 300)
    assert (approx > exact_maps + 1e-3).any()  # the index really is approximate here
    maps, scores = patch_scores(index, bank, patches, 9)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5)
    np.testing.assert_allclose(maps.max(axis=1), exact_maps.max(axis=1), rtol=1e-5)
    assert (maps >= exact_maps - 1e-4).all()  # other patches: never below the exact distance
