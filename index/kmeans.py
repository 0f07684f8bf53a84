"""Flat k-means: Faiss `Kmeans`, or Lloyd's algorithm over any vector backend, on one process
or on many (torch.distributed ranks, each holding a slice of the rows).

Choices that make runs comparable and repeatable:

* Lloyd's assignment step keeps bounds (see `_Assignment`): rows that provably keep their
  centroid skip the search, which is where the speed over Faiss's `Kmeans` comes from; the
  result is the same as searching every row.
* Initial centroids are greedy k-means++ seeds (`index.kmeans_seeding`: scikit-learn's
  algorithm, on a seeded sample of the rows once n x k is large), or `init`: the same for every backend
  and every rank count, so backends can be compared iteration for iteration and N ranks equal
  one process.
* Faiss never sub-samples silently: `max_points_per_centroid` is set from the data so every
  row takes part; a caller that sets it lower gets a warning that says how many rows are used.
* Lloyd's update sums each cluster in row order (float32) and adds ranks in float64, so 1
  rank and N ranks agree to float32 rounding.
  An empty cluster takes the row farthest from its centroid (scikit-learn's rule).
* With `checkpoint=PATH` the centroids are saved every `checkpoint_every` iterations (atomic
  write); a rerun with the same data, k and init resumes there and ends with the same result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse
import torch
from tqdm.auto import tqdm

from lvd.common.atomic import atomic_path
from lvd.index.backend_choice import choose_backend
from lvd.index.backends import FaissBackend, VectorBackend, _as_f32
from lvd.index.kmeans_seeding import MAX_K, random_rows, seed_centroids, seeding_sample

log = logging.getLogger(__name__)

# Rows per chunk when computing distances to assigned centroids (bounds the temporary).
UPDATE_CHUNK = 65536


@dataclass
class KMeansResult:
    """Centroids and the final assignment (of this rank's rows when distributed)."""

    centroids: np.ndarray  # (k, d) float32
    assign: np.ndarray  # (n,) int64 index of the nearest centroid
    distance: np.ndarray  # (n,) float32 squared L2 distance to it
    inertia: float  # sum of `distance` over all rows (all ranks)
    objective: list[float] = field(default_factory=list)  # inertia of each iteration's assignment


def kmeans(
    x,
    k: int,
    niter: int = 20,
    seed: int = 0,
    spherical: bool = False,
    backend="auto",
    device="cpu",
    init=None,
    *,
    dtype: str = "auto",
    distributed: bool = False,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 5,
    max_points_per_centroid: int | None = None,
    prune: bool = True,
    algorithm: str = "auto",
    progress: bool | None = None,
) -> KMeansResult:
    """k-means of the rows of x (float32 [n, d]) into k clusters, `niter` Lloyd iterations.

    backend: "faiss", "torch", "auto" or a `VectorBackend`: the engine of the nearest-centroid
    searches; "auto" is the engine and dtype measured fastest here for this assignment's shape
    (`lvd.index.backend_choice`). init: None or "k-means++" (greedy k-means++ seeds, see
    `index.kmeans_seeding`), "random" (k distinct rows drawn with `seed`) or a (k, d) array.
    algorithm: "faiss" (Faiss's own `Kmeans`, needs the faiss
    backend, one process), "lloyd" (lvd's Lloyd with bounds, any backend, any number of ranks)
    or "auto": Faiss's `Kmeans` when backend="faiss" is asked for on one process, else Lloyd,
    whose bounds skip most rows' searches (benchmarks/kmeans.py: 1.8x Faiss's `Kmeans` on the
    Faiss engine, 100k x 384 -> 1k, 2-core AVX-512 CPU). `distributed=True` runs Lloyd over the
    initialised torch.distributed group: x is this rank's slice, centroid sums are all-reduced, and the result's
    assign/distance cover this rank's rows. spherical=True L2-normalises the centroids after
    each update (for cosine clustering of normalised embeddings). prune=False makes the
    Lloyd path search every row at every iteration (same result, slower; see `_Assignment`).
    """
    x = _as_f32(x)
    comm = _Comm(distributed)
    n_total, offset = comm.sizes(len(x))
    if not 0 < k <= n_total:
        raise ValueError(f"cannot make {k} clusters of {n_total} rows")
    centroids = _initial_centroids(x, k, seed, init, comm, offset, n_total, spherical)
    engine = choose_backend(
        "k-means assignment",
        centroids,
        x,
        2,
        metric="l2",
        backend=backend,
        device=device,
        dtype=dtype,
        agree=comm.agree if comm.active else None,
    )
    store = _Checkpoint(checkpoint, checkpoint_every, _fingerprint(n_total, x.shape[1], k, spherical, centroids), comm)
    if algorithm not in ("auto", "faiss", "lloyd"):
        raise ValueError(f"unknown k-means algorithm {algorithm!r}; expected auto, faiss or lloyd")
    if algorithm == "faiss" and (comm.active or not isinstance(engine, FaissBackend)):
        raise ValueError("algorithm='faiss' needs backend='faiss' and a single process")
    if algorithm == "faiss" or (algorithm == "auto" and backend == "faiss" and not comm.active):
        return _faiss_kmeans(x, centroids, niter, seed, spherical, engine, store, max_points_per_centroid)
    return _lloyd(x, centroids, niter, spherical, engine, comm, store, progress, prune)


def _initial_centroids(x, k, seed, init, comm: _Comm, offset: int, n_total: int, spherical: bool) -> np.ndarray:
    """`init` as given, or seeds drawn from the rows of all ranks (the same on every rank)."""
    if init is not None and not isinstance(init, str):
        init = _as_f32(init)
        if init.shape != (k, x.shape[1]):
            raise ValueError(f"init has shape {init.shape}, expected {(k, x.shape[1])}")
        return init.copy()
    method = init or "k-means++"
    if method not in ("k-means++", "random"):
        raise ValueError(f"unknown k-means init {method!r}; expected k-means++, random or an array")
    if method == "random" or k > MAX_K:
        if method != "random":
            log.info("k-means: %d clusters, more than k-means++ seeds (%d); random rows instead", k, MAX_K)
        return comm.rows(x, random_rows(n_total, k, seed), offset).copy()
    sample = seeding_sample(n_total, k, seed)
    rows = (
        x
        if sample is None and not comm.active
        else comm.rows(x, np.arange(n_total) if sample is None else sample, offset)
    )
    return seed_centroids(rows, k, seed=seed, spherical=spherical)


def _faiss_kmeans(
    x, centroids, niter, seed, spherical, engine: FaissBackend, store: _Checkpoint, max_points_per_centroid
) -> KMeansResult:
    import faiss

    n, d = x.shape
    k = len(centroids)
    every_row = math.ceil(n / k)
    if max_points_per_centroid is None:
        max_points_per_centroid = every_row
    elif max_points_per_centroid < every_row:
        log.warning(
            "faiss k-means trains on %d of %d rows (max_points_per_centroid=%d)",
            k * max_points_per_centroid,
            n,
            max_points_per_centroid,
        )
    start, centroids, objective = store.resume(centroids)
    step = store.every if store.path is not None else max(1, niter)
    for it in range(start, niter, step):
        seg = min(step, niter - it)
        km = faiss.Kmeans(
            d,
            k,
            niter=seg,
            seed=seed + it,
            spherical=spherical,
            gpu=engine.use_gpu,
            max_points_per_centroid=max_points_per_centroid,
            min_points_per_centroid=1,
        )
        km.train(x, init_centroids=centroids)
        centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
        objective += [float(v) for v in km.obj]
        store.save(it + seg, centroids, objective)
    distance, assign = engine.assign(x, centroids)
    return KMeansResult(centroids, assign.astype(np.int64), distance, float(distance.sum(dtype=np.float64)), objective)


def _lloyd(
    x, centroids, niter, spherical, engine: VectorBackend, comm: _Comm, store: _Checkpoint, progress, prune: bool = True
) -> KMeansResult:
    start, centroids, objective = store.resume(centroids)
    state = _Assignment(x, engine)
    state.full(centroids)
    for it in tqdm(range(start, niter), desc="k-means", leave=False, disable=_quiet(progress)):
        objective.append(float(comm.sum(state.sq_distance.sum(dtype=np.float64))))
        updated = _means(state, centroids, comm)
        if spherical:
            updated /= np.maximum(np.linalg.norm(updated, axis=1, keepdims=True), 1e-12)
        if prune:
            state.refresh(centroids, updated)
        else:
            state.full(updated)
        centroids = updated
        store.save(it + 1, centroids, objective)
    inertia = float(comm.sum(state.sq_distance.sum(dtype=np.float64)))
    return KMeansResult(centroids, state.assign.copy(), state.sq_distance.astype(np.float32), inertia, objective)


class _Assignment:
    """Nearest-centroid assignment kept up to date at O(d) per row that provably stays put.

    Each row keeps its centroid `assign` and a lower bound `lower` on its distance to every
    other centroid. After an update only the centroids that moved can come closer, so the
    bound becomes min(old bound, exact distance to the moved centroids); a row whose own
    (exact) distance stays below it provably keeps its centroid. The rest are searched in
    full. Late iterations move few centroids, so most rows skip the k x d search, and the
    result is Lloyd's, not an approximation of it. Cluster sums are recomputed in row order
    every iteration, so a cluster that no row left or joined gets a bit-identical centroid
    (which is what "moved" tests) and the result does not depend on where a run resumed.
    """

    # Above this fraction of moved centroids the bounds cost more than a full search.
    MAX_MOVED = 0.6

    def __init__(self, x: np.ndarray, engine: VectorBackend):
        self.x, self.engine = x, engine
        self.sq_norm = np.einsum("ij,ij->i", x, x, dtype=np.float64)
        self.assign = np.full(len(x), -1, np.int64)
        self.lower = np.full(len(x), np.inf)
        self.sq_distance = np.zeros(len(x), np.float64)
        #: rows searched in full by the last full()/refresh() (for benchmarks and tests)
        self.searched = 0

    def full(self, centroids: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Search `rows` (default: all) against every centroid, keeping the two nearest."""
        rows = np.arange(len(self.x)) if rows is None else rows
        xs = self.x if len(rows) == len(self.x) else self.x[rows]
        top = min(2, len(centroids))
        d2, nearest = self.engine.search(centroids, xs, top, metric="l2")
        self.assign[rows] = nearest[:, 0]
        self.lower[rows] = np.sqrt(d2[:, 1]) if top == 2 else np.inf
        self.sq_distance[rows] = d2[:, 0]
        self.searched = len(rows)

    def refresh(self, old: np.ndarray, new: np.ndarray) -> None:
        """Assignment to `new` centroids, searching only rows whose bound does not hold."""
        moved_mask = np.any(old != new, axis=1)
        moved = np.flatnonzero(moved_mask)
        if len(moved) > self.MAX_MOVED * len(new):
            self.full(new)
            return
        if len(moved):
            top = min(2, len(moved))
            d2, nearest = self.engine.search(new[moved], self.x, top, metric="l2")
            own = moved[nearest[:, 0]] == self.assign
            other = np.where(own, d2[:, 1] if top == 2 else np.inf, d2[:, 0])
            self.lower = np.minimum(self.lower, np.sqrt(other))
            followed = np.flatnonzero(moved_mask[self.assign])  # rows whose own centroid moved
            self.sq_distance[followed] = self._own_sq_distance(new, followed)
        # A margin for the rounding of squared distances computed as |x|^2 + |c|^2 - 2 x.c.
        slack = 1e-5 * (self.sq_norm + float(np.einsum("ij,ij->i", new, new).max()))
        unsure = np.flatnonzero(self.sq_distance + slack >= self.lower**2)
        if len(unsure):
            self.full(new, unsure)
        self.searched = len(unsure)

    def _own_sq_distance(self, centroids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Squared distance of `rows` to their assigned centroid, computed directly."""
        out = np.empty(len(rows), np.float64)
        for start in range(0, len(rows), UPDATE_CHUNK):
            part = rows[start : start + UPDATE_CHUNK]
            diff = torch.from_numpy(self.x[part] - centroids[self.assign[part]])
            out[start : start + len(part)] = torch.linalg.vector_norm(diff, dim=1).double().square().numpy()
        return out


def _cluster_sums(x: np.ndarray, assign: np.ndarray, k: int) -> np.ndarray:
    """Per-cluster sums of rows, each summed in row order (a sparse one-hot product)."""
    one_hot = scipy.sparse.csr_matrix((np.ones(len(x), np.float32), (assign, np.arange(len(x)))), shape=(k, len(x)))
    return np.asarray(one_hot @ x, dtype=np.float64)


def _means(state: _Assignment, centroids: np.ndarray, comm: _Comm) -> np.ndarray:
    """Mean of each cluster's rows over all ranks; an empty cluster takes the farthest row."""
    k = len(centroids)
    sums = comm.sum(_cluster_sums(state.x, state.assign, k))
    counts = comm.sum(np.bincount(state.assign, minlength=k).astype(np.float64))
    new = centroids.astype(np.float64)
    filled = counts > 0
    new[filled] = sums[filled] / counts[filled, None]
    empty = np.flatnonzero(~filled)
    if len(empty):
        log.info("k-means: %d empty clusters moved to the farthest rows", len(empty))
        new[empty] = comm.farthest_rows(state.x, state.sq_distance, len(empty))
    return new.astype(np.float32)


class _Comm:
    """The few collective operations distributed k-means needs (no-ops on one process)."""

    def __init__(self, distributed: bool):
        self.active = bool(distributed)
        if self.active:
            import torch.distributed as dist

            if not dist.is_initialized():
                raise RuntimeError("distributed k-means needs torch.distributed.init_process_group first")
            self.dist = dist
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world = 0, 1

    def sum(self, array):
        """Element-wise sum over ranks (float64 on the wire, float32 arrays as float32)."""
        if not self.active:
            return np.asarray(array)
        dtype = np.float32 if np.asarray(array).dtype == np.float32 else np.float64
        tensor = torch.from_numpy(np.array(array, dtype=dtype, ndmin=1))
        self.dist.all_reduce(tensor)
        return tensor.numpy().reshape(np.shape(array))

    def agree(self, name: str, names: list[str]) -> str:
        """Rank 0's `name` on every rank (each rank may have measured a different winner)."""
        vote = np.zeros(len(names), np.float64)
        if self.rank == 0:
            vote[names.index(name)] = 1.0
        return names[int(np.argmax(self.sum(vote)))]

    def sizes(self, n_local: int) -> tuple[int, int]:
        """(rows over all ranks, index of this rank's first row in rank order)."""
        if not self.active:
            return n_local, 0
        counts = np.zeros(self.world, np.float64)
        counts[self.rank] = n_local
        counts = self.sum(counts).astype(np.int64)
        return int(counts.sum()), int(counts[: self.rank].sum())

    def rows(self, x, picked: np.ndarray, offset: int) -> np.ndarray:
        """Rows `picked` (indices over all ranks) on every rank: each rank fills the ones it holds
        and the rest are zeros, so the sum is exact."""
        if not self.active:
            return x[picked]
        out = np.zeros((len(picked), x.shape[1]), np.float32)
        mine = (picked >= offset) & (picked < offset + len(x))
        out[mine] = x[picked[mine] - offset]
        return self.sum(out)

    def farthest_rows(self, x, distance, count: int) -> np.ndarray:
        """The `count` rows of all ranks farthest from their centroid (ties: lower rank, row)."""
        local = np.argsort(-distance, kind="stable")[:count]
        if not self.active:
            return x[local].astype(np.float64)
        width = 2 + x.shape[1]
        offered = np.full((count, width), -np.inf)
        offered[: len(local), 0] = distance[local]
        offered[: len(local), 1] = self.rank
        offered[: len(local), 2:] = x[local]
        gathered = [torch.zeros((count, width), dtype=torch.float64) for _ in range(self.world)]
        self.dist.all_gather(gathered, torch.from_numpy(offered))
        rows = torch.cat(gathered).numpy()
        order = np.lexsort((rows[:, 1], -rows[:, 0]))[:count]
        return rows[order, 2:]


class _Checkpoint:
    """Centroids every few iterations in one .npz, replaced atomically.

    Rank 0 writes and every rank reads, so several machines need the path on a shared file
    system. Only centroids are saved: the assignment is recomputed from them on resume.
    """

    def __init__(self, path, every: int, fingerprint: str, comm: _Comm):
        self.path = None if path is None else Path(path)
        self.every = max(1, int(every))
        self.fingerprint = fingerprint
        self.writer = comm.rank == 0

    def resume(self, centroids: np.ndarray) -> tuple[int, np.ndarray, list[float]]:
        """(iterations done, centroids, objective so far): from the file when it matches."""
        if self.path is None or not self.path.exists():
            return 0, centroids, []
        with np.load(self.path, allow_pickle=False) as saved:
            if str(saved["fingerprint"]) != self.fingerprint:
                log.warning("k-means checkpoint %s is for other data or settings; starting over", self.path)
                return 0, centroids, []
            done = int(saved["iteration"])
            log.info("k-means: resuming from %s after %d iterations", self.path, done)
            return done, saved["centroids"].astype(np.float32), [float(v) for v in saved["objective"]]

    def save(self, iteration: int, centroids: np.ndarray, objective: list[float]) -> None:
        if self.path is None or not self.writer or iteration % self.every:
            return
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                iteration=np.int64(iteration),
                centroids=centroids,
                objective=np.asarray(objective, np.float64),
                fingerprint=np.str_(self.fingerprint),
            )


def _fingerprint(n: int, d: int, k: int, spherical: bool, init: np.ndarray) -> str:
    """What a checkpoint must match to be resumed: the problem and its starting point."""
    digest = hashlib.sha1(np.ascontiguousarray(init).tobytes()).hexdigest()
    return json.dumps({"n": n, "d": d, "k": k, "spherical": spherical, "init_sha1": digest}, sort_keys=True)


def _quiet(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


__all__ = ["KMeansResult", "kmeans"]
