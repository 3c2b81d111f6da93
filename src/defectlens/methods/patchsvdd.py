"""Patch SVDD (Yi & Yoon, "Patch SVDD: Patch-level SVDD for Anomaly Detection and
Segmentation", ACCV 2020).

An encoder maps every 32 px and 64 px patch of an image to a 64-d embedding, trained on normal
images only with two self-supervised losses: SVDD' pulls the embeddings of a patch and of its
neighbour shifted by a pixel or two together (so similar-looking patches embed close, without
one collapsing centre for a whole image), and a position classifier must tell, from two
patches' embedding difference, which of the 8 neighbouring places the second came from (so
the embeddings keep what a patch looks like). At test time each patch is scored by the
distance to its nearest training-patch embedding; a pixel gets the mean score of the patches
covering it; the two scales' maps are multiplied; image score = the map's maximum.

Architecture, as in the authors' code: the 32 px encoder is eight padding-free 3 x 3
convolutions (the first strided; 32-64-128-128-64-32-32-64 channels, LeakyReLU 0.1, tanh);
the 64 px encoder runs the *same* 32 px encoder on the patch's four quadrants and combines the
2 x 2 embeddings with a 2 x 2 convolution to 128 channels, LeakyReLU, a 1 x 1 convolution to 64
and tanh. Position classifiers (one per scale): 64 -> 128 -> 128 -> 8 on the embedding
difference, the last layer a fixed random projection with unit-norm columns and a trained bias
(the authors' `NormalizedLinear` takes its weight under `no_grad`, so only its bias learns).
Inputs: the image minus the training images' mean image, in [0, 1] units. Positions: the
second patch of a position pair is 3/4 to 1 patch away along each moved axis, with per-channel
and per-pixel noise (std 0.02) on both; the SVDD' neighbour is shifted by up to K/32 px.
Loss: both classifiers' cross-entropy + `svdd_weight` x both SVDD' distances, with
`svdd_weight` = 1e-3: the value the authors' README runs and recommends against collapse (their
code's default, 1, collapsed every embedding to one point on magnetic_tile here: the loss sat
at exactly 2 ln 8, chance for both classifiers, with zero SVDD' distance).

Dense scoring without a loop over patches: the padding-free encoder run once over the whole
image gives every 32 px patch's embedding at a 2 px pitch (`components.patchnet`); the 64 px
embeddings are the quadrant head applied to that map with a 16-cell dilation. Test patches are
taken at the authors' strides, 4 px (32 px scale) and 16 px (64 px scale), as are the training
patches of the memory banks.

Changed for a 2-core CPU: the authors train 300 epochs of 100 pairs per image each (hours on a
GPU); here one sample of each of the four pair kinds per image per epoch (`pairs_per_image`
= 1: 8 trained no better within the same budget on either dev set) within the `max_minutes`
budget, Adam at 1e-3 instead of 1e-4, early stopping on the same loss over
fixed pairs of the normal validation images -- or, with `select_by` = "synthetic", on how
well the network finds synthetic defects pasted on validation images (below). The
authors' banks hold every training patch at
the test strides, searched with a KD-tree and NGT: 3249 small patches per 256 px image, 1.8
million for 567 training images, whose search took minutes per image on 2 cores even with an
inverted-file index (a briefly trained encoder's embeddings crowd into few cells). Here each
bank keeps a greedy coreset of `coreset_ratio` = 1 % of them (PatchCore's sampler, minutes
for the 1.8 million), searched exactly by faiss (`index`); `coreset_ratio=1` keeps all.

Which epoch to keep: on 2 cores the position task often stays at chance for the whole budget
(kolektorsdd, deeppcb), and there the loss is lowest for embeddings that have drifted
together -- the classifier's best guess at chance is the same for every pair. With PyTorch's
default initialisation the network kept by that loss scored image AUROC 0.52 on kolektorsdd,
where the network after one epoch scored 0.74. `select_by` = "synthetic" judges each epoch
instead by `training.SyntheticCheck`: up to 16 validation images, each also with one pasted
synthetic defect, scored against a bank of 8192 patch embeddings of 16 training images (both
scales, exact search); the epoch with the best mean of image and pixel AUROC on that task is
kept (its `val_loss` in the history is 1 minus that mean, also recorded as
`synthetic_auroc`). The default stays the authors' rule, "loss": with He initialisation
(below) it did as well or better on the dev sets (kolektorsdd, two seeds: 0.834 and 0.799
image AUROC against the check's 0.815 and 0.709), so the initialisation, not the rule, was
what kept the collapsed networks. Without validation images the training loss decides.

Initialisation: He (Kaiming) normal for LeakyReLU(0.1), zero biases, where the authors' code
keeps PyTorch's default. With the default, nine layers shrink the signal so much that 64 px
patches' embeddings start within about 2e-5 of each other (their spread over patches of noise
with kolektorsdd's contrast, std 0.08): the classifiers see almost no difference to learn
from, and an early epoch's distances are too small for float32 scoring to reproduce across
runtimes (the export parity test failed on one). He-initialised embeddings spread by about
0.06 from the start; on magnetic_tile the position loss then reached the default's best
validation value (3.637) after 42 epochs, where the default's best came at epoch 60.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from defectlens.backbones import FeatureExtractor
from defectlens.components.coverage import coverage_product
from defectlens.components.knn import NearestNeighbourIndex, index_names, make_index
from defectlens.components.memory_bank import GreedyCoresetSampler
from defectlens.components.patchnet import PatchNet
from defectlens.errors import ModelFileError, ParameterError
from defectlens.methods.trained import TrainedImageMethod
from defectlens.params import check_choice, check_float, check_int
from defectlens.training.synthetic_check import SyntheticCheck

ENCODER = [
    ("conv", 3, 32, 2),
    ("conv", 3, 64),
    ("conv", 3, 128),
    ("conv", 3, 128),
    ("conv", 3, 64),
    ("conv", 3, 32),
    ("conv", 3, 32),
]
SLOPE = 0.1
SMALL, LARGE = 32, 64  # patch sizes
TEST_STRIDE = {SMALL: 4, LARGE: 16}
NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
CHECK_BANK_IMAGES = 16  # training images whose patches the synthetic check searches
CHECK_BANK_SIZE = 8192  # of their 32 px patch embeddings, drawn at random (the 64 px: all)
SELECT_BY = ("synthetic", "loss")


class _FixedProjection(nn.Module):
    """The authors' last classifier layer: a random matrix with unit-norm columns that never
    trains (a buffer), plus a trained bias."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        weight = torch.empty(c_out, c_in)
        nn.init.kaiming_uniform_(weight, a=5**0.5)
        self.register_buffer("weight", weight / weight.norm(dim=0, keepdim=True))
        self.bias = nn.Parameter(torch.zeros(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _classifier(dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, 128),
        nn.LeakyReLU(SLOPE),
        nn.Linear(128, 128),
        nn.LeakyReLU(SLOPE),
        _FixedProjection(128, len(NEIGHBOURS)),
    )


class _PatchSVDDNet(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.small = PatchNet(3, [*ENCODER, ("conv", 3, dim)], SLOPE, output="tanh")
        self.combine = nn.Conv2d(dim, 128, 2)  # the 2 x 2 quadrant embeddings
        self.project = nn.Conv2d(128, dim, 1)
        self.classify_small = _classifier(dim)
        self.classify_large = _classifier(dim)

    def _head(self, quadrants: torch.Tensor, dilation: int) -> torch.Tensor:
        x = F.conv2d(quadrants, self.combine.weight, self.combine.bias, dilation=dilation)
        return torch.tanh(self.project(F.leaky_relu(x, SLOPE)))

    def embed(self, patches: torch.Tensor) -> torch.Tensor:
        """Patches (N, 3, K, K), K = 32 or 64 -> embeddings (N, dim)."""
        if patches.shape[-1] == SMALL:
            return self.small(patches).flatten(1)
        half = LARGE // 2
        quadrants = [
            patches[:, :, y : y + half, x : x + half] for y in (0, half) for x in (0, half)
        ]
        codes = self.small(torch.cat(quadrants))  # (4N, dim, 1, 1): TL, TR, BL, BR
        n = patches.shape[0]
        grid = codes.view(2, 2, n, -1).permute(2, 3, 0, 1)  # (N, dim, 2, 2)
        return self._head(grid, 1).flatten(1)

    def dense(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every 32 px patch's embedding at a 4 px pitch and every 64 px patch's at 16 px:
        ((B, dim, h32, w32), (B, dim, h64, w64)), from one padding-free pass (2 px pitch)."""
        fine = self.small(images)
        # the 64 px head's quadrants are 32 px = 16 cells of 2 px apart; on every 8th cell
        # (16 px) that is 2 cells
        return fine[:, :, ::2, ::2], self._head(fine[:, :, ::8, ::8], 2)


class PatchSVDD(TrainedImageMethod):
    name = "patchsvdd"
    fitted_buffers = ("mean_image", "bank_small", "bank_large")

    def __init__(
        self,
        embedding_dim: int = 64,
        svdd_weight: float = 1e-3,
        coreset_ratio: float = 0.01,
        index: str = "exact",
        pairs_per_image: int = 1,
        select_by: str = "loss",
        learning_rate: float = 1e-3,
        batch_size: int = 64,
        max_epochs: int = 1000,
        patience: int = 20,
        max_minutes: float = 10.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.embedding_dim = check_int("embedding_dim", embedding_dim, 1, 4096)
        self.svdd_weight = check_float("svdd_weight", svdd_weight, 0.0, 1e6)
        self.coreset_ratio = check_float("coreset_ratio", coreset_ratio, 0.0, 1.0, low_open=True)
        self.index = check_choice("index", index, index_names())
        self.pairs_per_image = check_int("pairs_per_image", pairs_per_image, 1, 1000)
        self.select_by = check_choice("select_by", select_by, SELECT_BY)
        self._init_optimisation(learning_rate, batch_size, max_epochs, patience, max_minutes, seed)
        self.space = "pixels"
        self.indexes: dict[int, NearestNeighbourIndex] = {}  # rebuilt from the banks

    def build(self) -> nn.Module:
        net = _PatchSVDDNet(self.embedding_dim)
        for layer in net.modules():  # He initialisation (see the module docstring)
            if isinstance(layer, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(layer.weight, a=SLOPE, nonlinearity="leaky_relu")
                nn.init.zeros_(layer.bias)
        return net

    def inputs(self, images: torch.Tensor, maps: list[torch.Tensor] | None) -> torch.Tensor:
        """The image minus the training images' mean image (the authors' normalisation)."""
        return images - self.mean_image

    # -- training ----------------------------------------------------------------------------
    def fit(
        self,
        extractor: FeatureExtractor,
        batches: Iterable[torch.Tensor],
        progress: bool = False,
        val_batches: Callable[[], Iterable[torch.Tensor]] | None = None,
    ) -> None:
        train = torch.cat(list(batches))
        _check_size(train.shape[-1], ParameterError)
        self.mean_image = train.mean(dim=0)
        raw_val = None if val_batches is None else torch.cat(list(val_batches()))
        self._generator = torch.Generator().manual_seed(self.seed)
        self._data = {}
        if self.select_by == "synthetic" and raw_val is not None:
            check = SyntheticCheck(raw_val, self.seed)
            self._check = check
            self._data["check"] = self.inputs(check.images, None)
            chosen = torch.randperm(len(train), generator=self._generator)[:CHECK_BANK_IMAGES]
            self._data["bank"] = self.inputs(train[chosen], None)
        train = self.inputs(train, None)
        val = None if raw_val is None else self.inputs(raw_val, None)
        self._data.update(train=train, val=val)
        self.net = self.new_network()
        try:
            # Each image appears `pairs_per_image` times an epoch, each time with new pairs.
            self.history = self.train_network(
                torch.arange(len(train)).repeat(self.pairs_per_image),
                None if val is None else torch.arange(len(val)),
                progress,
            )
            if "check" in self._data:  # say what val_loss was: 1 - the check's AUROC
                for record in self.history:
                    if record.get("val_loss") is not None:
                        record["synthetic_auroc"] = 1.0 - record["val_loss"]
        finally:
            del self._data, self._generator
            self.__dict__.pop("_check", None)
        self.net.requires_grad_(False).eval()
        self.build_banks(train, progress)

    def build_banks(self, x: torch.Tensor, progress: bool = False) -> None:
        """Both scales' memory banks from prepared training images (`inputs`): a greedy
        coreset of `coreset_ratio` of their test-stride patch embeddings. Public so that a
        trained encoder's banks can be rebuilt at another ratio without retraining it."""
        small, large = self.patch_embeddings(x, progress)
        sampler = GreedyCoresetSampler(self.coreset_ratio, None, self.seed)
        banks = []
        for size, vectors in ((SMALL, small), (LARGE, large)):
            total = sampler.target_size(len(vectors)) - 1
            desc = f"coreset {size} px"
            with tqdm(total=total, desc=desc, disable=not progress, unit="pt") as bar:
                banks.append(vectors[sampler.select(vectors, progress=bar.update)].contiguous())
        self.bank_small, self.bank_large = banks
        self.after_load()

    def loss(self, indices: torch.Tensor) -> torch.Tensor:
        """Both scales' position and SVDD' losses on one random pair of each kind per image."""
        return self._pair_loss(self._data["train"][indices.cpu()], self._generator, indices.device)

    def validation_loss(self, indices: torch.Tensor) -> torch.Tensor:
        """The same on pairs fixed per validation image, so epochs compare."""
        generator = torch.Generator().manual_seed(self.seed + 1 + int(indices[0]))
        return self._pair_loss(self._data["val"][indices.cpu()], generator, indices.device)

    def _pair_loss(
        self, images: torch.Tensor, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        total = images.new_zeros((), device=device)
        for size, classify in ((LARGE, self.net.classify_large), (SMALL, self.net.classify_small)):
            first, second, label = position_pairs(images, size, generator)
            first = first + _noise(first, generator)
            second = second + _noise(second, generator)
            logits = classify(self.net.embed(first.to(device)) - self.net.embed(second.to(device)))
            total = total + F.cross_entropy(logits, label.to(device))
            if self.svdd_weight:
                a, b = neighbour_pairs(images, size, generator)
                distance = (self.net.embed(a.to(device)) - self.net.embed(b.to(device))).norm(dim=1)
                total = total + self.svdd_weight * distance.mean()
        return total

    def validation_measure(self) -> Callable[[], float] | None:
        """With `select_by` = "synthetic" (and validation images): 1 - the synthetic check."""
        return self._synthetic_error if "check" in self._data else None

    def _synthetic_error(self) -> float:
        """1 - the synthetic check's mean AUROC for the network as it is now: the check's
        images scored against a bank of `CHECK_BANK_SIZE` patches of `CHECK_BANK_IMAGES`
        training images (a subsample: this runs after every epoch)."""
        small, large = self.patch_embeddings(self._data["bank"])
        generator = torch.Generator().manual_seed(self.seed)
        keep = torch.randperm(len(small), generator=generator)[:CHECK_BANK_SIZE]
        indexes = _indexes("exact", small[keep], large)
        maps = torch.cat(
            [
                self._maps(self._data["check"][i : i + 16], indexes)
                for i in range(0, len(self._data["check"]), 16)
            ]
        )
        return 1.0 - self._check.measure(maps)

    # -- scoring -----------------------------------------------------------------------------
    def patch_embeddings(
        self, x: torch.Tensor, progress: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every test-stride patch embedding of these prepared images, both scales: (N, dim),
        on the CPU (the network may be on another device while it trains)."""
        device = next(self.net.parameters()).device
        small, large = [], []
        starts = range(0, len(x), 16)
        with torch.no_grad():
            for start in tqdm(starts, desc="embed patches", disable=not progress, unit="batch"):
                s, g = self.net.dense(x[start : start + 16].to(device))
                small.append(s.permute(0, 2, 3, 1).reshape(-1, s.shape[1]).cpu())
                large.append(g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]).cpu())
        return torch.cat(small), torch.cat(large)

    def _maps(self, x: torch.Tensor, indexes: dict[int, NearestNeighbourIndex]) -> torch.Tensor:
        """Prepared images -> the product of both scales' coverage maps (B, h, w), CPU."""
        with torch.no_grad():
            small, large = self.net.dense(x.to(next(self.net.parameters()).device))
        maps = patch_svdd_maps([_nearest(indexes[SMALL], small), _nearest(indexes[LARGE], large)])
        return torch.from_numpy(maps)

    def after_load(self) -> None:
        for name in ("bank_small", "bank_large"):
            bank = getattr(self, name)
            if bank.ndim != 2 or bank.dtype != torch.float32 or bank.shape[0] < 1:
                raise ModelFileError(f"patchsvdd {name} must be a non-empty float32 (N, d) tensor")
        self.indexes = _indexes(self.index, self.bank_small, self.bank_large)

    def score(self, *x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self._maps(x[0], self.indexes).to(x[0].device)
        return maps, maps.flatten(1).max(dim=1).values

    def check_geometry(self, image_size: int, taps: dict[int, int]) -> None:
        _check_size(image_size, ModelFileError)
        if tuple(self.mean_image.shape) != (3, image_size, image_size):
            raise ModelFileError("patchsvdd mean image does not match the image size")
        dim = self.embedding_dim
        if self.bank_small.shape[1] != dim or self.bank_large.shape[1] != dim:
            raise ModelFileError(f"patchsvdd banks must hold {dim}-d embeddings")

    # -- export ------------------------------------------------------------------------------
    def export_head(self) -> nn.Module:
        return _EmbeddingHead(self.net)

    def export_finish(self) -> tuple[dict, dict[str, np.ndarray]]:
        arrays = {"bank_small": self.bank_small.numpy(), "bank_large": self.bank_large.numpy()}
        spec = {
            "kind": "patch_coverage",
            "index": self.index,
            "patch_sizes": [SMALL, LARGE],
            "strides": [TEST_STRIDE[SMALL], TEST_STRIDE[LARGE]],
        }
        return spec, arrays


def patch_svdd_maps(distances: list[np.ndarray]) -> np.ndarray:
    """Nearest-neighbour distances of the 32 px patches (B, h, w) at 4 px and of the 64 px
    patches at 16 px -> the product of the two per-pixel coverage means, on 4 px cells."""
    return coverage_product(distances, [SMALL, LARGE], [TEST_STRIDE[SMALL], TEST_STRIDE[LARGE]])


def _indexes(
    kind: str, small: torch.Tensor, large: torch.Tensor
) -> dict[int, NearestNeighbourIndex]:
    """Nearest-neighbour indexes of `kind` over both scales' banks (N, dim), by patch size."""
    indexes = {}
    for size, bank in ((SMALL, small), (LARGE, large)):
        indexes[size] = make_index(kind)
        indexes[size].build(bank.contiguous().numpy())
    return indexes


def _nearest(index: NearestNeighbourIndex, embeddings: torch.Tensor) -> np.ndarray:
    """Distance of every embedding (B, dim, h, w) to its nearest bank vector: (B, h, w)."""
    b, d, h, w = embeddings.shape
    queries = embeddings.permute(0, 2, 3, 1).reshape(-1, d).float().cpu().numpy()
    distances, _ = index.search(np.ascontiguousarray(queries), 1)
    return distances.reshape(b, h, w)


def _check_size(size: int, error: type[Exception]) -> None:
    if size < LARGE or size % TEST_STRIDE[LARGE]:
        raise error(
            f"patchsvdd needs an image size of at least 64 px, a multiple of 16, not {size}"
        )


def _noise(patches: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-channel shift and per-pixel noise, both N(0, 0.02) (the authors' augmentation)."""
    n, c = patches.shape[:2]
    shift = torch.randn(n, c, 1, 1, generator=generator) * 0.02
    return shift + torch.randn(patches.shape, generator=generator) * 0.02


def _crop(images: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    return torch.stack(
        [images[i, :, y : y + size, x : x + size] for i, (y, x) in enumerate(corners.tolist())]
    )


def position_pairs(
    images: torch.Tensor, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pair per image: a random K px patch, one of its 8 neighbours 3/4 K to K away along
    each moved axis (clipped to the image), and the neighbour's class (0-7)."""
    n, side = images.shape[0], images.shape[-1]
    first = torch.randint(side - size + 1, (n, 2), generator=generator)
    label = torch.randint(len(NEIGHBOURS), (n,), generator=generator)
    direction = torch.tensor(NEIGHBOURS)[label]
    distance = 3 * size // 4 + torch.randint(size // 4, (n, 2), generator=generator)
    second = (first + direction * distance).clamp(0, side - size)
    return _crop(images, first, size), _crop(images, second, size), label


def neighbour_pairs(
    images: torch.Tensor, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pair per image for SVDD': a random K px patch and the patch shifted by up to K/32 px
    along each axis (never by zero on both), clipped to the image."""
    n, side = images.shape[0], images.shape[-1]
    first = torch.randint(side - size + 1, (n, 2), generator=generator)
    reach = max(1, size // 32)
    shifts = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)]
    shifts.remove((0, 0))
    chosen = torch.tensor(shifts)[torch.randint(len(shifts), (n,), generator=generator)]
    second = (first + chosen).clamp(0, side - size)
    return _crop(images, first, size), _crop(images, second, size)


class _EmbeddingHead(nn.Module):
    """The export's head graph: prepared images -> both scales' patch embeddings, channels
    last (the bank search and the maps stay outside it, in `runtime.finish`)."""

    def __init__(self, net: _PatchSVDDNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        small, large = self.net.dense(inputs[0])
        return small.permute(0, 2, 3, 1), large.permute(0, 2, 3, 1)
