"""How dedup, cluster and retrieve grow with the pool: wall time, peak memory, planted-pair recall.

For each n it writes a synthetic run folder by the run-folder contract (manifest parts and float16
embedding parts of clustered unit vectors, d = 384; 1 % of the pool are planted near-duplicate
copies at cosine ~0.95, 50 planted copies of eval images, 3 seed sets of 20 seeds), then runs
`lvd dedup`, `lvd cluster` and `lvd retrieve` as subprocesses, and prints per stage the wall
seconds, the peak RSS of that subprocess (its VmHWM), the recall of the planted near-duplicate
pairs (a pair counts when dedup put both in one component; every planted pair is above the
threshold in exact search by construction) and the growth exponent between consecutive sizes.

`--images N` measures instead the stages that read every image, per machine: N web-sized JPEGs
(crops of the photos scikit-image and scikit-learn ship, shorter side 360-720 px, quality 85-95)
in a folder, `lvd manifest` over them (read, sha1, decode), then `lvd shards` writing all of them
(read, sha1 check, tar), each as one process with `workers: auto` and under torchrun with that
many ranks on this machine (`--ranks`), in images/s and MB/s of source bytes.

    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/scale.py --sizes 100000 300000
    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/scale.py --sizes 1000000 3000000   # long
    .venv/bin/python benchmarks/scale.py --sizes 10000000 --stages dedup --keep   # then:
    .venv/bin/python benchmarks/scale.py --sizes 10000000 --stages cluster retrieve --reuse
    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/scale.py --images 8000 --ranks 1 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
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
from lvd.common.memory import memory_budget
from lvd.common.run_folder import MANIFEST_SCHEMA as SCHEMA
from lvd.curate.stage import write_success

D = 384
PART = 262_144
THRESHOLD = 0.9
# The same k at every n, so that the exponents measure growth in n (DINOv2 used 100k clusters on 1.2B images).
CLUSTERS = 1000
# The planted (original id, copy id) pairs, saved in the run folder so that --reuse can score a kept run.
PLANTED = "planted-pairs.npy"


def vectors(n: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    which = rng.integers(0, len(centres), n)
    x = centres[which] + 1.2 * rng.standard_normal((n, D), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near_copy(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    y = x + (0.3 / math.sqrt(D)) * rng.standard_normal(x.shape, dtype=np.float32)  # cosine ~0.95
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def _manifest_part(rows: np.ndarray, name: str) -> pa.Table:
    n = len(rows)
    return pa.table(
        {
            "id": rows,
            "set": [name] * n,
            "source": ["synthetic"] * n,
            "kind": ["folder"] * n,
            "key": [f"{i}.jpg" for i in rows],
            "label": [None] * n,
            "bytes": np.full(n, 100),
            "sha1": [hashlib.sha1(str(i).encode()).hexdigest() for i in rows],
            "width": np.full(n, 64, np.int32),
            "height": np.full(n, 64, np.int32),
            "format": ["JPEG"] * n,
            "mode": ["RGB"] * n,
            "frames": np.ones(n, np.int32),
            "status": ["ok"] * n,
            "error": [None] * n,
        },
        schema=SCHEMA,
    )


def write_run(run: Path, n: int, seed: int = 0) -> np.ndarray:
    """The run folder, written part by part (memory holds one part); returns the planted pool pairs
    as (id, id) rows. Pool rows n_base.. are near copies of earlier pool rows, the last 50 of eval images."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((min(max(2, n // 100), 100_000), D), dtype=np.float32)
    n_copies = n // 100
    n_base = n - n_copies - 50
    originals = np.sort(rng.choice(n_base, n_copies, replace=False))
    copy_rng = np.random.default_rng([seed, 1])
    copy_order = copy_rng.permutation(n_copies)  # which original each copy row copies
    sets = {"pool": n, "eval:ev": 1000, **{f"seed:s{i}": 20 for i in range(3)}}
    ids = {name: np.arange(count, dtype=np.int64) + 1 + (k << 40) for k, (name, count) in enumerate(sets.items())}
    (run / "manifest").mkdir(parents=True)
    (run / "embed").mkdir()
    eval_x = vectors(1000, rng, centres)
    part = 0
    for name, count in sets.items():
        for start in range(0, count, PART):
            stop = min(start + PART, count)
            rows = ids[name][start:stop]
            pq.write_table(_manifest_part(rows, name), run / "manifest" / f"part-{part:05d}.parquet")
            if name == "pool":
                x = vectors(stop - start, np.random.default_rng([seed, 2, part]), centres)
                pos = np.arange(start, stop)
                copies = np.flatnonzero((pos >= n_base) & (pos < n_base + n_copies))
                if len(copies):  # every original is before n_base: written already, or in this part
                    src = originals[copy_order[pos[copies] - n_base]]
                    x[copies] = near_copy(_pool_rows(run, src, start, x), copy_rng)
                evals = np.flatnonzero(pos >= n_base + n_copies)
                if len(evals):
                    x[evals] = near_copy(eval_x[pos[evals] - n_base - n_copies], copy_rng)
            elif name == "eval:ev":
                x = eval_x[start:stop]
            else:
                x = vectors(stop - start, rng, centres)
            np.save(run / "embed" / f"part-{part:05d}.npy", x.astype(np.float16))
            np.save(run / "embed" / f"ids-{part:05d}.npy", rows)
            part += 1
    write_success(run / "manifest")
    write_success(run / "embed", model="synthetic", dim=D, copy_detection=None)
    copy_rows = n_base + np.arange(n_copies)
    pairs = np.stack([ids["pool"][originals[copy_order]], ids["pool"][copy_rows]], 1)
    np.save(run / PLANTED, pairs)
    return pairs


def _pool_rows(run: Path, rows: np.ndarray, start: int, current: np.ndarray) -> np.ndarray:
    """float32 pool rows: those before `start` from the written parts, the others from `current`."""
    out = np.empty((len(rows), D), np.float32)
    here = rows >= start
    out[here] = current[rows[here] - start]
    for p in np.unique(rows[~here] // PART):
        hit = np.flatnonzero(~here & (rows // PART == p))
        out[hit] = np.load(run / "embed" / f"part-{p:05d}.npy", mmap_mode="r")[rows[hit] - p * PART]
    return out


# The stage's own peak, read in the stage process (VmHWM): the rusage of a child (`wait4`) keeps the
# high-water mark of the mm it was spawned from, so after a large parent it reports the parent's peak.
LAUNCH = """import sys
import lvd.curate.cli as cli
try:
    code = cli.main(sys.argv[2:])
finally:
    with open('/proc/self/status') as status:
        peak = next(line for line in status if line.startswith('VmHWM')).split()[1]
    with open(sys.argv[1], 'w') as out:
        out.write(peak)
sys.exit(code)
"""


def run_stage(stage: str, run: Path, extra: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of `lvd STAGE` on the run folder."""
    peak_file = run / f".peak-{stage}"
    args = [
        sys.executable,
        "-c",
        LAUNCH,
        str(peak_file),
        stage,
        "default",
        f"run_dir={run}",
        "progress=false",
        f"dedup.threshold={THRESHOLD}",
        f"decontam.threshold={THRESHOLD}",
        "embed.copy_detection.weights=null",
        f"cluster.k={CLUSTERS}",
        "retrieve.n=100",
        *extra,
    ]
    started = time.perf_counter()
    done = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"lvd {stage} failed: {done.stderr.decode()[-2000:]}")
    return wall, int(peak_file.read_text()) / 2**20  # VmHWM is in kB


def pair_recall(run: Path, pairs: np.ndarray) -> float:
    near = pd.read_parquet(run / "dedup" / "near.parquet", columns=["id", "component"]).set_index("id")["component"]
    a, b = near.reindex(pairs[:, 0]).to_numpy(), near.reindex(pairs[:, 1]).to_numpy()
    return float(np.mean((a == b) & ~np.isnan(a)))


def faiss_comparison(run: Path, pairs: np.ndarray, queries: int) -> None:
    """Dedup's list join against Faiss's IndexIVFFlat on the same lists (centroids), in this process;
    Faiss probes as many lists per query as lvd's margin gives a row on average.

    Faiss searches `queries` pool rows (a whole 1M pool would take it hours here); both are
    timed on those rows' work: ours joins every list once (all rows), so its time is scaled by
    queries / n for the per-query figure printed beside Faiss's.
    """
    import faiss

    from lvd.common.run_folder import embedding_ids, vector_files
    from lvd.index import ivf_join
    from lvd.index.io import EmbeddingRows, IdRows

    info = json.loads((run / "dedup" / "_SUCCESS.json").read_text())["near_search"]
    if info.get("method") != "ivf-join":
        print(f"  faiss comparison: dedup did not join lists here ({info.get('method')})")
        return
    near = pd.read_parquet(run / "dedup" / "near.parquet", columns=["id"])
    rows = IdRows(embedding_ids(run / "embed")).rows(near["id"].to_numpy())
    view = EmbeddingRows(vector_files(run / "embed"), rows)
    n, nprobe = len(view), max(1, round(info["mean_probes"]))  # Faiss: the same probes a row on average
    rng = np.random.default_rng(0)  # the stage's sample and seed (seed 0)
    train = np.sort(rng.choice(n, min(n, info["nlist"] * ivf_join.TRAIN_PER_LIST), replace=False))
    t = time.perf_counter()
    quantizer = ivf_join.train_quantizer(view[train], info["nlist"], seed=0)
    probes = ivf_join.within_margin(*ivf_join.probe_lists(view, quantizer, info["nprobe"], gaps=True), info["margin"])
    ours_assign = time.perf_counter() - t
    t = time.perf_counter()
    found = sum(
        len(i)
        for i, _, _ in ivf_join.join_lists(
            view, probes, probes.shape[1], THRESHOLD, k=64, nlist=quantizer.nlist, block_bytes=1 << 30
        )
    )
    ours_join = time.perf_counter() - t
    x = view[:]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(D), D, quantizer.nlist, faiss.METRIC_INNER_PRODUCT)
    index.quantizer.add(quantizer.centroids)
    index.is_trained = True
    t = time.perf_counter()
    index.add(x)
    faiss_add = time.perf_counter() - t
    index.nprobe = nprobe
    q = np.sort(np.random.default_rng(1).choice(n, min(n, queries), replace=False))
    t = time.perf_counter()
    D_f, I_f = index.search(x[q], 65)
    faiss_search = time.perf_counter() - t
    faiss_pairs = int(((D_f >= THRESHOLD) & (I_f >= 0) & (I_f != q[:, None])).sum())
    per_ours = (ours_assign + ours_join) / n * 1e6
    per_faiss = (faiss_add / n + faiss_search / len(q)) * 1e6
    print(
        f"  same lists ({quantizer.nlist}, {'two levels' if quantizer.top is not None else 'flat'}), lvd margin "
        f"{info['margin']} ({info['mean_probes']:.1f} probes a row), Faiss nprobe {nprobe}, "
        f"{n} rows: lvd list join {ours_assign:.1f} s assign + {ours_join:.1f} s join = {per_ours:.1f} us/row "
        f"({found} directed pairs >= {THRESHOLD}); Faiss IVFFlat add {faiss_add:.1f} s + search of {len(q)} rows "
        f"{faiss_search:.1f} s = {per_faiss:.1f} us/row ({faiss_pairs} directed pairs among them, "
        f"{faiss_pairs * n / len(q):.0f} scaled); Faiss / lvd per row: {per_faiss / per_ours:.1f}x",
        flush=True,
    )


def write_images(folder: Path, n: int, seed: int = 0) -> int:
    """n JPEGs cut from the packaged sample photos, as a web crawl would hold them; returns their bytes."""

    from lvd.curate.demo.photo_edits import package_photos

    photos = list(package_photos().values())
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        side = int(rng.integers(360, 721))
        scale = side / min(cw, ch)
        img = photo.crop((x, y, x + cw, y + ch)).resize((max(1, round(cw * scale)), max(1, round(ch * scale))))
        path = folder / f"{i // 4096:04d}" / f"img-{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, "JPEG", quality=int(rng.integers(85, 96)))
        total += path.stat().st_size
    return total


def select_everything(run: Path) -> None:
    """retrieve/neighbors.parquet naming every pool image once, so that `lvd shards` writes them all."""
    ids = pd.read_parquet(run / "manifest", columns=["id", "status"]).query("status == 'ok'")["id"].to_numpy()
    frame = pd.DataFrame(
        {
            "seed_set": "all",
            "seed_id": np.int64(0),
            "id": ids,
            "rank": np.arange(1, len(ids) + 1, dtype=np.int64),
            "similarity": np.float32(1.0),
            "mode": "sample",
            "cluster": np.int64(0),
            "floor": np.float32(0.0),
        }
    )
    (run / "retrieve").mkdir(exist_ok=True)
    frame.to_parquet(run / "retrieve" / "neighbors.parquet", index=False)
    write_success(run / "retrieve", rows=len(frame))


def run_ranks(stage: str, run: Path, ranks: int, overrides: list[str]) -> float:
    """Wall seconds of `python -m lvd.curate.STAGE` under `torchrun --nproc-per-node RANKS`."""
    config = run / f"{stage}-{ranks}.yaml"
    run.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "lvd.curate.cli", "config", "default", *overrides], capture_output=True, text=True
    )
    config.write_text(done.stdout)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    started = time.perf_counter()
    done = subprocess.run([*cmd, "-m", f"lvd.curate.{stage}", str(config)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"torchrun lvd.curate.{stage} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - started


def image_throughput(args) -> None:
    """manifest and shards over real JPEGs: images/s and MB/s per machine (see the docstring)."""
    work = Path(args.work) / f"images{args.images}"
    pool = work / "pool"
    if not pool.is_dir():
        started = time.perf_counter()
        size = write_images(pool, args.images)
        print(f"wrote {args.images} JPEGs, {size / 1e6:.0f} MB, in {time.perf_counter() - started:.0f} s", flush=True)
    size = sum(p.stat().st_size for p in pool.rglob("*.jpg"))
    print(
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores; {args.images} JPEGs, "
        f"{size / args.images / 1e3:.0f} kB each on average"
    )
    print(f"{'stage':>9s} {'ranks':>6s} {'wall s':>9s} {'images/s':>9s} {'MB/s':>7s} {'peak GiB':>9s}")
    for ranks in args.ranks:
        run = work / f"run-{ranks}"
        shutil.rmtree(run, ignore_errors=True)
        common = [f"run_dir={run}", f'sources.pool=["{pool}"]', "progress=false", "shards.select=retrieve"]
        for stage in ("manifest", "shards"):
            if stage == "shards":
                select_everything(run)
            if ranks == 1:
                wall, peak = run_stage(stage, run, common[1:])
            else:
                wall, peak = run_ranks(stage, run, ranks, common + ["workers=auto"]), float("nan")
            rate = args.images / wall
            print(f"{stage:>9s} {ranks:6d} {wall:9.1f} {rate:9.1f} {size / wall / 1e6:7.1f} {peak:9.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000])
    ap.add_argument("--stages", nargs="+", default=["dedup", "cluster", "retrieve"])
    ap.add_argument("--work", default="/tmp/lvd-bench-scale")
    ap.add_argument(
        "--faiss-at",
        type=int,
        nargs="*",
        default=[1_000_000],
        help="sizes at which dedup's join is compared with Faiss IVFFlat on the same lists",
    )
    ap.add_argument("--faiss-queries", type=int, default=20_000)
    ap.add_argument("--memory-gb", default="auto", help="the stages' memory_gb (auto: a third of this machine's)")
    ap.add_argument("--keep", action="store_true", help="keep each run folder (default: removed after its size)")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="run the stages on a run folder that an earlier --keep left (not written afresh)",
    )
    ap.add_argument("--images", type=int, default=0, help="measure manifest and shards over this many JPEGs instead")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="--images: torchrun ranks on this machine")
    args = ap.parse_args()
    if args.images:
        image_throughput(args)
        return
    print(
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 {cpu_has_native_bf16()}, "
        f"{os.cpu_count()} cores; d = {D}, planted pairs = 1 % of n, threshold {THRESHOLD}, cluster.k {CLUSTERS}, "
        f"memory_gb {args.memory_gb} = {memory_budget(args.memory_gb) / 2**30:.2f} GiB"
    )
    print(f"{'n':>9s} {'stage':>9s} {'wall s':>9s} {'peak GiB':>9s} {'exponent':>9s}  recall of planted pairs")
    previous: dict[str, tuple[int, float]] = {}
    for n in args.sizes:
        run = Path(args.work) / f"n{n}"
        if args.reuse and (run / PLANTED).is_file():
            pairs = np.load(run / PLANTED)
            print(f"{n:9d} {'(reused)':>9s} {str(run)}", flush=True)
        else:
            shutil.rmtree(run, ignore_errors=True)
            t = time.perf_counter()
            pairs = write_run(run, n)
            print(f"{n:9d} {'(write)':>9s} {time.perf_counter() - t:9.1f}", flush=True)
        for stage in args.stages:
            wall, rss = run_stage(stage, run, [f"memory_gb={args.memory_gb}"])
            exponent = ""
            if stage in previous:
                n0, t0 = previous[stage]
                exponent = f"{math.log(wall / t0) / math.log(n / n0):.2f}"
            previous[stage] = (n, wall)
            recall = f"{pair_recall(run, pairs):.4f} of {len(pairs)}" if stage == "dedup" else ""
            print(f"{n:9d} {stage:>9s} {wall:9.1f} {rss:9.2f} {exponent:>9s}  {recall}", flush=True)
            if stage == "dedup":
                info = json.loads((run / "dedup" / "_SUCCESS.json").read_text()).get("near_search") or {}
                print(f"          {json.dumps(info)}", flush=True)
                if n in args.faiss_at:
                    faiss_comparison(run, pairs, args.faiss_queries)
        if not (args.keep or args.reuse):  # a reused folder was kept on purpose
            shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
