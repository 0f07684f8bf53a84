"""Dedup's list join (`ivf_join.join_lists`) against the bare matrix products of the same shapes.

For every inverted list the join multiplies the rows that probe it (queries) by the rows assigned
to it (members), in float32. This benchmark builds a synthetic pool as `benchmarks/scale.py` does
(clustered unit vectors, d = 384, 1 % planted copies, float16 parts on disk, held in memory as
dedup holds them), trains the lists, assigns the probes, then in one process with the same
threads times, in interleaved rounds (the machine's speed drifts: each round's ratio pairs runs
seconds apart),

- lvd: `join_lists` over all lists (the inverted lists, reading the rows, the gathers, the
  product, the threshold scan, the pairs);
- GEMM: for each list, one float32 product of contiguous (queries, d) x (d, members) blocks with
  the data in place, three ways: numpy-lists (the lists spread over the BLAS's threads, each
  product on one, as the join spreads them), numpy and torch.mm (list after list, each product on
  every thread);

and prints the medians, the ratio best GEMM / lvd round by round (1.0: the join runs at its
product's speed), the same ratio in process CPU seconds (steal excluded), the machine's square
fp32 matmul, the CPU kind and the load average.

    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/ivf_join.py --n 100000 --rounds 15  # dedup's margin
    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/ivf_join.py --n 1000000 --rounds 3
    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/ivf_join.py --n 100000 --nprobe 12  # a fixed nprobe

Figures (2-core AVX2 AMD EPYC, alone under the lock, 2026-12-07). At 100k (195 lists of 513
members x 1889 queries, margin 0.04), two runs of 15 rounds: the join 1.35 / 1.60 s median,
numpy-lists 0.99 / 1.01 s, numpy 1.08 / 1.09 s, torch 1.37 / 1.50 s; ratio best / lvd median
0.72 (0.59-0.85) and 0.68 (0.57-0.79), in CPU seconds 0.75 and 0.71; against numpy list after
list, the reference before, 0.80 and 0.68. At 1M (1953 lists of 512 x 4436, 14 groups of lists),
3 rounds: the join 29.4 s, numpy-lists 23.2 s, numpy 24.6 s; ratio median 0.76 (0.75-0.83), CPU
0.78, against numpy list after list 0.83. Before this change (the join list after list on
2-thread BLAS, against numpy or torch list after list) 100k gave 0.68 (0.57-0.78, 6 runs).

Where the join's time goes (py-spy --native --threads at 100 Hz, 6 joins at 100k, the worker
threads' samples): the product 73.5 %, waiting for the GIL after a numpy call 6.0 %, gathering
a list's query rows 5.3 %, the threshold scan 5.2 %, the diagonal mask and concatenations 3.2 %,
the group read 3.0 %, the rest of a list's bookkeeping 1.9 %, gathering its members 1.3 %, the
inverted lists 0.5 %. Before the self products were masked the scan took 9.6 %: every member is
a query of its own list, and its product with itself (1.0) made every member row reach the
threshold and be scanned cell by cell. What did not pay: chunks of 256 or 512 query rows (their
blocks fit L2; no difference within the noise), a coarse ordering of the lists so that a group's
rows overlap (1M rows read 5.21M times instead of 5.27M: the synthetic pool has little locality),
the rows held as float32 and multiplied in place at 1M (no group reads; 35.6 and 41.1 s against
31.7 and 44.6 s), a gather from float16 (numpy's cast: 1.1 ms per 1024 rows, a sixth of their
product). Earlier: a torch gather between numpy products made the join 3x slower (torch's OpenMP
threads and OpenBLAS's spun against each other); reading a group from the mapped parts at 1M ran
5-9x slower than in a fresh process, hence `EmbeddingRows.held` and one reused group buffer.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.embed import matmul_gflops  # noqa: E402
from benchmarks.scale import THRESHOLD, D, near_copy, vectors  # noqa: E402
from lvd.common.run_folder import vector_files  # noqa: E402
from lvd.index import ivf_join  # noqa: E402
from lvd.index.io import EmbeddingRows  # noqa: E402


def pool_view(folder: Path, n: int, seed: int = 0, part: int = 262_144) -> EmbeddingRows:
    """n clustered unit rows, 1 % of them near copies of others, as float16 parts in `folder`."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((min(max(2, n // 100), 100_000), D), dtype=np.float32)
    x = vectors(n, rng, centres)
    copies = n // 100
    x[n - copies :] = near_copy(x[rng.choice(n - copies, copies, replace=False)], rng)
    for p, start in enumerate(range(0, n, part)):
        np.save(folder / f"part-{p:05d}.npy", x[start : start + part].astype(np.float16))
        np.save(folder / f"ids-{p:05d}.npy", np.arange(start, min(start + part, n), dtype=np.int64))
    return EmbeddingRows(vector_files(folder), np.arange(n))


def list_shapes(probes: np.ndarray, nprobe: int, nlist: int) -> tuple[np.ndarray, np.ndarray]:
    """(queries, members) per list: rows probing it, rows assigned to it (-1: a probe not taken)."""
    members = np.bincount(probes[:, 0].astype(np.int64), minlength=nlist)
    taken = probes[:, :nprobe].astype(np.int64).ravel()
    queries = np.bincount(taken[taken >= 0], minlength=nlist)
    return queries, members


def gemm_seconds(
    queries: np.ndarray, members: np.ndarray, d: int, engine: str, seed: int = 1, cpu: list | None = None
) -> float:
    """Seconds of one contiguous float32 product per list of these shapes, the data in place:

    - numpy / torch: list after list, each product on every BLAS thread;
    - numpy-lists: the lists spread over as many threads as the BLAS has, each product on one
      (the join's own parallelism), every thread with its own blocks; `cpu` gets its process CPU seconds."""
    rng = np.random.default_rng(seed)
    used = [(int(q), int(m)) for q, m in zip(queries, members) if q and m]
    threads = ivf_join.blas_threads() if engine == "numpy-lists" else 1
    blocks = [
        (
            rng.standard_normal((int(queries.max()), d), dtype=np.float32),
            rng.standard_normal((int(members.max()), d), dtype=np.float32),
        )
        for _ in range(threads)
    ]
    if engine == "numpy-lists":
        mine = threading.local()
        taken = iter(blocks)

        def product(shape):
            if not hasattr(mine, "blocks"):
                mine.blocks = next(taken)
            a, b = mine.blocks
            a[: shape[0]] @ b[: shape[1]].T

        with ThreadPoolExecutor(threads) as pool, threadpool_limits(1, user_api="blas"):
            list(pool.map(product, used[: 4 * threads]))  # warm the BLAS (a thread takes its blocks on first use)
            start, start_cpu = time.perf_counter(), time.process_time()
            list(pool.map(product, used))
            if cpu is not None:
                cpu.append(time.process_time() - start_cpu)
            return time.perf_counter() - start
    a, b = blocks[0]
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    q0, m0 = used[0]
    a[:q0] @ b[:m0].T  # warm the BLAS
    start = time.perf_counter()
    for q, m in used:
        if engine == "numpy":
            a[:q] @ b[:m].T
        else:
            torch.mm(ta[:q], tb[:m].T)
    return time.perf_counter() - start


def main(argv=None) -> None:
    import os

    from benchmarks.knn_graph import load_line, machine_line

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument(
        "--nprobe", type=int, default=0, help="a fixed nprobe (0: the margin dedup chooses, `ivf_join.choose_margin`)"
    )
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--block-bytes", type=int, default=1 << 30, help="join_lists' group size (dedup: budget / 8)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the join and each GEMM; medians")
    args = ap.parse_args(argv)

    print(machine_line(), flush=True)
    print(load_line(), flush=True)
    with tempfile.TemporaryDirectory(prefix="lvd-bench-join-") as tmp:
        view = pool_view(Path(tmp), args.n).held()  # as dedup's join reads them
        nlist = ivf_join.list_count(args.n)
        rng = np.random.default_rng(0)
        train = np.sort(rng.choice(args.n, min(args.n, nlist * ivf_join.TRAIN_PER_LIST), replace=False))
        quantizer = ivf_join.train_quantizer(view[train], nlist, seed=0)
        if args.nprobe:
            probes, rule = (
                np.ascontiguousarray(ivf_join.probe_lists(view, quantizer, args.nprobe)),
                f"nprobe {args.nprobe}",
            )
        else:
            probes, gaps = ivf_join.probe_lists(view, quantizer, ivf_join.PROBE_WIDTHS[-1], gaps=True)
            margin = ivf_join.choose_margin(view, probes, gaps, quantizer, THRESHOLD, args.k)[0]
            probes = ivf_join.within_margin(probes, gaps, margin)
            rule = f"margin {margin} ({(probes >= 0).sum() / args.n:.1f} probes a row, at most {probes.shape[1]})"
        nprobe = probes.shape[1]
        queries, members = list_shapes(probes, nprobe, quantizer.nlist)
        flops = 2.0 * float((queries * members).sum()) * view.dim
        engines = ("numpy-lists", "numpy", "torch")  # the join's own parallelism first: closest to it in time
        lvd, gemm, pairs = [], {engine: [] for engine in engines}, 0
        lvd_cpu, lists_cpu = [], []  # process CPU seconds (steal excluded): the join's and the numpy-lists GEMM's
        for _ in range(args.rounds):  # interleaved: a change in the machine's speed touches both sides
            start, start_cpu = time.perf_counter(), time.process_time()
            pairs = sum(
                len(i)
                for i, _, _ in ivf_join.join_lists(
                    view, probes, nprobe, THRESHOLD, k=args.k, nlist=quantizer.nlist, block_bytes=args.block_bytes
                )
            )
            lvd.append(time.perf_counter() - start)
            lvd_cpu.append(time.process_time() - start_cpu)
            for engine in engines:
                gemm[engine].append(gemm_seconds(queries, members, view.dim, engine, cpu=lists_cpu))
    used = int(((queries > 0) & (members > 0)).sum())
    levels = "two levels" if quantizer.top is not None else "flat"
    print(
        f"{args.n} rows, d {view.dim}, {quantizer.nlist} lists ({levels}), "
        f"{rule}: mean list {members.mean():.0f} members x {queries.mean():.0f} queries, "
        f"{flops / 1e9:.1f} GFLOP of products, {pairs} directed pairs >= {THRESHOLD}, {args.rounds} rounds "
        f"(medians; the join on {ivf_join.blas_threads()} threads)",
        flush=True,
    )
    for name, seconds in gemm.items():
        median = float(np.median(seconds))
        print(
            f"  GEMM ({name}) of the same shapes: {median:.2f} s, {median / used * 1e3:.1f} ms/list, "
            f"{flops / median / 1e9:.1f} GFLOP/s",
            flush=True,
        )
    median = float(np.median(lvd))
    print(
        f"  lvd join_lists: {median:.2f} s (runs {', '.join(f'{t:.2f}' for t in lvd)}), "
        f"{median / used * 1e3:.1f} ms/list, {flops / median / 1e9:.1f} GFLOP/s",
        flush=True,
    )
    best = np.min(np.array(list(gemm.values())), axis=0)  # each round's fastest GEMM
    ratios = best / np.array(lvd)
    print(
        f"  ratio best GEMM / lvd, round by round: median {np.median(ratios):.2f} "
        f"(range {ratios.min():.2f}-{ratios.max():.2f})",
        flush=True,
    )
    cpu_ratios = np.array(lists_cpu) / np.array(lvd_cpu)
    print(
        f"  CPU seconds, GEMM (numpy-lists) / lvd, round by round: median {np.median(cpu_ratios):.2f} "
        f"(range {cpu_ratios.min():.2f}-{cpu_ratios.max():.2f}; lvd {np.median(lvd_cpu):.2f} s)",
        flush=True,
    )
    print(f"roofline: fp32 square matmul {matmul_gflops(torch.float32, torch.device('cpu')):.0f} GFLOP/s", flush=True)
    print(load_line(), f"(threads {torch.get_num_threads()}, cpus {os.cpu_count()})", flush=True)


if __name__ == "__main__":
    main()
