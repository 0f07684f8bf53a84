"""Label-free WebDataset input: an infinite, resampled, resumable stream of uint8 images.

reader (webdataset tar iteration) -> mapper (decode to a fixed square) -> batches.

Each rank runs `num_workers` *logical streams* (one per DataLoader worker, or one in-process).
A stream is a sequence of *cycles*; cycle c of stream s on rank r draws `shards_per_cycle`
shards with replacement from a generator seeded by (seed, r, s, c), interleaves their samples
at random and passes them through a shuffle buffer. A cycle depends on its seed alone, so a
stream's position is the pair (cycle, samples emitted in that cycle): resuming replays only
the unfinished cycle, skipping its first samples without decoding them.

Every batch carries the logical stream it came from and that stream's position after it; the
trainer keeps the positions of consumed batches and saves them in checkpoints. DataLoader
workers are served round-robin, so on resume physical worker w takes over logical stream
(w + batches_consumed) % num_workers, and batches arrive in the uninterrupted run's order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from itertools import count

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from lvd.common import media
from lvd.common.media import IMAGE_EXTENSIONS
from lvd.pretrain.data.decode import DecodeError, load_resized

log = logging.getLogger(__name__)


def expand_shards(spec: str | list[str]) -> list[str]:
    """Brace patterns and (for local paths) globs -> sorted, de-duplicated shard list."""
    return media.expand_shards(spec, sort=True)


def image_field(sample: dict) -> bytes | None:
    """The bytes of the sample's image file, whatever its extension (first in sorted order)."""
    for key in sorted(k for k in sample if not k.startswith("__")):
        if key.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
            return sample[key]
    return None


def _tar_samples(url: str) -> Iterator[dict]:
    return wds.tariterators.group_by_keys(
        wds.tariterators.tar_file_expander(wds.tariterators.url_opener([{"url": url}]))
    )


def cycle_samples(
    shards: list[str], rng: np.random.Generator, shards_per_cycle: int, shuffle_buffer: int
) -> Iterator[dict]:
    """One cycle: resampled shards, randomly interleaved, then buffer-shuffled (all from `rng`)."""
    picks = rng.integers(0, len(shards), size=shards_per_cycle)
    active = [_tar_samples(shards[i]) for i in picks]
    buffer: list[dict] = []
    while active:
        i = int(rng.integers(len(active)))
        try:
            buffer.append(next(active[i]))
        except StopIteration:
            active.pop(i)
            continue
        if len(buffer) >= shuffle_buffer:
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


class ShardStream(IterableDataset):
    """Infinite batches {"images": uint8 B x 3 x S x S, "stream": int, "position": (cycle, offset)}."""

    def __init__(
        self,
        shards: list[str],
        image_size: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        num_streams: int = 1,
        positions: list[tuple[int, int]] | None = None,
        batches_consumed: int = 0,
        shards_per_cycle: int = 4,
        shuffle_buffer: int = 1000,
        max_pixels: int | None = 100_000_000,
    ):
        self.shards = list(shards)
        self.image_size, self.batch_size = image_size, batch_size
        self.seed, self.rank, self.num_streams = seed, rank, max(1, num_streams)
        self.positions = [tuple(p) for p in positions] if positions else [(0, 0)] * self.num_streams
        if len(self.positions) != self.num_streams:
            raise ValueError(
                f"resume state has {len(self.positions)} streams, the loader {self.num_streams}: "
                "keep data.num_workers unchanged when resuming"
            )
        self.batches_consumed = batches_consumed
        self.shards_per_cycle, self.shuffle_buffer, self.max_pixels = shards_per_cycle, shuffle_buffer, max_pixels

    def samples(self, stream: int, start: tuple[int, int]) -> Iterator[tuple[torch.Tensor, tuple[int, int]]]:
        """Decoded images of one logical stream from `start` on, each with the position after it."""
        first_cycle, skip = start
        for c in count(first_cycle):
            rng = np.random.default_rng([self.seed, self.rank, stream, c])
            offset = 0
            for sample in cycle_samples(self.shards, rng, self.shards_per_cycle, self.shuffle_buffer):
                offset += 1
                if c == first_cycle and offset <= skip:
                    continue
                data = image_field(sample)
                if data is None:
                    log.warning(
                        "sample %s of %s has no image file; skipped", sample.get("__key__"), sample.get("__url__")
                    )
                    continue
                try:
                    img = load_resized(data, self.image_size, crop=True, max_pixels=self.max_pixels)
                except DecodeError as exc:
                    log.warning("cannot decode %s of %s: %s", sample.get("__key__"), sample.get("__url__"), exc)
                    continue
                arr = np.asarray(img, dtype=np.uint8)
                yield torch.from_numpy(arr.copy()).permute(2, 0, 1), (c, offset)

    def __iter__(self):
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if n_workers != self.num_streams:
            raise ValueError(f"ShardStream built for {self.num_streams} streams runs in {n_workers} workers")
        stream = (worker + self.batches_consumed) % self.num_streams
        images: list[torch.Tensor] = []
        for img, pos in self.samples(stream, self.positions[stream]):
            images.append(img)
            if len(images) == self.batch_size:
                yield {"images": torch.stack(images), "stream": stream, "position": pos}
                images = []
