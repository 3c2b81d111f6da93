"""The epoch loop shared by every network defectlens trains (DifferNet's flow, RegAD's
registration): early stopping on a loss over held-out *normal* images, keeping the best
epoch's weights, a wall-clock budget, a progress bar with both losses, and the history.

The caller owns what an epoch is (`run_epoch`: optimiser steps, learning-rate schedule) and
what validation measures (`validate`); the loop owns when to stop and which weights to keep,
so that no method re-implements (and gets subtly wrong) the stopping rule. Ctrl-C propagates
as KeyboardInterrupt after the bar is closed: callers save nothing half-trained.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from defectlens.errors import ParameterError


def resolve_device(name: str | None) -> torch.device:
    """`None` or "auto": CUDA when present, else the CPU; otherwise the named device, refused
    with one line if this machine has no such device."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ParameterError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"device {name!r} asked for, but this machine has no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ParameterError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


@dataclass(frozen=True)
class StopRule:
    """At most `max_epochs` epochs and `max_minutes` of wall-clock time (checked after each
    epoch); stop after `patience` epochs without the monitored loss improving by `min_delta`."""

    max_epochs: int
    patience: int
    max_minutes: float
    min_delta: float = 1e-4


def train_epochs(
    module: nn.Module,
    run_epoch: Callable[[int], float],
    validate: Callable[[], float] | None,
    rule: StopRule,
    progress: bool = False,
    desc: str = "train",
) -> list[dict[str, float]]:
    """Train `module` epoch by epoch; afterwards it holds the weights of the epoch with the
    lowest validation loss (training loss without `validate`) and is in eval mode.

    `run_epoch(epoch)` trains one epoch and returns its mean training loss; `validate()`
    returns the validation loss. Returns one record per epoch run.
    """
    best, best_state, stale = float("inf"), None, 0
    deadline = time.monotonic() + 60.0 * rule.max_minutes
    history: list[dict[str, float]] = []
    bar = tqdm(range(rule.max_epochs), desc=desc, disable=not progress, unit="epoch")
    try:
        for epoch in bar:
            module.train()
            record = {"epoch": epoch, "train_loss": float(run_epoch(epoch))}
            module.eval()
            monitored = record["train_loss"]
            if validate is not None:
                monitored = record["val_loss"] = float(validate())
            history.append(record)
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "epoch"})
            if monitored < best - rule.min_delta:
                best, best_state, stale = monitored, copy.deepcopy(module.state_dict()), 0
            else:
                stale += 1
            if stale >= rule.patience or time.monotonic() > deadline:
                break
    finally:
        bar.close()
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return history
