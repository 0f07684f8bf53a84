"""Dedup's list join (`ivf_join.join_lists`) against the bare matrix products of the same shapes.

For every inverted list the join multiplies the rows that probe it (queries) by the rows assigned
to it (members), in float32. This benchmark builds a synthetic pool as `benchmarks/scale.py` does
(clustered unit vectors, d = 384, 1 % planted copies, float16 parts on disk), trains the lists,
assigns the probes, then in one process with the same threads times

- lvd: `join_lists` over all lists (reading the rows, the product, the threshold scan, the pairs);
- GEMM: for each list, one float32 product of contiguous (queries, d) x (d, members) blocks, the
  best of numpy's matmul and torch.mm (the same shapes, the data already in place);

and prints the ratio GEMM / lvd (1.0: the join runs at its product's speed), both GFLOP/s, the
machine's square fp32 matmul speed, the CPU kind and the load average.

    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/ivf_join.py --n 100000            # dedup's margin
    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/ivf_join.py --n 100000 --nprobe 12  # a fixed nprobe

Where the join's time went (py-spy --native, 2-core AVX2 AMD EPYC): at 100k rows, 195 lists of
~513 members x ~6154 queries at nprobe 12, the BLAS product took 69 %, gathering each list's
query rows 12 %, reading a group 10 %, the inverted lists 4 %, the threshold scan 2 %; gathering
rows with torch's index_select between numpy products made the join 3x slower (torch's OpenMP
threads and OpenBLAS's spun against each other). At 1M rows a group's read took 34-38 % of the
join: the mapped parts read ~5-9x slower inside the join than in a fresh process, and each group
converted its rows into freshly faulted pages. The join now holds the rows in memory
(`EmbeddingRows.held`) and reads each group into one reused buffer: dedup's join at 1M went from
66.3 s to 37.9 s at the same probes (51 -> 90 GFLOP/s), and at 100k with the margin dedup chooses
(0.04, 3.7 probes a row, 513 members x 1889 queries a list) the profile (50 Hz, 100 samples of
the join) is: the product 70 %, gathering each list's query rows 10 %, the threshold scan 9 %,
reading the group 4 %, gathering a list's members 2 %, the inverted lists 2 %. Ratio GEMM / lvd over 6 runs: 0.57-0.78,
median 0.68 (GEMM 126-160 GFLOP/s, join 91-105; load average 1.9-2.1, this benchmark alone
under the lock): with the margin, a list's product is a third of what nprobe 12 gave it, so the
per-list gathers weigh more.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

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


def gemm_seconds(queries: np.ndarray, members: np.ndarray, d: int, engine: str, seed: int = 1) -> float:
    """Seconds of one contiguous float32 product per list of these shapes (data in place, output preallocated
    by the engine as the join's own call would be)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((int(queries.max()), d), dtype=np.float32)
    b = rng.standard_normal((int(members.max()), d), dtype=np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    used = [(int(q), int(m)) for q, m in zip(queries, members) if q and m]
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
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each; the best is kept")
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
        lvd, pairs = [], 0
        for _ in range(args.repeats):
            start = time.perf_counter()
            pairs = sum(
                len(i)
                for i, _, _ in ivf_join.join_lists(
                    view, probes, nprobe, THRESHOLD, k=args.k, nlist=quantizer.nlist, block_bytes=args.block_bytes
                )
            )
            lvd.append(time.perf_counter() - start)
        gemm = {
            engine: min(gemm_seconds(queries, members, view.dim, engine) for _ in range(args.repeats))
            for engine in ("numpy", "torch")
        }
    best_engine = min(gemm, key=gemm.get)
    used = int(((queries > 0) & (members > 0)).sum())
    levels = "two levels" if quantizer.top is not None else "flat"
    print(
        f"{args.n} rows, d {view.dim}, {quantizer.nlist} lists ({levels}), "
        f"{rule}: mean list {members.mean():.0f} members x {queries.mean():.0f} queries, "
        f"{flops / 1e9:.1f} GFLOP of products, {pairs} directed pairs >= {THRESHOLD}",
        flush=True,
    )
    for name, seconds in gemm.items():
        print(
            f"  GEMM ({name}) of the same shapes: {seconds:.2f} s, {seconds / used * 1e3:.1f} ms/list, "
            f"{flops / seconds / 1e9:.1f} GFLOP/s",
            flush=True,
        )
    lvd_s, runs = min(lvd), ", ".join(f"{t:.2f}" for t in lvd)
    print(
        f"  lvd join_lists: {lvd_s:.2f} s (runs {runs}), {lvd_s / used * 1e3:.1f} ms/list, "
        f"{flops / lvd_s / 1e9:.1f} GFLOP/s",
        flush=True,
    )
    print(f"  ratio GEMM ({best_engine}) / lvd: {gemm[best_engine] / lvd_s:.2f}", flush=True)
    print(f"roofline: fp32 square matmul {matmul_gflops(torch.float32, torch.device('cpu')):.0f} GFLOP/s", flush=True)
    print(load_line(), f"(threads {torch.get_num_threads()}, cpus {os.cpu_count()})", flush=True)


if __name__ == "__main__":
    main()
