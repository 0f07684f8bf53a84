"""Assigning rows to their nprobe nearest lists: lvd's `ivf_join.nearest_lists` vs Faiss
IndexFlatIP.search, and the numpy argpartition top-k lvd used before, on the same block.

This is the list join's assignment step (every row against every centroid, flat): at 10M rows
the join uses ~12.6k lists and 24-32 probes, and the top-k, not the product, set its time.

    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/list_assign.py --rows 16384 --lists 12649 --nprobe 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.knn_graph import machine_line  # noqa: E402
from lvd.index import ivf_join  # noqa: E402


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def torch_top(x, centroids, k):
    """The two-level path's top-k (`ivf_join._top_columns`) on one flat score block."""
    return ivf_join._top_columns(x @ centroids.T, np.arange(len(centroids)), k)


def argpartition_top(x, centroids, k):
    """The former lvd top-k: numpy product, argpartition, then a sort of the k kept."""
    scores = x @ centroids.T
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def timed(fn, repeats):
    """(first call's seconds, best of `repeats`, result): the assignment loop allocates a fresh
    score block each time, so the first call (page faults included) is the one it pays."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return times[0], min(times), out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--lists", type=int, default=12649)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print(machine_line())
    rng = np.random.default_rng(0)
    x, centroids = unit(rng, args.rows, args.d), unit(rng, args.lists, args.d)
    quantizer = ivf_join.Quantizer(centroids)
    index = faiss.IndexFlatIP(args.d)
    index.add(centroids)
    runs = {
        "lvd (faiss.knn)": timed(lambda: ivf_join.nearest_lists(x, quantizer, args.nprobe), args.repeats),
        "Faiss IndexFlatIP": timed(lambda: index.search(x, args.nprobe)[1], args.repeats),
        "numpy + torch.topk": timed(lambda: torch_top(x, centroids, args.nprobe), args.repeats),
        "numpy argpartition": timed(lambda: argpartition_top(x, centroids, args.nprobe), args.repeats),
    }
    print(
        f"{args.rows} rows x {args.lists} lists x d {args.d}, top {args.nprobe}, first call / best of {args.repeats}:"
    )
    first, best, lists = runs["lvd (faiss.knn)"]
    for name, (f, b, found) in runs.items():
        print(
            f"  {name:20s} {f:6.2f} s / {b:6.2f} s   vs lvd {f / first:5.2f}x / {b / best:5.2f}x   "
            f"lists equal to lvd's {float((found == lists).mean()):.5f}"
        )
    print("  (lists differ only where scores tie or float sums round differently)")


if __name__ == "__main__":
    main()
