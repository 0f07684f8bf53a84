"""The retrieve stage: pool images for each curated seed set, as the DINOv2 paper retrieves them.

reader : embeddings (embed/), the surviving pool (dedup/), clusters (cluster/) and the
         manifest's seed sets;
mapper : per seed set, `sample` mode takes the n nearest pool images of every seed image;
         `cluster` mode finds the clusters the seed images fall in and draws m pool images
         from each (each drawn image is credited to its most similar seed in that cluster);
         a target size keeps the set's best images by similarity;
writer : retrieve/neighbors.parquet, one row per (seed set, seed, retrieved image) with rank,
         similarity, cluster and mode, so overlaps between seeds and sets stay visible and the
         shards stage can merge them.
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

from curate.manifest import read_manifest
from curate.runio import clear_success, is_done, open_stage, parquet_fingerprint, read_success, write_parquet, write_success

log = logging.getLogger(__name__)

STAGE = "retrieve"
MODES = ("sample", "cluster")
PER_SET_KEYS = {"mode", "n", "m", "target"}
SCHEMA = pa.schema(
    [
        ("seed_set", pa.string()),
        ("seed_id", pa.int64()),
        ("id", pa.int64()),
        ("rank", pa.int32()),
        ("similarity", pa.float32()),
        ("mode", pa.string()),
        ("cluster", pa.int64()),
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
        plans.append(SetPlan(name, mode, int(own.get("n", cfg.retrieve.n)), int(own.get("m", cfg.retrieve.m)), None if target is None else int(target)))
    return plans


def _rows_of(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    order = np.argsort(ids)
    pos = np.searchsorted(ids, wanted, sorter=order)
    pos = np.clip(pos, 0, len(ids) - 1)
    rows = order[pos]
    if not np.array_equal(ids[rows], wanted):
        missing = np.setdiff1d(wanted, ids)[:5]
        raise KeyError(f"ids without an embedding: {missing.tolist()}")
    return rows


def sample_neighbors(pool_x, pool_ids, seed_x, seed_ids, n: int, *, backend="auto", device="cpu"):
    """(seed_id, id, rank, similarity) of the n nearest pool images of every seed image."""
    from index.knn import search

    k = min(n, len(pool_ids))
    if k == 0 or len(seed_ids) == 0:
        return pd.DataFrame({"seed_id": [], "id": [], "rank": [], "similarity": []})
    sims, idx = search(pool_x, seed_x, k, metric="ip", method="exact", backend=backend, device=device)
    valid = idx >= 0
    seed_col = np.repeat(seed_ids, k).reshape(len(seed_ids), k)
    ranks = np.tile(np.arange(1, k + 1), (len(seed_ids), 1))
    return pd.DataFrame({"seed_id": seed_col[valid], "id": pool_ids[idx[valid]], "rank": ranks[valid], "similarity": sims[valid]})


def nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (squared L2) for each row, in blocks."""
    c_norm = (centroids.astype(np.float64) ** 2).sum(1)
    out = np.empty(len(x), np.int64)
    for start in range(0, len(x), 4096):
        block = x[start : start + 4096].astype(np.float64)
        out[start : start + 4096] = np.argmin(c_norm[None, :] - 2.0 * block @ centroids.T.astype(np.float64), axis=1)
    return out


def cluster_draws(pool_x, pool_ids, pool_cluster, seed_x, seed_ids, seed_cluster, m: int, rng: np.random.Generator):
    """(seed_id, id, rank, similarity, cluster): m pool images from each cluster a seed falls in."""
    frames = []
    for c in np.unique(seed_cluster):
        members = np.flatnonzero(pool_cluster == c)
        if len(members) == 0:
            continue
        drawn = members if len(members) <= m else np.sort(rng.choice(members, size=m, replace=False))
        seeds_here = np.flatnonzero(seed_cluster == c)
        sims = pool_x[drawn] @ seed_x[seeds_here].T
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
    parts = [json.dumps(read_success(run_dir / s), sort_keys=True, default=str) for s in ("embed", "dedup", "cluster")]
    settings = {k: cfg.retrieve[k] for k in cfg.retrieve}
    parts.append(json.dumps(settings, sort_keys=True, default=str))
    parts.append(str(cfg.seed))
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


def _cluster_of(run_dir: Path) -> pd.DataFrame | None:
    path = run_dir / "cluster" / "assign.parquet"
    return pq.read_table(path).to_pandas() if path.is_file() else None


def run_retrieve(cfg) -> Path:
    """Write retrieve/neighbors.parquet for every configured seed set."""
    from curate.dedup import curated_pool_ids
    from index.backends import resolve_device
    from index.io import load_embeddings

    started = time.time()
    run_dir = Path(cfg.run_dir)
    out = open_stage(cfg, STAGE)
    fp = _stage_fingerprint(cfg, run_dir)
    target = out / "neighbors.parquet"
    if not cfg.overwrite and is_done(out) and parquet_fingerprint(target) == fp:
        log.info("retrieve: up to date")
        return out
    clear_success(out)

    manifest = read_manifest(run_dir)
    seed_sets = sorted({s.split(":", 1)[1] for s in manifest["set"].unique() if s.startswith("seed:")})
    plans = set_plans(cfg, seed_sets)
    emb_ids, emb_x = load_embeddings(run_dir / "embed")
    pool_ids = np.intersect1d(curated_pool_ids(run_dir), emb_ids)
    pool_x = emb_x[_rows_of(emb_ids, pool_ids)]
    assign = _cluster_of(run_dir)
    pool_cluster = None
    if assign is not None:
        cluster_by_id = pd.Series(assign["cluster"].to_numpy(), index=assign["id"].to_numpy())
        pool_cluster = cluster_by_id.reindex(pool_ids).fillna(-1).astype(np.int64).to_numpy()
    device = str(resolve_device(cfg.retrieve.device))

    frames = []
    for plan in plans:
        seed_rows = manifest[manifest["set"] == f"seed:{plan.name}"]
        seed_ids = np.intersect1d(seed_rows["id"].to_numpy(np.int64), emb_ids)
        seed_x = emb_x[_rows_of(emb_ids, seed_ids)]
        if plan.mode == "sample":
            rows = sample_neighbors(pool_x, pool_ids, seed_x, seed_ids, plan.n, backend=cfg.retrieve.backend, device=device)
            rows["cluster"] = (pd.Series(pool_cluster, index=pool_ids).reindex(rows["id"]).to_numpy() if pool_cluster is not None else -1)
        else:
            if assign is None:
                raise FileNotFoundError(f"seed set {plan.name!r} retrieves by cluster but {run_dir / 'cluster'} has no assign.parquet: run `lvd cluster` first")
            centroids = np.load(run_dir / "cluster" / "centroids.npy")
            rng = np.random.default_rng([int(cfg.seed), int(hashlib.sha1(plan.name.encode()).hexdigest()[:8], 16)])
            rows = cluster_draws(pool_x, pool_ids, pool_cluster, seed_x, seed_ids, nearest_centroid(seed_x, centroids), plan.m, rng)
        rows = apply_target(rows, plan.target)
        rows.insert(0, "seed_set", plan.name)
        rows["mode"] = plan.mode
        if cfg.retrieve.include_seeds:
            seeds = pd.DataFrame({"seed_set": plan.name, "seed_id": seed_ids, "id": seed_ids, "rank": 0, "similarity": 1.0, "mode": "seed", "cluster": -1})
            rows = pd.concat([seeds, rows], ignore_index=True)
        log.info("retrieve: seed set %s (%s): %d seeds -> %d rows, %d distinct images", plan.name, plan.mode, len(seed_ids), len(rows), rows["id"].nunique())
        frames.append(rows)
    neighbors = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SCHEMA.names)
    neighbors = neighbors.sort_values(["seed_set", "seed_id", "rank", "id"], kind="stable").reset_index(drop=True)
    table = pa.Table.from_pandas(neighbors[SCHEMA.names].astype({"cluster": "int64", "rank": "int32", "similarity": "float32"}), schema=SCHEMA, preserve_index=False)
    write_parquet(target, table, fp)
    write_success(
        out,
        seed_sets={p.name: {"mode": p.mode, "n": p.n, "m": p.m, "target": p.target} for p in plans},
        pool_candidates=int(len(pool_ids)),
        rows=int(len(neighbors)),
        distinct_images=int(neighbors["id"].nunique()) if len(neighbors) else 0,
        seconds=round(time.time() - started, 3),
    )
    return out


def read_neighbors(run_dir) -> pd.DataFrame:
    return pq.read_table(Path(run_dir) / STAGE / "neighbors.parquet").to_pandas()
