"""k-NN graph: lvd's exact graph vs Faiss IndexFlatIP vs blocked numpy, and IVF vs exact.

Everything runs in this process on the same vectors with the same threads; ratios are to
Faiss, and the machine's own matmul speed (fp32, and bf16 where native) is printed as the
roofline. "exact" checks that every row's neighbour set equals Faiss's, or differs only by rows
whose similarity ties the k-th one (the order among ties is arbitrary), and compares `auto`
(timed with its own calibration) with the best explicit engine; `--calibrate-under-load` first
makes that calibration while a CPU hog runs, as a first job on a shared machine would, so the
`auto` row shows whether the quiet run re-checks it. `--compare-selection` adds the torch fp32
path with torch.topk instead of lvd's partial selection. "select" times the two selections
alone on the score blocks the exact graph produces. "approx" measures the exact/IVF crossover
on this machine, then times exact search, IVF (unchecked and checked) and `auto` (which
switches at the crossover), with the recall of near-duplicate edges (cosine >= threshold)
against the exact graph.

Measurements are cached in a fresh temporary folder unless `--user-cache` is given, so `auto`
measures in this run. The load average is printed before and after: a figure means something
only with the machine's state next to it.

Data: clustered unit vectors (like image embeddings) with planted near-duplicate copies;
`--data fmnist` uses Fashion-MNIST pixels (Debian dataset-fashion-mnist), a real distribution.

    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/knn_graph.py exact --n 50000 --d 512
    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/knn_graph.py exact --calibrate-under-load
    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/knn_graph.py select --n 50000 --d 512
    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/knn_graph.py approx --n 200000 --d 384
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lvd.common.calibration import CACHE_FILE, cache_folder  # noqa: E402
from lvd.common.devices import cpu_has_native_bf16  # noqa: E402
from lvd.common.logs import setup_logging  # noqa: E402
from lvd.index import backends  # noqa: E402
from lvd.index.backend_choice import choose_backend  # noqa: E402
from lvd.index.ivf_switch import measured_exact_max  # noqa: E402
from lvd.index.knn import build_ivf, ivf_search, knn_graph, plan_knn, search_ivf  # noqa: E402


def machine_line() -> str:
    return (
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 {cpu_has_native_bf16()}, "
        f"threads {torch.get_num_threads()}, faiss {faiss.__version__}, torch {torch.__version__}"
    )


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def roofline_line(seconds: float = 1.0) -> str:
    """The machine's own matmul speed, the ceiling of every exact search here."""
    from embed import matmul_gflops

    line = f"roofline: fp32 matmul {matmul_gflops(torch.float32, torch.device('cpu'), seconds=seconds):.0f} GFLOP/s"
    if cpu_has_native_bf16():
        line += f", bf16 matmul {matmul_gflops(torch.bfloat16, torch.device('cpu'), seconds=seconds):.0f} GFLOP/s"
    return line


def use_cache(user_cache: bool) -> None:
    """Measure `auto` in this run (a fresh cache folder) unless the user's own cache is wanted."""
    if not user_cache:
        os.environ["LVD_CACHE_DIR"] = tempfile.mkdtemp(prefix="lvd-bench-cache-")


@contextlib.contextmanager
def cpu_hog(processes: int | None = None):
    """Busy processes on every core, as other users' jobs on a shared node; stopped on exit."""
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes or os.cpu_count() or 1)
    ]
    try:
        time.sleep(2.0)  # let them take the cores
        yield len(hogs)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def engine_label(engine) -> str:
    return engine.name if engine.name == "faiss" else f"torch {engine.dtype}"


def cached_choice(task: str) -> str:
    """The engine of the newest cached measurement of `task`: what an `auto` run just used (asking
    choose_backend again could measure anew if the machine's load has changed meanwhile)."""
    path = cache_folder() / CACHE_FILE
    entries = [e for e in json.loads(path.read_text()).values() if e["task"] == task] if path.exists() else []
    if not entries:
        return "faiss, unmeasured: too small to repay a measurement"
    newest = max(entries, key=lambda e: e["at"])
    return min(newest["seconds"], key=newest["seconds"].get).replace("-", " ")


def calibrated_under_load(calibrate) -> str:
    """Run `calibrate()` (which caches its choice) under a CPU hog; a line saying what it chose."""
    with cpu_hog() as n:
        engine = calibrate()
    return f"calibration made under load ({n} busy processes) chose {engine_label(engine)}"


def auto_vs_best(t_auto, best: dict) -> str:
    name = min(best, key=lambda n: best[n][0])
    return (
        f"auto / best explicit engine ({name}): {t_auto[0] / best[name][0]:.3f}x wall time, "
        f"{t_auto[1] / best[name][1]:.3f}x CPU time (1.000 = as fast; the target is <= 1.10)"
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
        f"{name:<34} {wall:8.2f} {cpu:8.2f} {flops / wall / 1e9:8.1f} {ref_wall / wall:8.2f}x "
        f"{ref_cpu / cpu:8.2f}x  {note}"
    )


def bench_exact(x, k, dtypes, with_numpy, under_load=False, compare_selection=False):
    n, d = x.shape
    flops = 2.0 * n * n * d
    print(f"exact k-NN graph, {n} x {d}, k={k}, threads={torch.get_num_threads()}")
    print(f"{'method':<34} {'wall s':>8} {'cpu s':>8} {'GFLOP/s':>8} {'wall vs':>9} {'cpu vs':>9}  (vs faiss)")
    t_faiss, (D_ref, I_ref) = timed(lambda: faiss_graph(x, k))
    row("faiss IndexFlatIP", t_faiss, t_faiss, flops)
    explicit = {"faiss": t_faiss}
    for dtype in dtypes:
        engine = backends.TorchBackend("cpu", dtype)
        t, (D, I) = timed(lambda engine=engine: knn_graph(x, k, method="exact", backend=engine))
        explicit[f"torch {dtype}"] = t
        ident, tied = same_sets(D, I, D_ref, I_ref)
        proof = (
            f"; rows retried {engine.last_retry_rows}, in fp32 {engine.last_fallback_rows}" if dtype != "fp32" else ""
        )
        row(
            f"lvd torch backend ({dtype})",
            t,
            t_faiss,
            flops,
            f"identical sets {ident:.4f}, ties aside {tied:.4f}{proof}",
        )
    if compare_selection:
        partial = backends.select_top
        backends.select_top = lambda s, kk: torch.topk(s, kk, dim=1)
        try:
            t, (D, I) = timed(lambda: knn_graph(x, k, method="exact", backend="torch", dtype="fp32"))
        finally:
            backends.select_top = partial
        ident, tied = same_sets(D, I, D_ref, I_ref)
        row("lvd torch fp32, torch.topk", t, t_faiss, flops, f"identical sets {ident:.4f}, ties aside {tied:.4f}")

    def calibrate():  # what `auto` measures (and caches)
        return choose_backend("k-NN graph", x, x, k, exclude_self=True)

    if under_load:
        print(calibrated_under_load(calibrate))
    t, (D, I) = timed(lambda: knn_graph(x, k, method="exact"))  # with its calibration or re-check
    name = cached_choice("k-NN graph")
    ident, tied = same_sets(D, I, D_ref, I_ref)
    row(f"lvd auto (chose {name})", t, t_faiss, flops, f"identical sets {ident:.4f}, ties aside {tied:.4f}")
    print(auto_vs_best(t, explicit))
    if with_numpy:
        t, (D, I) = timed(lambda: numpy_graph(x, k))
        ident, tied = same_sets(D, I, D_ref, I_ref)
        row("blocked numpy", t, t_faiss, flops, f"identical sets {ident:.4f}, ties aside {tied:.4f}")


def bench_select(x, k, repeats=5):
    """torch.topk vs lvd's partial selection on the score blocks of the torch backend's exact graph."""
    n = len(x)
    engine = backends.TorchBackend("cpu", "fp32")
    rows = max(1, engine.block_bytes // (4 * n))
    xt = torch.from_numpy(x)
    block = engine._mm_fp32(xt[:rows], xt)
    product = median_seconds(lambda: engine._mm_fp32(xt[:rows], xt), repeats)
    print(f"score block {rows} x {n} (one chunk of the exact graph); fp32 product {product * 1e3:.1f} ms")
    print(f"{'selection':<40} {'ms':>8} {'G entries/s':>12} {'vs topk':>8} {'vs product':>11}")
    for dtype in (torch.float32, torch.bfloat16):
        s = block.to(dtype)
        for want, why in ((k, "k"), (2 * k, "k + k"), (3 * k, "k + 2k")):
            reference = torch.topk(s, want, dim=1)
            mine = backends.select_top(s, want)
            assert torch.equal(mine[0], reference[0]), "partial selection disagrees with torch.topk"
            t_topk = median_seconds(lambda s=s, want=want: torch.topk(s, want, dim=1), repeats)
            t_mine = median_seconds(lambda s=s, want=want: backends.select_top(s, want), repeats)
            for label, t in (("torch.topk", t_topk), ("lvd select_top", t_mine)):
                print(
                    f"{label + f' {str(dtype)[6:]} {want} ({why})':<40} {t * 1e3:8.1f} {s.numel() / t / 1e9:12.3f} "
                    f"{t_topk / t:7.2f}x {t / product:10.2f}x"
                )


def median_seconds(fn, repeats):
    fn()
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        rounds.append(time.perf_counter() - start)
    return float(np.median(rounds))


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
    parser.add_argument("mode", choices=["exact", "approx", "select"])
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
    parser.add_argument("--calibrate-under-load", action="store_true", help="make auto's calibration under a CPU hog")
    parser.add_argument("--compare-selection", action="store_true", help="also time torch fp32 with torch.topk")
    parser.add_argument("--user-cache", action="store_true", help="use the user's calibration cache")
    args = parser.parse_args()
    use_cache(args.user_cache)
    setup_logging("INFO")  # auto's choices and re-checks, with every candidate's time
    n = args.n or (200_000 if args.mode == "approx" else 50_000)
    d = args.d or (384 if args.mode == "approx" else 512)
    x = fashion_mnist(n) if args.data == "fmnist" else embedding_like(n, d, args.seed)
    print(f"{machine_line()}, data {args.data}")
    print(f"before: {load_line()}; {roofline_line()}")
    if args.mode == "exact":
        bench_exact(x, args.k, args.dtypes, not args.no_numpy, args.calibrate_under_load, args.compare_selection)
    elif args.mode == "select":
        bench_select(x, args.k)
    else:
        bench_approx(x, args.k, args.threshold, args.exact_backend)
    print(f"after: {load_line()}")


if __name__ == "__main__":
    main()
