"""Memories of normal feature prototypes, read by attention at every position of a feature map:
what MemAE and MNAD put between an encoder and its decoder so that the decoder can only
rebuild an input from patterns of normal images (an anomaly then reconstructs badly).

- `SparseMemory` (MemAE, Gong et al. 2019): N items learned by backpropagation; each
  position's code is replaced by a convex combination of items, with weights from a softmax over
  cosine similarities made sparse by hard shrinkage (weights below `shrink` are dropped, the
  rest renormalised), plus the entropy of the weights as a loss that sharpens them further.
- `ItemMemory` (MNAD, Park et al. 2020): a few items that are *not* parameters: they follow
  the L2-normalised queries nearest to them by an update rule, are read by a softmax over dot
  products and concatenated with the query, and shape the queries through a compactness loss
  (near one item) and a separateness loss (a triplet margin to the second-nearest item).

Both work on (B, C, H, W) maps, one query per position; both are plain modules whose state is
in parameters or buffers, so they save and export with the rest of the network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _positions(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B H W, C): one row per position."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _as_map(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    b, _, h, w = like.shape
    return rows.view(b, h, w, -1).permute(0, 3, 1, 2)


class SparseMemory(nn.Module):
    """`items` learned prototypes of `channels` values; `shrink` is MemAE's λ (the paper
    recommends 1/N to 3/N; 0 disables the shrinkage)."""

    def __init__(self, items: int, channels: int, shrink: float) -> None:
        super().__init__()
        bound = 1.0 / channels**0.5
        self.items = nn.Parameter(torch.empty(items, channels).uniform_(-bound, bound))
        self.shrink = shrink

    def forward(self, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory's rebuild of `code` (B, C, H, W) and the addressing weights (B H W, N)."""
        queries = _positions(code)
        similarity = F.normalize(queries, dim=1) @ F.normalize(self.items, dim=1).T
        weights = similarity.softmax(dim=1)
        if self.shrink > 0:
            # hard shrinkage written with ReLU so it stays differentiable (the paper's eq. 7)
            shifted = weights - self.shrink
            weights = F.relu(shifted) * weights / (shifted.abs() + 1e-12)
            weights = F.normalize(weights, p=1, dim=1)
        return _as_map(weights @ self.items, code), weights


def addressing_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Mean over positions of -sum w log w: MemAE's sparsity loss."""
    return -(weights * torch.log(weights + 1e-12)).sum(dim=1).mean()


class ItemMemory(nn.Module):
    """`items` prototypes of `channels` values, kept in a buffer and moved by `update`."""

    def __init__(self, items: int, channels: int) -> None:
        super().__init__()
        self.register_buffer("items", F.normalize(torch.rand(items, channels), dim=1))

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention weights over items (Q, M) and the two nearest items' indices (Q, 2)."""
        weights = (queries @ self.items.T).softmax(dim=1)
        return weights, weights.topk(2, dim=1).indices

    def read(self, query_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) L2-normalised queries -> the decoder's input (B, 2C, H, W), the query
        and its attention read of the items concatenated, and each query's squared distance
        to its nearest item (B, H, W), MNAD's feature score."""
        queries = _positions(query_map)
        weights, top = self.nearest(queries)
        read = weights @ self.items
        distance = (queries - self.items[top[:, 0]]).pow(2).mean(dim=1)
        b, _, h, w = query_map.shape
        return torch.cat([query_map, _as_map(read, query_map)], dim=1), distance.view(b, h, w)

    def losses(self, query_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compactness (mean squared distance of each query to its nearest item) and
        separateness (triplet margin 1 between the nearest and second-nearest items)."""
        queries = _positions(query_map)
        _, top = self.nearest(queries)
        positive, negative = self.items[top[:, 0]], self.items[top[:, 1]]
        compactness = F.mse_loss(queries, positive)
        separateness = F.triplet_margin_loss(queries, positive, negative, margin=1.0)
        return compactness, separateness

    @torch.no_grad()
    def update(self, query_map: torch.Tensor) -> None:
        """Move each item towards the queries for which it is the nearest, each weighted by its
        attention to the item relative to the largest such attention in the batch, then
        renormalise (MNAD's eq. 5)."""
        queries = _positions(query_map)
        scores = queries @ self.items.T  # (Q, M)
        nearest = scores.softmax(dim=1).argmax(dim=1)
        over_queries = scores.softmax(dim=0)
        relative = over_queries / over_queries.max(dim=0, keepdim=True).values
        assigned = F.one_hot(nearest, self.items.shape[0]).to(queries.dtype)
        # a new tensor, not an in-place write: the step's loss still needs the old items
        self.items = F.normalize(self.items + (relative * assigned).T @ queries, dim=1)
