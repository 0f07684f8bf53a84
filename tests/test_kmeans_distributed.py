"""Distributed k-means on 2 gloo ranks (CPU) gives the 1-rank result."""

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

import lvd.index.kmeans_seeding as seeding
from lvd.index.kmeans import kmeans

N, D, K = 1201, 8, 9  # an odd count: the ranks hold slices of different sizes


def data():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((K, D)) * 3
    x = (centres[rng.integers(0, K, N)] + rng.standard_normal((N, D))).astype(np.float32)
    init_with_twin = x[:K].copy()
    init_with_twin[1] = init_with_twin[0]  # one cluster starts empty
    return x, init_with_twin


def runs(x, init_with_twin, **kw):
    out = {
        "seeded": kmeans(x, K, niter=6, seed=3, backend="torch", **kw),
        "twin": kmeans(x, K, niter=4, init=init_with_twin, backend="torch", **kw),
        "faiss_assign": kmeans(x, K, niter=4, seed=5, backend="faiss", **kw),
    }
    every_row, seeding.SEEDING_PAIRS = seeding.SEEDING_PAIRS, K * 300  # k-means++ on 300 sampled rows
    try:
        out["sampled_seeds"] = kmeans(x, K, niter=6, seed=4, backend="torch", **kw)
    finally:
        seeding.SEEDING_PAIRS = every_row
    return out


def worker(rank, world, folder):
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        x, twin = data()
        cut = 700  # rank 0: rows [0, 700), rank 1: rows [700, N)
        part = x[:cut] if rank == 0 else x[cut:]
        results = runs(part, twin, distributed=True, checkpoint=f"{folder}/ckpt.npz", checkpoint_every=2)
        arrays = {}
        for name, r in results.items():
            arrays[f"{name}_centroids"] = r.centroids
            arrays[f"{name}_assign"] = r.assign
            arrays[f"{name}_inertia"] = np.float64(r.inertia)
        np.savez(f"{folder}/rank{rank}.npz", **arrays)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one(tmp_path):
    mp.start_processes(worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    x, twin = data()
    single = runs(x, twin)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]
    for name, ref in single.items():
        for got in ranks:  # every rank ends with the same centroids and the global inertia
            np.testing.assert_allclose(got[f"{name}_centroids"], ref.centroids, atol=1e-5)
            assert float(got[f"{name}_inertia"]) == pytest.approx(ref.inertia, rel=1e-6)
        assign = np.concatenate([ranks[0][f"{name}_assign"], ranks[1][f"{name}_assign"]])
        np.testing.assert_array_equal(assign, ref.assign)
    assert len(np.unique(single["twin"].assign)) == K  # the empty cluster was refilled
    assert (tmp_path / "ckpt.npz").exists()
