"""The retrieve stage: pool images for each curated seed set, as the DINOv2 paper retrieves them.

reader : embeddings (embed/), the surviving pool (dedup/), clusters (cluster/) and the
         manifest's seed sets;
mapper : per seed set, `sample` mode takes the n nearest pool images of every seed image;
         `cluster` mode finds the clusters the seed images fall in and draws m pool images
         from each (each drawn image is credited to its most similar seed in that cluster);
         a target size keeps the set's best images by similarity; a similarity floor
         (`min_similarity`, measured from the seeds themselves by default) rejects candidates
         that are not close enough to any seed to be like the seed set;
writer : retrieve/neighbors.parquet, one row per (seed set, seed, retrieved image) with rank,
         similarity, cluster, mode and the floor it cleared, so overlaps between seeds and sets
         stay visible and the shards stage can merge them (and label only what a floor vouches for).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lvd.common.errors import MissingInputError
from lvd.common.memory import memory_budget, rows_per_block
from lvd.curate.manifest import manifest_sets, read_manifest
from lvd.curate.ranks import Ranks, gather_rows, in_ranks, rank_device, rank_slice, torchrun_main
from lvd.curate.runio import is_done, open_stage, parquet_fingerprint, stage_fingerprint, write_parquet
from lvd.curate.stage import StageOutputs

log = logging.getLogger(__name__)

STAGE = "retrieve"
MODES = ("sample", "cluster")
PER_SET_KEYS = {"mode", "n", "m", "target", "min_similarity"}
# `auto` floors are measured on at most this many seeds of a set (a seeded sample).
FLOOR_SAMPLE = 4096
SCHEMA = pa.schema(
    [
        ("seed_set", pa.string()),
        ("seed_id", pa.int64()),
        ("id", pa.int64()),
        ("rank", pa.int32()),
        ("similarity", pa.float32()),
        ("mode", pa.string()),
        ("cluster", pa.int64()),
        ("floor", pa.float32()),  # the similarity floor the row cleared (null: none applied)
    ]
)


@dataclass(frozen=True)
class SetPlan:
    """How one seed set retrieves."""

    name: str
    mode: str
    n: int
    m: int
    target: int | None
    min_similarity: str | float | None  # auto, a number, or None (no floor)


def set_plans(cfg, names: list[str]) -> list[SetPlan]:
    """Per-set settings: `retrieve.per_set.NAME` over the stage-wide defaults."""
    per_set = cfg.retrieve.per_set or {}
    unknown_sets = sorted(set(per_set) - set(names))
    if unknown_sets:
        raise ValueError(f"retrieve.per_set names seed sets that are not configured: {unknown_sets}")
    plans = []
    for name in names:
        own = dict(per_set.get(name) or {})
        bad = sorted(set(own) - PER_SET_KEYS)
        if bad:
            raise ValueError(f"unknown key(s) {bad} in retrieve.per_set.{name}; allowed: {sorted(PER_SET_KEYS)}")
        mode = str(own.get("mode", cfg.retrieve.mode))
        if mode not in MODES:
            raise ValueError(f"retrieve mode {mode!r} for seed set {name!r}; expected one of {MODES}")
        target = own.get("target", cfg.retrieve.target)
        floor = _floor_setting(own.get("min_similarity", cfg.retrieve.min_similarity), name)
        plans.append(
            SetPlan(
                name,
                mode,
                int(own.get("n", cfg.retrieve.n)),
                int(own.get("m", cfg.retrieve.m)),
                None if target is None else int(target),
                floor,
            )
        )
    return plans


def _floor_setting(value, name: str) -> str | float | None:
    if value is None or str(value).strip().lower() in ("none", "null"):
        return None
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"min_similarity of seed set {name!r} must be auto, null or a number, got {value!r}") from None


def seed_floor(seed_x: np.ndarray, quantile: float, rng: np.random.Generator) -> float | None:
    """The `quantile` of each seed's cosine to its nearest fellow seed (None for a single seed).

    A retrieved image should be at least as close to a seed as the seeds of one class are to
    each other: an image further from every seed than all but the loosest seeds are from
    their nearest fellow is not like the seed set.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"retrieve.floor_quantile must be within [0, 1], got {quantile}")
    n = len(seed_x)
    if n < 2:
        return None
    pick = np.sort(rng.choice(n, size=FLOOR_SAMPLE, replace=False)) if n > FLOOR_SAMPLE else np.arange(n)
    x = np.asarray(seed_x[pick], np.float32)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return float(np.quantile(sims.max(axis=1), quantile))


def seed_floors(seed_x: np.ndarray, labels, quantile: float, rng: np.random.Generator) -> dict:
    """{label: floor} measured per label of a labelled seed set, and {None: floor} over all its seeds.

    Classes differ in how tight they are (in the demo, trousers far more than bags), so each
    label gets its own floor; a label with a single seed falls back to the set-wide one.
    """
    floors = {None: seed_floor(seed_x, quantile, rng)}
    if labels is not None:
        labels = np.asarray(labels, dtype=object)
        for label in sorted({str(v) for v in labels if not pd.isna(v)}):
            floors[label] = seed_floor(seed_x[labels == label], quantile, rng)
    return floors


def row_floors(rows: pd.DataFrame, seed_label: dict, floors: dict) -> np.ndarray:
    """The floor each row must clear: that of its seed's label, else the set-wide one (NaN: none)."""
    default = floors.get(None)
    per_seed = {
        seed: (floors.get(label) if floors.get(label) is not None else default) for seed, label in seed_label.items()
    }
    per_seed = {seed: (np.nan if v is None else float(v)) for seed, v in per_seed.items()}
    fallback = np.nan if default is None else float(default)
    return rows["seed_id"].astype(np.int64).map(per_seed).fillna(fallback).to_numpy(np.float64)


def apply_floor(rows: pd.DataFrame, floors: np.ndarray) -> tuple[pd.DataFrame, int]:
    """Rows at or above their floor (NaN = no floor), and how many distinct candidates were rejected."""
    if rows.empty:
        return rows, 0
    floors = np.where(np.isnan(floors), -np.inf, floors)
    kept = rows[rows["similarity"].to_numpy(np.float64) >= floors]
    return kept, int(np.setdiff1d(rows["id"].unique(), kept["id"].unique()).size)


def _rows_of(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    order = np.argsort(ids)
    pos = np.searchsorted(ids, wanted, sorter=order)
    pos = np.clip(pos, 0, len(ids) - 1)
    rows = order[pos]
    if not np.array_equal(ids[rows], wanted):
        missing = np.setdiff1d(wanted, ids)[:5]
        raise KeyError(f"ids without an embedding: {missing.tolist()}")
    return rows


def best_columns(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (similarity, row) of each line of candidates, best first, ties to the lower
    row; empty slots (-inf, or row -1) come last as (-inf, -1). Merging per-block or per-rank
    best lists with it gives what one pass over all the rows gives."""
    sims = np.asarray(sims, np.float32)
    empty = ~np.isfinite(sims) | (idx < 0)
    sims = np.where(empty, -np.inf, sims).astype(np.float32)
    idx = np.where(empty, np.iinfo(np.int64).max, idx)
    order = np.lexsort((idx, -sims), axis=1)[:, :k]
    best_s, best_i = np.take_along_axis(sims, order, 1), np.take_along_axis(idx, order, 1)
    return best_s, np.where(np.isfinite(best_s), best_i, -1)


def top_neighbors(pool_x, seed_x, k: int, *, backend="auto", device="cpu", block_rows: int = 262144, offset: int = 0):
    """(similarity, pool row) [q, k] of the k most similar pool rows of every seed, best first
    (ties: lower row), reading `pool_x` (an array or an `index.io.EmbeddingRows` view)
    `block_rows` at a time and keeping the running best, so the pool is never held whole.
    `offset` is added to the rows (a rank's slice of a larger pool)."""
    from lvd.index.knn import search

    n, q = len(pool_x), len(seed_x)
    k = min(k, n)
    best_s = np.full((q, 0), -np.inf, np.float32)
    best_i = np.zeros((q, 0), np.int64)
    for start in range(0, n, block_rows):
        block = np.asarray(pool_x[slice(start, start + block_rows)], np.float32)
        kb = min(k, len(block))
        sims, idx = search(block, seed_x, kb, metric="ip", method="exact", backend=backend, device=device)
        idx = np.where(idx >= 0, idx + start + offset, -1)
        best_s, best_i = best_columns(np.concatenate([best_s, sims], 1), np.concatenate([best_i, idx], 1), k)
    return best_s, best_i


def gather_neighbors(
    sims: np.ndarray, idx: np.ndarray, k: int, ranks, *, memory_budget: int = 1 << 30
) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's `top_neighbors` of its slice of the pool merged into the k best over the
    whole pool, on every rank. Each rank sends q * k pairs, not its rows, a run of seeds at a
    time so that the world's candidates for one run take an eighth of `memory_budget`."""
    if ranks.world == 1:
        return sims, idx
    q, have = sims.shape
    pad = k - have  # a slice shorter than k gives fewer columns
    sims = np.pad(np.asarray(sims, np.float32), ((0, 0), (0, pad)), constant_values=-np.inf)
    idx = np.pad(np.asarray(idx, np.int64), ((0, 0), (0, pad)), constant_values=-1)
    run = max(1, memory_budget // (8 * ranks.world * max(1, k) * 12))
    for start in range(0, q, run):
        part = slice(start, min(q, start + run))
        width = part.stop - part.start
        all_s = gather_rows(sims[part], ranks).reshape(ranks.world, width, k).transpose(1, 0, 2)
        all_i = gather_rows(idx[part], ranks).reshape(ranks.world, width, k).transpose(1, 0, 2)
        sims[part], idx[part] = best_columns(all_s.reshape(width, -1), all_i.reshape(width, -1), k)
    return sims, idx


def neighbor_rows(
    sims: np.ndarray, idx: np.ndarray, pool_ids: np.ndarray, seed_ids: np.ndarray, n: int
) -> pd.DataFrame:
    """(seed_id, id, rank, similarity) from the first n columns of `top_neighbors`' output."""
    sims, idx = sims[:, :n], idx[:, :n]
    valid = idx >= 0
    k = idx.shape[1]
    seed_col = np.repeat(seed_ids, k).reshape(len(seed_ids), k)
    ranks = np.tile(np.arange(1, k + 1), (len(seed_ids), 1))
    return pd.DataFrame(
        {"seed_id": seed_col[valid], "id": pool_ids[idx[valid]], "rank": ranks[valid], "similarity": sims[valid]}
    )


def nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (squared L2) for each row, in blocks."""
    c_norm = (centroids.astype(np.float64) ** 2).sum(1)
    out = np.empty(len(x), np.int64)
    for start in range(0, len(x), 4096):
        block = x[start : start + 4096].astype(np.float64)
        out[start : start + 4096] = np.argmin(c_norm[None, :] - 2.0 * block @ centroids.T.astype(np.float64), axis=1)
    return out


def cluster_draws(pool_x, pool_ids, pool_cluster, seed_x, seed_ids, seed_cluster, m: int, rng: np.random.Generator):
    """(seed_id, id, rank, similarity, cluster): m pool images from each cluster a seed falls in.

    `pool_x` may be an `index.io.EmbeddingRows` view: only the drawn rows are read. The pool is
    grouped by cluster once (a stable sort), not scanned once per cluster."""
    frames = []
    by_cluster = np.argsort(pool_cluster, kind="stable")
    sorted_clusters = pool_cluster[by_cluster]
    for c in np.unique(seed_cluster):
        lo, hi = np.searchsorted(sorted_clusters, [c, c + 1])
        members = by_cluster[lo:hi]  # in row order: the sort is stable
        if len(members) == 0:
            continue
        drawn = members if len(members) <= m else np.sort(rng.choice(members, size=m, replace=False))
        seeds_here = np.flatnonzero(seed_cluster == c)
        sims = np.asarray(pool_x[drawn], np.float32) @ seed_x[seeds_here].T
        best = sims.argmax(1)
        similarity = sims[np.arange(len(drawn)), best]
        order = np.argsort(-similarity, kind="stable")
        frames.append(
            pd.DataFrame(
                {
                    "seed_id": seed_ids[seeds_here[best[order]]],
                    "id": pool_ids[drawn[order]],
                    "rank": np.arange(1, len(drawn) + 1),
                    "similarity": similarity[order],
                    "cluster": np.full(len(drawn), c, np.int64),
                }
            )
        )
    if not frames:
        return pd.DataFrame({"seed_id": [], "id": [], "rank": [], "similarity": [], "cluster": []})
    return pd.concat(frames, ignore_index=True)


def apply_target(rows: pd.DataFrame, target: int | None) -> pd.DataFrame:
    """Keep the rows of the `target` distinct images with the best similarity to any seed."""
    if target is None or rows["id"].nunique() <= target:
        return rows
    best = rows.groupby("id")["similarity"].max().reset_index()
    best = best.sort_values(["similarity", "id"], ascending=[False, True], kind="stable").head(target)
    return rows[rows["id"].isin(best["id"])]


def _stage_fingerprint(cfg, run_dir: Path) -> str:
    parts = [str(stage_fingerprint(run_dir / s)) for s in ("embed", "dedup", "cluster")]
    settings = {k: cfg.retrieve[k] for k in cfg.retrieve}
    parts.append(json.dumps(settings, sort_keys=True, default=str))
    parts.append(str(cfg.seed))
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


def _cluster_of(run_dir: Path) -> pd.DataFrame | None:
    path = run_dir / "cluster" / "assign.parquet"
    return pq.read_table(path).to_pandas() if path.is_file() else None


def run_retrieve(cfg) -> Path:
    """Write retrieve/neighbors.parquet for every configured seed set.

    Under torchrun (`python -m lvd.curate.retrieve CONFIG`) every rank searches its slice of the
    pool for every sample-mode seed set; rank 0 merges the ranks' best lists (exactly what one
    pass over the whole pool keeps), draws the cluster-mode sets and writes.
    """
    return in_ranks(_run_retrieve, cfg, cfg.retrieve.device)


def _run_retrieve(cfg, ranks: Ranks) -> Path:
    from lvd.curate.dedup import curated_pool_ids
    from lvd.index.io import EmbeddingRows, load_embedding_ids

    started = time.time()
    run_dir = Path(cfg.run_dir)
    out = open_stage(cfg, STAGE) if ranks.rank == 0 else run_dir / STAGE
    ranks.barrier()
    fp = _stage_fingerprint(cfg, run_dir)
    target = out / "neighbors.parquet"
    if not cfg.overwrite and is_done(out) and parquet_fingerprint(target) == fp:
        log.info("retrieve: up to date")
        return out
    ranks.barrier()  # every rank has checked the finished file before rank 0 replaces it

    seed_sets = [name.split(":", 1)[1] for name in manifest_sets(run_dir) if name.startswith("seed:")]
    plans = set_plans(cfg, seed_sets)
    manifest = read_manifest(
        run_dir, sets=[f"seed:{name}" for name in seed_sets], columns=["id", "set", "label", "sha1"]
    )
    emb_ids = load_embedding_ids(run_dir / "embed")
    pool_ids = np.intersect1d(curated_pool_ids(run_dir), emb_ids)
    pool_x = EmbeddingRows(run_dir / "embed", _rows_of(emb_ids, pool_ids))  # read in blocks, never whole
    budget = memory_budget(cfg.get("memory_gb", "auto"))
    block_rows = rows_per_block(budget, 4 * max(1, pool_x.dim))
    device = str(rank_device(cfg.retrieve.device, ranks))

    seeds = {}  # set name -> (its manifest rows, the ids with an embedding, their vectors)
    for plan in plans:
        seed_rows = manifest[manifest["set"] == f"seed:{plan.name}"]
        seed_ids = np.intersect1d(seed_rows["id"].to_numpy(np.int64), emb_ids)
        seeds[plan.name] = (seed_rows, seed_ids, EmbeddingRows(run_dir / "embed", _rows_of(emb_ids, seed_ids))[:])
    # every sample-mode set in one pass over the pool (each rank its slice): the seeds of all of them, to the largest n
    sampled = [p for p in plans if p.mode == "sample"]
    top = {}
    bounds = np.cumsum([0] + [len(seeds[p.name][1]) for p in sampled])
    if len(pool_ids) and bounds[-1]:
        k = min(max(p.n for p in sampled), len(pool_ids))
        mine = rank_slice(len(pool_ids), ranks)
        sims, idx = top_neighbors(
            pool_x.subset(mine),
            np.concatenate([seeds[p.name][2] for p in sampled]),
            k,
            backend=cfg.retrieve.backend,
            device=device,
            block_rows=block_rows,
            offset=mine.start,
        )
        sims, idx = gather_neighbors(sims, idx, k, ranks, memory_budget=budget)
        top = {p.name: (sims[a:b], idx[a:b]) for p, a, b in zip(sampled, bounds[:-1], bounds[1:])}
    if ranks.rank != 0:  # a helper rank: its slice searched, nothing written
        ranks.barrier()  # rank 0 commits
        return out
    assign = _cluster_of(run_dir)
    pool_cluster = None
    if assign is not None:
        cluster_by_id = pd.Series(assign["cluster"].to_numpy(), index=assign["id"].to_numpy())
        pool_cluster = cluster_by_id.reindex(pool_ids).fillna(-1).astype(np.int64).to_numpy()
        del assign, cluster_by_id

    frames, set_floors = [], {}
    for plan in plans:
        seed_rows, seed_ids, seed_x = seeds[plan.name]
        if plan.mode == "sample":
            none = (np.zeros((len(seed_ids), 0), np.float32), np.zeros((len(seed_ids), 0), np.int64))
            rows = neighbor_rows(*top.get(plan.name, none), pool_ids, seed_ids, plan.n)
            rows["cluster"] = (
                pd.Series(pool_cluster, index=pool_ids).reindex(rows["id"]).to_numpy()
                if pool_cluster is not None
                else -1
            )
        else:
            if pool_cluster is None:
                raise MissingInputError(
                    f"seed set {plan.name!r} retrieves by cluster but {run_dir / 'cluster'} has no assign.parquet: "
                    "run `lvd cluster` first"
                )
            centroids = np.load(run_dir / "cluster" / "centroids.npy")
            rng = np.random.default_rng([int(cfg.seed), int(hashlib.sha1(plan.name.encode()).hexdigest()[:8], 16)])
            rows = cluster_draws(
                pool_x, pool_ids, pool_cluster, seed_x, seed_ids, nearest_centroid(seed_x, centroids), plan.m, rng
            )
        seed_label = {int(i): (None if pd.isna(v) else str(v)) for i, v in zip(seed_rows["id"], seed_rows["label"])}
        if plan.min_similarity == "auto":
            # byte-identical seeds say nothing about how spread out a class is: one of each counts
            sha1 = seed_rows.set_index("id")["sha1"].reindex(seed_ids)
            distinct = ~(sha1.duplicated() & sha1.notna()).to_numpy()
            labels = np.array([seed_label.get(int(i)) for i in seed_ids[distinct]], dtype=object)
            rng = np.random.default_rng([int(cfg.seed), 7, int(hashlib.sha1(plan.name.encode()).hexdigest()[:8], 16)])
            floors = seed_floors(
                seed_x[distinct],
                labels if any(v is not None for v in labels) else None,
                float(cfg.retrieve.floor_quantile),
                rng,
            )
            if floors[None] is None:
                log.warning(
                    "retrieve: seed set %s has one seed, so no floor can be measured; set "
                    "retrieve.per_set.%s.min_similarity (its retrieved images get no label)",
                    plan.name,
                    plan.name,
                )
        else:
            floors = {None: plan.min_similarity}
        candidates = int(rows["id"].nunique()) if len(rows) else 0
        rows = rows.assign(floor=row_floors(rows, seed_label, floors))
        rows, rejected = apply_floor(rows, rows["floor"].to_numpy(np.float64))
        if candidates and rejected == candidates:
            log.warning(
                "retrieve: the similarity floor of seed set %s rejected all %d candidates (its seeds are closer "
                "to each other than any pool image is to them); set retrieve.per_set.%s.min_similarity or "
                "retrieve.floor_quantile lower to retrieve some",
                plan.name,
                candidates,
                plan.name,
            )
        set_floors[plan.name] = {
            "min_similarity": {("*" if k is None else k): v for k, v in floors.items()},
            "setting": plan.min_similarity,
            "candidates": candidates,
            "rejected_by_floor": rejected,
        }
        rows = apply_target(rows, plan.target)
        rows.insert(0, "seed_set", plan.name)
        rows["mode"] = plan.mode
        if cfg.retrieve.include_seeds:
            seed_frame = pd.DataFrame(
                {
                    "seed_set": plan.name,
                    "seed_id": seed_ids,
                    "id": seed_ids,
                    "rank": 0,
                    "similarity": 1.0,
                    "mode": "seed",
                    "cluster": -1,
                    "floor": np.nan,
                }
            )
            rows = pd.concat([seed_frame, rows], ignore_index=True)
        log.info(
            "retrieve: seed set %s (%s): %d seeds -> %d rows, %d distinct images; floors %s rejected %d of %d "
            "candidates",
            plan.name,
            plan.mode,
            len(seed_ids),
            len(rows),
            rows["id"].nunique(),
            {k: (None if v is None else round(v, 4)) for k, v in set_floors[plan.name]["min_similarity"].items()},
            rejected,
            candidates,
        )
        frames.append(rows)
    neighbors = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SCHEMA.names)
    neighbors = neighbors.sort_values(["seed_set", "seed_id", "rank", "id"], kind="stable").reset_index(drop=True)
    table = pa.Table.from_pandas(
        neighbors[SCHEMA.names].astype(
            {"cluster": "int64", "rank": "int32", "similarity": "float32", "floor": "float32"}
        ),
        schema=SCHEMA,
        preserve_index=False,
    )
    with StageOutputs(out) as staged:  # the last finished neighbors.parquet stays until commit
        write_parquet(staged.path(target.name), table, fp)
        staged.commit(
            seed_sets={
                p.name: {"mode": p.mode, "n": p.n, "m": p.m, "target": p.target, **set_floors[p.name]} for p in plans
            },
            pool_candidates=int(len(pool_ids)),
            world_size=ranks.world,
            rows=int(len(neighbors)),
            distinct_images=int(neighbors["id"].nunique()) if len(neighbors) else 0,
            seconds=round(time.time() - started, 3),
        )
    ranks.barrier()
    return out


def read_neighbors(run_dir) -> pd.DataFrame:
    return pq.read_table(Path(run_dir) / STAGE / "neighbors.parquet").to_pandas()


def main(argv: list[str] | None = None) -> int:
    """`python -m lvd.curate.retrieve CONFIG [key=value ...]`: the entry point for torchrun."""
    return torchrun_main(run_retrieve, "lvd.curate.retrieve", argv)


if __name__ == "__main__":
    raise SystemExit(main())
