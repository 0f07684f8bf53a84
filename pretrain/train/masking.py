"""iBOT block masking of the student's global crops.

A share `sample_probability` of the images in a batch is masked; their target ratios are
spread evenly over `[ratio_min, ratio_max]` (as DINOv2's collate does), and each mask is
built from random rectangles (BEiT-style blocks), topped up with single patches so that an
image gets exactly `int(ratio * n_patches)` masked patches.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def block_mask(grid: tuple[int, int], n_masked: int, rng: np.random.Generator,
               min_block: int = 4, max_block: int | None = None,
               aspect: tuple[float, float] = (0.3, 1 / 0.3), max_attempts: int = 10) -> np.ndarray:
    """A boolean H x W mask with exactly `n_masked` True entries, mostly in rectangles."""
    h, w = grid
    n_masked = int(min(max(n_masked, 0), h * w))
    mask = np.zeros((h, w), dtype=bool)
    max_block = n_masked if max_block is None else max_block
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    count, failures = 0, 0
    while count < n_masked and failures < max_attempts:
        remaining = n_masked - count
        hi = min(remaining, max_block)
        if hi < min_block:
            break
        area = rng.uniform(min_block, hi)
        ar = math.exp(rng.uniform(*log_aspect))
        bh, bw = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
        if not (0 < bh <= h and 0 < bw <= w):
            failures += 1
            continue
        top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        block = mask[top:top + bh, left:left + bw]
        new = int((~block).sum())
        if 0 < new <= remaining:
            block[:] = True
            count += new
            failures = 0
        else:
            failures += 1
    if count < n_masked:  # top up with single patches so the ratio is exact
        free = np.flatnonzero(~mask.ravel())
        mask.ravel()[rng.choice(free, n_masked - count, replace=False)] = True
    return mask


def batch_masks(batch_size: int, grid: tuple[int, int], ratio_range: tuple[float, float],
                sample_probability: float, rng: np.random.Generator, min_block: int = 4) -> torch.Tensor:
    """Bool B x (H*W) masks for a batch; rows are in random order."""
    n_patches = grid[0] * grid[1]
    n_masked_images = int(batch_size * sample_probability)
    bounds = np.linspace(ratio_range[0], ratio_range[1], n_masked_images + 1)
    masks = np.zeros((batch_size, n_patches), dtype=bool)
    for i in range(n_masked_images):
        ratio = rng.uniform(bounds[i], bounds[i + 1])
        masks[i] = block_mask(grid, int(n_patches * ratio), rng, min_block=min_block,
                              max_block=int(n_patches * ratio_range[1])).ravel()
    masks = masks[rng.permutation(batch_size)]
    return torch.from_numpy(masks)
