"""Queries per second at recall@10 >= target: lvd's automatically chosen index vs hnswlib.

Both run in this process on the same vectors with the same number of threads. The data are
clustered unit vectors (Gaussian clusters, L2-normalised), the queries held out from the same
distribution; the reference neighbours come from exact search.

For lvd the index and its search parameter are exactly what `lvd index build` chooses (the
vectors are written as embed parts and built through the same function): the parameter is
tuned at build time on a held-back sample of the indexed vectors, then measured here on the
held-out queries. hnswlib gets the smallest `ef` that reaches the
target on the held-out queries themselves (its best case).

    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/search.py --sizes 200000 1000000
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lvd.index import ann  # noqa: E402
from lvd.index.store import BuildOptions, IndexStore  # noqa: E402
from lvd.serve.run_inputs import build  # noqa: E402


def clustered_unit_vectors(n: int, d: int, n_clusters: int, spread: float, seed: int) -> np.ndarray:
    """Points around random centres, normalised: neighbours are mostly in the same cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d), dtype=np.float32)
    x = np.empty((n, d), dtype=np.float32)
    step = 100_000
    for start in range(0, n, step):
        stop = min(start + step, n)
        assign = rng.integers(0, n_clusters, size=stop - start)
        x[start:stop] = centres[assign] + spread * rng.standard_normal((stop - start, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def timed_qps(search, xq: np.ndarray, repeats: int = 3) -> tuple[float, np.ndarray]:
    """Best of `repeats` runs over the whole query batch (the machine is shared)."""
    best, found = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        found = search(xq)
        best = min(best, time.perf_counter() - t0)
    return len(xq) / best, found


def bench_hnswlib(xb, xq, truth, k, target, threads, m=16, ef_construction=200):
    import hnswlib

    t0 = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=xb.shape[1])
    index.init_index(max_elements=len(xb), M=m, ef_construction=ef_construction, random_seed=0)
    index.set_num_threads(threads)
    index.add_items(xb, np.arange(len(xb)), num_threads=threads)
    build_s = time.perf_counter() - t0
    rows = []
    for ef in ann.EF_CANDIDATES:
        if ef < k:
            continue
        index.set_ef(ef)
        qps, found = timed_qps(lambda q: index.knn_query(q, k=k, num_threads=threads)[0], xq)
        recall = ann.recall_at_k(found, truth, k)
        rows.append({"ef": ef, "recall": recall, "qps": qps})
        if recall >= target:
            break
    best = rows[-1]
    return {"name": f"hnswlib M={m} efC={ef_construction}", "build_s": build_s, "sweep": rows, **best}


def bench_lvd(embed_dir, index_dir, xq, truth, k, target, memory_gb, calib_queries, factory="auto"):
    """`lvd index build` exactly as the CLI runs it, then search with what it chose and tuned."""
    t0 = time.perf_counter()
    info = build(
        embed_dir,
        index_dir,
        BuildOptions(
            factory=factory,
            memory_gb=memory_gb,
            k=k,
            target_recall=target,
            calibration_queries=calib_queries,
            progress=False,
        ),
        overwrite=True,
    )
    build_s = time.perf_counter() - t0
    store = IndexStore.open(index_dir)
    qps, found = timed_qps(lambda q: store.index.search(q, k)[1], xq)
    recall = ann.recall_at_k(store.ids[found], truth, k)
    return {
        "name": f"lvd auto: {info['factory']}",
        "reason": info["plan"]["reason"],
        "params": info["search_params"],
        "calibration_recall": info["expected_recall"]["recall"],
        "recall": recall,
        "qps": qps,
        "build_s": build_s,
    }


def bench_exact(xb, xq, k):
    flat = faiss.IndexFlatIP(xb.shape[1])
    flat.add(xb)
    qps, _ = timed_qps(lambda q: flat.search(q, k)[1], xq, repeats=1)
    return {"name": "exact (Faiss Flat)", "recall": 1.0, "qps": qps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[200_000], help="database sizes to run")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=10_000, help="held-out queries")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=1.0, help="within-cluster noise / centre norm per dimension")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--target", type=float, default=0.95, help="recall@k to reach")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-gb", default="8")
    p.add_argument("--factory", default="auto", help="auto, or a Faiss factory string to try instead")
    p.add_argument("--calibration-queries", type=int, default=1000)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    faiss.omp_set_num_threads(args.threads)
    results = []
    for n in args.sizes:
        x = clustered_unit_vectors(n + args.queries, args.dim, args.clusters, args.spread, seed=n)
        # the vectors as an embed stage stores them (float16 parts); both contenders get exactly these
        xb, xq = x[:n].astype(np.float16).astype(np.float32), x[n:]
        del x
        work = Path(tempfile.mkdtemp(prefix="lvd-bench-search-"))
        embed_dir = work / "embed"
        embed_dir.mkdir()
        for p, start in enumerate(range(0, n, 250_000)):
            np.save(embed_dir / f"part-{p:05d}.npy", xb[start : start + 250_000].astype(np.float16))
            np.save(embed_dir / f"ids-{p:05d}.npy", np.arange(start, min(start + 250_000, n), dtype=np.int64))
        _, truth = ann.exact_search(xb, xq, args.k)
        print(
            f"\n== {n} x {args.dim} clustered unit vectors, {len(xq)} held-out queries, "
            f"{args.threads} threads, recall@{args.k} >= {args.target}",
            flush=True,
        )
        ours = bench_lvd(
            embed_dir,
            work / "index",
            xq,
            truth,
            args.k,
            args.target,
            args.memory_gb,
            args.calibration_queries,
            args.factory,
        )
        shutil.rmtree(work)
        peer = bench_hnswlib(xb, xq, truth, args.k, args.target, args.threads)
        exact = bench_exact(xb, xq, args.k)
        for r in (ours, peer, exact):
            extra = r.get("params") or ({"ef": r["ef"]} if "ef" in r else {})
            build = f"build {r['build_s']:.1f}s" if "build_s" in r else ""
            print(
                f"  {r['name']:<44} recall {r['recall']:.3f}  {r['qps']:>9.0f} QPS  {build:<12} {extra}",
                flush=True,
            )
        ratio = ours["qps"] / peer["qps"]
        ok = ours["recall"] >= args.target and peer["recall"] >= args.target
        print(
            f"  ratio lvd/hnswlib QPS = {ratio:.2f}x  (both at recall >= {args.target}: {ok}); why: {ours['reason']}",
            flush=True,
        )
        results.append(
            {
                "n": n,
                "d": args.dim,
                "threads": args.threads,
                "lvd": ours,
                "hnswlib": peer,
                "exact": exact,
                "ratio": ratio,
            }
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
