"""iBOT block masking of the student's global crops.

A share `sample_probability` of the images in a batch is masked; their target ratios are
spread evenly over `[ratio_min, ratio_max]` (as DINOv2's collate does). Each mask is a union
of random rectangles (BEiT / DINOv2 block masking): area uniform between `min_block` and what
is left of the target, log-uniform aspect ratio, sides shorter than the grid's. When no
rectangle fits after a few tries the mask stops short of its target rather than scattering
single patches, so masked regions stay contiguous, as in the masks DINOv2 trained with.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def block_shape(
    grid: tuple[int, int],
    budget: int,
    rng: np.random.Generator,
    min_block: int = 4,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> tuple[int, int] | None:
    """One proposed rectangle (height, width), or None when it would span a whole side.

    The area is uniform between `min_block` and `budget` (either may be the larger one: a
    budget below `min_block` still proposes blocks of about `min_block` patches, which only
    fit where they overlap the mask), the aspect ratio log-uniform over `aspect`.
    """
    area = min_block + (budget - min_block) * rng.random()
    ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
    bh, bw = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
    return (bh, bw) if 0 < bh < grid[0] and 0 < bw < grid[1] else None


def _add_block(
    mask: np.ndarray, budget: int, rng: np.random.Generator, min_block: int, aspect: tuple[float, float], attempts: int
) -> int:
    """Mask one random rectangle adding 1..`budget` new patches; the number added (0: none fitted)."""
    h, w = mask.shape
    for _ in range(attempts):
        shape = block_shape((h, w), budget, rng, min_block, aspect)
        if shape is None:
            continue
        bh, bw = shape
        top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        block = mask[top : top + bh, left : left + bw]
        new = bh * bw - int(block.sum())
        if 0 < new <= budget:
            block[:] = True
            return new
    return 0


def block_mask(
    grid: tuple[int, int],
    n_masked: int,
    rng: np.random.Generator,
    min_block: int = 4,
    max_block: int | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    max_attempts: int = 10,
) -> np.ndarray:
    """A boolean H x W mask of at most `n_masked` True entries, a union of rectangles.

    Rectangles of at most `max_block` new patches are added while the target is not reached;
    the mask ends when `max_attempts` proposals in a row fail to fit, possibly a few patches short.
    """
    h, w = grid
    n_masked = int(min(max(n_masked, 0), h * w))
    max_block = n_masked if max_block is None else int(max_block)
    mask = np.zeros((h, w), dtype=bool)
    count = 0
    while count < n_masked:
        added = _add_block(mask, min(n_masked - count, max_block), rng, min_block, aspect, max_attempts)
        if added == 0:
            break
        count += added
    return mask


def batch_masks(
    batch_size: int,
    grid: tuple[int, int],
    ratio_range: tuple[float, float],
    sample_probability: float,
    rng: np.random.Generator,
    min_block: int = 4,
) -> torch.Tensor:
    """Bool B x (H*W) masks for a batch; rows are in random order.

    Blocks are capped at `ratio_max` of the grid (DINOv2 caps them at half of it, its `ratio_max`).
    """
    n_patches = grid[0] * grid[1]
    n_masked_images = int(batch_size * sample_probability)
    bounds = np.linspace(ratio_range[0], ratio_range[1], n_masked_images + 1)
    masks = np.zeros((batch_size, n_patches), dtype=bool)
    for i in range(n_masked_images):
        ratio = rng.uniform(bounds[i], bounds[i + 1])
        masks[i] = block_mask(
            grid, int(n_patches * ratio), rng, min_block=min_block, max_block=int(n_patches * ratio_range[1])
        ).ravel()
    masks = masks[rng.permutation(batch_size)]
    return torch.from_numpy(masks)
