"""Per-position multivariate Gaussians, estimated by streaming, scored by Mahalanobis distance.

`GaussianAccumulator` keeps float64 running sums (shifted by the first batch's mean, so that
the one-pass covariance does not lose precision), so fitting memory is constant in the number of
images: P positions x C x C for the second moments, whatever N is. It also keeps the two extra
sums the Ledoit-Wolf shrinkage needs, so that shrinkage is exact in the same single pass.
"""

from __future__ import annotations

import torch

from defectlens.components.distances import block_mahalanobis, block_row_shapes, block_row_views


class GaussianAccumulator:
    """Streaming sufficient statistics of features (P, C, B) -> per-position mean/covariance."""

    def __init__(self, shift: torch.Tensor | None = None) -> None:
        self.n = 0
        # (P, C) reference subtracted before summing: the first batch's mean unless given.
        # Accumulators that share it add up exactly (`merge`): a distributed fit gives every
        # partition the shift of the first batch, which is what a local fit would use.
        self.shift = None if shift is None else shift.to(torch.float64)
        self.s1: torch.Tensor | None = None  # (P, C)      sum of y
        self.s2: torch.Tensor | None = None  # (P, C, C)   sum of y y^T
        self.a2: torch.Tensor | None = None  # (P,)        sum of |y|^4
        self.ay: torch.Tensor | None = None  # (P, C)      sum of |y|^2 y

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of embeddings shaped (P, C, B)."""
        y = features.detach().to(torch.float64).transpose(1, 2)  # (P, B, C)
        if self.shift is None:
            self.shift = y.mean(dim=1)
        if self.s1 is None:
            p, _, c = y.shape
            if self.shift.shape != (p, c):
                raise ValueError(f"features {tuple(y.shape)} do not match the shift's shape")
            self.s1 = y.new_zeros(p, c)
            self.s2 = y.new_zeros(p, c, c)
            self.a2 = y.new_zeros(p)
            self.ay = y.new_zeros(p, c)
        y = y - self.shift.unsqueeze(1)
        sq = (y * y).sum(dim=2)  # (P, B)
        self.n += y.shape[1]
        self.s1 += y.sum(dim=1)
        torch.baddbmm(self.s2, y.transpose(1, 2), y, out=self.s2)  # in place: no P x C x C temp
        self.a2 += (sq * sq).sum(dim=1)
        self.ay += torch.bmm(sq.unsqueeze(1), y).squeeze(1)

    def merge(self, other: GaussianAccumulator) -> GaussianAccumulator:
        """Add another accumulator's sums to this one's (in place; returns self). Both must
        use the same shift: the sums are then simply added, with no loss of precision."""
        if other.n == 0:
            return self
        if self.n == 0:  # copies: adding to this one later must not change `other`
            self.n, self.shift = other.n, other.shift.clone()
            self.s1, self.s2 = other.s1.clone(), other.s2.clone()
            self.a2, self.ay = other.a2.clone(), other.ay.clone()
            return self
        if not torch.equal(self.shift, other.shift):
            raise ValueError("accumulators with different shifts cannot be added")
        self.n += other.n
        self.s1 += other.s1
        self.s2 += other.s2
        self.a2 += other.a2
        self.ay += other.ay
        return self

    def mean(self) -> torch.Tensor:
        return self.shift + self.s1 / self.n

    def covariance(self, shrinkage: str = "none", positions: slice = slice(None)) -> torch.Tensor:
        """Covariance per position: unbiased sample covariance, or Ledoit-Wolf shrunk (MLE-based,
        the same estimator as sklearn.covariance.ledoit_wolf). `positions` selects a chunk."""
        if self.n < 1:
            raise ValueError("no samples accumulated")
        n = self.n
        m = self.s1[positions] / n  # mean of shifted features
        scatter = self.s2[positions] - n * m.unsqueeze(2) * m.unsqueeze(1)  # centred outer sums
        if shrinkage == "none":
            return scatter.div_(max(n - 1, 1))
        if shrinkage != "ledoit_wolf":
            raise ValueError(f"unknown shrinkage {shrinkage!r}")
        return self._ledoit_wolf(scatter.div_(n), m, positions)

    def precision_factors(self, shrinkage: str, epsilon: float, chunk: int = 256) -> torch.Tensor:
        """Packed float32 inverse-Cholesky factors (P, C(C+1)/2), computed chunk by chunk so
        that finalising needs no second P x C x C array beside the running sums."""
        p = self.s2.shape[0]
        parts = []
        for start in range(0, p, chunk):
            cov = self.covariance(shrinkage, slice(start, start + chunk))
            parts.append(pack_lower(inverse_cholesky(cov, epsilon)).float())
        return torch.cat(parts)

    def _ledoit_wolf(self, s: torch.Tensor, m: torch.Tensor, sl: slice) -> torch.Tensor:
        n, p = self.n, s.shape[-1]
        # sum_i |x_i|^4 for centred x_i = y_i - m, expanded into the streamed sums.
        # |x|^2 = a - 2b + c with a = |y|^2, b = y.m, c = |m|^2.
        c = (m * m).sum(dim=1)
        s2 = self.s2[sl]
        sum_a = torch.diagonal(s2, dim1=1, dim2=2).sum(dim=1)
        sum_b = (self.s1[sl] * m).sum(dim=1)
        sum_b2 = torch.einsum("pi,pij,pj->p", m, s2, m)
        sum_ab = (self.ay[sl] * m).sum(dim=1)
        sum_x4 = self.a2[sl] + 4 * sum_b2 + n * c * c - 4 * sum_ab + 2 * c * sum_a - 4 * c * sum_b
        trace = torch.diagonal(s, dim1=1, dim2=2).sum(dim=1)
        mu = trace / p
        s_norm2 = (s * s).sum(dim=(1, 2))
        beta = (sum_x4 / n - s_norm2) / (p * n)
        delta = (s_norm2 - 2 * mu * trace + p * mu * mu) / p
        beta = torch.minimum(beta, delta)
        shrink = torch.where(delta > 0, beta / delta.clamp_min(1e-300), torch.zeros_like(delta))
        eye = torch.eye(p, dtype=s.dtype, device=s.device)
        shrink = shrink.view(-1, 1, 1)
        return (1 - shrink) * s + shrink * mu.view(-1, 1, 1) * eye


def inverse_cholesky(covariance: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Lower-triangular W with W^T W = (cov + eps I)^-1, so Mahalanobis^2 = |W (x - mean)|^2.

    Cholesky then a triangular solve: cheaper and better conditioned than a general inverse, and
    it works in batch over all positions (no Python loop).
    """
    p = covariance.shape[-1]
    eye = torch.eye(p, dtype=covariance.dtype, device=covariance.device)
    chol, info = torch.linalg.cholesky_ex(covariance + epsilon * eye)
    if bool((info > 0).any()):
        raise ValueError(
            "covariance is not positive definite at some positions; raise the regularisation "
            "epsilon or use Ledoit-Wolf shrinkage"
        )
    return torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)


def pack_lower(matrices: torch.Tensor) -> torch.Tensor:
    """(P, C, C) lower-triangular -> (P, C(C+1)/2): halves the stored model size."""
    rows, cols = torch.tril_indices(matrices.shape[-1], matrices.shape[-1])
    return matrices[:, rows, cols]


def unpack_lower(packed: torch.Tensor, size: int) -> torch.Tensor:
    rows, cols = torch.tril_indices(size, size)
    out = packed.new_zeros(packed.shape[0], size, size)
    out[:, rows, cols] = packed
    return out


BLOCK = 32  # block-row height of `BlockRows`


class BlockRows:
    """Lower-triangular matrices (P, C, C) stored as block rows, without most of the zeros.

    Block row i holds rows [i b, i b + b) and only columns [0, i b + b): everything right of the
    diagonal block is zero and not stored. With b = 32 that is 58 % of the dense size for
    C = 176 (a loaded PaDiM model at 256 px: 282 MB instead of 484 MB) and tends to half as C
    grows, and W x is one batched product per block row, no slower than the dense product.
    All rows live in one flat tensor (`flat`, what a model keeps as its buffer); `rows` are views.
    """

    def __init__(self, flat: torch.Tensor, positions: int, size: int, block: int = BLOCK) -> None:
        if flat.ndim != 1 or flat.numel() != positions * self.stored(size, block):
            raise ValueError("block rows do not match the positions and size")
        self.flat, self.positions, self.size, self.block = flat, positions, size, block
        views = block_row_views(flat.numpy(), positions, size, block)
        self.rows: list[torch.Tensor] = [torch.from_numpy(v) for v in views]  # no copies

    @staticmethod
    def spans(size: int, block: int) -> list[tuple[int, int]]:
        return [(s, s + rows) for s, rows, _ in block_row_shapes(size, block)]

    @classmethod
    def stored(cls, size: int, block: int) -> int:
        """Values stored per position."""
        return sum((stop - start) * stop for start, stop in cls.spans(size, block))

    def _packed_index(self, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        """Rows and columns (within block row [start, stop)) of the lower triangle, and their
        positions in `pack_lower`'s row-major order (row r starts at r (r + 1) / 2)."""
        rows, cols = torch.tril_indices(stop, stop)
        keep = rows >= start
        rows, cols = rows[keep], cols[keep]
        return rows - start, cols, rows * (rows + 1) // 2 + cols

    @classmethod
    def from_packed(cls, packed: torch.Tensor, size: int, block: int = BLOCK) -> BlockRows:
        positions = packed.shape[0]
        out = cls(packed.new_zeros(positions * cls.stored(size, block)), positions, size, block)
        for (start, stop), row in zip(cls.spans(size, block), out.rows, strict=True):
            local_rows, cols, index = out._packed_index(start, stop)
            row[:, local_rows, cols] = packed[:, index]
        return out

    def to_packed(self) -> torch.Tensor:
        packed = self.flat.new_empty(self.positions, self.size * (self.size + 1) // 2)
        for (start, stop), row in zip(self.spans(self.size, self.block), self.rows, strict=True):
            local_rows, cols, index = self._packed_index(start, stop)
            packed[:, index] = row[:, local_rows, cols]
        return packed

    def matmul(self, x: torch.Tensor, positions: slice = slice(None)) -> torch.Tensor:
        """W x for the selected positions: x (P', C, B) -> (P', C, B)."""
        return torch.cat([torch.bmm(r[positions], x[:, : r.shape[2]]) for r in self.rows], dim=1)


def mahalanobis(
    features: torch.Tensor,
    mean: torch.Tensor,
    inv_chol: BlockRows,
    chunk: int = 512,
    projected_mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distances (B, P) of embeddings (P, C, B) to per-position Gaussians: means (P, C) and
    inverse-Cholesky factors W.

    |W (x - m)| is computed as |W x - W m|: batched products on the embeddings as they are,
    no centred copy. `projected_mean` (P, C, 1) = W m may be given precomputed (it does not
    depend on the images). Chunked over positions to bound the temporary memory.
    """
    if projected_mean is None:
        projected_mean = project_mean(mean, inv_chol)
    rows = [r.numpy() for r in inv_chol.rows]  # numpy views: the code exported models run
    distances = block_mahalanobis(
        rows, projected_mean.numpy(), features.contiguous().numpy(), chunk
    )
    return torch.from_numpy(distances)


def project_mean(mean: torch.Tensor, inv_chol: BlockRows) -> torch.Tensor:
    """W m per position: (P, C, 1)."""
    return inv_chol.matmul(mean.unsqueeze(2))
