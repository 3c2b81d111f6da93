"""Reaching a Dask cluster: a scheduler's address, or `local[:N]` for worker processes here."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from defectlens.allocator import reuse_freed_memory
from defectlens.blas import numpy_blas_single_threaded
from defectlens.components.distances import default_threads
from defectlens.errors import DefectLensError, option

CONNECT_TIMEOUT_S = 5.0  # an unreachable scheduler is an error after this long, not a hang
WORKER_TIMEOUT_S = 30.0  # a reachable scheduler with no worker: an error after this long
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_LOCAL = re.compile(r"^local(?::(\d+))?$")


def local_workers(address: str) -> int | None:
    """N for `local:N` (`local`: one worker per core), None for a scheduler address."""
    match = _LOCAL.match(address.strip())
    if match is None:
        return None
    n = int(match.group(1)) if match.group(1) else (os.cpu_count() or 1)
    if not 1 <= n <= 256:
        given = option("--dask", "address", address)
        raise DefectLensError(f"{given}: give between 1 and 256 local workers")
    return n


def _import_dask() -> Any:
    try:
        import dask.distributed
    except ImportError:
        raise DefectLensError(
            f"{option('--dask', 'scoring on Dask')} needs Dask on this machine and on the "
            "workers: pip install 'defectlens[dask]'"
        ) from None
    return dask.distributed


@contextmanager
def connect(address: str, connect_timeout: float = CONNECT_TIMEOUT_S) -> Iterator[Any]:
    """A `dask.distributed.Client` for `address`, closed (with its local cluster) on exit.

    `local:N` starts N worker processes on this machine, each with one task thread and
    cores / N threads for torch and onnxruntime (Dask's own default is one thread per
    worker for numerical libraries, which would leave cores idle). Anything else is a
    scheduler's address (`tcp://host:8786`, `host:8786`), which must answer within
    `connect_timeout` seconds and have a worker within `WORKER_TIMEOUT_S`.
    """
    distributed = _import_dask()
    n = local_workers(address)
    cluster = None
    if n is not None:
        threads = max(1, (os.cpu_count() or 1) // n)
        cluster = distributed.LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address="127.0.0.1:0",  # None still takes port 8787 for its HTTP server
            silence_logs=logging.ERROR,
            # Dask's nanny sets these three to 1 unless told otherwise.
            env={name: str(threads) for name in _THREAD_VARIABLES},
        )
        client = distributed.Client(cluster)
    else:
        try:
            client = distributed.Client(address, timeout=connect_timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise DefectLensError(
                f"cannot connect to a Dask scheduler at {address} ({detail}); give "
                "tcp://HOST:PORT of a running scheduler, or local[:N]"
            ) from None
    try:
        try:
            client.wait_for_workers(1, timeout=WORKER_TIMEOUT_S)
        except (TimeoutError, OSError):
            raise DefectLensError(
                f"the Dask scheduler at {address} has no worker after {WORKER_TIMEOUT_S:g} s; "
                "start some (`dask worker ADDRESS`)"
            ) from None
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def worker_count(client: Any) -> int:
    """How many workers the cluster has now."""
    return max(1, len(client.nthreads()))


def prepare_worker() -> None:
    """Undo two of Dask's worker defaults that cost defectlens's work its speed (called
    before the model is loaded):

    - Threads: give torch (and through it onnxruntime, whose sessions take torch's count),
      the OpenMP pools and faiss's BLAS the threads this worker should use: OMP_NUM_THREADS,
      which `local:N` sets to cores / N and Dask's nanny defaults to 1. Set explicitly
      because a worker's task thread reports one torch thread whatever the environment says.
      numpy's own BLAS then gets one thread, as in every scoring process
      (`blas.numpy_blas_single_threaded`); PaDiM's Mahalanobis step has threads of its own.
    - Memory: large arrays come from the heap again (`allocator.reuse_freed_memory`), not
      from a fresh mapping each time, as the nanny's `MALLOC_TRIM_THRESHOLD_` made them.
    """
    reuse_freed_memory()
    threads = default_threads()  # the Mahalanobis step's own rule: OMP_NUM_THREADS, else CPUs
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)  # every BLAS and OpenMP pool loaded so far
    except ImportError:  # threadpoolctl is a dependency; a worker may still lack it
        pass
    numpy_blas_single_threaded()  # but numpy's: its idle threads spin (defectlens.blas)
    try:
        import torch
    except ImportError:  # a worker scoring exports only
        return
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
