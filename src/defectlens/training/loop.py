"""The epoch loop shared by every network defectlens trains (DifferNet's flow, RegAD's
registration): early stopping on a loss over held-out *normal* images, keeping the best
epoch's weights, a wall-clock budget, a progress bar with both losses, and the history.

The caller owns what an epoch is (`run_epoch`: optimiser steps, learning-rate schedule) and
what validation measures (`validate`); the loop owns when to stop and which weights to keep,
so that no method re-implements (and gets subtly wrong) the stopping rule. Ctrl-C propagates
as KeyboardInterrupt after the bar is closed: callers save nothing half-trained. Minibatch
training on tensors (optimiser, schedule, shuffling, device) is `training.trainer`.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from defectlens.errors import DefectLensError, DefectLensWarning, ParameterError


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
    """At most `max_epochs` epochs and `max_minutes` of wall-clock time; stop after `patience`
    epochs without the monitored loss improving by `min_delta`.

    The time budget is a ceiling, not a floor: after each epoch, the next one is started only
    if, at the pace of the epoch just run (validation included), it would end within the
    budget. Checking only that the budget was not yet spent let the last epoch run past it,
    by up to one epoch: 50 s for Uninformed Students on 400 board images on 2 cores."""

    max_epochs: int
    patience: int
    max_minutes: float
    min_delta: float = 1e-4


class TrainingDiverged(DefectLensError):
    """The loss became NaN or infinite before any epoch finished with a finite one."""


def train_epochs(
    module: nn.Module,
    run_epoch: Callable[[int], float],
    validate: Callable[[], float] | None,
    rule: StopRule,
    progress: bool = False,
    desc: str = "train",
) -> list[dict[str, Any]]:
    """Train `module` epoch by epoch; afterwards it holds the weights of the epoch with the
    lowest validation loss (training loss without `validate`) and is in eval mode.

    `run_epoch(epoch)` trains one epoch and returns its mean training loss (NaN as soon as a
    step's loss is not finite, before that step updates anything); `validate()` returns the
    validation loss. Returns one record per epoch run; the last one also says why training
    stopped (`stopped`: "patience", "time budget", "max_epochs" or "non-finite loss"). A
    non-finite loss stops training with the last good epoch's weights and a warning, or raises
    TrainingDiverged if no epoch was good.
    """
    best, best_state, stale = float("inf"), None, 0
    deadline = time.monotonic() + 60.0 * rule.max_minutes
    history: list[dict[str, Any]] = []
    stopped = "max_epochs"
    bar = tqdm(range(rule.max_epochs), desc=desc, disable=not progress, unit="epoch")
    try:
        for epoch in bar:
            epoch_start = time.monotonic()
            module.train()
            record: dict[str, Any] = {"epoch": epoch, "train_loss": float(run_epoch(epoch))}
            module.eval()
            monitored = record["train_loss"]
            if validate is not None and math.isfinite(monitored):
                monitored = record["val_loss"] = float(validate())
            history.append(record)
            bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "epoch"})
            if not (math.isfinite(record["train_loss"]) and math.isfinite(monitored)):
                stopped = "non-finite loss"
                for key in ("train_loss", "val_loss"):  # JSON has no NaN: saved as null
                    if key in record and not math.isfinite(record[key]):
                        record[key] = None
                break
            if monitored < best - rule.min_delta:
                best, best_state, stale = monitored, copy.deepcopy(module.state_dict()), 0
                record["best"] = True
            else:
                stale += 1
            if stale >= rule.patience:
                stopped = "patience"
                break
            now = time.monotonic()
            if now + (now - epoch_start) > deadline:  # the next epoch would end past it
                stopped = "time budget"
                break
    finally:
        bar.close()
    if history:
        history[-1]["stopped"] = stopped
    if stopped == "non-finite loss":
        if best_state is None:
            raise TrainingDiverged(
                f"{desc}: the loss became NaN or infinite in the first epoch; nothing was "
                "saved. Lower the learning rate, or check the images"
            )
        warnings.warn(
            f"{desc}: the loss became NaN or infinite at epoch {len(history)}; training "
            f"stopped and keeps the weights of epoch {_best_epoch(history) + 1}",
            DefectLensWarning,
            stacklevel=2,
        )
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return history


def _best_epoch(history: list[dict[str, Any]]) -> int:
    return max(r["epoch"] for r in history if r.get("best"))
