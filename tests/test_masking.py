"""iBOT block masking: exact counts, ratios within bounds, share of masked images, block shape."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lvd.pretrain.train.masking import batch_masks, block_mask


@pytest.mark.parametrize("grid", [(16, 16), (8, 8), (7, 5)])
def test_block_mask_has_exactly_the_requested_count(grid):
    rng = np.random.default_rng(0)
    n = grid[0] * grid[1]
    for target in [0, 1, 3, 4, n // 10, n // 3, n // 2, n]:
        m = block_mask(grid, target, rng)
        assert m.shape == grid and m.dtype == bool
        assert int(m.sum()) == target


def test_block_masks_are_blocky():
    # Masked patches come in rectangles: far fewer connected pieces than a uniform random
    # mask with the same number of patches.
    rng = np.random.default_rng(1)
    grid, target = (16, 16), 77
    pieces_block = np.mean([ndimage.label(block_mask(grid, target, rng))[1] for _ in range(50)])
    pieces_random = []
    for _ in range(50):
        m = np.zeros(256, dtype=bool)
        m[rng.choice(256, target, replace=False)] = True
        pieces_random.append(ndimage.label(m.reshape(grid))[1])
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
    assert (counts[masked] >= int(n * lo)).all() and (counts[masked] <= int(n * hi)).all()
    if prob == 1.0:  # target ratios are spread over the whole range
        ratios = np.sort(counts / n)
        assert ratios[0] < lo + (hi - lo) / 8 and ratios[-1] > hi - (hi - lo) / 8


def test_batch_masks_deterministic_given_the_generator():
    a = batch_masks(8, (6, 6), (0.1, 0.5), 0.5, np.random.default_rng(3))
    b = batch_masks(8, (6, 6), (0.1, 0.5), 0.5, np.random.default_rng(3))
    c = batch_masks(8, (6, 6), (0.1, 0.5), 0.5, np.random.default_rng(4))
    assert (a == b).all() and not (a == c).all()
