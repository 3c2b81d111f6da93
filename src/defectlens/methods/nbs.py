"""Neural Batch Sampling (Chu & Kitani, "Neural Batch Sampling with Reinforcement Learning for
Semi-Supervised Anomaly Detection", ECCV 2020).

The observation: while an autoencoder trains on mostly normal data, the reconstruction loss
of a normal pixel falls steadily and an anomalous one's stays high or fluctuates. The
sequence of a pixel's losses over training -- its *loss profile* -- is a feature, and a small
*predictor* learns from a few labelled anomalies to map profiles to an anomaly map. A
*sampler* policy chooses which patches each training batch holds so that normal and
anomalous profiles separate better; it is trained by REINFORCE over episodes (one episode =
the autoencoder trained from the same start), rewarded by how well the predictor then
separates held-out labelled pixels.

Labelled anomalies: `anomalies`, an MVTec-layout folder of defective images with masks
(test/<defect>/ + ground_truth/), or -- without it -- `data.synthetic.paste_defect` defects
of the `defects` kinds (default: the drawn ones) pasted on copies of held-out normal images.
`supervision` (config.json, metrics.json) says which was used. Test images and their labels
are never read.

How it is split: the fit images are divided into the *pool* the autoencoder trains on and a
held-out `labelled_fraction` whose clean and defective copies train the predictor; the
normal validation images (and half of any real anomalies) give the reward that picks the
episode kept (the early-stopping role validation plays for every trained method).

What changed from the paper, and why:
- Inductive scoring. The paper's profiles are those of the very images being trained on
  (transductive: a test image must be in the training run). We keep the autoencoder's
  weights at `snapshots` points of the episode; a new image's profile is its loss under each
  snapshot, so it is scored without retraining, and the model is a plain network (export
  works).
- Smaller, for a 2-core CPU: `steps` (96) autoencoder steps per episode on 2 x 2-cell windows
  of a 4 x 4 grid (the sampler picks cells), 8 snapshots, a per-pixel predictor (1 x 1
  convolutions on the standardised log-profile and its 5 x 5 local mean), a two-layer policy
  on three state features per cell (its current loss, the change since the last snapshot,
  its image's mean loss), at most 48 candidate images per episode.
- `space="features"` (default): the autoencoder reconstructs the backbone's standardised
  maps as the other trained methods can; "pixels": the paper's setting, images at
  `input_size`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectlens.backbones import FeatureExtractor
from defectlens.components.autoencoder import ConvDecoder, ConvEncoder
from defectlens.data.dataset import find_anomalies
from defectlens.data.loader import load_labelled
from defectlens.data.synthetic import defect_kinds, with_synthetic_defects
from defectlens.errors import DataError, ModelFileError, ParameterError
from defectlens.methods.trained import TrainedImageMethod
from defectlens.metrics import auroc
from defectlens.params import check_float, check_int
from defectlens.training.loop import StopRule, resolve_device, train_epochs

GRID = 4  # the sampler chooses among GRID x GRID cells of each candidate image
CANDIDATES = 48  # candidate images per episode
# At most this many held-out training images (clean and defective copies train the
# predictor) and validation images (the same, for the reward): every episode computes their
# profiles under every snapshot, so more would slow each episode without a better predictor.
MAX_HELD = 32
MAX_REWARD = 24
_EPS = 1e-8


class _Autoencoder(nn.Module):
    """A plain convolutional autoencoder without batch-norm: a snapshot must score alone."""

    def __init__(self, channels: int, widths: tuple[int, ...], output: str) -> None:
        super().__init__()
        self.encoder = ConvEncoder(channels, widths, norm=False)
        self.decoder = ConvDecoder(
            widths[-1], (*widths[-2::-1], widths[0]), channels, norm=False, output=output
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def _error(autoencoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-position squared reconstruction error, mean over channels: (B, s, s)."""
    return (autoencoder(x) - x).pow(2).mean(dim=1)


class _NBSNet(nn.Module):
    """What is deployed: the autoencoder snapshots, the profile statistics and the predictor
    from a loss profile to an anomaly logit."""

    def __init__(self, channels: int, widths: tuple[int, ...], output: str, snapshots: int):
        super().__init__()
        self.snapshots = nn.ModuleList(
            _Autoencoder(channels, widths, output) for _ in range(snapshots)
        )
        self.predictor = nn.Sequential(
            nn.Conv2d(2 * snapshots, 32, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 1, 1),
        )
        # Mean and spread of each snapshot's log-loss over normal pixels: (K, 2).
        self.register_buffer("profile_stats", torch.tensor([[0.0, 1.0]]).repeat(snapshots, 1))

    def profile(self, x: torch.Tensor) -> torch.Tensor:
        """Loss profiles (B, K, s, s): each position's error under each snapshot."""
        return torch.stack([_error(ae, x) for ae in self.snapshots], dim=1)

    def features(self, profile: torch.Tensor) -> torch.Tensor:
        """The predictor's input: the standardised log-profile and its 5 x 5 local mean."""
        k = profile.shape[1]
        mean, std = self.profile_stats[:, 0], self.profile_stats[:, 1]
        z = (torch.log(profile + _EPS) - mean.view(1, k, 1, 1)) / std.view(1, k, 1, 1)
        local = F.avg_pool2d(z, 5, stride=1, padding=2, count_include_pad=False)
        return torch.cat([z, local], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly logits (B, s, s)."""
        return self.predictor(self.features(self.profile(x)))[:, 0]


class _Sampler(nn.Module):
    """The batch-sampling policy: three state features of a cell -> its logit. The last layer
    starts at zero, so the first episode samples uniformly (plain autoencoder training)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.layers(state)[:, 0]


class _Episodes:
    """The data of one fit and the state carried between its episodes."""

    def __init__(
        self,
        pool: torch.Tensor,
        labelled: torch.Tensor,
        labels: torch.Tensor,
        reward_x: torch.Tensor,
        reward_labels: torch.Tensor,
    ) -> None:
        self.pool, self.labelled, self.labels = pool, labelled, labels
        self.reward_x, self.reward_labels = reward_x, reward_labels
        self.baseline: float | None = None
        self.rewards: list[float] = []


class NBS(TrainedImageMethod):
    name = "nbs"
    PIXEL_WIDTHS = (32, 64, 128, 256)
    FEATURE_WIDTHS = (128, 64)  # 152 x 32 x 32 backbone maps -> a 64 x 8 x 8 code

    def __init__(
        self,
        space: str = "features",
        input_size: int = 128,
        widths: tuple[int, ...] | None = None,
        anomalies: str | None = None,
        defects: str = "drawn",
        snapshots: int = 8,
        steps: int = 96,
        labelled_fraction: float = 0.3,
        predictor_steps: int = 150,
        policy_learning_rate: float = 0.01,
        learning_rate: float = 1e-3,
        batch_size: int = 16,
        max_epochs: int = 60,
        patience: int = 15,
        max_minutes: float = 10.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._init_training(
            space,
            input_size,
            widths,
            learning_rate,
            batch_size,
            max_epochs,
            patience,
            max_minutes,
            seed,
        )
        if anomalies is not None and not isinstance(anomalies, str | Path):
            raise ParameterError(f"anomalies must be a folder path, not {anomalies!r}")
        self.anomalies = None if anomalies is None else str(anomalies)
        if not isinstance(defects, str):
            raise ParameterError(f"defects must be comma-separated kinds, not {defects!r}")
        self.kinds = defect_kinds(defects.split(","))  # an unknown kind: said here
        self.defects = defects
        self.snapshots = check_int("snapshots", snapshots, 2, 64)
        self.steps = check_int("steps", steps, self.snapshots, 100_000)
        self.labelled_fraction = check_float("labelled_fraction", labelled_fraction, 0.05, 0.9)
        self.predictor_steps = check_int("predictor_steps", predictor_steps, 1, 100_000)
        self.policy_learning_rate = check_float(
            "policy_learning_rate", policy_learning_rate, 0.0, 10.0
        )
        self.supervision = "not fitted"

    def build(self) -> nn.Module:
        return _NBSNet(self.in_channels, self.layer_widths, self.output, self.snapshots)

    def score(self, *x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.net(x[0]), None

    # -- fitting -----------------------------------------------------------------------------
    def fit(
        self,
        extractor: FeatureExtractor,
        batches: Iterable[torch.Tensor],
        progress: bool = False,
        val_batches: Callable[[], Iterable[torch.Tensor]] | None = None,
    ) -> None:
        # A bad --anomalies folder is said before the training images are read.
        samples = None if self.anomalies is None else find_anomalies(self.anomalies)
        images = torch.cat(list(batches))
        val = torch.cat(list(val_batches())) if val_batches is not None else None
        size = images.shape[-1]
        if size < 64:
            raise ParameterError(f"nbs pastes defects on images of at least 64 px, not {size}")
        if len(images) < 4:
            raise DataError(
                f"nbs needs at least 4 normal training images (it trains its autoencoder on "
                f"some and its predictor on the others), got {len(images)}"
            )
        generator = torch.Generator().manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        order = torch.randperm(len(images), generator=generator)
        n_held = min(len(images) - 2, max(2, round(len(images) * self.labelled_fraction)))
        n_held = min(n_held, MAX_HELD)  # the rest trains the autoencoder
        held, pool_images = images[order[:n_held]], images[order[n_held:]]
        if val is None:  # no validation images given: half of the held-out ones reward
            half = max(1, n_held // 2)
            held, val = held[half:], held[:half]
        val = val[torch.randperm(len(val), generator=generator)[:MAX_REWARD]]
        if samples is None:
            labelled, labelled_masks = _with_synthetic(held, rng, self.kinds)
            reward_images, reward_masks = _with_synthetic(val, rng, self.kinds)
            self.supervision = (
                f"synthetic defects pasted on {len(held)} held-out training images and "
                f"{len(val)} validation images ({', '.join(self.kinds)})"
            )
        else:
            real, real_masks = (torch.from_numpy(a) for a in load_labelled(samples, size))
            # Alternate, so both halves hold every defect type (the list is sorted by type).
            train, reward = slice(0, None, 2), slice(1, None, 2)
            labelled = torch.cat([held, real[train]])
            labelled_masks = torch.cat([torch.zeros(len(held), size, size), real_masks[train]])
            n_reward = len(real[reward])
            if n_reward:
                reward_images = torch.cat([val, real[reward]])
                reward_masks = torch.cat([torch.zeros(len(val), size, size), real_masks[reward]])
            else:  # a single labelled defect trains the predictor; synthetic ones reward
                reward_images, reward_masks = _with_synthetic(val, rng, self.kinds)
            self.supervision = (
                f"{len(real)} real anomalous images from {self.anomalies} "
                f"({len(real) - n_reward} train the predictor, "
                + (
                    f"{n_reward} choose the episode"
                    if n_reward
                    else "synthetic defects on the validation images choose the episode"
                )
                + f"), with {len(held)} held-out normal images"
            )
        pool = self._prepare_all(extractor, pool_images, fit_statistics=True)
        side = pool.shape[-1]
        self._check_window(side)
        episodes = _Episodes(
            pool,
            self._prepare_all(extractor, labelled),
            _labels(labelled_masks, side),
            self._prepare_all(extractor, reward_images),
            _labels(reward_masks, side),
        )
        self.net = self.new_network()
        self.history = self._train(episodes, generator, progress)
        for record, reward in zip(self.history, episodes.rewards, strict=False):
            record["reward"] = reward
        self.net.requires_grad_(False).eval()

    def _prepare_all(
        self, extractor: FeatureExtractor, images: torch.Tensor, fit_statistics: bool = False
    ) -> torch.Tensor:
        """The autoencoder's inputs for images in [0, 1], in chunks; with `fit_statistics`,
        the feature standardisation is fitted on these images first."""
        prepared = self._collect(extractor, (images[i : i + 32] for i in range(0, len(images), 32)))
        if self.space == "pixels":
            return prepared
        if fit_statistics:
            self.fit_standardisation(prepared)
        return self.standardise(prepared)

    def _check_window(self, side: int) -> None:
        """The training windows (2 x 2 cells of the grid) must pass through the encoder."""
        window, halvings = 2 * side // GRID, 2 ** len(self.layer_widths)
        if side % GRID or window % halvings:
            raise ParameterError(
                f"nbs trains on {window} x {window} windows of its {side} x {side} input, which "
                f"its {len(self.layer_widths)} widths cannot halve {len(self.layer_widths)} "
                "times; change input_size (pixels), the image size (features) or widths"
            )

    def _train(
        self, episodes: _Episodes, generator: torch.Generator, progress: bool
    ) -> list[dict[str, Any]]:
        where = resolve_device(self.device)
        for name in ("pool", "labelled", "labels", "reward_x", "reward_labels"):
            setattr(episodes, name, getattr(episodes, name).to(where))
        self.net.to(where)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            sampler = _Sampler().to(where)
        start = {k: v.clone() for k, v in self.net.snapshots[0].state_dict().items()}
        policy_optimiser = torch.optim.Adam(sampler.parameters(), lr=self.policy_learning_rate)

        def run_episode(episode: int) -> float:
            autoencoder = _Autoencoder(self.in_channels, self.layer_widths, self.output)
            autoencoder.load_state_dict(start)
            loss, log_prob = self._train_autoencoder(
                autoencoder.to(where), sampler, episodes, generator
            )
            if not math.isfinite(loss):
                return float("nan")
            reward = self._fit_predictor(episodes, generator)
            if not math.isfinite(reward):
                return float("nan")
            episodes.rewards.append(reward)
            if episodes.baseline is None:
                episodes.baseline = reward
            advantage = reward - episodes.baseline
            episodes.baseline = 0.8 * episodes.baseline + 0.2 * reward
            policy_optimiser.zero_grad(set_to_none=True)
            (-advantage * log_prob).backward()
            policy_optimiser.step()
            return loss

        try:
            return train_epochs(
                self.net,
                run_episode,
                lambda: 1.0 - episodes.rewards[-1],
                StopRule(self.max_epochs, self.patience, self.max_minutes),
                progress,
                f"train {self.name} (episodes)",
            )
        finally:
            self.net.cpu()

    def _train_autoencoder(
        self,
        autoencoder: nn.Module,
        sampler: _Sampler,
        episodes: _Episodes,
        generator: torch.Generator,
    ) -> tuple[float, torch.Tensor]:
        """One episode's autoencoder training, batches chosen by the sampler; each of the
        `snapshots` chunks ends with a snapshot. Returns the last chunk's mean loss (NaN if a
        loss was not finite) and the log-probability of every choice made (for REINFORCE)."""
        pool = episodes.pool
        chosen = torch.randperm(len(pool), generator=generator)[:CANDIDATES]
        candidates = pool[chosen.to(pool.device)]
        optimiser = torch.optim.Adam(autoencoder.parameters(), lr=self.learning_rate)
        chunk = self.steps // self.snapshots
        log_prob = torch.zeros((), device=pool.device)
        previous: torch.Tensor | None = None
        losses: list[float] = []
        for k in range(self.snapshots):
            with torch.no_grad():
                state, previous = _state(autoencoder, candidates, previous)
            logits = sampler(state)
            picks = torch.multinomial(
                logits.detach().cpu().softmax(0),
                chunk * self.batch_size,
                replacement=True,
                generator=generator,
            ).to(pool.device)
            log_prob = log_prob + logits.log_softmax(0)[picks].mean()
            losses = []
            for t in range(chunk):
                batch = _windows(candidates, picks[t * self.batch_size : (t + 1) * self.batch_size])
                loss = _error(autoencoder, batch).mean()
                if not math.isfinite(loss.item()):
                    return float("nan"), log_prob
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                losses.append(loss.item())
            self.net.snapshots[k].load_state_dict(autoencoder.state_dict())
        return float(np.mean(losses)), log_prob

    def _fit_predictor(self, episodes: _Episodes, generator: torch.Generator) -> float:
        """Profile statistics and a fresh predictor from this episode's snapshots; returns
        the reward: the mean of pixel and image AUROC on the reward images."""
        net = self.net
        with torch.no_grad():
            profile = _in_chunks(net.profile, episodes.labelled)
            normal = torch.log(profile + _EPS).permute(1, 0, 2, 3)[:, episodes.labels == 0]
            net.profile_stats.copy_(
                torch.stack([normal.mean(dim=1), normal.std(dim=1).clamp_min(1e-6)], dim=1)
            )
            features = net.features(profile)
            reward_features = net.features(_in_chunks(net.profile, episodes.reward_x))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1)
            for layer in net.predictor:
                if isinstance(layer, nn.Conv2d):
                    layer.reset_parameters()
        labels = episodes.labels
        positive = float(labels.mean())
        weight = torch.tensor(min(100.0, (1 - positive) / max(positive, 1e-6)))
        weight = weight.to(labels.device)
        optimiser = torch.optim.Adam(net.predictor.parameters(), lr=5e-3)
        net.predictor.requires_grad_(True)
        for _ in range(self.predictor_steps):
            pick = torch.randint(len(features), (min(16, len(features)),), generator=generator)
            pick = pick.to(features.device)
            logits = net.predictor(features[pick])[:, 0]
            loss = F.binary_cross_entropy_with_logits(logits, labels[pick], pos_weight=weight)
            if not math.isfinite(loss.item()):
                return float("nan")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            maps = _in_chunks(lambda f: net.predictor(f)[:, 0], reward_features)
        return _reward(maps.cpu(), episodes.reward_labels.cpu())

    # -- checks ------------------------------------------------------------------------------
    def check_geometry(self, image_size: int, taps: dict[int, int]) -> None:
        super().check_geometry(image_size, taps)
        stats = self.net.profile_stats
        if stats.shape != (self.snapshots, 2) or not bool((stats[:, 1] > 0).all()):
            raise ModelFileError("nbs profile statistics must be (snapshots, 2), spreads > 0")


def _with_synthetic(images: torch.Tensor, rng: np.random.Generator, kinds: Sequence[str]):
    """Each image twice: as it is, and with one synthetic defect of `kinds`; with the masks."""
    pasted, masks = with_synthetic_defects(images.numpy(), rng, kinds)
    return torch.from_numpy(pasted), torch.from_numpy(masks)


def _labels(masks: torch.Tensor, side: int) -> torch.Tensor:
    """Masks (N, S, S) -> labels on the (side x side) grid: a cell is defective if any of its
    pixels is (a small defect must not vanish from the coarse grid)."""
    return F.adaptive_max_pool2d(masks[:, None], side)[:, 0]


def _in_chunks(function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.cat([function(x[i : i + 32]) for i in range(0, len(x), 32)])


def _state(
    autoencoder: nn.Module, candidates: torch.Tensor, previous: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler's view of every candidate cell: its log-loss standardised over all cells,
    its change since the last snapshot, and its image's mean; and the standardised log-loss
    (the next call's `previous`)."""
    errors = _in_chunks(lambda x: _error(autoencoder, x), candidates)
    cells = torch.log(F.avg_pool2d(errors[:, None], errors.shape[-1] // GRID)[:, 0] + _EPS)
    z = (cells - cells.mean()) / cells.std().clamp_min(1e-6)
    change = torch.zeros_like(z) if previous is None else z - previous
    image = z.mean(dim=(1, 2), keepdim=True).expand_as(z)
    return torch.stack([z, change, image], dim=-1).reshape(-1, 3), z


def _windows(candidates: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """The 2 x 2-cell training window centred on each picked cell (clamped inside the image)."""
    side = candidates.shape[-1]
    cell, window = side // GRID, 2 * side // GRID
    crops = []
    for pick in picks.tolist():
        image, rest = divmod(pick, GRID * GRID)
        row, col = divmod(rest, GRID)
        top = min(max(row * cell + cell // 2 - window // 2, 0), side - window)
        left = min(max(col * cell + cell // 2 - window // 2, 0), side - window)
        crops.append(candidates[image, :, top : top + window, left : left + window])
    return torch.stack(crops)


def _reward(maps: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean of pixel AUROC and image AUROC (image score: the 3 x 3-smoothed map's maximum);
    0.5 for a part that is undefined (one class only)."""
    pixel_labels = labels.flatten().numpy() > 0.5
    image_scores = F.avg_pool2d(maps[:, None], 3, 1, 1).amax(dim=(1, 2, 3))
    image_labels = labels.amax(dim=(1, 2)).numpy() > 0.5
    parts = []
    pairs = ((maps.flatten().numpy(), pixel_labels), (image_scores.numpy(), image_labels))
    for scores, truth in pairs:
        parts.append(auroc(scores, truth) if 0 < truth.sum() < len(truth) else 0.5)
    return float(np.mean(parts))
