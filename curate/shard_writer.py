"""Writes one WebDataset tar: fetches the samples' bytes, checks them, stores them.

Kept apart from the stage so that writer processes import only the standard library,
Pillow and lvd's source readers. A tar is written to a temporary name (`common.atomic`) and
moved into place, so a killed writer never leaves a tar that looks finished; members carry
fixed times, owners and modes, so the same samples always give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import tarfile
import threading
from dataclasses import dataclass

from lvd.common.atomic import atomic_path
from lvd.common.errors import UserError
from lvd.curate import sources as src
from lvd.curate.crops import crop_jpegs


class SourceChangedError(UserError, RuntimeError):
    """An image's bytes differ from the sha1 the manifest recorded."""


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
    crops: list | None = None  # per sample: [(crop key, pixel box, provenance JSON bytes)] (`curate.crops`)


def reencode(data: bytes, shorter_side: int, quality: int) -> bytes:
    """An upright RGB JPEG whose shorter side is at most `shorter_side`."""
    from lvd.pretrain.data.decode import decode, resize_shorter

    img = decode(data)
    if min(img.size) > shorter_side:
        img = resize_shorter(img, shorter_side)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class _Samples:
    """The samples' bytes, in the order the writer asks for them.

    Files are read when asked for. Members of tar sources are read ahead on a thread in
    source order (each source tar opened once and streamed), since the tar's order is shuffled
    relative to theirs. Measured on 800 cached 110 kB files, reading files on such a thread
    made the writer slower (0.20 s against 0.16 s): the thread and the writer hand the GIL
    back and forth on every file.
    """

    def __init__(self, spec: ShardSpec):
        self.where = {i: (k, s, key) for i, k, s, key in zip(spec.ids, spec.kinds, spec.sources, spec.source_keys)}
        streamed = sorted(
            (i for i in range(len(spec.ids)) if spec.kinds[i] == src.TAR),
            key=lambda i: (spec.sources[i], spec.source_keys[i]),
        )
        self.rows = {
            "id": [spec.ids[i] for i in streamed],
            "kind": [spec.kinds[i] for i in streamed],
            "source": [spec.sources[i] for i in streamed],
            "key": [spec.source_keys[i] for i in streamed],
        }
        self.ready: dict[int, bytes] = {}
        self.error: BaseException | None = None
        self.finished = False
        self.cond = threading.Condition()
        if streamed:
            threading.Thread(target=self._stream, name="shard-read", daemon=True).start()

    def _stream(self) -> None:
        try:
            for id_, data in src.iter_bytes(self.rows):
                with self.cond:
                    self.ready[id_] = data
                    self.cond.notify_all()
        except BaseException as exc:  # handed to the writer, which re-raises it
            with self.cond:
                self.error = exc
        finally:
            with self.cond:
                self.finished = True
                self.cond.notify_all()

    def take(self, id_: int) -> bytes:
        kind, source, key = self.where[id_]
        if kind != src.TAR:
            return src.read_row_bytes(kind, source, key)
        with self.cond:
            while id_ not in self.ready and self.error is None and not self.finished:
                self.cond.wait()
            if id_ in self.ready:
                return self.ready.pop(id_)
            raise self.error or KeyError(f"image {id_} was not read")


class _Sha1Check:
    """Checks each sample's sha1 against the manifest's on a thread, off the writer's path.

    The tar is only moved into place after `verify()`, so a finished shard never holds bytes
    that changed since the manifest; hashing (which releases the GIL) overlaps the writes.
    """

    _END = None

    def __init__(self, ids, sha1s):
        self.expected = dict(zip(ids, sha1s))
        self.todo: queue.SimpleQueue = queue.SimpleQueue()
        self.changed: list[int] = []
        self.thread = threading.Thread(target=self._run, name="shard-sha1", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.todo.get()) is not self._END:
            id_, data = item
            if hashlib.sha1(data).hexdigest() != self.expected[id_]:
                self.changed.append(id_)

    def submit(self, id_: int, data: bytes) -> None:
        self.todo.put((id_, data))

    def verify(self) -> None:
        self.todo.put(self._END)
        self.thread.join()
        if self.changed:
            raise SourceChangedError(
                f"image {self.changed[0]} changed since the manifest was made (sha1 differs; "
                f"{len(self.changed)} in this shard); rerun `lvd manifest`"
            )


def _octal12(value: int) -> bytes:
    """A 12-byte ustar number field: 11 zero-padded octal digits and a NUL."""
    if not 0 <= value < 8**11:
        raise ValueError(f"{value} does not fit a 12-byte ustar field")
    return b"%011o\0" % value


_MODE_OWNER = b"0000444\0" + b"0000000\0" * 2  # mode 0444, uid 0, gid 0
_TAIL = b"0" + bytes(100) + b"ustar\x0000" + bytes(32 + 32 + 16 + 155)  # regular file, no link, no owner names
_FIXED_SUM = sum(_MODE_OWNER) + 8 * 32 + sum(_TAIL)  # the checksum field counts as 8 spaces
_PAD = bytes(tarfile.BLOCKSIZE - 100 - len(_MODE_OWNER) - 12 - 12 - 8 - len(_TAIL))


def ustar_header(name: str, size: int, mtime: int) -> bytes:
    """The 512-byte ustar header of a regular file owned by 0:0 with mode 0444.

    Written here rather than with `tarfile.TarInfo.tobuf`, which spends about 40 µs a member
    (a fifth of the writer's time on 100 kB images); only the name, size and time vary, so the
    rest and its checksum are constants. Tests check it is byte-identical to tarfile's own.
    """
    encoded = name.encode("utf-8")
    if len(encoded) > 100:
        raise ValueError(f"member name longer than 100 bytes: {name!r}")
    size_field, time_field = _octal12(size), _octal12(mtime)
    checksum = _FIXED_SUM + sum(encoded) + sum(size_field) + sum(time_field)
    return b"".join(
        (encoded.ljust(100, b"\0"), _MODE_OWNER, size_field, time_field, b"%06o\0 " % checksum, _TAIL, _PAD)
    )


def write_shard(spec: ShardSpec) -> tuple[str, int, int]:
    """Write the tar; returns (path, samples, bytes).

    Members go straight to the file (header, data, zero padding to 512 bytes) instead of
    through `TarFile.addfile`, which copies every payload again in 16 kB chunks; the result is
    the same ustar archive, ending in two zero blocks padded to a 10 kB record like GNU tar.
    """
    payload, check = _Samples(spec), _Sha1Check(spec.ids, spec.sha1s)
    written = 0
    try:
        with atomic_path(spec.path) as tmp, open(tmp, "wb", buffering=1 << 20) as f:
            for i, key in enumerate(spec.keys):
                image = original = payload.take(spec.ids[i])
                check.submit(spec.ids[i], image)
                ext = spec.exts[i]
                if spec.resize:
                    image, ext = reencode(image, spec.resize, spec.quality), "jpg"
                members = [(f"{key}.{ext}", image), (f"{key}.json", spec.jsons[i])]
                if spec.classes[i] is not None:
                    members.append((f"{key}.cls", str(spec.classes[i]).encode()))
                crops = spec.crops[i] if spec.crops else []
                if crops:  # object crops follow their image, each a sample of its own
                    jpegs = crop_jpegs(original, [box for _, box, _ in crops], spec.quality)
                    for (crop_key, _, meta), jpeg in zip(crops, jpegs):
                        members += [(f"{crop_key}.jpg", jpeg), (f"{crop_key}.json", meta)]
                for name, data in members:
                    pad = -len(data) % tarfile.BLOCKSIZE
                    f.write(ustar_header(name, len(data), spec.mtime))
                    f.write(data)
                    f.write(bytes(pad))
                    written += tarfile.BLOCKSIZE + len(data) + pad
            end = 2 * tarfile.BLOCKSIZE
            end += -(written + end) % tarfile.RECORDSIZE
            f.write(bytes(end))
            f.flush()
            check.verify()
            os.fdatasync(f.fileno())  # the data (and size) on disk before the rename
    finally:
        if check.thread.is_alive():  # an error on the way: stop the checker too
            check.todo.put(check._END)
    return spec.path, len(spec.keys), os.path.getsize(spec.path)
