import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis
from sklearn.covariance import ledoit_wolf

from defectlens.components.blur import gaussian_blur
from defectlens.components.distances import block_mahalanobis, default_threads
from defectlens.components.gaussian import (
    BlockRows,
    GaussianAccumulator,
    inverse_cholesky,
    mahalanobis,
    pack_lower,
    unpack_lower,
)


def _data(positions=3, n=40, channels=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A large offset checks that the one-pass sums do not lose precision.
    return torch.randn(positions, n, channels, generator=g, dtype=torch.float64) * 2 + 1000


def _accumulate(x, batch=7):
    acc = GaussianAccumulator()
    for i in range(0, x.shape[1], batch):
        acc.update(x[:, i : i + batch].transpose(1, 2))  # (P, C, B)
    return acc


def test_streaming_moments_match_numpy():
    x = _data()
    acc = _accumulate(x)
    assert acc.n == 40
    for p in range(3):
        np.testing.assert_allclose(acc.mean()[p], x[p].mean(0), rtol=1e-12)
        np.testing.assert_allclose(acc.covariance()[p], np.cov(x[p].T), rtol=1e-9, atol=1e-9)


def test_ledoit_wolf_matches_sklearn():
    x = _data(n=12, channels=8)  # fewer samples than a comfortable n/p: shrinkage matters
    acc = _accumulate(x, batch=5)
    for p in range(3):
        expected = ledoit_wolf(x[p].numpy())[0]
        np.testing.assert_allclose(acc.covariance("ledoit_wolf")[p], expected, atol=1e-8)


def test_accumulator_memory_does_not_grow_with_samples():
    acc = GaussianAccumulator()
    acc.update(torch.randn(4, 6, 10))
    sizes = [t.numel() for t in (acc.s1, acc.s2, acc.a2, acc.ay)]
    for _ in range(20):
        acc.update(torch.randn(4, 6, 10))
    assert [t.numel() for t in (acc.s1, acc.s2, acc.a2, acc.ay)] == sizes


def test_mahalanobis_matches_scipy():
    x = _data()
    acc = _accumulate(x)
    cov = acc.covariance()
    w = inverse_cholesky(cov, epsilon=0.0)
    w = BlockRows.from_packed(pack_lower(w), 5, block=2)  # 3 block rows: 2, 2 and 1 rows
    query = torch.randn(3, 5, 4, dtype=torch.float64) + 1000  # (P, C, B)
    d = mahalanobis(query, acc.mean(), w, chunk=2)
    assert d.shape == (4, 3)
    for b in range(4):
        for p in range(3):
            expected = scipy_mahalanobis(
                query[p, :, b].numpy(), acc.mean()[p].numpy(), np.linalg.inv(cov[p].numpy())
            )
            assert d[b, p].item() == pytest.approx(expected, rel=1e-7)


def test_mahalanobis_threads_give_the_same_numbers_bit_for_bit(monkeypatch):
    """The positions are split between threads; no split may change a single bit, and the
    default follows OMP_NUM_THREADS."""
    rng = np.random.default_rng(0)
    p, c, b = 37, 7, 3  # positions not a multiple of any chunk or thread count
    w = np.tril(rng.normal(size=(p, c, c))).astype(np.float32)
    rows = [r.numpy() for r in BlockRows.from_packed(pack_lower(torch.from_numpy(w)), c, 3).rows]
    mean = rng.normal(size=(p, c, 1)).astype(np.float32)
    x = rng.normal(size=(p, c, b)).astype(np.float32)
    one = block_mahalanobis(rows, mean, x, chunk=512, threads=1)
    expected = np.linalg.norm(np.einsum("pij,pjb->pib", w, x) - mean, axis=1).T
    np.testing.assert_allclose(one, expected, rtol=1e-5)
    for threads, chunk in [(2, 512), (3, 4), (8, 1), (64, 512)]:
        assert np.array_equal(block_mahalanobis(rows, mean, x, chunk, threads), one)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "zero")
    assert default_threads() >= 1


def test_batched_cholesky_under_two_threads():
    """anomalib's batched inverse crashed in MKL after set_num_threads(2); ours must not."""
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(256, 400, 176, generator=g, dtype=torch.float64)
    cov = feats.transpose(1, 2) @ feats / 399
    w = inverse_cholesky(cov, epsilon=0.01)
    eye = torch.eye(176, dtype=torch.float64)
    product = w.transpose(1, 2) @ w @ (cov + 0.01 * eye)
    torch.testing.assert_close(product, eye.expand_as(product), atol=1e-8, rtol=0)


def test_singular_covariance_is_reported():
    with pytest.raises(ValueError, match="positive definite"):
        inverse_cholesky(-torch.eye(3, dtype=torch.float64)[None], epsilon=0.0)


def test_pack_roundtrip_halves_storage():
    w = torch.tril(torch.randn(2, 6, 6))
    packed = pack_lower(w)
    assert packed.shape == (2, 21)
    torch.testing.assert_close(unpack_lower(packed, 6), w)


@pytest.mark.parametrize(("size", "block"), [(6, 32), (6, 4), (7, 2), (176, 32)])
def test_block_rows_store_the_lower_triangle_exactly(size, block):
    w = torch.tril(torch.randn(3, size, size, generator=torch.Generator().manual_seed(size)))
    blocks = BlockRows.from_packed(pack_lower(w), size, block)
    torch.testing.assert_close(blocks.to_packed(), pack_lower(w), rtol=0, atol=0)
    x = torch.randn(3, size, 5)
    torch.testing.assert_close(blocks.matmul(x), torch.bmm(w, x))
    torch.testing.assert_close(blocks.matmul(x[1:], slice(1, None)), torch.bmm(w[1:], x[1:]))
    assert blocks.flat.numel() <= 3 * size * size  # never more than dense
    if size == 176:
        assert blocks.flat.numel() / (3 * size * size) < 0.6
    with pytest.raises(ValueError, match="do not match"):
        BlockRows(blocks.flat[:-1], 3, size, block)


def test_blur_preserves_mass_and_constant_maps():
    maps = torch.zeros(1, 65, 65)
    maps[0, 32, 32] = 1.0
    out = gaussian_blur(maps, 4.0)
    assert out.sum().item() == pytest.approx(1.0, rel=1e-5)
    assert out[0, 32, 32] == out.max()
    assert out[0, 32, 36].item() == pytest.approx(out[0, 32, 32].item() * np.exp(-0.5), rel=1e-4)
    flat = torch.full((2, 20, 20), 3.0)
    torch.testing.assert_close(gaussian_blur(flat, 4.0), flat)


def test_position_major_layout_matches_interpolate_and_concat():
    from defectlens.components.layout import position_major
    from defectlens.components.pyramid import align_pyramid, concat_pyramid

    feats = [torch.rand(2, 3, 8, 8), torch.rand(2, 4, 4, 4), torch.rand(2, 5, 2, 2)]
    expected = concat_pyramid(feats).flatten(2).permute(2, 1, 0).numpy()
    aligned = [f.numpy() for f in align_pyramid(feats)]
    assert len(aligned) == 3  # nested sizes: replicated by the layout, not upsampled
    np.testing.assert_array_equal(position_major(aligned), expected)
    keep = np.array([0, 2, 3, 8, 11])  # a channel subset across all three maps
    np.testing.assert_array_equal(position_major(aligned, keep), expected[:, keep])
    bilinear = [f.numpy() for f in align_pyramid(feats, "bilinear")]
    assert len(bilinear) == 1
    np.testing.assert_array_equal(
        position_major(bilinear), concat_pyramid(feats, "bilinear").flatten(2).permute(2, 1, 0)
    )
    uneven = [torch.rand(2, 3, 7, 7), torch.rand(2, 4, 4, 4)]  # 4 does not divide 7
    (joined,) = align_pyramid(uneven)
    assert joined.shape == (2, 7, 7, 7)
    with pytest.raises(ValueError, match="divide"):
        position_major([f.numpy() for f in uneven])
    with pytest.raises(ValueError, match="exceed"):
        position_major(aligned, np.array([0, 12]))


@pytest.mark.parametrize("size", [97, 128, 250, 256])
@pytest.mark.parametrize("scale", [0.5, 0.25])
def test_downscale_matches_torch_antialiased_bilinear(size, scale):
    from defectlens.components.scale import downscale

    images = torch.rand(2, 3, size, size + 3)
    expected = torch.nn.functional.interpolate(
        images, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False
    )
    got = downscale(images, scale)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
