"""Training RegAD's registration network on normal images of many categories.

Episodes as in the authors' code: every step takes `batch_size` query images of ONE category,
each with `shots` other images of the same category as supports (their registered features
averaged), and minimises the head's symmetric per-position loss (`components.registration`).
Categories take turns in a seeded order. By default only the transformers and the head train
and the backbone is frozen (a registration is then a few hundred kB). With
`backbone_learning_rate` > 0 the backbone's convolutions train too, as in the paper (its
batch-norm statistics stay ImageNet's: CPU batch sizes cannot re-estimate them), and the
tuned backbone is saved next to the transformers as a weights file (`BACKBONE_FILE`).

Model selection never looks at a target category or at test labels (RegAD's released code picks
each epoch on the target's test set): each *training* category holds out `val_fraction` of its
images, and the loss on fixed, seeded episodes of those held-out images picks the epoch
(`training.loop`). The learning rate follows a cosine schedule from `learning_rate` to 0 over
`max_epochs`, with SGD and momentum 0.9 as in the paper.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as save_safetensors
from torch import nn
from tqdm.auto import tqdm

from defectlens.backbones import FeatureExtractor
from defectlens.components.geometry import rotation, warp
from defectlens.components.registration import BACKBONE_FILE, RegistrationNet
from defectlens.data.dataset import find_normal_images
from defectlens.data.loader import iter_batches
from defectlens.errors import DataError, option
from defectlens.params import check_float, check_image_size, check_int, check_seed
from defectlens.training.loop import StopRule, resolve_device, train_epochs


@dataclass
class Category:
    """One category's normal images, resized, as uint8 (N, 3, S, S) for training and
    validation."""

    name: str
    train: torch.Tensor
    val: torch.Tensor


@dataclass(frozen=True)
class RegistrationConfig:
    """Training parameters (saved with the registration model)."""

    shots: int = 2
    batch_size: int = 8
    steps_per_epoch: int = 50
    max_epochs: int = 20
    patience: int = 4
    max_minutes: float = 30.0
    learning_rate: float = 0.01
    momentum: float = 0.9
    val_fraction: float = 0.1
    pose_jitter: float = 0.0
    backbone_learning_rate: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("shots", self.shots, 1, 64)
        check_int("batch_size", self.batch_size, 1, 1024)
        check_int("steps_per_epoch", self.steps_per_epoch, 1, 1_000_000)
        check_int("max_epochs", self.max_epochs, 1, 100_000)
        check_int("patience", self.patience, 1, 100_000)
        check_float("max_minutes", self.max_minutes, 0.0, 1e6, low_open=True)
        check_float("learning_rate", self.learning_rate, 0.0, 10.0, low_open=True)
        check_float("momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_float("val_fraction", self.val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        check_float("pose_jitter", self.pose_jitter, 0.0, 180.0)
        check_float("backbone_learning_rate", self.backbone_learning_rate, 0.0, 10.0)
        check_seed("seed", self.seed)


def _to_uint8(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.rint(images * 255.0).astype(np.uint8))


def category_name(source: str | Path) -> str:
    """A pool entry's category name: its folder's name (`cat/train/good` is `cat`)."""
    path = Path(source).resolve()
    if path.name == "good" and path.parent.name == "train":
        return path.parent.parent.name
    return path.name


def load_pool(
    sources: Sequence[str | Path],
    image_size: int,
    config: RegistrationConfig,
    progress: bool = False,
) -> list[Category]:
    """Each source (an MVTec-layout root: its train/good; or a folder of images) is one
    category, named after its folder. Each needs shots + 1 training images and one
    validation image at least."""
    names = [category_name(s) for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"two pool categories are both named {duplicates[0]!r}")
    # Every folder is listed and counted before any image is decoded, so a bad pool entry
    # fails at once, not after minutes of reading the others; a missing folder is named
    # before the count of categories, which would otherwise hide a mistyped path.
    found = [find_normal_images(source) for source in sources]
    if len(sources) < 2:
        raise DataError(
            "registration training needs at least two categories (it learns what they share)"
        )
    listed = []
    for source, paths in zip(sources, found, strict=True):
        n_val = max(1, round(len(paths) * config.val_fraction))
        need = config.shots + 1 + n_val
        if len(paths) < need:
            raise DataError(
                f"{source}: {len(paths)} normal images; registration training with "
                f"{option('--shots', value=str(config.shots))} needs at least {need} per category"
            )
        listed.append((paths, n_val))
    pool = []
    for (paths, n_val), name in tqdm(
        list(zip(listed, names, strict=True)), desc="read pool", disable=not progress
    ):
        order = np.random.default_rng([config.seed, len(pool)]).permutation(len(paths))
        images = np.concatenate(
            [b.images for b in iter_batches([paths[i] for i in order], image_size, 64)]
        )
        pool.append(Category(name, _to_uint8(images[n_val:]), _to_uint8(images[:n_val])))
    return pool


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0).contiguous(memory_format=torch.channels_last)


def _jitter(images: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Random rotations (uniform within +-degrees): pose variation for pools that lack it."""
    if degrees <= 0:
        return images
    angles = (torch.rand(images.shape[0], generator=generator) * 2 - 1) * math.radians(degrees)
    return warp(images, rotation(angles.to(images.device)))


def _episode(
    category: Category, source: torch.Tensor, config: RegistrationConfig, generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries from `source` (B, 3, S, S) and, for each, `shots` supports from the category's
    training images, never the query itself when the query is one of them."""
    n = source.shape[0]
    b = min(config.batch_size, n)
    queries = torch.randperm(n, generator=generator)[:b]
    m = category.train.shape[0]
    if source is category.train:  # draw among the m - 1 others, skipping the query's index
        supports = torch.randint(0, m - 1, (b, config.shots), generator=generator)
        supports = supports + (supports >= queries.unsqueeze(1)).long()
    else:
        supports = torch.randint(0, m, (b, config.shots), generator=generator)
    return source[queries], category.train[supports.flatten()]


def _loss(
    net: RegistrationNet,
    extractor: FeatureExtractor,
    queries: torch.Tensor,
    supports: torch.Tensor,
    config: RegistrationConfig,
    generator: torch.Generator | None,
) -> torch.Tensor:
    device = next(net.parameters()).device
    q, s = _as_float(queries).to(device), _as_float(supports).to(device)
    if generator is not None:
        q = _jitter(q, config.pose_jitter, generator)
        s = _jitter(s, config.pose_jitter, generator)
    query_maps, _ = net.register(extractor, q)
    support_maps, _ = net.register(extractor, s)
    last = support_maps[-1]
    mean_support = last.view(q.shape[0], config.shots, *last.shape[1:]).mean(dim=1)
    return net.loss(query_maps[-1], mean_support)


def train_registration(
    extractor: FeatureExtractor,
    pool: list[Category],
    config: RegistrationConfig,
    progress: bool = False,
    device: torch.device | None = None,
) -> tuple[RegistrationNet, list[dict[str, float]]]:
    """Train a registration network for `extractor` on `pool` on `device` (default: the CPU;
    images move there a batch at a time); returns it on the CPU (eval mode, the best
    validation epoch's weights) and the loss history. With `backbone_learning_rate` > 0 the
    extractor is tuned in place (left frozen again, at its best epoch's weights)."""
    device = device or torch.device("cpu")
    torch.manual_seed(config.seed)
    net = RegistrationNet(extractor.strides, extractor.channels).to(device)
    extractor.to(device)
    groups = [{"params": list(net.parameters()), "scale": 1.0}]
    tune = config.backbone_learning_rate > 0
    if tune:  # stages past the last tap get no gradient, so SGD leaves them as they were
        extractor.requires_grad_(True)
        scale = config.backbone_learning_rate / config.learning_rate
        groups.append({"params": list(extractor.parameters()), "scale": scale})
    optimiser = torch.optim.SGD(groups, lr=config.learning_rate, momentum=config.momentum)
    # What the best epoch's weights are kept of: the backbone too when it trains (its
    # batch-norm layers stay in eval mode whatever train() is called on; see FeatureExtractor).
    trained = nn.ModuleDict({"registration": net, "backbone": extractor}) if tune else net
    generator = torch.Generator().manual_seed(config.seed)
    # Fixed validation episodes: the same queries, supports and jitter every epoch.
    val_generator = torch.Generator().manual_seed(config.seed + 1)
    val_episodes = [
        (*_episode(c, c.val, config, val_generator), config.seed + 2 + i)
        for i, c in enumerate(pool)
    ]

    def run_epoch(epoch: int) -> float:
        lr = 0.5 * config.learning_rate * (1 + math.cos(math.pi * epoch / config.max_epochs))
        for group in optimiser.param_groups:
            group["lr"] = lr * group["scale"]
        order = torch.randperm(len(pool), generator=generator)
        total = 0.0
        for step in range(config.steps_per_epoch):
            category = pool[int(order[step % len(pool)])]
            queries, supports = _episode(category, category.train, config, generator)
            loss = _loss(net, extractor, queries, supports, config, generator)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item()
        return total / config.steps_per_epoch

    @torch.no_grad()
    def validate() -> float:
        losses = [
            _loss(net, extractor, q, s, config, torch.Generator().manual_seed(seed)).item()
            for q, s, seed in val_episodes
        ]
        return float(np.mean(losses))

    rule = StopRule(config.max_epochs, config.patience, config.max_minutes)
    try:
        history = train_epochs(trained, run_epoch, validate, rule, progress, "train registration")
    finally:
        extractor.to("cpu").requires_grad_(False)
    return net.cpu().requires_grad_(False), history


def build_registration(
    sources: Sequence[str | Path],
    out: str | Path,
    backbone: str = "efficientnet_lite0",
    weights: str | None = None,
    image_size: int = 256,
    config: RegistrationConfig | None = None,
    exclude: Sequence[str] = (),
    progress: bool = False,
    device: str | None = None,
) -> tuple[Path, dict]:
    """Read the pool (minus categories named in `exclude`), train, save to `out` (checked
    before any work). Returns the saved folder and its training record."""
    from defectlens import __version__
    from defectlens.backbones import build_extractor
    from defectlens.components.registration import save_registration
    from defectlens.outputs import check_model_target

    config = config or RegistrationConfig()
    image_size = check_image_size(image_size)  # a registration no fit could use: before work
    where = resolve_device(device)
    check_model_target(out, list(sources), kind="registration")
    unknown = set(exclude) - {category_name(s) for s in sources}
    if unknown:
        name = sorted(unknown)[0]
        raise DataError(f"{option('--exclude', value=name)}: no pool category has that name")
    kept = [s for s in sources if category_name(s) not in set(exclude)]
    extractor = build_extractor(backbone, (4, 8, 16), image_size, weights)
    pool = load_pool(kept, image_size, config, progress)
    start = time.monotonic()
    net, history = train_registration(extractor, pool, config, progress, where)
    record = {
        "categories": {c.name: {"train": len(c.train), "val": len(c.val)} for c in pool},
        "excluded": sorted(exclude),
        "config": asdict(config),
        "history": history,
        "seconds": round(time.monotonic() - start, 1),
        "device": str(where),
        "defectlens_version": __version__,
    }
    info = {
        "backbone": backbone,
        "weights_sha256": extractor.weights_sha256,
        "image_size": image_size,
        "training": record,
    }
    files: dict[str, bytes] = {}
    if config.backbone_learning_rate > 0:  # the tuned backbone: a weights file of its own
        files[BACKBONE_FILE] = save_safetensors(extractor.weights_state())
        info["weights_sha256"] = hashlib.sha256(files[BACKBONE_FILE]).hexdigest()
        info["backbone_weights"] = BACKBONE_FILE
    return save_registration(net, out, info, list(sources), files), record
