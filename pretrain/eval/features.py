"""Frozen-backbone features for evaluation: encoded images in, a float32 array out.

k-NN and linear evaluation see the backbone only through this module, so both measure the
same thing: images decoded, resized and centre-cropped by the backbone's own preprocessing
(`pretrain.models.preprocess`, which the embedder uses too), normalised with the model's mean/std, and read from
`forward_features` (the final-norm CLS token, optionally with the mean patch token, as
dinov2's linear evaluation does with `avgpool`). Any module with dinov2's `forward_features`
works, which is what lets the tests use a stand-in.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
from tqdm.auto import tqdm

from lvd.common.devices import autocast, resolve_device, resolve_dtype
from lvd.pretrain.data.decode import DecodeError
from lvd.pretrain.data.labelled import LabelledSample
from lvd.pretrain.models.preprocess import bytes_to_square, normalise

log = logging.getLogger(__name__)

POOLINGS = ("cls", "cls+mean")


@dataclass(frozen=True)
class Preprocessing:
    """How pixels reach the model: shorter side to resolution × resize_ratio, central
    resolution² crop, then per-channel (x - mean) / std (dinov2's evaluation: ratio 256/224)."""

    resolution: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_ratio: float = 1.0


def images_to_tensor(
    images: Sequence[np.ndarray], prep: Preprocessing, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """H×W×3 uint8 arrays (same size) to a normalised B×3×H×W float32 batch on `device`."""
    return normalise(torch.from_numpy(np.stack(images)), prep.mean, prep.std, torch.device(device))


def pool_features(out: dict, pooling: str) -> torch.Tensor:
    """The evaluated vector from a `forward_features` dict."""
    cls = out["x_norm_clstoken"]
    if pooling == "cls":
        return cls
    if pooling == "cls+mean":
        return torch.cat([cls, out["x_norm_patchtokens"].mean(dim=1)], dim=-1)
    raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")


def _batched(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def _decode_or_none(data: bytes, prep: Preprocessing) -> np.ndarray | None:
    try:
        return bytes_to_square(data, prep.resolution, prep.resize_ratio)
    except DecodeError as exc:
        log.warning("skipping an image that cannot be decoded: %s", exc)
        return None


@dataclass
class LabelledFeatures:
    """Features (float32, not normalised) of the decodable samples, and the keys skipped."""

    x: np.ndarray
    labels: list[str]
    keys: list[str]
    skipped: list[str]


@torch.no_grad()
def extract_labelled_features(
    model: torch.nn.Module,
    samples: Iterable[LabelledSample],
    prep: Preprocessing,
    *,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    pooling: str = "cls",
    workers: int = 0,
    desc: str = "features",
    progress: bool | None = None,
) -> LabelledFeatures:
    """Run `model` over every sample; undecodable images are logged and listed as skipped.

    Decoding runs on `workers` threads (Pillow releases the GIL while it decodes).
    """
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    model.eval()
    feats: list[np.ndarray] = []
    labels: list[str] = []
    keys: list[str] = []
    skipped: list[str] = []
    pool = ThreadPoolExecutor(workers) if workers > 0 else None
    bar = tqdm(desc=desc, unit="img", disable=None if progress is None else not progress)
    try:
        for batch in _batched(samples, batch_size):
            datas = [s.data for s in batch]
            decoded = list((pool.map if pool else map)(_decode_or_none, datas, [prep] * len(datas)))
            kept = [(s, img) for s, img in zip(batch, decoded) if img is not None]
            skipped.extend(s.key for s, img in zip(batch, decoded) if img is None)
            bar.update(len(batch))
            if not kept:
                continue
            x = images_to_tensor([img for _, img in kept], prep, device)
            with autocast(device, resolve_dtype(dtype, device)):
                out = model.forward_features(x)
            feats.append(pool_features(out, pooling).float().cpu().numpy())
            labels.extend(s.label for s, _ in kept)
            keys.extend(s.key for s, _ in kept)
    finally:
        bar.close()
        if pool:
            pool.shutdown()
    if not feats:
        raise ValueError(f"{desc}: no decodable image in the source")
    if skipped:
        log.warning("%s: %d undecodable images left out", desc, len(skipped))
    return LabelledFeatures(np.concatenate(feats).astype(np.float32, copy=False), labels, keys, skipped)
