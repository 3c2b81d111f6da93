"""How nearest-neighbour query time grows with the memory-bank size, exact vs approximate.

    python benchmarks/knn_scaling.py [--dim 128] [--queries 1024]

Banks are random Gaussian clusters (a stand-in for patch features, which are clustered too);
one query set = one 256 x 256 image's 32 x 32 PatchCore patches. Reports build seconds, query
milliseconds per image and recall@1 against exact search, with 2 threads.
"""

from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np
import torch

from defectlens.components.knn import make_index
from defectlens.components.memory_bank import MemoryBank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--sizes", default="10000,50000,200000,500000")
    args = parser.parse_args()
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    rng = np.random.default_rng(0)
    for n in (int(s) for s in args.sizes.split(",")):
        centres = rng.normal(size=(max(n // 200, 1), args.dim)).astype(np.float32) * 3
        bank = centres[rng.integers(len(centres), size=n)] + rng.normal(size=(n, args.dim)).astype(
            np.float32
        )
        queries = bank[rng.integers(n, size=args.queries)] + 0.5 * rng.normal(
            size=(args.queries, args.dim)
        ).astype(np.float32)
        truth = None
        for name in ("exact", "ivf", "hnsw"):
            start = time.perf_counter()
            memory = MemoryBank(torch.from_numpy(bank), make_index(name))
            build = time.perf_counter() - start
            q = torch.from_numpy(queries)
            memory.search(q[:16], 1)
            start = time.perf_counter()
            _, found = memory.search(q, 1)
            query_ms = (time.perf_counter() - start) * 1000
            if truth is None:
                truth = found[:, 0]
            recall = float((found[:, 0] == truth).float().mean())
            print(
                json.dumps(
                    {
                        "bank": n,
                        "index": name,
                        "build_s": round(build, 2),
                        "query_ms_per_image": round(query_ms, 1),
                        "recall_at_1": recall,
                    }
                )
            )


if __name__ == "__main__":
    main()
