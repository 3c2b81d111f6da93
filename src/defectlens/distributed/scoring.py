"""Batch scoring on a Dask cluster, with results identical to `defectlens predict` here.

The model's files travel to each worker once (as the result of one task that every chunk
depends on) and are loaded there once per worker process (cached by the files' SHA-256), not
shipped with each task. Each task scores a chunk of inputs with
`defectlens.scoring.score_files`, exactly what a local run does, reading the images where the
worker is: local paths on a shared file system, or fsspec URLs
(`s3://` with s3fs installed). Results come back in input order, so the client writes the same
rows and pictures a local run writes. A worker that dies takes its running tasks with it and
Dask runs them again elsewhere; the client takes each chunk's result once, so every input
appears exactly once.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import threading
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from defectlens.data.images import get_max_pixels, set_max_pixels
from defectlens.distributed.cluster import prepare_worker, worker_count
from defectlens.errors import DefectLensError
from defectlens.prediction import Predictor
from defectlens.scoring import ScoredFile, score_files

# -- on the workers ----------------------------------------------------------------------------
_models: dict[str, Predictor] = {}  # per worker: files' SHA-256 -> model
_lock = threading.Lock()


def _worker_model(key: str, files: dict[str, bytes], weights: str | None) -> Predictor:
    """The model these files make, loaded on the first task that needs it. One model is kept
    at a time: a worker reused for another run drops the previous one.

    The files are written to a temporary folder only for loading, and removed as soon as the
    model is loaded (a loaded model, saved or exported, reads nothing from its folder again).
    Removing them at the worker's exit is not enough: a nanny stops its worker without running
    exit handlers, and each run would leave a copy of the model behind on every worker.
    """
    from defectlens.loading import load_model

    with _lock:
        prepare_worker()
        if key not in _models:
            _models.clear()  # the previous run's model
            folder = Path(tempfile.mkdtemp(prefix="defectlens-model-"))
            try:
                for name, data in files.items():
                    (folder / name).write_bytes(data)
                _models[key] = load_model(str(folder), weights=weights)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        return _models[key]


def _model_payload(files: dict[str, bytes]) -> dict[str, bytes]:
    return files


def score_chunk(
    key: str,
    files: dict[str, bytes],
    sources: Sequence[str],
    pictures: bool,
    weights: str | None,
    max_pixels: int | None,
) -> tuple[list[ScoredFile], list[str]]:
    """One task: score `sources` on this worker (see `defectlens.scoring.score_files`)."""
    set_max_pixels(max_pixels)
    return score_files(_worker_model(key, files, weights), sources, pictures)


# -- on the client -----------------------------------------------------------------------------
def model_files(folder: str | Path) -> tuple[str, dict[str, bytes]]:
    """(SHA-256 over names and contents, {name: bytes}) of a model or export folder's files."""
    folder = Path(folder)
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    digest = hashlib.sha256()
    for name, data in files.items():
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest(), files


def score_on_cluster(
    client: Any,
    model_dir: str | Path,
    sources: Sequence[str | Path],
    pictures: bool,
    chunk_size: int = 32,
    progress: bool = False,
    weights: str | None = None,
    max_pixels: int | None = None,
) -> Iterator[ScoredFile]:
    """Score `sources` on the cluster; yield a `ScoredFile` per input, in input order.

    At most a few chunks per worker are in flight or waiting to be written, so the client's
    memory does not grow with the number of inputs. Worker warnings (16-bit data, multi-page
    files) arrive as notes of the chunk's first result.
    """
    from dask.distributed import as_completed

    limit = get_max_pixels() if max_pixels is None else max_pixels  # the client's, everywhere
    names = [str(s) for s in sources]
    chunks = [names[i : i + chunk_size] for i in range(0, len(names), chunk_size)]
    if not chunks:
        return
    key, files = model_files(model_dir)
    run = uuid.uuid4().hex[:8]
    # A task that returns the files, not a scatter: Dask's active memory manager drops the
    # extra replicas of scattered data, and scattered data lost with its worker cannot be
    # recovered; a task's result can (the scheduler runs it again from its arguments).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "large graph": deliberate, it is sent once
        shared = client.submit(_model_payload, files, key=f"defectlens-model-{run}", pure=False)
    del files
    window = max(4, 4 * worker_count(client))
    index: dict[str, int] = {}
    outstanding: dict[str, Any] = {}  # key -> future, cancelled if the run stops early
    ready: dict[int, tuple[list[ScoredFile], list[str]]] = {}
    pending = as_completed()
    submitted = written = 0

    def submit() -> None:
        nonlocal submitted
        future = client.submit(
            score_chunk,
            key,
            shared,
            chunks[submitted],
            pictures,
            weights,
            limit,
            key=f"defectlens-score-{run}-{submitted}",
        )
        index[future.key] = submitted
        outstanding[future.key] = future
        pending.add(future)
        submitted += 1

    bar = tqdm(total=len(names), desc="score (dask)", disable=not progress, unit="img")
    try:
        while submitted < min(window, len(chunks)):
            submit()
        while written < len(chunks):
            if written in ready:
                results, notes = ready.pop(written)
                if results and notes:
                    results[0].notes[:0] = notes
                written += 1
                if submitted < len(chunks):
                    submit()
                yield from results
                continue
            future = next(pending)
            i = index.pop(future.key)
            del outstanding[future.key]
            try:
                ready[i] = future.result()
            except DefectLensError:
                raise
            except Exception as exc:  # KilledWorker, or a bug on the worker
                raise DefectLensError(
                    f"the Dask cluster could not score {chunks[i][0]} and the "
                    f"{len(chunks[i]) - 1} images after it: {type(exc).__name__}: {exc}"
                ) from None
            bar.update(len(chunks[i]))
    finally:
        bar.close()
        client.cancel([*outstanding.values(), shared])
