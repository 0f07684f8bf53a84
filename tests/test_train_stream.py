"""The WebDataset input stream: any image extension, infinite resampling, exact resume."""

from __future__ import annotations

import io

import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from lvd.pretrain.train.stream import ShardStream, expand_shards, image_field

FORMATS = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("JPEG", "JPEG"), ("bmp", "BMP")]


def _image_bytes(value: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (value, value, value)).save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def write_shards(folder, n_shards=2, per_shard=6):
    """Shards whose sample i has a grey level that identifies it (value = 10 + 3 * global index)."""
    values = []
    for s in range(n_shards):
        with wds.TarWriter(str(folder / f"train-{s:06d}.tar")) as w:
            for i in range(per_shard):
                g = s * per_shard + i
                ext, fmt = FORMATS[g % len(FORMATS)]
                w.write({"__key__": f"{g:06d}", ext: _image_bytes(10 + 3 * g, fmt), "json": b"{}"})
                values.append(10 + 3 * g)
            w.write({"__key__": "broken", "png": b"not an image"})
            w.write({"__key__": "textonly", "txt": b"no image here"})
    return values


def _value(img: torch.Tensor) -> int:
    return int(round(img.float().mean().item()))


def test_image_field_takes_any_image_extension():
    assert image_field({"__key__": "a", "json": b"1", "WebP": b"x"}) == b"x"
    assert image_field({"__key__": "a", "json": b"1", "cls": b"3"}) is None
    assert image_field({"__key__": "a", "v2.tiff": b"t"}) == b"t"


def test_expand_shards_brace_and_glob(tmp_path):
    write_shards(tmp_path, n_shards=3, per_shard=1)
    brace = expand_shards(str(tmp_path / "train-{000000..000002}.tar"))
    assert brace == expand_shards(str(tmp_path / "*.tar")) == sorted(str(p) for p in tmp_path.glob("*.tar"))
    with pytest.raises(FileNotFoundError):
        expand_shards(str(tmp_path / "nothing-*.tar"))


def test_one_cycle_serves_every_decodable_image_once(tmp_path):
    values = write_shards(tmp_path, n_shards=1, per_shard=11)
    stream = ShardStream(
        expand_shards(str(tmp_path / "*.tar")), image_size=8, batch_size=1, shards_per_cycle=1, shuffle_buffer=4
    )
    got = [(_value(img), pos) for img, pos in _take(stream.samples(0, (0, 0)), 11)]
    assert sorted(v for v, _ in got) == sorted(values)  # broken and image-less samples skipped
    assert all(pos[0] == 0 for _, pos in got)
    assert [v for v, _ in got] != sorted(values)  # shuffled
    nxt = _take(stream.samples(0, (0, 0)), 12)[-1]
    assert nxt[1][0] == 1  # the stream goes on into the next cycle


def _take(it, n):
    out = []
    for x in it:
        out.append(x)
        if len(out) == n:
            break
    return out


def _batches(loader, n):
    return _take(iter(loader), n)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reproduces_the_stream(tmp_path, workers):
    write_shards(tmp_path, n_shards=3, per_shard=5)
    shards = expand_shards(str(tmp_path / "*.tar"))
    streams = max(1, workers)
    kw = dict(image_size=8, batch_size=3, seed=7, num_streams=streams, shards_per_cycle=2, shuffle_buffer=3)
    loader = lambda ds: DataLoader(ds, batch_size=None, num_workers=workers)  # noqa: E731
    full = _batches(loader(ShardStream(shards, **kw)), 9)
    k = 5
    positions = [(0, 0)] * streams
    for b in full[:k]:
        positions[b["stream"]] = tuple(int(x) for x in b["position"])
    resumed = _batches(loader(ShardStream(shards, positions=positions, batches_consumed=k, **kw)), 9 - k)
    for a, b in zip(full[k:], resumed):
        assert a["stream"] == b["stream"]
        assert torch.equal(a["images"], b["images"])
    # and the images are the decoded grey levels we wrote
    assert {_value(img) for b in full for img in b["images"]} <= {10 + 3 * g for g in range(15)}


def test_ranks_and_seeds_get_different_streams(tmp_path):
    write_shards(tmp_path, n_shards=4, per_shard=5)
    shards = expand_shards(str(tmp_path / "*.tar"))
    seq = lambda **kw: [_value(i) for i, _ in _take(ShardStream(shards, 8, 1, **kw).samples(0, (0, 0)), 15)]  # noqa: E731
    assert seq(rank=0) == seq(rank=0)
    assert seq(rank=0) != seq(rank=1)
    assert seq(seed=1) != seq(seed=2)


def test_changed_worker_count_is_refused(tmp_path):
    write_shards(tmp_path, n_shards=1, per_shard=2)
    with pytest.raises(ValueError, match="num_workers"):
        ShardStream(expand_shards(str(tmp_path / "*.tar")), 8, 1, num_streams=2, positions=[(0, 0)])
