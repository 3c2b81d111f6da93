"""Process settings of the scoring processes: glibc's allocator as the service and Dask workers
set it (`defectlens.allocator`), and numpy's BLAS threads (`defectlens.blas`). Each is checked
in a fresh process, by what it changes there."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from defectlens.allocator import limit_arenas

glibc_only = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="these settings are glibc's mallopt"
)

ARENA_PROBE = """
import ctypes, ctypes.util, sys, threading
import numpy as np
from defectlens.allocator import limit_arenas
if sys.argv[1] == "cap":
    assert limit_arenas(2)
kept, together = [], threading.Barrier(8)
def allocate():
    kept.append([np.ones(2000) for _ in range(50)])  # 16 KB blocks: from the thread's arena
    together.wait()  # all alive at once, so none can take over an arena another let go
threads = [threading.Thread(target=allocate) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, (ctypes.c_char_p, ctypes.c_char_p)
libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
libc.fclose.argtypes = (ctypes.c_void_p,)
stream = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info(0, stream)
libc.fclose(stream)
print(open(sys.argv[2]).read().count("<heap nr="))
"""

FAULT_PROBE = """
import resource, sys
import numpy as np
from defectlens.allocator import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
np.ones(1_000_000).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    np.ones(1_000_000).sum()  # 8 MB, allocated and freed again: a batch's tensor
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(script: str, *args: str, env: dict[str, str]) -> int:
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=env,
    )
    return int(done.stdout.strip())


@glibc_only
def test_the_service_cap_makes_threads_share_two_arenas(tmp_path, monkeypatch):
    """What keeps the server's memory from creeping under load: threads started after the
    cap share 2 arenas (8 without it). A MALLOC_ARENA_MAX the user set wins."""
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    env = dict(os.environ)
    assert _probe(ARENA_PROBE, "cap", str(tmp_path / "cap.xml"), env=env) == 2
    assert _probe(ARENA_PROBE, "default", str(tmp_path / "default.xml"), env=env) > 2
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert not limit_arenas()
    with pytest.raises(ValueError, match="at least 1"):
        limit_arenas(0)


@glibc_only
def test_a_dask_worker_reuses_large_arrays_despite_the_nannys_trim_threshold(monkeypatch):
    """Under Dask's MALLOC_TRIM_THRESHOLD_=65536 every 8 MB array is a fresh mapping,
    page-faulted in (hundreds of faults each, measured 420-930); after `reuse_freed_memory` it
    is the same heap memory again, and the faults vanish. This was Dask's per-worker slowdown."""
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    env = dict(os.environ)
    mapped = _probe(FAULT_PROBE, "default", env=env)
    reused = _probe(FAULT_PROBE, "reuse", env=env)
    assert mapped > 100 * 100  # 100 arrays, each mapped and faulted in afresh
    assert reused < mapped / 20, (reused, mapped)


BLAS_PROBE = """
import json
import faiss, numpy
from threadpoolctl import threadpool_info
from defectlens.blas import numpy_blas_single_threaded
before = {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
assert numpy_blas_single_threaded()
after = {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
print(json.dumps([before, after]))
"""


def test_scoring_processes_keep_numpys_blas_to_one_thread_and_leave_faiss_alone():
    """numpy's OpenBLAS (whose idle helpers spun for 0.1 s after each map resampling, taking a
    core from the next image) goes to one thread; faiss's own OpenBLAS keeps its threads."""
    done = subprocess.run(
        [sys.executable, "-c", BLAS_PROBE], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    before, after = json.loads(done.stdout)
    numpy_libs = [path for path in after if "numpy" in path]
    assert numpy_libs and all(after[path] == 1 for path in numpy_libs)
    others = [path for path in after if path not in numpy_libs]
    assert others and all(after[path] == before[path] for path in others)  # faiss's
