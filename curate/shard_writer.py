"""Writes one WebDataset tar: fetches the samples' bytes, checks them, stores them.

Kept apart from the stage so that writer processes import only the standard library,
Pillow and lvd's source readers. A tar is written to a temporary name and moved into place,
so a killed writer never leaves a tar that looks finished; members carry fixed times, owners
and modes, so the same samples always give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass

from curate import sources as src


@dataclass(frozen=True)
class ShardSpec:
    """Everything one writer process needs."""

    path: str
    keys: list  # sample keys (__key__), in the order they go into the tar
    ids: list
    kinds: list
    sources: list
    source_keys: list
    sha1s: list
    exts: list  # image member extension per sample
    jsons: list  # provenance JSON bytes per sample
    classes: list  # class index per sample, or None
    mtime: int
    resize: int | None
    quality: int


def reencode(data: bytes, shorter_side: int, quality: int) -> bytes:
    """An upright RGB JPEG whose shorter side is at most `shorter_side`."""
    from pretrain.data.decode import decode, resize_shorter

    img = decode(data)
    if min(img.size) > shorter_side:
        img = resize_shorter(img, shorter_side)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _fetch(spec: ShardSpec) -> dict[int, bytes]:
    """Bytes of every sample, read in source order (each source tar opened once) and checked."""
    order = sorted(range(len(spec.ids)), key=lambda i: (spec.kinds[i], spec.sources[i], spec.source_keys[i]))
    rows = {
        "id": [spec.ids[i] for i in order],
        "kind": [spec.kinds[i] for i in order],
        "source": [spec.sources[i] for i in order],
        "key": [spec.source_keys[i] for i in order],
    }
    expected = dict(zip(spec.ids, spec.sha1s))
    out = {}
    for id_, data in src.iter_bytes(rows):
        if hashlib.sha1(data).hexdigest() != expected[id_]:
            raise RuntimeError(f"image {id_} changed since the manifest was made (sha1 differs); rerun `lvd manifest`")
        out[id_] = data
    return out


def _member(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_shard(spec: ShardSpec) -> tuple[str, int, int]:
    """Write the tar; returns (path, samples, bytes)."""
    payload = _fetch(spec)
    tmp = f"{os.path.dirname(spec.path)}/.{os.path.basename(spec.path)}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for i, key in enumerate(spec.keys):
                image = payload[spec.ids[i]]
                ext = spec.exts[i]
                if spec.resize:
                    image, ext = reencode(image, spec.resize, spec.quality), "jpg"
                members = [(f"{key}.{ext}", image), (f"{key}.json", spec.jsons[i])]
                if spec.classes[i] is not None:
                    members.append((f"{key}.cls", str(spec.classes[i]).encode()))
                for name, data in members:
                    tar.addfile(_member(name, len(data), spec.mtime), io.BytesIO(data))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, spec.path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return spec.path, len(spec.keys), os.path.getsize(spec.path)
