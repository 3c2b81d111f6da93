"""The inspection service under load, against `defectlens predict` on the same images and
model (issue 12). One JSON line per client count.

    python benchmarks/serve_load.py MODEL_DIR IMAGE_FOLDER [--requests 2000] [--clients 1 4 16]
        [--per-request N]

- predict img/s: `defectlens predict MODEL IMAGES --no-images --out ...`: the wall time of
  the command (start-up and model loading included), and the rate it prints for its own
  scoring loop; and the same loop in this process after loading (`iter_predict` over the
  files, three passes after a warm-up: decode, resize, score, full-size maps).
- service: a real `defectlens serve MODEL` on loopback; N client threads with keep-alive
  connections send requests of `--per-request` images (default 1; multipart PNG) until
  `--requests` are done; every
  response's score is checked against the in-process prediction (to 1e-5: batch size changes
  float32 summation order). Reported: status counts, wrong scores, p50/p90/p99 latency,
  throughput, the server's resident memory before and after the run (after a warm-up), the
  mean images per scored batch and the share of the run its scoring worker was busy.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from defectlens.data.dataset import list_images  # noqa: E402
from defectlens.loading import load_model  # noqa: E402
from tests.server import rss_mb, run_load, running_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("images")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--serve-arg", action="append", default=[], help="passed to serve")
    parser.add_argument(
        "--per-request",
        type=int,
        default=1,
        metavar="N",
        help="images per request (the service takes at most 32); throughput counts images",
    )
    parser.add_argument(
        "--soak",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="instead of the comparison: ROUNDS x --requests against one fresh server, its "
        "memory after each round; the rounds take the --clients counts in turn",
    )
    parser.add_argument(
        "--soak-minutes",
        type=float,
        default=0.0,
        metavar="M",
        help="with --soak: start no round after M minutes (0: run every round)",
    )
    args = parser.parse_args()
    if not 1 <= args.per_request <= 32:
        parser.error("--per-request must be between 1 and 32 (the service's limit)")
    if args.soak_minutes and not args.soak:
        parser.error("--soak-minutes limits a --soak run; give --soak ROUNDS too")
    paths = list_images(Path(args.images))
    images = [(p.name, p.read_bytes()) for p in paths]
    if len({name for name, _ in images}) != len(images):
        raise SystemExit("image file names must be unique")
    predictor = load_model(args.model)
    expected = {Path(p.source).name: p.score for p in predictor.iter_predict(paths)}
    start = time.perf_counter()  # after that warm-up: three passes, for a stable rate
    for _ in range(3):
        list(predictor.iter_predict(paths))
    in_process = 3 * len(paths) / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "defectlens", "predict", args.model, args.images]
        start = time.perf_counter()
        done = subprocess.run(
            [*command, "--no-images", "--out", f"{out}/r", "-q"],
            check=True,
            capture_output=True,
            text=True,
        )
        cli = len(paths) / (time.perf_counter() - start)
        # the command's own rate, printed at its end: its scoring loop, without start-up
        cli_loop = float(re.search(r"\(([\d.]+) img/s\)", done.stdout + done.stderr).group(1))
    model = Path(args.model).resolve().name
    if args.soak:
        soak(args, model, images, expected)
        return
    with running_server([args.model], *args.serve_arg) as (url, process):
        run_load(url, model, images, expected, clients=4, requests=100)  # warm-up
        for clients in args.clients:
            before, batches = rss_mb(process.pid), batch_counters(url, model)
            result = run_load(
                url, model, images, expected, clients, args.requests, per_request=args.per_request
            )
            after = rss_mb(process.pid)
            after_batches = batch_counters(url, model)
            row = {
                "model": args.model,
                "method": predictor.method,
                "images": args.images,
                "n_images": len(paths),
                "predict_cli_img_s": round(cli, 1),
                "predict_cli_loop_img_s": cli_loop,
                "predict_in_process_img_s": round(in_process, 1),
                **{k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()},
                "ratio_to_in_process": round(result["images_per_s"] / in_process, 3),
                "ratio_to_cli_loop": round(result["images_per_s"] / cli_loop, 3),
                "rss_before_mb": round(before, 1),
                "rss_after_mb": round(after, 1),
                **batch_stats(batches, after_batches, result["wall_s"]),
            }
            print(json.dumps(row), flush=True)


def batch_counters(url: str, model: str) -> tuple[float, float, float] | None:
    """Batches and images scored and the worker's busy seconds so far, from /metrics (None
    from a version of the service that did not count them)."""
    text = httpx.get(f"{url}/metrics").text
    values = []
    for series in (
        "defectlens_batch_images_count",
        "defectlens_batch_images_sum",
        "defectlens_scoring_seconds_total",
    ):
        found = re.search(re.escape(series + '{model="' + model + '"}') + r" (\S+)", text)
        if found is None:
            return None
        values.append(float(found.group(1)))
    return tuple(values)


def batch_stats(before, after, wall_s: float) -> dict:
    """Mean images per batch and the share of the run the scoring worker was busy."""
    if before is None or after is None:
        return {}
    n_batches, n_images, busy = (b - a for a, b in zip(before, after, strict=True))
    return {"mean_batch": round(n_images / n_batches, 2), "worker_busy": round(busy / wall_s, 3)}


def soak(args, model: str, images, expected) -> None:
    """The server's memory over repeated load (issue 12's memory check). Cycling through
    client counts varies the batch sizes, the pattern that fragments native memory."""
    start = time.monotonic()
    with running_server([args.model], *args.serve_arg) as (url, process):
        print(f"start: {rss_mb(process.pid):.0f} MB", flush=True)
        for i in range(args.soak):
            minutes = (time.monotonic() - start) / 60
            if args.soak_minutes and minutes >= args.soak_minutes:
                break
            clients = args.clients[i % len(args.clients)]
            r = run_load(url, model, images, expected, clients, args.requests)
            print(
                f"round {i + 1} ({clients} clients, {minutes:.1f} min): {r['statuses']}, "
                f"{r['n_wrong']} wrong, {r['images_per_s']:.1f} img/s, "
                f"RSS {rss_mb(process.pid):.0f} MB",
                flush=True,
            )


if __name__ == "__main__":
    main()
