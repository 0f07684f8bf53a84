"""Shard writing throughput: lvd's writer vs a raw sequential copy vs webdataset.ShardWriter.

The same image files (random-noise JPEGs of about 150 kB, so the bytes do not compress or
cache in odd ways) go through three writers in one process, each timed from reading the
sources to having its output on disk (`os.sync()` inside the timing for all three):
- raw copy: read every file and append its bytes to one output file;
- webdataset.ShardWriter: one sample per file ({jpg, json}), shards of `--per-shard` samples;
- lvd: `curate.shard_writer.write_shard`, the same samples and shard size, with sha1
  checking of every source file and fixed tar headers, as `lvd shards` runs it.

Usage: python benchmarks/shards.py [--files 800] [--per-shard 200] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from lvd.curate.shard_writer import ShardSpec, write_shard


def make_files(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    base = [Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)) for _ in range(8)]
    paths = []
    for i in range(count):
        path = folder / f"img-{i:05d}.jpg"
        base[i % 8].save(path, "JPEG", quality=85 + i % 10)
        paths.append(path)
    return paths


def raw_copy(paths, out: Path) -> int:
    total = 0
    with open(out / "raw.bin", "wb") as f:
        for p in paths:
            with open(p, "rb") as src:
                data = src.read()
            f.write(data)
            total += len(data)
    return total


def wds_writer(paths, out: Path, per_shard: int) -> int:
    import webdataset as wds

    total = 0
    with wds.ShardWriter(str(out / "wds-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, p in enumerate(paths):
            data = p.read_bytes()
            sink.write({"__key__": f"{i:019d}", "jpg": data, "json": json.dumps({"id": i, "source": str(p)}).encode()})
            total += len(data)
    return total


def lvd_writer(paths, out: Path, per_shard: int, sha1s: list[str]) -> int:
    for n, start in enumerate(range(0, len(paths), per_shard)):
        chunk = paths[start : start + per_shard]
        idx = range(start, start + len(chunk))
        spec = ShardSpec(
            path=str(out / f"lvd-{n:06d}.tar"),
            keys=[f"{i:019d}" for i in idx],
            ids=list(idx),
            kinds=["folder"] * len(chunk),
            sources=[str(p.parent) for p in chunk],
            source_keys=[p.name for p in chunk],
            sha1s=[sha1s[i] for i in idx],
            exts=["jpg"] * len(chunk),
            jsons=[json.dumps({"id": i, "source": str(paths[i])}).encode() for i in idx],
            classes=[None] * len(chunk),
            mtime=0,
            resize=None,
            quality=90,
        )
        write_shard(spec)
    return sum(p.stat().st_size for p in paths)


def timed(fn, out: Path) -> tuple[float, int]:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    start = time.perf_counter()
    nbytes = fn(out)
    os.sync()
    return time.perf_counter() - start, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=800)
    parser.add_argument("--per-shard", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        paths = make_files(tmp / "src", args.files)
        sha1s = [hashlib.sha1(p.read_bytes()).hexdigest() for p in paths]
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{len(paths)} files, {mb:.1f} MB")
        writers = {
            "raw sequential copy": lambda out: raw_copy(paths, out),
            "webdataset.ShardWriter": lambda out: wds_writer(paths, out, args.per_shard),
            "lvd shard writer": lambda out: lvd_writer(paths, out, args.per_shard, sha1s),
        }
        times = {name: [] for name in writers}
        for _ in range(args.repeat):  # interleaved, so page-cache state is alike for all three
            for name, fn in writers.items():
                seconds, _ = timed(fn, tmp / "out")
                times[name].append(seconds)
        raw = mb / statistics.median(times["raw sequential copy"])
        for name in writers:
            rate = mb / statistics.median(times[name])
            print(f"{name:24s} {rate:8.1f} MB/s   {rate / raw:6.1%} of raw")


if __name__ == "__main__":
    main()
