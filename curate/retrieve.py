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
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from lvd.common.errors import MissingInputError
from lvd.common.memory import memory_budget, rows_per_block
from lvd.common.ranks import Ranks, rank_device, rank_slice
from lvd.common.run_folder import (
    cluster_assignments,
    cluster_centroids,
    curated_pool_ids,
    embed_dir,
    embedding_ids,
    manifest_sets,
    read_manifest,
    read_neighbors,  # noqa: F401 (retrieve/neighbors.parquet, read where the stage is)
    vector_files,
)
from lvd.curate.config import ConfigError
from lvd.curate.stage import open_stage, torchrun_main, write_table
from lvd.index.hierarchical import nearest_centroids
from lvd.index.io import EmbeddingRows, IdRows
from lvd.index.pool_search import gather_neighbors, top_neighbors

log = logging.getLogger(__name__)

STAGE = "retrieve"
NEIGHBORS = "neighbors.parquet"
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
        raise ConfigError(f"retrieve.per_set names seed sets that are not configured: {unknown_sets}")
    plans = []
    for name in names:
        own = dict(per_set.get(name) or {})
        bad = sorted(set(own) - PER_SET_KEYS)
        if bad:
            raise ConfigError(f"unknown key(s) {bad} in retrieve.per_set.{name}; allowed: {sorted(PER_SET_KEYS)}")
        mode = str(own.get("mode", cfg.retrieve.mode))
        if mode not in MODES:
            raise ConfigError(f"retrieve mode {mode!r} for seed set {name!r}; expected one of {MODES}")
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
        raise ConfigError(
            f"min_similarity of seed set {name!r} must be auto, null or a number, got {value!r}"
        ) from None


def seed_floor(seed_x: np.ndarray, quantile: float, rng: np.random.Generator) -> float | None:
    """The `quantile` of each seed's cosine to its nearest fellow seed (None for a single seed).

    A retrieved image should be at least as close to a seed as the seeds of one class are to
    each other: an image further from every seed than all but the loosest seeds are from
    their nearest fellow is not like the seed set.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ConfigError(f"retrieve.floor_quantile must be within [0, 1], got {quantile}")
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


# ---------------------------------------------------------------- reader


@dataclass
class SeedSet:
    """One seed set as the mappers need it: its manifest rows, the ids with an embedding, their vectors."""

    plan: SetPlan
    rows: pd.DataFrame
    ids: np.ndarray
    x: np.ndarray


@dataclass
class Inputs:
    seeds: list[SeedSet]
    pool_ids: np.ndarray  # the curated pool with an embedding, sorted
    pool_x: EmbeddingRows  # their vectors, read in blocks, never whole
    budget: int


def read_inputs(cfg) -> Inputs:
    """The seed sets (manifest rows and vectors) and the curated pool's vectors."""
    run_dir = Path(cfg.run_dir)
    names = [name.split(":", 1)[1] for name in manifest_sets(run_dir) if name.startswith("seed:")]
    plans = set_plans(cfg, names)
    manifest = read_manifest(run_dir, sets=[f"seed:{n}" for n in names], columns=["id", "set", "label", "sha1"])
    folder = embed_dir(run_dir)
    embedded = IdRows(embedding_ids(folder))
    pool_ids = np.intersect1d(curated_pool_ids(run_dir), embedded.ids)
    parts = vector_files(folder)
    seeds = []
    for plan in plans:
        rows = manifest[manifest["set"] == f"seed:{plan.name}"]
        ids = np.intersect1d(rows["id"].to_numpy(np.int64), embedded.ids)
        seeds.append(SeedSet(plan, rows, ids, EmbeddingRows(parts, embedded.rows(ids))[:]))
    budget = memory_budget(cfg.get("memory_gb", "auto"))
    return Inputs(seeds, pool_ids, EmbeddingRows(parts, embedded.rows(pool_ids)), budget)


def pool_clusters(run_dir: Path, pool_ids: np.ndarray) -> np.ndarray | None:
    """Each pool image's cluster (-1: none), or None when the cluster stage has not run."""
    assign = cluster_assignments(run_dir, ["id", "cluster"], optional=True)
    if assign is None:
        return None
    by_id = pd.Series(assign["cluster"].to_numpy(), index=assign["id"].to_numpy())
    return by_id.reindex(pool_ids).fillna(-1).astype(np.int64).to_numpy()


# ---------------------------------------------------------------- mappers


def search_sample_sets(cfg, inputs: Inputs, ranks: Ranks) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{set: (similarity, pool row)} of every sample-mode set, found in one pass over the pool for
    all of them (to the largest n); under torchrun each rank searches its slice and every rank
    gets the merged best lists."""
    sampled = [s for s in inputs.seeds if s.plan.mode == "sample"]
    bounds = np.cumsum([0] + [len(s.ids) for s in sampled])
    if not len(inputs.pool_ids) or not bounds[-1]:
        return {}
    k = min(max(s.plan.n for s in sampled), len(inputs.pool_ids))
    mine = rank_slice(len(inputs.pool_ids), ranks)
    sims, idx = top_neighbors(
        inputs.pool_x.subset(mine),
        np.concatenate([s.x for s in sampled]),
        k,
        backend=cfg.retrieve.backend,
        device=str(rank_device(cfg.retrieve.device, ranks)),
        block_rows=rows_per_block(inputs.budget, 4 * max(1, inputs.pool_x.dim)),
        offset=mine.start,
    )
    sims, idx = gather_neighbors(sims, idx, k, ranks, memory_budget=inputs.budget)
    return {s.plan.name: (sims[a:b], idx[a:b]) for s, a, b in zip(sampled, bounds[:-1], bounds[1:])}


def _set_rng(cfg, name: str, *stream: int) -> np.random.Generator:
    return np.random.default_rng([int(cfg.seed), *stream, int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)])


def candidates(cfg, seeds: SeedSet, inputs: Inputs, top: dict, pool_cluster: np.ndarray | None) -> pd.DataFrame:
    """(seed_id, id, rank, similarity, cluster) of one set before its floor and target."""
    plan = seeds.plan
    if plan.mode == "sample":
        none = (np.zeros((len(seeds.ids), 0), np.float32), np.zeros((len(seeds.ids), 0), np.int64))
        rows = neighbor_rows(*top.get(plan.name, none), inputs.pool_ids, seeds.ids, plan.n)
        found = pd.Series(pool_cluster, index=inputs.pool_ids) if pool_cluster is not None else None
        return rows.assign(cluster=found.reindex(rows["id"]).to_numpy() if found is not None else -1)
    if pool_cluster is None:
        raise MissingInputError(
            f"seed set {plan.name!r} retrieves by cluster but {Path(cfg.run_dir) / 'cluster'} has no assign.parquet: "
            "run `lvd cluster` first"
        )
    centroids = cluster_centroids(cfg.run_dir)
    seed_cluster, _ = nearest_centroids(seeds.x, centroids, str(cfg.retrieve.backend), "cpu")
    rng = _set_rng(cfg, plan.name)
    return cluster_draws(inputs.pool_x, inputs.pool_ids, pool_cluster, seeds.x, seeds.ids, seed_cluster, plan.m, rng)


def set_floors(cfg, seeds: SeedSet, seed_label: dict) -> dict:
    """{label: floor} of one set: measured from its seeds (`auto`), the number set, or none."""
    plan = seeds.plan
    if plan.min_similarity != "auto":
        return {None: plan.min_similarity}
    # byte-identical seeds say nothing about how spread out a class is: one of each counts
    sha1 = seeds.rows.set_index("id")["sha1"].reindex(seeds.ids)
    distinct = ~(sha1.duplicated() & sha1.notna()).to_numpy()
    labels = np.array([seed_label.get(int(i)) for i in seeds.ids[distinct]], dtype=object)
    has_labels = any(v is not None for v in labels)
    floors = seed_floors(
        seeds.x[distinct],
        labels if has_labels else None,
        float(cfg.retrieve.floor_quantile),
        _set_rng(cfg, plan.name, 7),
    )
    if floors[None] is None:
        log.warning(
            "retrieve: seed set %s has one seed, so no floor can be measured; set "
            "retrieve.per_set.%s.min_similarity (its retrieved images get no label)",
            plan.name,
            plan.name,
        )
    return floors


def retrieve_set(cfg, seeds: SeedSet, inputs: Inputs, top: dict, pool_cluster) -> tuple[pd.DataFrame, dict]:
    """One seed set's rows of neighbors.parquet, and what its floor did (for _SUCCESS.json)."""
    plan = seeds.plan
    rows = candidates(cfg, seeds, inputs, top, pool_cluster)
    seed_label = {int(i): (None if pd.isna(v) else str(v)) for i, v in zip(seeds.rows["id"], seeds.rows["label"])}
    floors = set_floors(cfg, seeds, seed_label)
    found = int(rows["id"].nunique()) if len(rows) else 0
    rows = rows.assign(floor=row_floors(rows, seed_label, floors))
    rows, rejected = apply_floor(rows, rows["floor"].to_numpy(np.float64))
    if found and rejected == found:
        log.warning(
            "retrieve: the similarity floor of seed set %s rejected all %d candidates (its seeds are closer "
            "to each other than any pool image is to them); set retrieve.per_set.%s.min_similarity or "
            "retrieve.floor_quantile lower to retrieve some",
            plan.name,
            found,
            plan.name,
        )
    rows = apply_target(rows, plan.target).assign(seed_set=plan.name, mode=plan.mode)
    if cfg.retrieve.include_seeds:
        own = {"seed_set": plan.name, "seed_id": seeds.ids, "id": seeds.ids, "rank": 0, "similarity": 1.0}
        own.update(mode="seed", cluster=-1, floor=np.nan)
        rows = pd.concat([pd.DataFrame(own), rows], ignore_index=True)
    shown = {("*" if k is None else k): v for k, v in floors.items()}
    log.info(
        "retrieve: seed set %s (%s): %d seeds -> %d rows, %d distinct images; floors %s rejected %d of %d candidates",
        plan.name,
        plan.mode,
        len(seeds.ids),
        len(rows),
        rows["id"].nunique(),
        {k: (None if v is None else round(v, 4)) for k, v in shown.items()},
        rejected,
        found,
    )
    record = {"min_similarity": shown, "setting": plan.min_similarity, "candidates": found}
    return rows, {**record, "rejected_by_floor": rejected}


# ---------------------------------------------------------------- writer


def neighbors_table(frames: list[pd.DataFrame]) -> pa.Table:
    neighbors = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SCHEMA.names)
    neighbors = neighbors.sort_values(["seed_set", "seed_id", "rank", "id"], kind="stable").reset_index(drop=True)
    types = {"cluster": "int64", "rank": "int32", "similarity": "float32", "floor": "float32"}
    return pa.Table.from_pandas(neighbors[SCHEMA.names].astype(types), schema=SCHEMA, preserve_index=False)


def run_retrieve(cfg) -> Path:
    """Write retrieve/neighbors.parquet for every configured seed set.

    Under torchrun (`python -m lvd.curate.retrieve CONFIG`) every rank searches its slice of the
    pool for every sample-mode seed set; rank 0 merges the ranks' best lists (exactly what one
    pass over the whole pool keeps), draws the cluster-mode sets and writes.
    """
    settings = {"retrieve": {k: cfg.retrieve[k] for k in cfg.retrieve}, "seed": int(cfg.seed)}
    inputs, optional = ("embed", "dedup"), ("manifest", "cluster")
    with open_stage(
        cfg, STAGE, settings=settings, inputs=inputs, optional=optional, device=cfg.retrieve.device
    ) as stage:
        if stage.up_to_date:
            log.info("retrieve: up to date")
            return stage.folder
        found = read_inputs(cfg)
        top = search_sample_sets(cfg, found, stage.ranks)
        if stage.ranks.rank != 0:  # a helper rank: its slice searched, nothing written
            return stage.commit()
        pool_cluster = pool_clusters(stage.run_dir, found.pool_ids)
        frames, floors = [], {}
        for seeds in found.seeds:
            rows, floors[seeds.plan.name] = retrieve_set(cfg, seeds, found, top, pool_cluster)
            frames.append(rows)
        table = neighbors_table(frames)
        write_table(stage.path(NEIGHBORS), table)
        ids = table.column("id").to_numpy()
        return stage.commit(
            seed_sets={
                s.plan.name: {"mode": s.plan.mode, "n": s.plan.n, "m": s.plan.m, "target": s.plan.target}
                | floors[s.plan.name]
                for s in found.seeds
            },
            pool_candidates=int(len(found.pool_ids)),
            rows=int(len(table)),
            distinct_images=int(len(np.unique(ids))),
        )


def main(argv: list[str] | None = None) -> int:
    """`python -m lvd.curate.retrieve CONFIG [key=value ...]`: the entry point for torchrun."""
    return torchrun_main(run_retrieve, "lvd.curate.retrieve", argv)


if __name__ == "__main__":
    raise SystemExit(main())
