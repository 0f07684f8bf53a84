"""Decode + resize-to-224 throughput: lvd's loader vs a plain Pillow loop, same JPEGs, same process.

The JPEGs are the real photos shipped with scikit-image, resized to about 1.9 Mpx and
re-encoded (quality 90), as a camera or a web crawl would deliver them. lvd's loader reads the
bytes, decodes at the smallest JPEG DCT scale that still covers 224 px (draft mode), applies
EXIF orientation and mode conversion, resizes the shorter side to 224 and centre-crops. The
peer is `Image.open(path).convert("RGB").resize((224, 224))`.

Usage: python benchmarks/decode.py [--images 120] [--repeat 3] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from lvd.pretrain.data.decode import load_resized

PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "coins",
    "moon",
    "page",
    "brick",
    "grass",
    "gravel",
    "hubble_deep_field",
)
TARGET_PIXELS = 1_900_000


def make_jpegs(folder: Path, count: int) -> list[Path]:
    from skimage import data

    photos = []
    for name in PHOTOS:
        arr = getattr(data, name)()
        img = Image.fromarray(arr).convert("RGB")
        scale = (TARGET_PIXELS / (img.width * img.height)) ** 0.5
        photos.append(img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS))
    paths = []
    for i in range(count):
        path = folder / f"photo-{i:04d}.jpg"
        photos[i % len(photos)].save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def lvd_load(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        img = load_resized(f.read(), 224)
    return img.size


def pil_load(path) -> tuple[int, int]:
    img = Image.open(path).convert("RGB").resize((224, 224))
    return img.size


def rate(fn, paths, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for p in paths:
            fn(p)
        times.append(time.perf_counter() - start)
    return len(paths) / statistics.median(times)


def pool_rate(paths, workers: int, repeat: int) -> float:
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        list(pool.map(lvd_load, paths[: workers * 4]))  # warm the workers up
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            list(pool.map(lvd_load, paths, chunksize=8))
            times.append(time.perf_counter() - start)
    return len(paths) / statistics.median(times)


def check_same_picture(paths) -> float:
    """Mean absolute difference (0-255) between lvd's 224 crop and a full-size decode + same crop."""
    diffs = []
    for p in paths[:12]:
        ref = Image.open(p).convert("RGB")
        s = 224 / min(ref.size)
        ref = ref.resize((max(224, round(ref.width * s)), max(224, round(ref.height * s))), Image.Resampling.BICUBIC)
        left, top = (ref.width - 224) // 2, (ref.height - 224) // 2
        ref = np.asarray(ref.crop((left, top, left + 224, top + 224)), dtype=float)
        with open(p, "rb") as f:
            ours = np.asarray(load_resized(f.read(), 224), dtype=float)
        diffs.append(np.abs(ours - ref).mean())
    return float(np.mean(diffs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.images)
        mpx = np.mean([np.prod(Image.open(p).size) for p in paths]) / 1e6
        print(f"{len(paths)} JPEGs, mean {mpx:.2f} Mpx, {os.path.getsize(paths[0]) / 1e6:.2f} MB each (first)")
        for p in paths[:4]:
            lvd_load(p), pil_load(p)  # warm caches
        peer = rate(pil_load, paths, args.repeat)
        ours = rate(lvd_load, paths, args.repeat)
        print(f"plain PIL open/convert/resize : {peer:8.1f} img/s")
        print(f"lvd loader (1 process)        : {ours:8.1f} img/s   ratio {ours / peer:.2f}x")
        print(f"mean |lvd - full decode| on the 224 crop: {check_same_picture(paths):.2f} / 255")
        base = None
        for w in args.workers:
            r = pool_rate(paths, w, args.repeat)
            base = base or r / w
            print(
                f"lvd loader, {w} worker process(es): {r:8.1f} img/s   ratio {r / peer:.2f}x   "
                f"scaling efficiency {r / (base * w):.2f}"
            )


if __name__ == "__main__":
    main()
