"""The cluster stage: k-means of the deduplicated, decontaminated pool.

reader : the pool ids that `dedup` kept (`curate.dedup.curated_pool_ids`) and their main
         embeddings (`embed/`);
mapper : flat k-means (`index.kmeans`, seeded by k-means++ and checkpointed every few
         iterations in cluster/kmeans-checkpoint.npz), or hierarchical k-means with resampling
         (`index.hierarchical`, Vo et al. 2024) over the levels `cluster.level_ks + [k]`;
writer : flat          cluster/centroids.npy, cluster/assign.parquet (id, cluster, distance);
         hierarchical  cluster/level{t}/centroids.npy, level{t}/assign.parquet (each image's
                       level-t cluster, composed through the levels, and its squared L2
                       distance to that centroid), level{t}/parents.npy (the level-t cluster of
                       each input of level t: images for t=1, level-(t-1) centroids above) and
                       level{t}/parent_distance.npy; the last level is also copied to
                       cluster/centroids.npy and cluster/assign.parquet so that readers of the
                       flat layout see the coarsest clustering;
         both          cluster/balanced.parquet (id) when the balanced sample is drawn
                       (`cluster.balanced_sample`, `curate.selection.balanced_size`);
         then cluster/_SUCCESS.json.

Distances are squared L2. The stage runner (`curate.stage`) stages every file and commits them
together. Resuming: every finished hierarchical level waits in cluster/.levels/ with its own
_SUCCESS.json carrying the levels' fingerprint; a rerun reuses those levels and computes the
rest, with the same per-level seeds, so its output equals an uninterrupted run's. The k-means
itself is `index.kmeans`, `index.hierarchical` and, past the memory budget, `index.kmeans_sampled`.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from omegaconf import ListConfig

from lvd.common.atomic import atomic_save_npy
from lvd.common.memory import memory_budget
from lvd.common.ranks import gather_rows, rank_device, rank_slice
from lvd.common.run_folder import curated_pool_ids, embed_dir, embedding_ids, read_success, vector_files
from lvd.curate.config import ConfigError, as_list
from lvd.curate.selection import balanced_size, uses_balanced
from lvd.curate.stage import Stage, open_stage, torchrun_main, write_frame, write_success
from lvd.index.hierarchical import (
    PAPER_NITER,
    Hierarchy,
    balanced_sample,
    hierarchical_kmeans,
    resampled_kmeans,
)
from lvd.index.io import EmbeddingRows, IdRows
from lvd.index.kmeans_distributed import distributed_kmeans, distributed_resampled_kmeans
from lvd.index.kmeans_sampled import DISTANCE_BLOCK, sampled_kmeans, squared_distances, training_rows

log = logging.getLogger(__name__)

STAGE = "cluster"
ASSIGN_SCHEMA = pa.schema([("id", pa.int64()), ("cluster", pa.int64()), ("distance", pa.float32())])
BALANCED_SCHEMA = pa.schema([("id", pa.int64())])
# Finished levels of a hierarchical run that has not committed yet (resume state, not output).
WORK = ".levels"
CHECKPOINT = "kmeans-checkpoint.npz"
LEVEL_FILES = ("centroids.npy", "parents.npy", "parent_distance.npy")


@dataclass
class Clustering:
    """What k-means found: the levels (flat: one), each image's squared distance at every level,
    how many levels came from an earlier run, and how many images it trained on."""

    hierarchy: Hierarchy
    distances: list[np.ndarray]
    resumed: int
    trained_on: int


def cluster_niter(c) -> int:
    """`cluster.niter`: a number, or auto = 50 per level for hierarchical k-means (Vo et al. 2024),
    20 for flat (Faiss's default)."""
    if str(c.niter) != "auto":
        return int(c.niter)
    return PAPER_NITER if c.method == "hierarchical" else 20


def cluster_settings(cfg) -> dict:
    c = cfg.cluster
    if c.method not in ("flat", "hierarchical"):
        raise ConfigError(f"cluster.method must be flat or hierarchical, got {c.method!r}")
    ks = [int(k) for k in as_list(c.level_ks)] + [int(c.k)] if c.method == "hierarchical" else [int(c.k)]
    return {
        "method": str(c.method),
        "ks": ks,
        "niter": cluster_niter(c),
        "spherical": bool(c.spherical),
        "resample_steps": as_list(c.resample_steps),
        "resample_size": as_list(c.resample_size),
        "seed": int(cfg.seed),
        "backend": str(c.backend),
    }


def read_pool(run_dir: Path) -> tuple[int, np.ndarray, EmbeddingRows]:
    """How many images dedup kept, those of them that have a main embedding, and a view of their
    vectors (a rank of many reads only its slice and a seeding sample)."""
    ids = curated_pool_ids(run_dir)
    curated = len(ids)
    folder = embed_dir(run_dir)
    rows = IdRows(embedding_ids(folder)).rows(ids)
    if (rows < 0).any():
        log.warning("cluster: %d curated images have no main embedding; they are left out", int((rows < 0).sum()))
        ids, rows = ids[rows >= 0], rows[rows >= 0]
    return curated, ids, EmbeddingRows(vector_files(folder), rows)


# ---------------------------------------------------------------- mappers


def _kmeans_options(cfg, stage: Stage) -> dict:
    c = cfg.cluster
    device = str(rank_device(str(c.device), stage.ranks))
    return dict(niter=cluster_niter(c), spherical=bool(c.spherical), backend=str(c.backend), device=device)


def flat_kmeans(cfg, stage: Stage, view: EmbeddingRows, k: int, train) -> Clustering:
    """One level: k-means of every image (in one process, over the ranks, or on a sample)."""
    ranks = stage.ranks
    checkpoint = None if stage.overwrite else stage.folder / CHECKPOINT
    kwargs = dict(seed=int(cfg.seed), checkpoint=checkpoint, **_kmeans_options(cfg, stage))
    if train is not None:
        centroids, labels, distance = sampled_kmeans(view, train, k, ranks=ranks, block_rows=DISTANCE_BLOCK, **kwargs)
    elif ranks.world > 1:
        centroids, labels, distance = distributed_kmeans(view, k, ranks, **kwargs)
    else:
        centroids, labels, distance = resampled_kmeans(np.asarray(view), k, **kwargs)
    ranks.barrier()  # every rank is done with the checkpoint
    return Clustering(
        Hierarchy([centroids], [labels], [distance]), [distance], 0, len(view if train is None else train)
    )


def _save_level(stage: Stage, levels_fp: str, level: int, centroids, parents, parent_distance) -> None:
    """A finished level: its arrays to the resume folder (with its marker) and to the staged outputs."""
    if stage.ranks.rank != 0:
        return
    work = stage.folder / WORK / f"level{level}"
    arrays = (np.asarray(centroids, np.float32), np.asarray(parents, np.int64), np.asarray(parent_distance, np.float32))
    for name, array in zip(LEVEL_FILES, arrays):
        atomic_save_npy(work / name, array)
        atomic_save_npy(stage.path(f"level{level}/{name}"), array)
    write_success(work, fingerprint=levels_fp, level=level, k=len(centroids), inputs=len(parents))


def finished_levels(folder: Path, n_levels: int, levels_fp: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The consecutive levels (from 1) that an earlier run finished with the same fingerprint."""
    done = []
    for t in range(1, n_levels + 1):
        level = folder / WORK / f"level{t}"
        info = read_success(level)
        if not info or info.get("fingerprint") != levels_fp:
            break
        done.append(tuple(np.load(level / name) for name in LEVEL_FILES))
    return done


def hierarchical(cfg, stage: Stage, view: EmbeddingRows, ks: list[int], train, levels_fp: str) -> Clustering:
    """Hierarchical k-means with resampling over the levels `ks`, resuming from finished levels.
    Level 1 runs on the sample past the budget, or over the ranks under torchrun."""
    ranks, options = stage.ranks, _kmeans_options(cfg, stage)
    done = [] if stage.overwrite else finished_levels(stage.folder, len(ks), levels_fp)
    if done:
        log.info("cluster: reusing %d finished level(s)", len(done))
    first_level = None
    if train is not None:  # level 1 (and its resampling) on the sample; every image assigned in blocks
        first_level = partial(sampled_kmeans, view, train, ranks=ranks, block_rows=DISTANCE_BLOCK, **options)
    elif ranks.world > 1:  # level 1 clusters every image: spread it over the ranks; the levels above are small
        first_level = partial(distributed_resampled_kmeans, view, ranks=ranks, **options)
    x = np.asarray(view) if ranks.world == 1 and train is None else view
    hierarchy = hierarchical_kmeans(
        x,
        ks,
        resampling_steps=_plain(cfg.cluster.resample_steps),
        sample_size=_plain(cfg.cluster.resample_size),
        seed=int(cfg.seed),
        done=done,
        on_level=partial(_save_level, stage, levels_fp),
        first_level=first_level,
        **options,
    )
    mine = rank_slice(len(view), ranks)  # each rank reads its slice block by block
    local = x[mine] if isinstance(x, np.ndarray) else x.subset(mine)
    distances = [
        gather_rows(
            squared_distances(local, hierarchy.centroids[t - 1], hierarchy.labels(t)[mine], DISTANCE_BLOCK), ranks
        )
        for t in range(1, len(ks) + 1)
    ]
    return Clustering(hierarchy, distances, len(done), len(view if train is None else train))


# ---------------------------------------------------------------- writer


def _assign_frame(ids: np.ndarray, labels: np.ndarray, distance: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"id": ids, "cluster": labels.astype(np.int64), "distance": distance.astype(np.float32)})


def write_clustering(stage: Stage, ids: np.ndarray, found: Clustering, levels: bool) -> list[dict]:
    """Stage centroids.npy and assign.parquet of the coarsest level, and with `levels` every
    level's folder; returns each level's statistics."""
    hierarchy, stats = found.hierarchy, []
    for t in range(1, hierarchy.n_levels + 1):
        labels, distance = hierarchy.labels(t), found.distances[t - 1]
        stats.append(_level_stats(t, labels, len(hierarchy.centroids[t - 1]), distance))
        if not levels:
            continue
        if t <= found.resumed:  # a resumed level: its arrays come from the resume folder
            for name in LEVEL_FILES:
                atomic_save_npy(stage.path(f"level{t}/{name}"), np.load(stage.folder / WORK / f"level{t}" / name))
        write_frame(stage.path(f"level{t}/assign.parquet"), _assign_frame(ids, labels, distance), ASSIGN_SCHEMA)
    atomic_save_npy(stage.path("centroids.npy"), np.asarray(hierarchy.centroids[-1], np.float32))
    frame = _assign_frame(ids, hierarchy.labels(hierarchy.n_levels), found.distances[-1])
    write_frame(stage.path("assign.parquet"), frame, ASSIGN_SCHEMA)
    return stats


def write_empty(stage: Stage, dim: int, settings: dict) -> Path:
    """Nothing survived dedup: empty but well-formed outputs, so later stages see zero images."""
    empty = np.zeros(0, np.int64)
    atomic_save_npy(stage.path("centroids.npy"), np.zeros((0, dim), np.float32))
    write_frame(stage.path("assign.parquet"), _assign_frame(empty, empty, np.zeros(0, np.float32)), ASSIGN_SCHEMA)
    write_frame(stage.path("balanced.parquet"), pd.DataFrame({"id": empty}), BALANCED_SCHEMA)
    return stage.commit(settings=settings, images=0, k=0, distance="squared_l2", levels=[])


# ---------------------------------------------------------------- the stage


def run_cluster(cfg) -> Path:
    """Cluster the curated pool; see the module docstring for the files written.

    Under torchrun (`python -m lvd.curate.cluster CONFIG`) the k-means over every image (flat, or
    level 1 of hierarchical with its resampling steps) runs over all ranks: each rank reads and
    iterates over its slice of the rows, centroid sums are all-reduced, and rank 0 writes the
    same files as one process would. Levels above the first cluster centroids (few rows) and
    run the same on every rank.
    """
    settings = cluster_settings(cfg)
    balanced = {"balanced_sample": str(cfg.cluster.balanced_sample), "for_shards": uses_balanced(cfg)}
    with open_stage(
        cfg, STAGE, settings=[settings, balanced], inputs=("dedup", "embed"), device=cfg.cluster.device
    ) as stage:
        if stage.up_to_date:
            log.info("cluster: up to date, nothing to do")
            return stage.folder
        curated, ids, view = read_pool(stage.run_dir)
        n_balanced = balanced_size(cfg, curated)
        ks = [min(k, len(view)) for k in settings["ks"]]
        if ks != settings["ks"]:
            log.warning("cluster: only %d curated images for levels %s; using %s", len(view), settings["ks"], ks)
        if len(view) == 0:
            return write_empty(stage, view.dim, settings) if stage.ranks.rank == 0 else stage.commit()
        # each rank holds its slice: the world's budget against the whole pool
        budget = memory_budget(cfg.get("memory_gb", "auto")) * stage.ranks.world
        train = training_rows(len(view), view.dim, ks[0], budget, int(cfg.seed))
        log.info(
            "cluster: %s k-means of %d images, levels %s%s%s",
            settings["method"],
            len(view),
            ks,
            f", rank {stage.ranks.rank} of {stage.ranks.world}" if stage.ranks.world > 1 else "",
            "" if train is None else f", trained on {len(train)} sampled images (memory_gb), all assigned in blocks",
        )
        if settings["method"] == "flat":
            found = flat_kmeans(cfg, stage, view, ks[0], train)
        else:
            found = hierarchical(cfg, stage, view, ks, train, stage.fingerprint_of("levels", settings, stage.inputs))
        if stage.ranks.rank != 0:  # rank 0 writes
            return stage.commit()
        stats = write_clustering(stage, ids, found, levels=settings["method"] == "hierarchical")
        if n_balanced > 0:
            picked = balanced_sample(found.hierarchy, min(n_balanced, len(view)), seed=int(cfg.seed))
            write_frame(stage.path("balanced.parquet"), pd.DataFrame({"id": ids[picked]}), BALANCED_SCHEMA)
        return stage.commit(
            settings=settings,
            images=int(len(view)),
            k=ks[-1],
            distance="squared_l2",
            levels=stats,
            balanced_sample=int(n_balanced),
            trained_on=int(found.trained_on),
        )


def main(argv: list[str] | None = None) -> int:
    """`python -m lvd.curate.cluster CONFIG [key=value ...]`: the entry point for torchrun."""
    return torchrun_main(run_cluster, "lvd.curate.cluster", argv)


def _plain(value):
    """A config value given once for all levels (scalar) or per level (list), as plain Python."""
    return list(value) if isinstance(value, (ListConfig, list, tuple)) else value


def _level_stats(level: int, labels: np.ndarray, k: int, distance: np.ndarray) -> dict:
    sizes = np.bincount(labels, minlength=k)
    return {
        "level": level,
        "k": k,
        "empty": int((sizes == 0).sum()),
        "largest": int(sizes.max()),
        "inertia": float(distance.sum(dtype=np.float64)),
    }


if __name__ == "__main__":
    sys.exit(main())
