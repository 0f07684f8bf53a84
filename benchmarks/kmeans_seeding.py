"""k-means seeding: lvd's default (greedy k-means++, then pruned Lloyd) against the references.

quality: 40k vectors around 200 planted Gaussian blobs, k = 200, `--niter` iterations for all;
  inertia (float64, brute force from each method's centroids) and NMI against the planted
  labels, mean and standard deviation over `--seeds` seeds, for lvd's default, lvd with random
  rows as seeds (its seeding before k-means++) and scikit-learn `KMeans(n_init=1)` (greedy
  k-means++ on every row, Lloyd). The per-seed spread of scikit-learn itself says how far apart
  two equally good methods can land on a handful of seeds.
speed: 100k x 384 -> 1000 (`benchmarks/knn_graph.embedding_like`), 20 iterations: each method
  with its own default seeding (Faiss `Kmeans`: random rows; lvd: k-means++ on a seeded sample,
  timed apart too), wall and CPU seconds in one process, and the inertia each reaches.

    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/kmeans_seeding.py
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

from knn_graph import embedding_like, machine_line, timed  # noqa: E402

from lvd.index.kmeans import kmeans  # noqa: E402
from lvd.index.kmeans_seeding import seed_centroids, seeding_sample  # noqa: E402


def planted_blobs(n: int, d: int, blobs: int, spread: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((blobs, d)) * 4
    labels = rng.integers(0, blobs, n)
    return (centres[labels] + spread * rng.standard_normal((n, d))).astype(np.float32), labels


def exact_inertia(x: np.ndarray, centroids: np.ndarray, block: int = 4096) -> float:
    """Sum of squared distances to the nearest centroid, in float64 (blocks of 4096 x k)."""
    c = np.asarray(centroids, np.float64)
    c_sq = np.einsum("ij,ij->i", c, c)
    total = 0.0
    for start in range(0, len(x), block):
        xb = x[start : start + block].astype(np.float64)
        d2 = np.einsum("ij,ij->i", xb, xb)[:, None] + c_sq[None, :] - 2 * xb @ c.T
        total += float(np.maximum(d2.min(1), 0).sum())
    return total


def quality(args) -> None:
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score as nmi

    x, labels = planted_blobs(args.n, args.d, args.blobs, args.spread)
    k = args.blobs
    methods = {
        "lvd default (k-means++)": lambda s: kmeans(x, k, niter=args.niter, seed=s),
        "lvd, random rows as seeds": lambda s: kmeans(x, k, niter=args.niter, seed=s, init="random"),
        "scikit-learn KMeans(n_init=1)": lambda s: KMeans(
            k, n_init=1, max_iter=args.niter, tol=0, random_state=s, algorithm="lloyd"
        ).fit(x),
    }
    print(
        f"quality: {args.n} x {args.d}, {args.blobs} blobs (centres N(0, 16), spread {args.spread}), k {k}, "
        f"{args.niter} iterations, seeds 0..{args.seeds - 1}"
    )
    print(f"{'method':<32} {'inertia mean':>14} {'std %':>7} {'/ sklearn':>10} {'NMI':>7} {'cpu s':>7}")
    rows = {}
    for name, fit in methods.items():
        inertias, scores, cpu = [], [], 0.0
        for s in range(args.seeds):
            seconds, model = timed(lambda s=s, fit=fit: fit(s))
            centroids = getattr(model, "cluster_centers_", getattr(model, "centroids", None))
            assign = getattr(model, "labels_", getattr(model, "assign", None))
            inertias.append(exact_inertia(x, centroids))
            scores.append(nmi(labels, assign))
            cpu += seconds[1]
        rows[name] = (np.mean(inertias), np.std(inertias) / np.mean(inertias), np.mean(scores), cpu / args.seeds)
    ref = rows["scikit-learn KMeans(n_init=1)"][0]
    for name, (mean, std, score, cpu) in rows.items():
        print(f"{name:<32} {mean:14.2f} {100 * std:7.2f} {mean / ref:10.4f} {score:7.4f} {cpu:7.2f}")


def speed(args) -> None:
    x = embedding_like(args.speed_n, args.speed_d, 0, copies=0)
    n, d = x.shape
    k = args.speed_k

    def faiss_default():
        km = faiss.Kmeans(
            d, k, niter=args.niter, seed=0, min_points_per_centroid=1, max_points_per_centroid=math.ceil(n / k)
        )
        km.train(x)
        return km.centroids

    def seeding_only():
        sample = seeding_sample(n, k, 0)
        return seed_centroids(x if sample is None else x[sample], k, seed=0)

    print(f"speed: {n} x {d} -> {k}, {args.niter} iterations, each method's own seeding; {machine_line()}")
    print(f"{'method':<40} {'wall s':>8} {'cpu s':>8} {'wall vs':>8} {'cpu vs':>8} {'inertia / faiss':>16}")
    t_faiss, centroids = timed(faiss_default)
    inertia_faiss = exact_inertia(x, centroids)

    def report(name, seconds, inertia):
        wall, cpu = seconds
        ratio = "" if inertia is None else f"{inertia / inertia_faiss:16.6f}"
        print(f"{name:<40} {wall:8.2f} {cpu:8.2f} {t_faiss[0] / wall:7.2f}x {t_faiss[1] / cpu:7.2f}x {ratio}")

    report("faiss Kmeans (random rows)", t_faiss, inertia_faiss)
    seconds, _ = timed(seeding_only)
    report("lvd k-means++ seeding alone", seconds, None)
    seconds, result = timed(lambda: kmeans(x, k, niter=args.niter, seed=0))
    report("lvd default (k-means++, lloyd, auto)", seconds, exact_inertia(x, result.centroids))
    seconds, result = timed(lambda: kmeans(x, k, niter=args.niter, seed=0, backend="faiss", algorithm="lloyd"))
    report("lvd k-means++, lloyd on the faiss engine", seconds, exact_inertia(x, result.centroids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=40_000)
    parser.add_argument("--d", type=int, default=32)
    parser.add_argument("--blobs", type=int, default=200)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--speed-n", type=int, default=100_000)
    parser.add_argument("--speed-d", type=int, default=384)
    parser.add_argument("--speed-k", type=int, default=1000)
    parser.add_argument("--skip", choices=["quality", "speed"], default=None)
    args = parser.parse_args()
    if args.skip != "quality":
        quality(args)
    if args.skip != "speed":
        speed(args)


if __name__ == "__main__":
    main()
