"""k-NN graph: lvd's exact graph vs Faiss IndexFlatIP vs blocked numpy, and IVF vs exact.

Everything runs in this process on the same vectors with the same threads; ratios are to
Faiss. "exact" checks that every row's neighbour set equals Faiss's, or differs only by rows
whose similarity ties the k-th one (the order among ties is arbitrary). "approx" measures the
exact/IVF crossover on this machine, then times exact search, IVF (unchecked and checked) and
`auto` (which switches at the crossover), with the recall of near-duplicate edges (cosine >=
threshold) against the exact graph.

Data: clustered unit vectors (like image embeddings) with planted near-duplicate copies;
`--data fmnist` uses Fashion-MNIST pixels (Debian dataset-fashion-mnist), a real distribution.

    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/knn_graph.py exact --n 50000 --d 512
    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/knn_graph.py approx --n 200000 --d 384
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lvd.common.devices import cpu_has_native_bf16  # noqa: E402
from lvd.index.backend_choice import choose_backend  # noqa: E402
from lvd.index.ivf_switch import measured_exact_max  # noqa: E402
from lvd.index.knn import build_ivf, ivf_search, knn_graph, plan_knn, search_ivf  # noqa: E402


def machine_line() -> str:
    return (
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 {cpu_has_native_bf16()}, "
        f"threads {torch.get_num_threads()}, faiss {faiss.__version__}, torch {torch.__version__}"
    )


def embedding_like(n: int, d: int, seed: int, copies: float = 0.02) -> np.ndarray:
    """Unit vectors around Zipf-sized clusters, plus `copies` * n near-duplicates (cos ~0.95)."""
    rng = np.random.default_rng(seed)
    n_copies = int(n * copies)
    n_base = n - n_copies
    n_clusters = max(2, n_base // 100)
    weights = 1.0 / np.arange(1, n_clusters + 1) ** 0.7
    centres = rng.standard_normal((n_clusters, d), dtype=np.float32)
    x = np.empty((n, d), np.float32)
    for start in range(0, n_base, 65536):
        stop = min(start + 65536, n_base)
        which = rng.choice(n_clusters, stop - start, p=weights / weights.sum())
        x[start:stop] = centres[which] + 1.2 * rng.standard_normal((stop - start, d), dtype=np.float32)
    x[:n_base] /= np.linalg.norm(x[:n_base], axis=1, keepdims=True)
    originals = rng.choice(n_base, n_copies)
    x[n_base:] = x[originals] + (0.3 / np.sqrt(d)) * rng.standard_normal((n_copies, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[rng.permutation(n)]


def fashion_mnist(n: int) -> np.ndarray:
    folder = Path("/usr/share/datasets/fashion-mnist")
    with gzip.open(folder / "train-images-idx3-ubyte.gz") as f:
        pixels = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz") as f:
        pixels = np.concatenate([pixels, np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)])
    x = pixels[:n].astype(np.float32)
    x -= x.mean(0)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def timed(fn):
    """((wall seconds, CPU seconds of this process), result). On a shared machine the CPU
    seconds are the steadier measure of work: waiting for a core is not counted."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - t0, time.process_time() - c0), out


def faiss_graph(x, k):
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    D, I = index.search(x, k + 1)
    own = I == np.arange(len(x))[:, None]
    own[~own.any(1), -1] = True
    keep = np.ones_like(own)
    keep[np.arange(len(x)), own.argmax(1)] = False
    return D[keep].reshape(len(x), k), I[keep].reshape(len(x), k)


def numpy_graph(x, k, block=2048):
    """The textbook way: a block of rows times all rows, argpartition, sort."""
    D = np.empty((len(x), k), np.float32)
    I = np.empty((len(x), k), np.int64)
    for start in range(0, len(x), block):
        s = x[start : start + block] @ x.T
        s[np.arange(len(s)), np.arange(start, start + len(s))] = -np.inf
        top = np.argpartition(-s, k, axis=1)[:, :k]
        vals = np.take_along_axis(s, top, 1)
        order = np.argsort(-vals, axis=1)
        D[start : start + len(s)] = np.take_along_axis(vals, order, 1)
        I[start : start + len(s)] = np.take_along_axis(top, order, 1)
    return D, I


def same_sets(D, I, D_ref, I_ref, tol=1e-5) -> tuple[float, float]:
    """(rows with identical sets, rows identical up to ties at the k-th similarity)."""
    a, b = np.sort(I, 1), np.sort(I_ref, 1)
    identical = (a == b).all(1)
    tied = identical.copy()
    for row in np.flatnonzero(~identical):
        diff = set(I[row]) ^ set(I_ref[row])
        kth = D_ref[row, -1]
        sims = {j: s for j, s in zip(I[row], D[row])} | {j: s for j, s in zip(I_ref[row], D_ref[row])}
        tied[row] = all(abs(sims[j] - kth) <= tol for j in diff) and np.allclose(D[row], D_ref[row], atol=tol)
    return identical.mean(), tied.mean()


def row(name, seconds, ref_seconds, flops, note=""):
    (wall, cpu), (ref_wall, ref_cpu) = seconds, ref_seconds
    print(
        f"{name:<28} {wall:8.2f} {cpu:8.2f} {flops / wall / 1e9:8.1f} {ref_wall / wall:8.2f}x "
        f"{ref_cpu / cpu:8.2f}x  {note}"
    )


def bench_exact(x, k, dtypes, with_numpy):
    n, d = x.shape
    flops = 2.0 * n * n * d
    print(f"exact k-NN graph, {n} x {d}, k={k}, threads={torch.get_num_threads()}")
    print(f"{'method':<28} {'wall s':>8} {'cpu s':>8} {'GFLOP/s':>8} {'wall vs':>9} {'cpu vs':>9}  (vs faiss)")
    t_faiss, (D_ref, I_ref) = timed(lambda: faiss_graph(x, k))
    row("faiss IndexFlatIP", t_faiss, t_faiss, flops)
    for dtype in dtypes:
        t, (D, I) = timed(lambda dtype=dtype: knn_graph(x, k, method="exact", backend="torch", dtype=dtype))
        ident, tied = same_sets(D, I, D_ref, I_ref)
        row(f"lvd torch backend ({dtype})", t, t_faiss, flops, f"identical sets {ident:.4f}, ties aside {tied:.4f}")
    chosen = choose_backend("k-NN graph", x, x, k, exclude_self=True)  # what `auto` measures (then cached)
    name = chosen.name if chosen.name == "faiss" else f"torch {chosen.dtype}"
    t, (D, I) = timed(lambda: knn_graph(x, k, method="exact"))
    ident, tied = same_sets(D, I, D_ref, I_ref)
    row(f"lvd auto (chose {name})", t, t_faiss, flops, f"identical sets {ident:.4f}, ties aside {tied:.4f}")
    if with_numpy:
        t, (D, I) = timed(lambda: numpy_graph(x, k))
        ident, tied = same_sets(D, I, D_ref, I_ref)
        row("blocked numpy", t, t_faiss, flops, f"identical sets {ident:.4f}, ties aside {tied:.4f}")


def edges_above(D, I, threshold):
    rows, cols = np.nonzero(D >= threshold)
    a, b = rows, I[rows, cols]
    return np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], 1), axis=0)


def bench_approx(x, k, threshold, exact_backend):
    n, d = x.shape
    plan = plan_knn(n, d, exact_max=0)
    print(f"dedup graph, {n} x {d}, k={k}, threshold {threshold}: {plan.factory}, nprobe {plan.nprobe}")
    engine = choose_backend("k-NN graph", x, x, k, exclude_self=True)

    def ivf_graph(rows, kk):
        plan = plan_knn(len(rows), d, method="ivf")
        return search_ivf(build_ivf(rows, plan), rows, kk, plan.nprobe, exclude_self=True)

    t_cal, crossover = timed(lambda: measured_exact_max(x, k, engine, ivf_graph))
    print(f"measured exact/IVF crossover here: {crossover} rows (calibration {t_cal[0]:.2f} s wall, cached after)")
    t_exact, (D_ref, I_ref) = timed(lambda: knn_graph(x, k, method="exact", backend=exact_backend))
    truth = edges_above(D_ref, I_ref, threshold)
    print(f"{'path':<34} {'wall s':>8} {'cpu s':>8} {'vs exact':>9}  near-duplicate edges ({len(truth)} exact)")

    def report(name, t, D, I):
        hit = len(np.intersect1d(truth.view("i8,i8"), edges_above(D, I, threshold).view("i8,i8")))
        print(f"{name:<34} {t[0]:8.2f} {t[1]:8.2f} {t_exact[0] / t[0]:8.2f}x  recall {hit / max(1, len(truth)):.4f}")

    report(f"exact ({exact_backend})", t_exact, D_ref, I_ref)
    t, (D, I) = timed(lambda: ivf_search(x, x, k, plan, exclude_self=True))
    report("IVF, unchecked", t, D, I)
    t, (D, I) = timed(lambda: knn_graph(x, k, method="ivf", min_similarity=threshold))
    report("IVF, checked (recall >= 0.999)", t, D, I)
    chosen = "exact" if n <= crossover else "IVF"
    t, (D, I) = timed(lambda: knn_graph(x, k, min_similarity=threshold))
    report(f"lvd auto (chose {chosen})", t, D, I)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["exact", "approx"])
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--d", type=int, default=None)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--data", choices=["synthetic", "fmnist"], default="synthetic")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["fp32", "bf16"] if cpu_has_native_bf16() else ["fp32"],
        help="torch backend dtypes to time",
    )
    parser.add_argument("--no-numpy", action="store_true")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--exact-backend", default="faiss")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n = args.n or (50_000 if args.mode == "exact" else 200_000)
    d = args.d or (512 if args.mode == "exact" else 384)
    x = fashion_mnist(n) if args.data == "fmnist" else embedding_like(n, d, args.seed)
    print(f"{machine_line()}, data {args.data}")
    if args.mode == "exact":
        bench_exact(x, args.k, args.dtypes, not args.no_numpy)
    else:
        bench_approx(x, args.k, args.threshold, args.exact_backend)


if __name__ == "__main__":
    main()
