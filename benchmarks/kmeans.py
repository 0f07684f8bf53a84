"""Flat k-means: lvd (torch backend, pruned Lloyd) vs Faiss `Kmeans` vs scikit-learn `KMeans`.

Same process, same threads, same data and the same initial centroids for everyone, so the
inertias are comparable iteration for iteration. Every method does `niter` updates and ends
with the assignment to the final centroids (Faiss: `Kmeans.train` then one search; sklearn:
`fit`, which stops early only if the assignment stops changing). Faiss is told to use every
row (`max_points_per_centroid` from the data), as lvd does. GFLOP/s counts the dense
assignment work 2 n k d (niter + 1), which is what an unpruned Lloyd performs. Times are
wall-clock and CPU seconds of this process (the steadier measure on a shared machine).

`auto` is timed with its own calibration (a fresh cache folder unless `--user-cache`) and
compared with the best explicit engine; `--calibrate-under-load` first makes that calibration
while a CPU hog runs, as a first job on a shared machine would, so the `auto` row shows whether
the quiet run re-checks it. The load average is printed before and after.

    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/kmeans.py --n 100000 --d 384 --k 1000
    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/kmeans.py --calibrate-under-load
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from knn_graph import (  # noqa: E402
    auto_vs_best,
    cached_choice,
    calibrated_under_load,
    embedding_like,
    fashion_mnist,
    load_line,
    machine_line,
    roofline_line,
    timed,
    use_cache,
)

from lvd.common.devices import cpu_has_native_bf16  # noqa: E402
from lvd.common.logs import setup_logging  # noqa: E402
from lvd.index.backend_choice import choose_backend  # noqa: E402
from lvd.index.kmeans import kmeans  # noqa: E402


def faiss_kmeans(x, init, niter, spherical):
    n, d = x.shape
    k = len(init)
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        seed=0,
        spherical=spherical,
        min_points_per_centroid=1,
        max_points_per_centroid=math.ceil(n / k),
    )
    km.train(x, init_centroids=init)
    dist, _ = km.index.search(x, 1)
    return float(dist.sum(dtype=np.float64))


def sklearn_kmeans(x, init, niter):
    from sklearn.cluster import KMeans

    model = KMeans(len(init), init=init, n_init=1, max_iter=niter, tol=0, algorithm="lloyd").fit(x)
    return float(model.inertia_)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--data", choices=["synthetic", "fmnist"], default="synthetic")
    parser.add_argument("--spherical", action="store_true")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["fp32", "bf16"] if cpu_has_native_bf16() else ["fp32"],
        help="torch backend dtypes to time",
    )
    parser.add_argument("--no-sklearn", action="store_true")
    parser.add_argument("--unpruned", action="store_true", help="also time lvd's Lloyd without bounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibrate-under-load", action="store_true", help="make auto's calibration under a CPU hog")
    parser.add_argument("--user-cache", action="store_true", help="use the user's calibration cache")
    args = parser.parse_args()
    use_cache(args.user_cache)
    setup_logging("INFO")  # auto's choices and re-checks, with every candidate's time

    x = fashion_mnist(args.n) if args.data == "fmnist" else embedding_like(args.n, args.d, args.seed, copies=0)
    n, d = x.shape
    init = x[np.random.default_rng(args.seed).choice(n, args.k, replace=False)].copy()
    flops = 2.0 * n * args.k * d * (args.niter + 1)
    print(f"k-means {n} x {d} -> {args.k}, {args.niter} iterations, data {args.data}; {machine_line()}")
    print(f"before: {load_line()}; {roofline_line()}")
    print(
        f"{'method':<30} {'wall s':>8} {'cpu s':>8} {'GFLOP/s':>8} {'wall vs':>8} {'cpu vs':>8} "
        f"{'inertia':>14} {'/ faiss':>9}"
    )

    def report(name, seconds, inertia):
        wall, cpu = seconds
        print(
            f"{name:<30} {wall:8.2f} {cpu:8.2f} {flops / wall / 1e9:8.1f} {t_faiss[0] / wall:7.2f}x "
            f"{t_faiss[1] / cpu:7.2f}x {inertia:14.2f} {inertia / inertia_faiss:9.6f}"
        )

    t_faiss, inertia_faiss = timed(lambda: faiss_kmeans(x, init, args.niter, args.spherical))
    report("faiss Kmeans", t_faiss, inertia_faiss)
    variants = [("torch", dtype, True) for dtype in args.dtypes] + [("faiss", "fp32", True)]
    variants += [("torch", "fp32", False)] if args.unpruned else []
    explicit = {}
    for backend, dtype, prune in variants:
        seconds, result = timed(
            lambda backend=backend, dtype=dtype, prune=prune: kmeans(
                x,
                args.k,
                niter=args.niter,
                init=init,
                spherical=args.spherical,
                backend=backend,
                dtype=dtype,
                prune=prune,
                algorithm="lloyd",
            )
        )
        label = f"lvd lloyd, {backend} {dtype}" + (", bounds" if prune else ", no bounds")
        if prune:
            explicit[f"lloyd on {backend} {dtype}"] = seconds
        report(label, seconds, result.inertia)

    def calibrate():  # what `auto` measures (and caches)
        return choose_backend("k-means assignment", init, x, 2, metric="l2")

    if args.calibrate_under_load:
        print(calibrated_under_load(calibrate))
    seconds, result = timed(lambda: kmeans(x, args.k, niter=args.niter, init=init, spherical=args.spherical))
    report(f"lvd auto (lloyd, {cached_choice('k-means assignment')})", seconds, result.inertia)
    print(auto_vs_best(seconds, explicit))
    if not args.no_sklearn:
        seconds, inertia = timed(lambda: sklearn_kmeans(x, init, args.niter))
        report("scikit-learn KMeans (lloyd)", seconds, inertia)
    print(f"after: {load_line()}")


if __name__ == "__main__":
    main()
