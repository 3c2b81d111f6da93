"""PaDiM fitted on a Dask cluster: the same model as a local fit, to float rounding.

PaDiM's statistics are sums over images (per position: the count, the sum of embeddings and
the sum of their outer products, in float64; `components.gaussian.GaussianAccumulator`), so
partitions of the training images can be embedded and summed on different workers and the
partial sums added. The sums are kept relative to a shift (for precision); a local fit uses the
first batch's mean, so the cluster first computes that same mean, and every partition sums
relative to it: the partial sums then add exactly, and only the order of additions differs
from a local fit. The Gaussians are finalised once, on a worker (the packed float32 factors
travel back to the client, a quarter of the float64 sums), and the thresholds are set on the
client from the validation images, as `Detector.fit` sets them.

SPADE and PatchCore could distribute their feature extraction the same way (their memory bank
is the concatenation of per-image features), but PatchCore's coreset selection is a greedy pass
over the whole bank, and the trained methods' optimisation is sequential: those fit on one
machine (see the README).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from defectlens.components.gaussian import GaussianAccumulator
from defectlens.data.loader import ImageInput
from defectlens.detector import Detector, check_readable
from defectlens.distributed.cluster import prepare_worker, worker_count
from defectlens.errors import DataError, DefectLensError

DISTRIBUTED_METHODS = ("padim",)

# -- on the workers ----------------------------------------------------------------------------
_detectors: dict[str, Detector] = {}  # per worker process: parameters -> a detector to embed with
_lock = threading.Lock()


def _worker_detector(params: dict[str, Any]) -> Detector:
    key = json.dumps(params, sort_keys=True)
    with _lock:
        prepare_worker()
        detector = _detectors.get(key)
        if detector is None:
            detector = Detector(**params)
            detector.model_.begin_fit(detector.ensure_extractor())
            _detectors.clear()
            _detectors[key] = detector
        return detector


def padim_sums(
    params: dict[str, Any], sources: Sequence[str], shift: Any | None
) -> GaussianAccumulator:
    """One task: the sums of a partition's embeddings (relative to `shift`; None: to the mean
    of the partition's first batch, as a local fit does)."""
    detector = _worker_detector(params)
    accumulator = GaussianAccumulator(shift)
    extractor = detector.ensure_extractor()
    return detector.model_.accumulate(extractor, detector.fit_batches(sources), accumulator)


def padim_shift(params: dict[str, Any], sources: Sequence[str]) -> Any:
    """The first batch's mean embedding: the shift a local fit sums relative to."""
    return padim_sums(params, sources, None).shift


def combined(first: GaussianAccumulator, second: GaussianAccumulator) -> GaussianAccumulator:
    """A new accumulator with both one's sums: inputs are left as they are, so a task that runs
    again (after a worker died) sees the same inputs."""
    return GaussianAccumulator().merge(first).merge(second)


def padim_state(params: dict[str, Any], accumulator: GaussianAccumulator) -> dict[str, Any]:
    """The fitted tensors from the total sums, computed on a worker: what comes back to the
    client is the model (the packed factor, 4 bytes a value) instead of the float64 sums."""
    model = Detector(**params).model_
    model.channel_index = _worker_detector(params).model_.channel_index
    model.finish_fit(accumulator)
    return model.fitted_state()


# -- on the client -----------------------------------------------------------------------------
def fit_on_cluster(
    client: Any,
    detector: Detector,
    images: str | Path | Sequence[ImageInput],
    val_images: str | Path | Sequence[ImageInput] | None = None,
    progress: bool = False,
    images_per_task: int | None = None,
) -> Detector:
    """Fit `detector` (PaDiM) on the cluster, then set its thresholds here; returns it.

    Images are split as `Detector.fit` splits them and read by the workers (paths must be the
    same there: a shared file system). `images_per_task` defaults to an even share per worker,
    in whole batches (the fewer partial sums, the less to send and add).
    """
    if detector.method not in DISTRIBUTED_METHODS:
        raise DefectLensError(
            f"{detector.method} fits on one machine only; on a Dask cluster: "
            + ", ".join(DISTRIBUTED_METHODS)
        )
    fit_images, val = detector.plan_fit(images, val_images)
    if any(isinstance(p, np.ndarray) for p in fit_images):
        raise DataError("a distributed fit reads images on the workers: give file paths")
    extractor = detector.ensure_extractor()  # missing weights: said before image problems
    check_readable([*fit_images, *val])
    detector.model_.begin_fit(extractor)
    names = [str(p) for p in fit_images]
    per_batch = detector.images_per_batch
    if images_per_task is None:  # one share per worker: the fewest partial sums to add
        share = math.ceil(len(names) / worker_count(client))
        images_per_task = max(1, math.ceil(share / per_batch)) * per_batch
    parts = [names[i : i + images_per_task] for i in range(0, len(names), images_per_task)]
    params = detector.params()
    # The first batch's mean first: the shift every partition sums relative to.
    shift = client.submit(padim_shift, params, names[:per_batch], pure=False)
    futures = [client.submit(padim_sums, params, p, shift, pure=False) for p in parts]
    sizes = {f.key: len(p) for f, p in zip(futures, parts, strict=True)}
    state = client.submit(padim_state, params, _tree_sum(client, futures), pure=False)
    bar = tqdm(total=len(names), desc="fit padim (dask)", disable=not progress, unit="img")
    try:
        from dask.distributed import as_completed

        for future in as_completed(futures):
            future.result()  # a task's error, raised here
            bar.update(sizes[future.key])
        fitted = state.result()
    except DefectLensError:
        raise
    except ValueError as exc:  # finalising: e.g. a covariance that is not positive definite
        raise DefectLensError(f"fitting padim failed: {exc}") from None
    except Exception as exc:  # KilledWorker, or a bug on a worker
        raise DefectLensError(f"fitting padim on the Dask cluster failed: {exc}") from None
    finally:
        bar.close()
    detector.model_.load_fitted_state(fitted)
    return detector.finish_fit(fit_images, val, progress)


def _tree_sum(client: Any, futures: list[Any]) -> Any:
    """Add partial sums pairwise on the workers: no machine ever holds more than three."""
    level = list(futures)
    while len(level) > 1:
        pairs = [
            client.submit(combined, level[i], level[i + 1], pure=False)
            for i in range(0, len(level) - 1, 2)
        ]
        level = pairs + ([level[-1]] if len(level) % 2 else [])
    return level[0]
