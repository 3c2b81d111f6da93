"""A real `defectlens serve` process on loopback, and a load generator for it: shared by the
dashboard test, the load test and benchmarks/serve_load.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    """The system Chromium (Playwright's own browser download cannot work offline)."""
    path = os.environ.get("DEFECTLENS_CHROMIUM") or shutil.which("chromium")
    if not path:
        raise RuntimeError("the dashboard test needs Chromium: run `make test` (it installs it)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(
    models: Sequence[str | Path], *args: str, startup_s: float = 60.0
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`defectlens serve MODELS... ARGS` on a free loopback port until the block ends; yields
    (base URL, process). Stops it with SIGTERM (graceful) and fails loudly if it never became
    ready."""
    port = free_port()
    command = [sys.executable, "-m", "defectlens", "serve", *map(str, models), "--port", str(port)]
    process = subprocess.Popen(
        [*command, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy()
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if process.poll() is not None:
                output = process.stdout.read().decode(errors="replace")
                raise RuntimeError(f"defectlens serve exited with {process.returncode}:\n{output}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"defectlens serve was not ready within {startup_s:g} s")
            time.sleep(0.2)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def run_load(
    url: str,
    model: str,
    images: Sequence[tuple[str, bytes]],
    expected: dict[str, float],
    clients: int = 4,
    requests: int = 2000,
    rel: float = 1e-5,
    per_request: int = 1,
) -> dict:
    """`requests` predict calls of `per_request` images each, from `clients` threads with
    keep-alive connections, cycling through `images`; every answer is checked against
    `expected` (score by file name, to `rel`: a batch's size changes float32 summation
    order). Latencies are per request; `images_per_s` counts images."""
    lock = threading.Lock()
    next_index = [0]
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    wrong: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60.0) as session:
            while True:
                with lock:
                    i = next_index[0]
                    next_index[0] += 1
                if i >= requests:
                    return
                sent = [images[(i * per_request + j) % len(images)] for j in range(per_request)]
                start = time.perf_counter()
                response = session.post(
                    f"/v1/models/{model}/predict",
                    files=[("images", (name, data, "image/png")) for name, data in sent],
                )
                elapsed = time.perf_counter() - start
                problems = []
                if response.status_code == 200:
                    results = response.json()["results"]
                    if len(results) != len(sent):
                        problems.append(f"{len(results)} results for {len(sent)} images")
                    for (name, _), result in zip(sent, results, strict=False):
                        score = result["score"]
                        if abs(score - expected[name]) > rel * max(abs(expected[name]), 1e-12):
                            problems.append(f"{name}: score {score} != {expected[name]}")
                with lock:
                    latencies.append(elapsed)
                    statuses[response.status_code] += 1
                    wrong.extend(problems)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {
        "requests": requests,
        "per_request": per_request,
        "clients": clients,
        "statuses": dict(statuses),
        "wrong": wrong[:5],
        "n_wrong": len(wrong),
        "wall_s": wall,
        "images_per_s": requests * per_request / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
    }
