"""A long-tailed, duplicated pool, as web data is, made from Fashion-MNIST (which is balanced).

Class frequencies fall off geometrically with the class's rank (each class `DECAY` times the one
before: the largest holds ~40 % of the distinct images, the rarest ~0.4 %), and some images are
repeated many times (10-50 copies, half byte-identical, half re-toned and re-encoded), as
popular pictures are on the web. The pool is written as WebDataset shards whose `.cls` member
holds the class name, so the manifest knows every pool image's class; the curation never reads
it (seedless curation uses no labels), the report and the demo use it to show the rebalancing.

The planted truth (class, origin and kind of every copy) is written to DATA/longtail/truth.json.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from lvd.common.atomic import atomic_write_json
from lvd.curate.demo.fashion_mnist import CLASSES, FASHION_MNIST_DIR, augment_copy, load_fashion_mnist

#: share of each class relative to the next larger one (class rank order is drawn with the seed)
DECAY = 0.6
#: share of distinct images that are repeated, and the range of their copy counts
REPEATED_FRACTION = 0.02
COPIES = (10, 50)
SHARD_SIZE = 1000


def class_shares(n_classes: int = len(CLASSES), decay: float = DECAY) -> np.ndarray:
    """Geometric shares, largest first, summing to 1."""
    w = decay ** np.arange(n_classes)
    return w / w.sum()


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def prepare_longtail_pool(
    out: str | os.PathLike,
    distinct: int = 2400,
    seed: int = 0,
    fmnist_root: str | os.PathLike = FASHION_MNIST_DIR,
    exclude: set[int] | None = None,
) -> Path:
    """Write DATA/longtail/pool-NNNNNN.tar (+ truth.json) and return DATA/longtail.

    `distinct` Fashion-MNIST train images are drawn with long-tailed class shares (train
    indices in `exclude` are never drawn), then repeated images are added.
    """
    import webdataset as wds

    folder = Path(out) / "data" / "longtail"
    truth_path = folder / "truth.json"
    params = {
        "distinct": distinct,
        "seed": seed,
        "decay": DECAY,
        "repeated": REPEATED_FRACTION,
        "copies": list(COPIES),
        "exclude": len(exclude or ()),
    }
    if truth_path.is_file() and json.loads(truth_path.read_text()).get("params") == params:
        return folder
    fm = load_fashion_mnist(fmnist_root)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(CLASSES))  # which class is the largest, the second, ...
    counts = np.maximum(1, np.round(class_shares() * distinct).astype(int))
    banned = np.zeros(len(fm["train_y"]), bool)
    banned[list(exclude or ())] = True
    chosen = []
    for rank, cls in enumerate(order):
        members = np.flatnonzero((fm["train_y"] == cls) & ~banned)
        chosen.append(rng.choice(members, counts[rank], replace=False))
    chosen = np.concatenate(chosen)
    samples = [(f"img-{i:05d}", _png(fm["train_x"][i]), CLASSES[fm["train_y"][i]], None, "original") for i in chosen]
    repeated = rng.choice(chosen, max(1, int(round(REPEATED_FRACTION * len(chosen)))), replace=False)
    for i in repeated:
        for c in range(int(rng.integers(COPIES[0], COPIES[1] + 1))):
            exact = c % 2 == 0
            data = _png(fm["train_x"][i]) if exact else _jpeg(augment_copy(Image.fromarray(fm["train_x"][i]), rng))
            samples.append(
                (f"copy-{i:05d}-{c:02d}", data, CLASSES[fm["train_y"][i]], f"img-{i:05d}", "exact" if exact else "near")
            )
    samples = [samples[j] for j in rng.permutation(len(samples))]  # a crawl is in no useful order
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("pool-*.tar"):
        old.unlink()
    truth = {
        "params": params,
        "class_order": [CLASSES[c] for c in order],
        "train_index": [int(i) for i in chosen],
        "samples": {},
    }
    for shard, start in enumerate(range(0, len(samples), SHARD_SIZE)):
        with wds.TarWriter(str(folder / f"pool-{shard:06d}.tar"), mtime=0) as sink:
            for key, data, label, origin, kind in samples[start : start + SHARD_SIZE]:
                ext = "png" if data[:4] == b"\x89PNG" else "jpg"
                sink.write({"__key__": key, ext: data, "cls": label})
                truth["samples"][f"{key}.{ext}"] = {"class": label, "copy_of": origin, "kind": kind}
    atomic_write_json(truth_path, truth)
    return folder


def entropy_gap_closed(pool_labels, drawn_labels) -> float:
    """How much of the gap between the pool's class entropy and a uniform one (log of the number
    of classes) a draw closes: 0 = as skewed as the pool, 1 = every class equally often."""

    def entropy(labels) -> float:
        counts = np.array(list(class_histogram(labels).values()), np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    pool = entropy(pool_labels)
    return (entropy(drawn_labels) - pool) / (np.log(len(CLASSES)) - pool)


def class_histogram(labels) -> dict[str, int]:
    """{class: count} over CLASSES (zeros included), in CLASSES order."""
    labels = list(labels)
    return {c: int(sum(1 for v in labels if v == c)) for c in CLASSES}


__all__ = ["prepare_longtail_pool", "class_shares", "class_histogram", "entropy_gap_closed", "DECAY"]
