"""The service's memory over repeated load: `rounds` x `requests` single-image requests from
`clients` threads against one `defectlens serve MODEL`, printing the server's RSS after each
round (issue 12's memory check).

    python benchmarks/serve_soak.py MODEL IMAGE_FOLDER [--clients 16] [--rounds 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from defectlens.data.dataset import list_images  # noqa: E402
from defectlens.loading import load_model  # noqa: E402
from tests.server import rss_mb, run_load, running_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("images")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    paths = list_images(Path(args.images))
    images = [(p.name, p.read_bytes()) for p in paths]
    predictor = load_model(args.model)
    expected = {Path(p.source).name: p.score for p in predictor.iter_predict(paths)}
    name = Path(args.model).resolve().name
    with running_server([args.model]) as (url, process):
        print(f"start: {rss_mb(process.pid):.0f} MB", flush=True)
        for i in range(args.rounds):
            r = run_load(url, name, images, expected, args.clients, args.requests)
            print(
                f"round {i + 1}: {r['statuses']}, {r['n_wrong']} wrong, "
                f"{r['images_per_s']:.1f} img/s, RSS {rss_mb(process.pid):.0f} MB",
                flush=True,
            )


if __name__ == "__main__":
    main()
