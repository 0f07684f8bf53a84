"""iBOT block masking: DINOv2-style rectangles (shape distribution derived from the sampling rule),
few isolated patches, counts never above the target, ratios spread over the configured range."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from lvd.pretrain.train.masking import batch_masks, block_mask, block_shape


def _isolated(mask: np.ndarray) -> int:
    """Masked patches with no masked 4-neighbour (connected pieces of one patch)."""
    labels, _ = ndimage.label(mask)
    return int((np.bincount(labels.ravel())[1:] == 1).sum())


def _shape_distribution(grid, lo, hi, aspect, n=1500):
    """P(height, width) of a proposed block, integrated on an n x n midpoint grid over
    area ~ U[lo, hi] and log-aspect ~ U[log a0, log a1]; None = rejected (a side is 0 or reaches the grid's)."""
    area = lo + (hi - lo) * (np.arange(n) + 0.5) / n
    t0, t1 = math.log(aspect[0]), math.log(aspect[1])
    ratio = np.exp(t0 + (t1 - t0) * (np.arange(n) + 0.5) / n)
    a, r = np.meshgrid(area, ratio, indexing="ij")
    bh, bw = np.round(np.sqrt(a * r)).astype(int), np.round(np.sqrt(a / r)).astype(int)
    ok = (bh > 0) & (bh < grid[0]) & (bw > 0) & (bw < grid[1])
    probs: dict = {None: float((~ok).mean())}
    keys, counts = np.unique(bh[ok] * 10_000 + bw[ok], return_counts=True)
    for key, count in zip(keys, counts):
        probs[(int(key) // 10_000, int(key) % 10_000)] = count / a.size
    return probs


@pytest.mark.parametrize("grid, lo, hi", [((16, 16), 4, 128), ((14, 14), 4, 98), ((6, 20), 4, 30)])
def test_block_shapes_follow_uniform_area_and_log_uniform_aspect(grid, lo, hi):
    # The shapes drawn (and how often a proposal is rejected for spanning a side) match the
    # distribution derived from the rule: area ~ U[lo, hi], aspect log-uniform in [0.3, 1/0.3],
    # sides rounded, a side reaching the grid's rejected.
    rng = np.random.default_rng(0)
    n = 100_000
    drawn: dict = {}
    for _ in range(n):
        s = block_shape(grid, hi, rng, min_block=lo)
        drawn[s] = drawn.get(s, 0) + 1
    want = _shape_distribution(grid, lo, hi, (0.3, 1 / 0.3))
    tv = 0.5 * sum(abs(drawn.get(k, 0) / n - want.get(k, 0.0)) for k in set(drawn) | set(want))
    assert tv < 0.02, tv
    assert abs(drawn.get(None, 0) / n - want[None]) < 0.01
    shapes, possible = [k for k in drawn if k is not None], [k for k in want if k is not None]
    assert set(shapes) <= set(possible)
    for side in (0, 1):  # the longest possible sides are reached; none is the grid's own
        assert max(k[side] for k in shapes) == max(k[side] for k in possible) < grid[side]
    if grid[0] == grid[1]:  # on the square grids, blocks up to one patch short of a whole side
        assert max(k[0] for k in shapes) == grid[0] - 1
    # A narrower aspect range is told apart (the check above can fail).
    other = _shape_distribution(grid, lo, hi, (0.5, 2.0))
    assert 0.5 * sum(abs(drawn.get(k, 0) / n - other.get(k, 0.0)) for k in set(drawn) | set(other)) > 0.05


@pytest.mark.parametrize("grid", [(16, 16), (8, 8), (7, 5)])
def test_block_mask_never_exceeds_its_target_and_rarely_falls_short(grid):
    rng = np.random.default_rng(0)
    n = grid[0] * grid[1]
    assert not block_mask(grid, 0, rng).any()
    short = []
    for _ in range(1000):
        target = int(n * rng.uniform(0.1, 0.5))
        m = block_mask(grid, target, rng, max_block=n // 2)
        assert m.shape == grid and m.dtype == bool and m.sum() <= target
        short.append(target - int(m.sum()))
    # Only the last few patches can miss: a block is proposed while >= 1 patch is left.
    assert np.mean(short) < 0.2 and np.mean(np.array(short) > 0) < 0.15 and max(short) <= 6


def test_isolated_patches_are_as_rare_as_in_dinov2():
    # A piece of one patch can only be a 1x1 block, and a 1x1 block needs an area below 2.25
    # (both rounded sides 1), i.e. a budget of at most 2 left: so at most 2 per mask, and only
    # in the few masks whose last block left 1 or 2 patches. Issue 15 measured dinov2's
    # generator at 0.15 isolated patches per mask, 15 % of masks with one (16 x 16 grid,
    # ratios 0.1-0.5); the fill-up with single patches gave 1.15 and 70 %.
    rng = np.random.default_rng(0)
    grid = (16, 16)
    masks = np.concatenate([batch_masks(64, grid, (0.1, 0.5), 1.0, rng).numpy() for _ in range(50)])
    isolated = np.array([_isolated(m.reshape(grid)) for m in masks])
    assert len(isolated) == 3200
    assert isolated.max() <= 2
    assert 0.10 < isolated.mean() < 0.20 and 0.10 < (isolated > 0).mean() < 0.20, (
        isolated.mean(),
        (isolated > 0).mean(),
    )


def test_block_masks_are_blocky():
    # Masked patches come in rectangles: far fewer connected pieces than a uniform random
    # mask with the same number of patches.
    rng = np.random.default_rng(1)
    grid, target = (16, 16), 77
    blocks = [block_mask(grid, target, rng) for _ in range(50)]
    pieces_block = np.mean([ndimage.label(m)[1] for m in blocks])
    pieces_random = []
    for m in blocks:
        r = np.zeros(256, dtype=bool)
        r[rng.choice(256, int(m.sum()), replace=False)] = True
        pieces_random.append(ndimage.label(r.reshape(grid))[1])
    assert pieces_block < 0.5 * np.mean(pieces_random)


@pytest.mark.parametrize("prob", [0.0, 0.5, 1.0])
def test_batch_masks_ratios_within_bounds(prob):
    rng = np.random.default_rng(2)
    b, grid, lo, hi = 32, (14, 14), 0.1, 0.5
    n = grid[0] * grid[1]
    masks = batch_masks(b, grid, (lo, hi), prob, rng).numpy()
    assert masks.shape == (b, n)
    counts = masks.sum(1)
    masked = counts > 0
    assert masked.sum() == int(b * prob)
    assert (counts[masked] >= int(n * lo) - 6).all() and (counts[masked] <= int(n * hi)).all()


def test_masked_ratios_spread_uniformly_over_the_configured_range():
    # Targets are int(N * U) with U stratified over [lo, hi]; the masks reach them but for a
    # few patches, so the masked share is close to uniform on [lo, hi].
    rng = np.random.default_rng(5)
    grid, lo, hi = (16, 16), 0.1, 0.5
    ratios = np.concatenate([batch_masks(32, grid, (lo, hi), 1.0, rng).numpy().mean(1) for _ in range(40)])
    qs = np.linspace(0.05, 0.95, 19)
    assert np.abs(np.quantile(ratios, qs) - (lo + (hi - lo) * qs)).max() < 0.02
    assert ratios.max() <= hi and abs(ratios.mean() - (lo + hi) / 2) < 0.01


def test_batch_masks_deterministic_given_the_generator():
    a = batch_masks(8, (6, 6), (0.1, 0.5), 0.5, np.random.default_rng(3))
    b = batch_masks(8, (6, 6), (0.1, 0.5), 0.5, np.random.default_rng(3))
    c = batch_masks(8, (6, 6), (0.1, 0.5), 0.5, np.random.default_rng(4))
    assert (a == b).all() and not (a == c).all()
