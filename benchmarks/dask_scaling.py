"""Scale-out on Dask against one machine (issue 13). One JSON line per measurement.

    python benchmarks/dask_scaling.py DATA [--workers 1 2] [--fit]

DATA is an MVTec-layout category. A PaDiM model is fitted on DATA's train/good once (locally),
then all of DATA's images (test/ and train/, for speed only) are scored with
`defectlens predict MODEL DATA/test DATA/train --no-images`:
locally, and with `--dask local:N` for each N. Reported per run: the wall time of the command
(start-up, model loading and, for Dask, starting the workers included), the rate it prints
for its scoring loop, and whether results.csv equals the local run's row for row. Then the
scheduler's own cost per task: 500 trivial tasks on a 1-worker LocalCluster, submitted at
once and gathered. With --fit: `defectlens fit DATA --dask local:2` against the local fit
(wall time, and the largest relative difference of every saved tensor).

With --external N, the workers are not started by defectlens but as on a real cluster: a
`dask scheduler` and `dask worker ADDRESS --nworkers N --nthreads 1` (Dask's own command
line, so Dask's defaults apply, such as one numerical thread per worker), on loopback; the
runs then use `--dask tcp://127.0.0.1:PORT`. This exercises the address path and the worker
preparation that a cluster started by anyone gets; it is not several machines.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "defectlens"]


def run(args: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([*CLI, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr}")
    return seconds, done.stdout + done.stderr


def rate(output: str) -> float:
    match = re.search(r"\(([\d.]+) img/s\)", output)
    return float(match.group(1)) if match else float("nan")


def noop(x: int) -> int:
    return x


def scheduler_overhead(tasks: int = 500) -> dict:
    from dask.distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.gather(client.map(noop, range(10)))  # warm-up
        started = time.perf_counter()
        client.gather(client.map(noop, range(tasks), pure=False))
        seconds = time.perf_counter() - started
    return {"what": "scheduler overhead", "tasks": tasks, "ms_per_task": 1000 * seconds / tasks}


@contextmanager
def external_cluster(workers: int) -> Iterator[str]:
    """A scheduler and `workers` worker processes started by Dask's command line, as an
    operator would start them; stopped on exit."""
    from dask.distributed import Client

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    dask = [str(Path(sys.executable).with_name("dask"))]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    scheduler = subprocess.Popen(
        [*dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        **quiet,
    )
    worker = subprocess.Popen(
        [*dask, "worker", address, "--nworkers", str(workers), "--nthreads", "1",
         "--no-dashboard"],
        **quiet,
    )  # fmt: skip
    try:
        with Client(address, timeout=30) as client:
            client.wait_for_workers(workers, timeout=60)
        yield address
    finally:
        for process in (worker, scheduler):
            process.terminate()
            process.wait(timeout=30)


def max_relative_difference(a: Path, b: Path) -> dict[str, float]:
    import numpy as np
    from safetensors.numpy import load_file

    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    out = {}
    for name, x in left.items():
        y = right[name].astype(np.float64)
        out[name] = float(np.abs(x.astype(np.float64) - y).max() / max(np.abs(y).max(), 1e-300))
    return out


def _same_rows(a: Path, b: Path) -> dict:
    """Rows compared: every column equal but the score, scores to 1e-5 relative (float32
    rounding: torch and onnxruntime results can differ in the last bits between processes)."""
    import csv

    left, right = (list(csv.DictReader(p.open())) for p in (a, b))
    paths = [r["path"] for r in left] == [r["path"] for r in right]
    other = all(
        {k: v for k, v in x.items() if k != "score"} == {k: v for k, v in y.items() if k != "score"}
        for x, y in zip(left, right, strict=True)
    )
    worst = max(
        (abs(float(x["score"]) - float(y["score"])) / abs(float(y["score"])) for x, y in
         zip(left, right, strict=True) if y["score"]),
        default=0.0,
    )  # fmt: skip
    exact = sum(x["score"] == y["score"] for x, y in zip(left, right, strict=True))
    return {
        "same_paths_in_order": paths,
        "same_decisions_and_pixels": other,
        "scores_identical_as_written": exact,
        "of": len(right),
        "max_relative_score_difference": worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--fit", action="store_true")
    parser.add_argument(
        "--external",
        type=int,
        metavar="N",
        help="also run against a cluster of N worker processes started by Dask's command line",
    )
    args = parser.parse_args()
    name = args.data.name
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "model"
        seconds, _ = run(["fit", str(args.data), "--out", str(model), "-q"])
        print(json.dumps({"what": "fit padim", "data": name, "where": "local", "s": seconds}))
        test = [str(args.data / "test"), str(args.data / "train")]  # speed only: every image
        local = tmp / "local"
        seconds, output = run(["predict", str(model), *test, "--no-images", "--out", str(local)])
        line = {"what": "predict", "data": name, "where": "local"}
        print(json.dumps({**line, "wall_s": seconds, "img_per_s": rate(output)}), flush=True)
        for n in args.workers:
            measure(args, tmp / f"local{n}", f"local:{n}", f"local:{n}", model, local)
        if args.external:  # started only now, so that its idle processes stay out of the rest
            with external_cluster(args.external) as address:
                label = f"dask worker --nworkers {args.external}"
                measure(args, tmp / "external", address, label, model, local)
    print(json.dumps(scheduler_overhead()), flush=True)


def measure(
    args: argparse.Namespace, tmp: Path, address: str, label: str, model: Path, local: Path
) -> None:
    """With --fit, a fit on `address` against the local `model`; then scoring every image on
    it against the `local` run's results."""
    name = args.data.name
    tmp.mkdir()
    if args.fit:
        target = tmp / "model"
        seconds, _ = run(["fit", str(args.data), "--out", str(target), "--dask", address, "-q"])
        diff = max_relative_difference(target, model)
        line = {"what": "fit padim", "data": name, "where": label, "s": seconds}
        print(json.dumps({**line, "max_relative_difference": diff}), flush=True)
    test = [str(args.data / "test"), str(args.data / "train")]
    out = tmp / "predict"
    seconds, output = run(
        ["predict", str(model), *test, "--no-images", "--out", str(out), "--dask", address]
    )
    same = _same_rows(out / "results.csv", local / "results.csv")
    line = {"what": "predict", "data": name, "where": label, "images": same["of"]}
    print(
        json.dumps({**line, "wall_s": seconds, "img_per_s": rate(output), "same": same}),
        flush=True,
    )


if __name__ == "__main__":
    main()
