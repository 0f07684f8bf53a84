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

Distances are squared L2. Resuming: every finished hierarchical level has its own
_SUCCESS.json carrying the stage fingerprint; a rerun reuses those levels and computes the
rest, with the same per-level seeds, so its output equals an uninterrupted run's.
"""

from __future__ import annotations

import logging
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from omegaconf import ListConfig

from lvd.common.errors import MissingInputError
from lvd.common.memory import memory_budget
from lvd.curate.config import as_list
from lvd.curate.dedup import curated_pool_ids, rows_of
from lvd.curate.ranks import Ranks, gather_rows, in_ranks, rank_device, rank_slice, torchrun_main
from lvd.curate.runio import (
    atomic_path,
    fingerprint,
    is_done,
    open_stage,
    read_success,
    stage_fingerprint,
    write_frame,
    write_success,
)
from lvd.curate.selection import balanced_size
from lvd.curate.stage import StageOutputs
from lvd.index.hierarchical import (
    Hierarchy,
    balanced_sample,
    hierarchical_kmeans,
    nearest_centroids,
    resampled_kmeans,
)
from lvd.index.io import EmbeddingRows, load_embedding_ids
from lvd.index.kmeans_distributed import distributed_kmeans, distributed_resampled_kmeans

log = logging.getLogger(__name__)

STAGE = "cluster"
ASSIGN_SCHEMA = pa.schema([("id", pa.int64()), ("cluster", pa.int64()), ("distance", pa.float32())])
BALANCED_SCHEMA = pa.schema([("id", pa.int64())])
# Rows per block when measuring image-to-centroid distances.
DISTANCE_BLOCK = 65536
# The whole pool is clustered in memory (float32) while it takes at most this share of memory_gb;
# past it, k-means trains on a sample and every image is assigned block by block.
FULL_MATRIX_SHARE = 0.25
# Rows per centroid of that sample: Faiss's default `max_points_per_centroid`, the size at which its
# k-means stops using every row (centroids move little past it while the cost grows with every row).
TRAIN_POINTS_PER_CENTROID = 256


def training_rows(n: int, dim: int, k: int, budget: int, seed: int) -> np.ndarray | None:
    """None when the n rows fit FULL_MATRIX_SHARE of the budget as float32 (k-means uses every
    row); else the sorted rows of a seeded sample that k-means trains on, at most
    TRAIN_POINTS_PER_CENTROID per cluster and within that share."""
    if n * dim * 4 <= FULL_MATRIX_SHARE * budget:
        return None
    fits = int(FULL_MATRIX_SHARE * budget // (dim * 4))
    m = min(n, fits, TRAIN_POINTS_PER_CENTROID * k)
    if m < k:
        raise MemoryError(
            f"k-means of {k} clusters needs at least {k} training rows in memory, but "
            f"{FULL_MATRIX_SHARE:.0%} of memory_gb holds only {fits}; raise memory_gb"
        )
    return np.sort(np.random.default_rng([seed, 11]).choice(n, m, replace=False))


def sampled_kmeans(
    view: EmbeddingRows, train: np.ndarray, k: int, *, ranks: Ranks | None = None, **kwargs
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centroids, assign, squared distance): `resampled_kmeans` on the training rows, then every
    row of `view` assigned to its nearest centroid block by block. Under torchrun each rank
    iterates over its slice of the sample and assigns its slice of the rows."""
    backend, device = kwargs["backend"], kwargs["device"]
    if ranks is None or ranks.world == 1:
        centroids, _, _ = resampled_kmeans(view[train], k, **kwargs)
        assign, distance = nearest_centroids(view, centroids, backend, device, DISTANCE_BLOCK)
        return centroids, assign, distance
    centroids, _, _ = distributed_resampled_kmeans(view.subset(train), k, ranks=ranks, **kwargs)
    assign, distance = nearest_centroids(
        view.subset(rank_slice(len(view), ranks)), centroids, backend, device, DISTANCE_BLOCK
    )
    return centroids, gather_rows(assign, ranks), gather_rows(distance, ranks)


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def squared_distances(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Squared L2 distance of each row of x to its labelled centroid, in bounded blocks."""
    out = np.empty(len(x), np.float32)
    for start in range(0, len(x), DISTANCE_BLOCK):
        diff = x[start : start + DISTANCE_BLOCK] - centroids[labels[start : start + DISTANCE_BLOCK]]
        out[start : start + DISTANCE_BLOCK] = np.einsum("ij,ij->i", diff, diff)
    return out


def _assign_frame(ids: np.ndarray, labels: np.ndarray, distance: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"id": ids, "cluster": labels.astype(np.int64), "distance": distance.astype(np.float32)})


def _write_clustering(staged: StageOutputs, prefix: str, ids, centroids, labels, distance, fp: str) -> None:
    save_npy(staged.path(f"{prefix}centroids.npy"), np.asarray(centroids, np.float32))
    write_frame(staged.path(f"{prefix}assign.parquet"), _assign_frame(ids, labels, distance), ASSIGN_SCHEMA, fp)


# Finished levels of a hierarchical run that has not committed yet (resume state, not output).
WORK = ".levels"


def _remove_stale_levels(staged: StageOutputs, out: Path, n_levels: int) -> None:
    """At commit: delete level folders beyond the configured levels (left by a run with more levels)."""
    for folder in out.glob("level*"):
        suffix = folder.name[len("level") :]
        if folder.is_dir() and suffix.isdigit() and int(suffix) > n_levels:
            staged.remove(folder.name)


def _finished_levels(out: Path, n_levels: int, fp: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The consecutive levels (from 1) that an earlier run finished with the same fingerprint."""
    done = []
    for t in range(1, n_levels + 1):
        level = out / WORK / f"level{t}"
        info = read_success(level)
        if not info or info.get("fingerprint") != fp:
            break
        done.append(tuple(np.load(level / name) for name in ("centroids.npy", "parents.npy", "parent_distance.npy")))
    return done


def run_cluster(cfg) -> Path:
    """Cluster the curated pool; see the module docstring for the files written.

    Under torchrun (`python -m lvd.curate.cluster CONFIG`) the k-means over every image (flat, or
    level 1 of hierarchical with its resampling steps) runs over all ranks: each rank reads and
    iterates over its slice of the rows, centroid sums are all-reduced, and rank 0 writes the
    same files as one process would. Levels above the first cluster centroids (few rows) and
    run the same on every rank.
    """
    return in_ranks(_run_cluster, cfg, cfg.cluster.device)


def _run_cluster(cfg, ranks: Ranks) -> Path:
    started = time.time()
    run_dir = Path(cfg.run_dir)
    c = cfg.cluster
    if not is_done(run_dir / "dedup"):
        raise MissingInputError(f"no finished dedup in {run_dir / 'dedup'}: run `lvd dedup` first")
    if c.method not in ("flat", "hierarchical"):
        raise ValueError(f"cluster.method must be flat or hierarchical, got {c.method!r}")
    out = run_dir / STAGE
    if ranks.rank == 0:
        open_stage(cfg, STAGE)
    ranks.barrier()
    ids = curated_pool_ids(run_dir)
    embed_info = stage_fingerprint(run_dir / "embed")
    ks = [int(k) for k in as_list(c.level_ks)] + [int(c.k)] if c.method == "hierarchical" else [int(c.k)]
    settings = {
        "method": str(c.method),
        "ks": ks,
        "niter": int(c.niter),
        "spherical": bool(c.spherical),
        "resample_steps": as_list(c.resample_steps),
        "resample_size": as_list(c.resample_size),
        "seed": int(cfg.seed),
        "backend": str(c.backend),
    }
    fp = fingerprint("cluster", ids, embed_info, settings)
    n_balanced = balanced_size(cfg, len(ids))
    balanced_fp = fingerprint(fp, n_balanced)
    info = read_success(out)
    if info and info.get("fingerprint") == balanced_fp and not cfg.get("overwrite", False):
        log.info("cluster: up to date, nothing to do")
        return out
    ranks.barrier()  # every rank has read the old _SUCCESS.json; it stays until rank 0 commits
    staged = StageOutputs(out) if ranks.rank == 0 else None
    try:
        return _cluster_and_commit(cfg, ranks, out, staged, ids, ks, settings, fp, balanced_fp, n_balanced, started)
    finally:
        if staged is not None and not staged.committed:
            staged.discard()


def _cluster_and_commit(
    cfg, ranks: Ranks, out: Path, staged, ids, ks, settings, fp, balanced_fp, n_balanced, started
) -> Path:
    """k-means of the curated rows; rank 0 stages every output and commits them together."""
    c = cfg.cluster
    run_dir = Path(cfg.run_dir)
    rows = rows_of(ids, load_embedding_ids(run_dir / "embed"))
    if (rows < 0).any():
        log.warning("cluster: %d curated images have no main embedding; they are left out", int((rows < 0).sum()))
        ids, rows = ids[rows >= 0], rows[rows >= 0]
    view = EmbeddingRows(run_dir / "embed", rows)  # a rank of many reads only its slice and a seeding sample
    n = len(view)
    if n < ks[0]:
        clamped = [min(k, n) for k in ks]
        log.warning("cluster: only %d curated images for levels %s; using %s", n, ks, clamped)
        ks = clamped
    if n == 0:
        if ranks.rank == 0:
            _write_empty(staged, out, view.dim, fp, balanced_fp, settings, started)
        ranks.barrier()
        return out
    # each rank holds its slice: the world's budget against the whole pool
    train = training_rows(n, view.dim, ks[0], memory_budget(cfg.get("memory_gb", "auto")) * ranks.world, int(cfg.seed))
    x = np.asarray(view) if ranks.world == 1 and train is None else None
    device = str(rank_device(str(c.device), ranks))
    log.info(
        "cluster: %s k-means of %d images, levels %s%s%s",
        c.method,
        n,
        ks,
        f", rank {ranks.rank} of {ranks.world}" if ranks.world > 1 else "",
        "" if train is None else f", trained on {len(train)} sampled images (memory_gb), all assigned in blocks",
    )

    if c.method == "flat":
        checkpoint = out / "kmeans-checkpoint.npz"
        kwargs = dict(
            niter=int(c.niter),
            seed=int(cfg.seed),
            spherical=bool(c.spherical),
            backend=str(c.backend),
            device=device,
            checkpoint=None if cfg.get("overwrite", False) else checkpoint,
        )
        if train is not None:
            centroids, labels, distance = sampled_kmeans(view, train, ks[0], ranks=ranks, **kwargs)
        elif ranks.world > 1:
            centroids, labels, distance = distributed_kmeans(view, ks[0], ranks, **kwargs)
        else:
            centroids, labels, distance = resampled_kmeans(x, ks[0], **kwargs)
        ranks.barrier()  # every rank is done with the checkpoint
        if ranks.rank != 0:
            ranks.barrier()  # rank 0 writes
            return out
        _write_clustering(staged, "", ids, centroids, labels, distance, fp)
        hierarchy = Hierarchy([centroids], [labels], [distance])
        stats = [_level_stats(1, labels, len(centroids), distance)]
    else:

        def save_level(level: int, centroids, parents, parent_distance) -> None:
            if ranks.rank != 0:
                return
            work = out / WORK / f"level{level}"  # resume state; the level's output is staged below
            arrays = {
                "centroids.npy": np.asarray(centroids, np.float32),
                "parents.npy": np.asarray(parents, np.int64),
                "parent_distance.npy": np.asarray(parent_distance, np.float32),
            }
            for name, array in arrays.items():
                save_npy(work / name, array)
                save_npy(staged.path(f"level{level}/{name}"), array)
            write_success(work, fingerprint=fp, level=level, k=len(centroids), inputs=len(parents))

        done = [] if cfg.get("overwrite", False) else _finished_levels(out, len(ks), fp)
        if done:
            log.info("cluster: reusing %d finished level(s)", len(done))
        first_level = None
        if train is not None:  # level 1 (and its resampling) on the sample; every image assigned in blocks
            first_level = partial(
                sampled_kmeans,
                view,
                train,
                ranks=ranks,
                niter=int(c.niter),
                spherical=bool(c.spherical),
                backend=str(c.backend),
                device=device,
            )
        elif ranks.world > 1:  # level 1 clusters every image: spread it over the ranks; the levels above are small
            first_level = partial(
                distributed_resampled_kmeans,
                view,
                ranks=ranks,
                niter=int(c.niter),
                spherical=bool(c.spherical),
                backend=str(c.backend),
                device=device,
            )
        hierarchy = hierarchical_kmeans(
            view if x is None else x,
            ks,
            niter=int(c.niter),
            resampling_steps=_plain(c.resample_steps),
            sample_size=_plain(c.resample_size),
            seed=int(cfg.seed),
            spherical=bool(c.spherical),
            backend=str(c.backend),
            device=device,
            done=done,
            on_level=save_level,
            first_level=first_level,
        )
        levels = [(hierarchy.labels(t), hierarchy.centroids[t - 1]) for t in range(1, len(ks) + 1)]
        if ranks.world > 1:
            mine = rank_slice(n, ranks)
            local = view.subset(mine)  # read block by block, as the single process reads the view
            distances = [gather_rows(squared_distances(local, cents, labels[mine]), ranks) for labels, cents in levels]
            if ranks.rank != 0:
                ranks.barrier()  # rank 0 writes
                return out
        else:
            distances = [squared_distances(view if x is None else x, cents, labels) for labels, cents in levels]
        stats = []
        for t, ((labels, _), distance) in enumerate(zip(levels, distances), start=1):
            stats.append(_level_stats(t, labels, ks[t - 1], distance))
            if t <= len(done):  # a resumed level: its arrays come from the work folder
                for name in ("centroids.npy", "parents.npy", "parent_distance.npy"):
                    save_npy(staged.path(f"level{t}/{name}"), np.load(out / WORK / f"level{t}" / name))
            write_frame(
                staged.path(f"level{t}/assign.parquet"), _assign_frame(ids, labels, distance), ASSIGN_SCHEMA, fp
            )
        _write_clustering(staged, "", ids, hierarchy.centroids[-1], labels, distance, fp)

    if n_balanced > 0:
        picked = balanced_sample(hierarchy, min(n_balanced, n), seed=int(cfg.seed))
        write_frame(staged.path("balanced.parquet"), pd.DataFrame({"id": ids[picked]}), BALANCED_SCHEMA, balanced_fp)
    else:
        staged.remove("balanced.parquet")
    _remove_stale_levels(staged, out, len(ks) if c.method == "hierarchical" else 0)
    staged.remove(WORK)  # committed: the resume state has served
    if c.method == "flat":
        staged.remove("kmeans-checkpoint.npz")  # finished: a later run with other settings must start afresh
    staged.commit(
        fingerprint=balanced_fp,
        settings=settings,
        images=int(n),
        k=ks[-1],
        distance="squared_l2",
        levels=stats,
        balanced_sample=int(n_balanced),
        trained_on=int(n if train is None else len(train)),
        world_size=ranks.world,
        seconds=round(time.time() - started, 3),
    )
    log.info("cluster: done in %.1f s", time.time() - started)
    ranks.barrier()
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m lvd.curate.cluster CONFIG [key=value ...]`: the entry point for torchrun."""
    return torchrun_main(run_cluster, "lvd.curate.cluster", argv)


def _write_empty(
    staged: StageOutputs, out: Path, dim: int, fp: str, balanced_fp: str, settings: dict, started: float
) -> Path:
    """Nothing survived dedup: empty but well-formed outputs, so later stages see zero images."""
    empty = np.zeros(0, np.int64)
    _write_clustering(staged, "", empty, np.zeros((0, dim), np.float32), empty, np.zeros(0, np.float32), fp)
    write_frame(staged.path("balanced.parquet"), pd.DataFrame({"id": empty}), BALANCED_SCHEMA, balanced_fp)
    staged.commit(
        fingerprint=balanced_fp,
        settings=settings,
        images=0,
        k=0,
        distance="squared_l2",
        levels=[],
        seconds=round(time.time() - started, 3),
    )
    return out


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
