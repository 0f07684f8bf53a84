"""Offline demo data: a Fashion-MNIST pool with planted duplicates, seed classes and an eval set.

The planted truth (which pool files are augmented copies of which pool or eval image, and
every pool image's class) is written beside the images, so the demo can measure curation
quality instead of asserting it.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from lvd.common.atomic import atomic_write_json
from lvd.common.errors import MissingInputError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
# Seed classes of the demo: easy to tell apart, so retrieval precision is meaningful.
SEED_CLASSES = ("trouser", "sandal", "bag")


class MissingDataError(MissingInputError):
    """The Fashion-MNIST files are not installed."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (gzip or plain) as a numpy array: images N×28×28 or labels N."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    if (magic >> 8) != 0x08:  # unsigned byte data
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    return np.frombuffer(data, np.uint8, count=int(np.prod(shape)), offset=offset).reshape(shape)


def load_fashion_mnist(root: str | os.PathLike = FASHION_MNIST_DIR) -> dict[str, np.ndarray]:
    root = Path(root)
    names = {
        "train_x": "train-images-idx3-ubyte",
        "train_y": "train-labels-idx1-ubyte",
        "test_x": "t10k-images-idx3-ubyte",
        "test_y": "t10k-labels-idx1-ubyte",
    }
    out = {}
    for key, stem in names.items():
        candidates = [root / f"{stem}.gz", root / stem]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise MissingDataError(
                f"Fashion-MNIST not found in {root} (looked for {stem}[.gz]). On Debian/Ubuntu: "
                "`apt-get install dataset-fashion-mnist`, or pass --fmnist DIR with the four IDX files."
            )
        out[key] = read_idx(path)
    return out


def augment_copy(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A near-duplicate as a web crawl produces them: re-toned and re-encoded.

    No cropping or rescaling: on 28 px Fashion-MNIST items either moves or blurs the object
    more than two garments of one class differ, so no image embedding could tell such a copy
    from a look-alike. Measured with the demo ViT at 112 px: copies cropped to 80-95 % had
    median cosine 0.93 to their original, copies rescaled to 60-90 % and back 0.945, while
    distinct images' nearest neighbours had 0.96; re-toned, re-encoded copies have 0.993.
    """
    out = ImageEnhance.Brightness(img).enhance(rng.uniform(0.9, 1.1))
    out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.9, 1.1))
    buf = io.BytesIO()
    out.convert("RGB").save(buf, "JPEG", quality=int(rng.integers(70, 95)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("L")


def _save_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _write_pool(fm: dict, pool_idx: np.ndarray, n_dups: int, rng, pool: Path, truth: dict) -> None:
    """The pool's train images, and `n_dups` re-toned, re-encoded copies of some of them."""
    for i in pool_idx:
        name = f"train-{i:05d}.png"
        _save_png(fm["train_x"][i], pool / name)
        truth["pool"][name] = CLASSES[fm["train_y"][i]]
    for j, i in enumerate(rng.choice(pool_idx, size=n_dups, replace=False)):
        name = f"neardup-{j:05d}-of-train-{i:05d}.png"
        augment_copy(Image.fromarray(fm["train_x"][i]), rng).save(pool / name)
        truth["pool"][name] = CLASSES[fm["train_y"][i]]
        truth["near_dup_of"][name] = f"train-{i:05d}.png"


def _write_eval(fm: dict, test_idx: np.ndarray, copies: int, rng, data_dir: Path, truth: dict) -> None:
    """The eval set's test images by class, and copies of `copies` of them planted in the pool."""
    for i in test_idx:
        label = CLASSES[fm["test_y"][i]]
        _save_png(fm["test_x"][i], data_dir / "eval" / "fmnist_test" / label / f"test-{i:05d}.png")
    for j, i in enumerate(rng.choice(test_idx, size=min(copies, len(test_idx)), replace=False)):
        name = f"evalcopy-{j:05d}-of-test-{i:05d}.png"
        augment_copy(Image.fromarray(fm["test_x"][i]), rng).save(data_dir / "pool" / name)
        label = CLASSES[fm["test_y"][i]]
        truth["pool"][name] = label
        truth["eval_copy_of"][name] = f"{label}/test-{i:05d}.png"


def prepare_demo_data(
    out: str | os.PathLike,
    pool_size: int = 4000,
    eval_size: int = 500,
    seeds_per_class: int = 40,
    near_dup_fraction: float = 0.05,
    eval_copy_count: int = 50,
    seed: int = 0,
    fmnist_root: str | os.PathLike = FASHION_MNIST_DIR,
) -> Path:
    """Write DATA/{pool,seeds/fashion/CLASS,eval/fmnist_test/CLASS} and DATA/truth.json."""
    data_dir = Path(out) / "data"
    truth_path = data_dir / "truth.json"
    params = dict(
        augment="retone-reencode",
        pool_size=pool_size,
        eval_size=eval_size,
        seeds_per_class=seeds_per_class,
        near_dup_fraction=near_dup_fraction,
        eval_copy_count=eval_copy_count,
        seed=seed,
    )
    if truth_path.is_file() and json.loads(truth_path.read_text()).get("params") == params:
        return data_dir
    fm = load_fashion_mnist(fmnist_root)
    rng = np.random.default_rng(seed)
    train_order = rng.permutation(len(fm["train_y"]))
    pool_idx = train_order[:pool_size]
    rest = train_order[pool_size:]
    test_idx = rng.permutation(len(fm["test_y"]))[:eval_size]

    truth = {
        "params": params,
        "classes": list(CLASSES),
        "seed_classes": list(SEED_CLASSES),
        "pool": {},
        "near_dup_of": {},
        "eval_copy_of": {},
    }
    _write_pool(fm, pool_idx, int(round(near_dup_fraction * pool_size)), rng, data_dir / "pool", truth)
    _write_eval(fm, test_idx, eval_copy_count, rng, data_dir, truth)
    for cls in SEED_CLASSES:
        members = [i for i in rest if CLASSES[fm["train_y"][i]] == cls][:seeds_per_class]
        for i in members:
            _save_png(fm["train_x"][i], data_dir / "seeds" / "fashion" / cls / f"train-{i:05d}.png")
    atomic_write_json(truth_path, truth)
    return data_dir
