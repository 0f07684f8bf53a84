"""How dedup, cluster and retrieve grow with the pool: wall time, peak memory, planted-pair recall.

For each n it writes a synthetic run folder by the run-folder contract (manifest parts and float16
embedding parts of clustered unit vectors, d = 384; 1 % of the pool are planted near-duplicate
copies at cosine ~0.95, 50 planted copies of eval images, 3 seed sets of 20 seeds), then runs
`lvd dedup`, `lvd cluster` and `lvd retrieve` as subprocesses, and prints per stage the wall
seconds, the peak RSS of that subprocess (`os.wait4`), the recall of the planted near-duplicate
pairs (a pair counts when dedup put both in one component; every planted pair is above the
threshold in exact search by construction) and the growth exponent between consecutive sizes.

    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/scale.py --sizes 100000 300000
    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/scale.py --sizes 1000000 3000000   # long
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lvd.common.devices import cpu_has_native_bf16
from lvd.curate.manifest import SCHEMA
from lvd.curate.runio import write_success

D = 384
PART = 262_144
THRESHOLD = 0.9


def vectors(n: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    which = rng.integers(0, len(centres), n)
    x = centres[which] + 1.2 * rng.standard_normal((n, D), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near_copy(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    y = x + (0.3 / math.sqrt(D)) * rng.standard_normal(x.shape, dtype=np.float32)  # cosine ~0.95
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def write_run(run: Path, n: int, seed: int = 0) -> np.ndarray:
    """The run folder; returns the planted pool pairs as (id, id) rows."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(2, n // 100), D), dtype=np.float32)
    n_copies = n // 100
    n_base = n - n_copies - 50
    originals = rng.choice(n_base, n_copies, replace=False)
    sets = {"pool": n, "eval:ev": 1000, **{f"seed:s{i}": 20 for i in range(3)}}
    ids = {name: np.arange(count, dtype=np.int64) + 1 + (k << 40) for k, (name, count) in enumerate(sets.items())}
    (run / "manifest").mkdir(parents=True)
    (run / "embed").mkdir()
    part = 0
    eval_x = vectors(1000, rng, centres)
    for name, count in sets.items():
        for start in range(0, count, PART):
            stop = min(start + PART, count)
            rows = ids[name][start:stop]
            table = pa.table({"id": rows, "set": [name] * len(rows), "source": ["synthetic"] * len(rows),
                              "kind": ["folder"] * len(rows), "key": [f"{i}.jpg" for i in rows], "label": [None] * len(rows),
                              "bytes": np.full(len(rows), 100), "sha1": [hashlib.sha1(str(i).encode()).hexdigest() for i in rows],
                              "width": np.full(len(rows), 64, np.int32), "height": np.full(len(rows), 64, np.int32),
                              "format": ["JPEG"] * len(rows), "mode": ["RGB"] * len(rows), "frames": np.ones(len(rows), np.int32),
                              "status": ["ok"] * len(rows), "error": [None] * len(rows)}, schema=SCHEMA)
            pq.write_table(table, run / "manifest" / f"part-{part:05d}.parquet")
            if name == "pool":
                x = np.empty((stop - start, D), np.float32)
                for i in range(start, stop, 65536):  # base rows, copies of earlier originals, eval copies
                    j = min(i + 65536, stop)
                    x[i - start : j - start] = vectors(j - i, rng, centres)
                pos = np.arange(start, stop)
                copy = (pos >= n_base) & (pos < n_base + n_copies)
                x[copy] = 0  # filled below, once every original exists
            elif name == "eval:ev":
                x = eval_x
            else:
                x = vectors(stop - start, rng, centres)
            np.save(run / "embed" / f"part-{part:05d}.npy", x.astype(np.float16))
            np.save(run / "embed" / f"ids-{part:05d}.npy", rows)
            part += 1
    # the planted copies: pool rows n_base.. get near copies of pool originals, the last 50 of eval images
    pool_parts = sorted(run.glob("embed/part-*.npy"))[: math.ceil(n / PART)]
    pool = np.concatenate([np.load(p).astype(np.float32) for p in pool_parts])
    pool[n_base : n_base + n_copies] = near_copy(pool[originals], rng)
    pool[n_base + n_copies :] = near_copy(eval_x[:50], rng)
    for k, p in enumerate(pool_parts):
        np.save(p, pool[k * PART : (k + 1) * PART].astype(np.float16))
    write_success(run / "manifest")
    write_success(run / "embed", model="synthetic", dim=D, copy_detection=None)
    return np.stack([ids["pool"][originals], ids["pool"][n_base : n_base + n_copies]], 1)


def run_stage(stage: str, run: Path, n: int) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of `lvd STAGE` on the run folder."""
    args = [sys.executable, "-m", "lvd.curate.cli", stage, "default", f"run_dir={run}", "progress=false",
            f"dedup.threshold={THRESHOLD}", f"decontam.threshold={THRESHOLD}", "embed.copy_detection.weights=null",
            f"cluster.k={max(10, n // 1000)}", "retrieve.n=100"]
    started = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"lvd {stage} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def pair_recall(run: Path, pairs: np.ndarray) -> float:
    near = pd.read_parquet(run / "dedup" / "near.parquet", columns=["id", "component"]).set_index("id")["component"]
    a, b = near.reindex(pairs[:, 0]).to_numpy(), near.reindex(pairs[:, 1]).to_numpy()
    return float(np.mean((a == b) & ~np.isnan(a)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000])
    ap.add_argument("--stages", nargs="+", default=["dedup", "cluster", "retrieve"])
    ap.add_argument("--work", default="/tmp/lvd-bench-scale")
    args = ap.parse_args()
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 {cpu_has_native_bf16()}, "
          f"{os.cpu_count()} cores; d = {D}, planted pairs = 1 % of n, threshold {THRESHOLD}")
    print(f"{'n':>9s} {'stage':>9s} {'wall s':>9s} {'peak GiB':>9s} {'exponent':>9s}  recall of planted pairs")
    previous: dict[str, tuple[int, float]] = {}
    for n in args.sizes:
        run = Path(args.work) / f"n{n}"
        shutil.rmtree(run, ignore_errors=True)
        pairs = write_run(run, n)
        for stage in args.stages:
            wall, rss = run_stage(stage, run, n)
            exponent = ""
            if stage in previous:
                n0, t0 = previous[stage]
                exponent = f"{math.log(wall / t0) / math.log(n / n0):.2f}"
            previous[stage] = (n, wall)
            recall = f"{pair_recall(run, pairs):.4f} of {len(pairs)}" if stage == "dedup" else ""
            print(f"{n:9d} {stage:>9s} {wall:9.1f} {rss:9.2f} {exponent:>9s}  {recall}", flush=True)


if __name__ == "__main__":
    main()
