"""Minibatch training on in-memory tensors, shared by every method that trains a network
(DifferNet's flow, the autoencoders): optimiser and learning-rate schedule from the method's
parameters, seeded shuffling, the device, and a guard that stops a step whose loss is not
finite before it updates anything. When to stop and which epoch to keep is `loop.train_epochs`.

A method supplies `loss(batch) -> scalar tensor` (it may update non-gradient state such as a
memory in train mode) and, optionally, a separate validation loss; everything else is here, so
five trained methods do not carry five subtly different loops.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from defectlens.params import check_choice
from defectlens.training.loop import StopRule, resolve_device, train_epochs

SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Adam with `learning_rate` and `weight_decay`, constant or cosine-annealed over
    `max_epochs`; minibatches of `batch_size` in a seeded order; the stopping rule. The values
    come from a method's parameters, which its constructor has already checked."""

    learning_rate: float = 1e-3
    batch_size: int = 16
    max_epochs: int = 100
    patience: int = 10
    max_minutes: float = 10.0
    weight_decay: float = 0.0
    schedule: str = "constant"
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("schedule", self.schedule, SCHEDULES)  # set by methods, not by users

    @property
    def rule(self) -> StopRule:
        return StopRule(self.max_epochs, self.patience, self.max_minutes)


def make_optimizer(
    parameters: Iterable[nn.Parameter], config: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """Adam and its per-epoch schedule (None when constant)."""
    optimiser = torch.optim.Adam(
        list(parameters), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    if config.schedule == "cosine":
        return optimiser, torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, config.max_epochs)
    return optimiser, None


def minibatches(
    data: torch.Tensor, batch_size: int, generator: torch.Generator | None
) -> Iterable[torch.Tensor]:
    """`data` in batches along its first axis, shuffled by `generator` (in order without)."""
    n = data.shape[0]
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield data[order[start : start + batch_size]]


def mean_loss(
    loss: Callable[[torch.Tensor], torch.Tensor],
    data: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> float:
    """`loss` averaged over `data` (weighted by batch size), without gradients: a
    validation loss."""
    total = 0.0
    with torch.no_grad():
        for batch in minibatches(data, batch_size, None):
            total += float(loss(batch.to(device))) * batch.shape[0]
    return total / data.shape[0]


def fit_minibatches(
    module: nn.Module,
    loss: Callable[[torch.Tensor], torch.Tensor],
    train: torch.Tensor,
    val: torch.Tensor | None,
    config: TrainConfig,
    progress: bool = False,
    desc: str = "train",
    device: str | torch.device | None = "cpu",
    val_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    parameters: Iterable[nn.Parameter] | None = None,
    after_backward: Callable[[], None] | None = None,
    validate: Callable[[], float] | None = None,
) -> list[dict[str, Any]]:
    """Train `module`'s parameters (or `parameters`) to lower `loss` over `train`, choosing the
    epoch by `val_loss` (default `loss`) over `val`, or by `validate()` when given: a measure
    of the whole validation set, lower is better, that is not a mean over minibatches (Patch
    SVDD's synthetic-defect check); the module ends on the CPU in eval mode with the best
    epoch's weights. `after_backward()` runs between each step's backward pass and its update
    (GradCon reads the gradients there). Returns the per-epoch history (see `train_epochs`)."""
    where = resolve_device(device) if not isinstance(device, torch.device) else device
    module.to(where)
    trainable = [p for p in (parameters or module.parameters()) if p.requires_grad]
    optimiser, schedule = make_optimizer(trainable, config)
    generator = torch.Generator().manual_seed(config.seed)

    def run_epoch(epoch: int) -> float:
        total = 0.0
        for batch in minibatches(train, config.batch_size, generator):
            value = loss(batch.to(where))
            number = value.item()
            if not math.isfinite(number):
                return float("nan")  # no step on it; train_epochs restores the best epoch
            optimiser.zero_grad(set_to_none=True)
            value.backward()
            if after_backward is not None:
                after_backward()
            optimiser.step()
            total += number * batch.shape[0]
        if schedule is not None:
            schedule.step()
        return total / train.shape[0]

    def mean_validation_loss() -> float:
        return mean_loss(val_loss or loss, val, config.batch_size, where)

    if validate is None and val is not None:
        validate = mean_validation_loss
    try:
        return train_epochs(module, run_epoch, validate, config.rule, progress, desc)
    finally:
        module.cpu()
