"""Which copy of a near-duplicate group to keep: the best one, decided from the manifest alone.

"Most pixels, then lowest id" cannot tell a pristine file from a degraded copy of the same size
(a JPEG q40 re-encode, a brightened re-save). The `quality` rule orders copies by
  1. most pixels (a downscaled copy lost detail);
  2. lossless over lossy format (PNG, BMP, TIFF, ... over JPEG, WebP, GIF's 256 colours);
  3. most bytes per pixel (within a kind of format, the least compressed);
  4. lowest id (a deterministic tie-break).
Arrays in, arrays out: `keep_priority` gives a rank that `index.components` keeps by, and
`keep_reasons` says which criterion made each kept image win over its group's runner-up.
"""

from __future__ import annotations

import numpy as np

# Pillow format names of formats that store pixels exactly. GIF is lossless but palette-limited,
# so a GIF of a photo has lost colours: it counts as lossy here. WebP can be either; the
# manifest does not say which, so it counts as lossy.
LOSSLESS_FORMATS = frozenset({"PNG", "BMP", "TIFF", "PPM", "PGM", "PBM", "QOI", "TGA", "ICO", "DIB", "SGI"})
RULES = ("quality", "pixels")
CRITERIA = ("most pixels", "lossless format", "least compressed", "lowest id")


def quality_keys(pixels, formats, nbytes) -> np.ndarray:
    """n x 3 float keys (pixels, lossless, bytes per pixel); larger is better in each column."""
    pixels = np.asarray(pixels, np.float64)
    lossless = np.array([str(f).upper() in LOSSLESS_FORMATS for f in formats], np.float64)
    bpp = np.asarray(nbytes, np.float64) / np.maximum(pixels, 1.0)
    return np.stack([pixels, lossless, bpp], axis=1)


def keep_priority(keys: np.ndarray, rule: str = "quality") -> np.ndarray:
    """Priority per row (higher is kept first), ties left to the caller's lowest-index rule.

    `quality` uses every column of `quality_keys` in order; `pixels` the first only (the old rule).
    Rows must be in id order for "lowest index" to mean "lowest id".
    """
    if rule not in RULES:
        raise ValueError(f"dedup.keep must be one of {RULES}, got {rule!r}")
    keys = np.asarray(keys, np.float64)
    if rule == "pixels":
        keys = keys[:, :1]
    if len(keys) == 0:
        return np.zeros(0)
    # dense rank of the key tuples: equal tuples share a rank, so the index tie-break applies
    _, inverse = np.unique(keys, axis=0, return_inverse=True)
    return inverse.reshape(-1).astype(np.float64)


def keep_reasons(labels: np.ndarray, keep: np.ndarray, keys: np.ndarray, rule: str = "quality") -> np.ndarray:
    """Why each kept row of a group of two or more won: the first criterion that separates it
    from the best of the rest of its group; None for removed rows and for single-image groups."""
    labels, keep, keys = np.asarray(labels), np.asarray(keep, bool), np.asarray(keys, np.float64)
    used = 1 if rule == "pixels" else keys.shape[1]
    out = np.full(len(labels), None, dtype=object)
    if len(labels) == 0:
        return out
    order = np.lexsort((np.arange(len(labels)), *[-keys[:, c] for c in reversed(range(used))], ~keep, labels))
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    first = starts[sizes > 1]  # groups of two or more: kept row first, the best of the rest second
    kept, runner_up = order[first], order[first + 1]
    differs = keys[kept, :used] != keys[runner_up, :used]
    criterion = np.where(differs.any(axis=1), differs.argmax(axis=1), len(CRITERIA) - 1)
    out[kept] = np.asarray(CRITERIA, dtype=object)[criterion]
    return out
