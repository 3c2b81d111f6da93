"""Choosing a configuration from normal images only, on a synthetic-defect task.

A user starting a new line has good parts and no labelled defects. Each candidate
configuration (method, backbone, image size, method parameters) is fitted on most of the normal
training images; the rest are held out and turned into a task: each held-out image as it is
(normal) and once with a synthetic defect of each kind (`data.synthetic.paste_defect`: drawn
scratches, spots, holes, foreign patches and smudges, and defects made of the image's own
texture, with exact masks). Candidates are ranked by image AUROC on that task, then AUPRO.
Nothing under test/ is read, and no test label is used: the ranking can be trusted as far as
synthetic defects resemble real ones, which BENCHMARKS.md measures against the real test sets.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from defectlens.data.dataset import find_normal_images
from defectlens.data.loader import iter_batches
from defectlens.data.synthetic import ALL_DEFECTS, DEFECTS, defect_kinds, paste_defect, to_uint8
from defectlens.detector import Detector, check_readable
from defectlens.errors import DataError, DefectLensError
from defectlens.metrics import aupro, auroc

MAX_TASK_IMAGES = 48  # held-out normal images made into the task (each also with defects)
# The defect kinds of the task, by default: the drawn ones. The self-texture kinds rank
# candidates worse on kolektorsdd (BENCHMARKS.md, "Which synthetic defects").
DEFAULT_DEFECTS = DEFECTS


@dataclass(frozen=True)
class Candidate:
    """One configuration to try: what `Detector` is built from."""

    method: str
    backbone: str = "efficientnet_lite0"
    image_size: int = 256
    method_params: tuple[tuple[str, Any], ...] = ()  # hashable; see `params`

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.method_params)

    @property
    def label(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.method_params)
        return f"{self.method} / {self.backbone} / {self.image_size}{extra}"

    def detector(self, batch_size: int, seed: int) -> Detector:
        return Detector(
            method=self.method,
            backbone=self.backbone,
            image_size=self.image_size,
            batch_size=batch_size,
            seed=seed,
            method_params=self.params,
        )


@dataclass
class Outcome:
    """How a candidate did on the synthetic task (or why it has no result)."""

    candidate: Candidate
    image_auroc: float = float("nan")
    aupro: float = float("nan")
    fit_s: float = float("nan")
    score_img_per_s: float = float("nan")
    error: str | None = None
    by_kind: dict[str, float] = field(default_factory=dict)  # image AUROC per defect kind
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate.label,
            "method": self.candidate.method,
            "backbone": self.candidate.backbone,
            "image_size": self.candidate.image_size,
            "params": " ".join(f"{k}={v}" for k, v in self.candidate.method_params),
            "synthetic_image_auroc": self.image_auroc,
            "synthetic_aupro": self.aupro,
            "fit_s": self.fit_s,
            "score_img_per_s": self.score_img_per_s,
            "auroc_by_kind": " ".join(f"{k}={v:.3f}" for k, v in self.by_kind.items()),
            "error": self.error or "",
        }


@dataclass
class SyntheticTask:
    """N held-out normal images as they are, then each with one defect of the first kind,
    each with one of the second kind, ...: arrays (N (1 + K), S, S, 3) uint8, labels, masks
    (S, S) bool, and each image's defect kind ("" for the normal ones)."""

    images: list[np.ndarray]
    labels: np.ndarray
    masks: list[np.ndarray]
    sources: list[Path]  # the held-out normal images (also the validation images of each fit)
    kinds: list[str]


def split_for_selection(
    images: Sequence[Path], seed: int, max_task: int = MAX_TASK_IMAGES
) -> tuple[list[Path], list[Path]]:
    """(images to fit on, images for the task): a seeded 20 % (at most `max_task`, at least
    2) held out; at least 2 left to fit on."""
    if len(images) < 4:
        raise DataError(
            f"selection needs at least 4 normal images (2 to fit on, 2 for the synthetic "
            f"task), got {len(images)}"
        )
    n_task = min(max_task, max(2, round(0.2 * len(images))))
    order = np.random.default_rng(seed).permutation(len(images))
    task = sorted(order[:n_task].tolist())
    fit = sorted(order[n_task:].tolist())
    return [images[i] for i in fit], [images[i] for i in task]


def make_task(
    sources: Sequence[Path], side: int, seed: int, kinds: Sequence[str] = DEFAULT_DEFECTS
) -> SyntheticTask:
    """The task at `side` x `side` pixels (the largest candidate image size, so no candidate
    sees upsampled defects): every source, and every source once with a defect of each kind
    in `kinds`. Every image gets every kind, not one kind at random, so a few dozen held-out
    images give a stable ranking; each kind draws from its own seeded stream, so a kind's
    defects are the same whichever other kinds are asked for."""
    kinds = defect_kinds(kinds)
    arrays = [
        image.transpose(1, 2, 0)
        for batch in iter_batches(list(sources), side, 32)
        for image in batch.images
    ]
    images = [to_uint8(a) for a in arrays]
    masks = [np.zeros((side, side), bool) for _ in arrays]
    labels = [0] * len(arrays)
    task_kinds = [""] * len(arrays)
    for index, kind in enumerate(ALL_DEFECTS):
        if kind not in kinds:
            continue
        rng = np.random.default_rng([seed, index])
        for array in arrays:
            pasted, mask = paste_defect(array, rng, (kind,))
            images.append(to_uint8(pasted))
            masks.append(mask)
            labels.append(1)
            task_kinds.append(kind)
    return SyntheticTask(images, np.array(labels), masks, list(sources), task_kinds)


def try_candidate(
    candidate: Candidate,
    fit_images: Sequence[Path],
    task: SyntheticTask,
    batch_size: int = 32,
    seed: int = 0,
    device: str | None = "auto",
    keep_detector: bool = False,
) -> Outcome:
    """Fit `candidate` on `fit_images` (thresholds from the task's normal sources, which it
    never fits on) and score the task. A candidate that fails says why, and ranks last. With
    `keep_detector`, the fitted detector is in `extra["detector"]` (for studies that also
    evaluate it on real defects)."""
    outcome = Outcome(candidate)
    try:
        detector = candidate.detector(batch_size, seed)
        started = time.perf_counter()
        detector.fit(list(fit_images), val_images=task.sources, device=device)
        outcome.fit_s = time.perf_counter() - started
        started = time.perf_counter()
        predictions = detector.predict(task.images)
        outcome.score_img_per_s = len(task.images) / (time.perf_counter() - started)
    except DefectLensError as exc:  # a parameter a method refuses, a fit that failed
        outcome.error = str(exc).splitlines()[0]
        return outcome
    if keep_detector:
        outcome.extra["detector"] = detector
    scores = np.array([p.score for p in predictions])
    outcome.image_auroc = auroc(scores, task.labels)
    kinds = np.array(task.kinds)
    for kind in dict.fromkeys(task.kinds[len(task.sources) :]):
        chosen = (kinds == kind) | (task.labels == 0)
        outcome.by_kind[kind] = auroc(scores[chosen], task.labels[chosen])
    if all(p.anomaly_map is not None for p in predictions):
        outcome.aupro = aupro([p.anomaly_map for p in predictions], task.masks)
    return outcome


def rank(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """Best first: image AUROC, then AUPRO; candidates without a result last."""

    def key(outcome: Outcome) -> tuple[float, float]:
        image = outcome.image_auroc if np.isfinite(outcome.image_auroc) else -1.0
        pixel = outcome.aupro if np.isfinite(outcome.aupro) else -1.0
        return (-image, -pixel)

    return sorted(outcomes, key=key)


# Synthetic image AUROCs closer than this are a tie: on the development sets, candidates this
# close on the task differed by up to 0.017 on real defects (elpv_poly, BENCHMARKS.md).
TIE_AUROC = 0.005


def near_ties(ranked: Sequence[Outcome]) -> list[Outcome]:
    """The candidates after the first of `ranked` whose synthetic image AUROC is within
    `TIE_AUROC` of its: the ones the task cannot tell from the winner."""
    if not ranked or not np.isfinite(ranked[0].image_auroc):
        return []
    top = ranked[0].image_auroc
    return [
        o for o in ranked[1:] if np.isfinite(o.image_auroc) and o.image_auroc >= top - TIE_AUROC
    ]


def select(
    data: str | Path,
    candidates: Sequence[Candidate],
    budget_s: float | None = None,
    batch_size: int = 32,
    seed: int = 0,
    device: str | None = "auto",
    on_outcome: Callable[[Outcome], None] | None = None,
    defects: Sequence[str] = DEFAULT_DEFECTS,
) -> list[Outcome]:
    """Try every candidate on DATA's normal images (train/good of an MVTec root; never
    test/), best first, on a task with the `defects` kinds. After `budget_s` seconds, the
    remaining candidates are not tried and say so. `on_outcome` hears each result as it comes
    (progress)."""
    if not candidates:
        raise DefectLensError("no candidate configuration to try")
    images = find_normal_images(data)
    fit_images, held_out = split_for_selection(images, seed)
    check_readable(images)
    task = make_task(held_out, max(c.image_size for c in candidates), seed, defects)
    started = time.monotonic()
    outcomes = []
    for candidate in candidates:
        if budget_s is not None and time.monotonic() - started > budget_s:
            outcome = Outcome(candidate, error="not tried: the time budget was spent")
        else:
            outcome = try_candidate(candidate, fit_images, task, batch_size, seed, device)
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    return rank(outcomes)
