"""Where images come from: folders, WebDataset tar shards and parquet/CSV path lists.

A source spec is a string. `classify` tells its kind; `list_folder`, `list_paths` and
`expand_shards` enumerate what it holds (files are listed, not read); `iter_tar_members`
streams a shard with `webdataset`; `iter_bytes` reads the bytes of manifest rows back for the
later stages. Every listing is sorted so that reruns see the same order.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from lvd.common import media
from lvd.common.errors import InputFormatError
from lvd.common.media import IMAGE_EXTENSIONS, LABEL_EXTENSIONS

FOLDER, TAR, LIST = "folder", "tar", "list"
log = logging.getLogger(__name__)

DEFAULT_EXTENSIONS = IMAGE_EXTENSIONS
# Members of a WebDataset sample that carry its class label.


class SourceError(InputFormatError):
    """A source spec that does not name anything lvd can read."""


@dataclass(frozen=True)
class Member:
    """One file inside a tar shard, as streamed by webdataset."""

    name: str
    data: bytes | None  # None when the member is not an image (label members are read)
    sample_key: str


def classify(spec: str) -> str:
    """folder, tar or list, from the spec's form (and the file system for folders)."""
    lowered = spec.lower()
    if lowered.endswith((".parquet", ".csv")):
        return LIST
    if re.search(r"\.tar(\.gz|\.bz2|\.xz)?(\}|$)", lowered) or lowered.startswith(
        ("pipe:", "http://", "https://", "s3://", "gs://")
    ):
        return TAR
    if os.path.isdir(spec):
        return FOLDER
    raise SourceError(
        f"source not found or of unknown kind: {spec!r} (expected a folder, .tar shards, or a .parquet/.csv list)"
    )


def _ext_ok(name: str, extensions: Iterable[str]) -> bool:
    return name.rsplit(".", 1)[-1].lower() in extensions if "." in name else False


def list_folder(root: str, extensions: Iterable[str] = DEFAULT_EXTENSIONS, follow_symlinks: bool = False) -> list[str]:
    """Relative posix paths of the image files under `root`, sorted.

    With `follow_symlinks`, linked folders are walked only when they resolve inside `root` and
    were not walked before: a link loop or a link to `/` would otherwise list files again and
    again, or the whole filesystem. Skipped links are logged.
    """
    extensions = {e.lower().lstrip(".") for e in extensions}
    top = os.path.realpath(root)
    seen = {top}
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks):
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            full = os.path.join(dirpath, d)
            if follow_symlinks:
                real = os.path.realpath(full)
                inside = real == top or real.startswith(top + os.sep)
                if real in seen or not inside:
                    if os.path.islink(full):
                        why = "it points outside the source folder" if not inside else "that folder is walked already"
                        log.warning("not following the folder link %s -> %s: %s", full, real, why)
                    continue
                seen.add(real)
            keep.append(d)
        dirnames[:] = keep
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.startswith(".") or not _ext_ok(name, extensions):
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def class_label(rel_path: str, class_layout: bool) -> str | None:
    """The class of a file in a folder of class sub-folders (first path component)."""
    if not class_layout or "/" not in rel_path:
        return None
    return rel_path.split("/", 1)[0]


def has_class_layout(root: str) -> bool:
    """A folder is a class layout when it holds sub-folders and no image files of its own."""
    entries = [e for e in os.scandir(root) if not e.name.startswith(".")]
    return (
        bool(entries)
        and any(e.is_dir() for e in entries)
        and not any(e.is_file() and _ext_ok(e.name, DEFAULT_EXTENSIONS) for e in entries)
    )


def list_paths(list_file: str) -> list[str]:
    """The `path` column of a parquet or CSV list, in the file's order."""
    import pandas as pd  # imported here: decoding workers import this module and need no pandas

    if list_file.lower().endswith(".parquet"):
        frame = pd.read_parquet(list_file)
    else:
        frame = pd.read_csv(list_file)
    if "path" not in frame.columns:
        raise SourceError(f"{list_file}: a path list needs a column named 'path' (has {list(frame.columns)})")
    return [str(p) for p in frame["path"].tolist()]


def resolve_listed_path(list_file: str, path: str) -> str:
    """Listed paths are absolute, or relative to the list file's folder."""
    return path if os.path.isabs(path) else os.path.join(os.path.dirname(os.path.abspath(list_file)), path)


def expand_shards(spec: str) -> list[str]:
    """Brace patterns and (for local paths) globs, expanded to the list of shard URLs."""
    try:
        return media.expand_shards(spec)
    except FileNotFoundError as exc:
        raise SourceError(str(exc)) from None


def _sample_key(name: str) -> str:
    """WebDataset's convention: the key is the member path up to the first dot of its basename."""
    from webdataset.tariterators import base_plus_ext

    prefix, _ = base_plus_ext(name)
    return prefix if prefix is not None else name


def iter_tar_members(url: str, extensions: Iterable[str] = DEFAULT_EXTENSIONS) -> Iterator[Member]:
    """Stream a shard with webdataset: image members with their bytes, label members too.

    Members of other kinds are yielded with `data=None` so that a sample without any image can
    still be accounted for. Errors of the tar itself propagate to the caller.
    """
    from webdataset.tariterators import tar_file_expander, url_opener

    extensions = {e.lower() for e in extensions}
    wanted = extensions | set(LABEL_EXTENSIONS)

    def reraise(exc: Exception) -> bool:
        raise exc

    stream = tar_file_expander(url_opener([{"url": url}], handler=reraise), handler=reraise)
    for record in stream:
        name = record.get("fname")
        if name is None:  # webdataset's end-of-shard marker
            continue
        ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        yield Member(name=name, data=record["data"] if ext in wanted else None, sample_key=_sample_key(name))


def tar_link_members(path: str) -> list[tuple[str, str]]:
    """(name, target) of the symbolic and hard link members of a local tar.

    WebDataset reads regular files only and passes links over without a word; the manifest
    lists them as quarantined rows so that nothing in a shard goes unaccounted for.
    """
    with tarfile.open(path, "r:*") as tar:
        return [(m.name, m.linkname) for m in tar if m.issym() or m.islnk()]


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def tar_has_end_marker(path: str) -> bool:
    """A whole tar ends in zero blocks; a shard cut at a member boundary does not.

    Python's tarfile ends quietly when a file stops exactly between members, so a truncated
    shard would otherwise pass for a shorter one.
    """
    size = os.path.getsize(path)
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == bytes(1024)


def read_file_bytes(path: str, max_bytes: int | None = None) -> bytes:
    """Bytes of a local file; files over `max_bytes` raise instead of being read whole."""
    if max_bytes is not None:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise OSError(f"file of {size} bytes exceeds the limit of {max_bytes}")
    with open(path, "rb") as f:
        return f.read()


def row_path(kind: str, source: str, key: str) -> str:
    """Local path of a folder or list row."""
    if kind == FOLDER:
        return os.path.join(source, key)
    if kind == LIST:
        return resolve_listed_path(source, key)
    raise ValueError(f"rows of kind {kind!r} have no path of their own")


def _iter_tar_rows(source: str, keys: list[str]) -> Iterator[bytes]:
    """Bytes of the named members of one shard, in the order asked for."""
    if "://" not in source and not source.startswith("pipe:") and os.path.isfile(source):
        with tarfile.open(source, "r:*") as tar:
            for key in keys:
                handle = tar.extractfile(tar.getmember(key))
                if handle is None:
                    raise KeyError(f"{source}: member {key!r} is not a file")
                yield handle.read()
        return
    wanted = set(keys)
    found: dict[str, bytes] = {}
    for member in iter_tar_members(source, extensions=[k.rsplit(".", 1)[-1].lower() for k in wanted]):
        if member.name in wanted and member.data is not None:
            found[member.name] = member.data
    for key in keys:
        yield found[key]


def iter_bytes(rows) -> Iterator[tuple[int, bytes]]:
    """(id, bytes) for each manifest row, in the frame's order; each shard is opened once per run of rows.

    `rows` is a DataFrame or any mapping of equal-length sequences (kind, source, key, id).
    """
    kinds, sources, keys, ids = (list(rows[c]) for c in ("kind", "source", "key", "id"))
    i = 0
    while i < len(ids):
        if kinds[i] != TAR:
            yield int(ids[i]), read_file_bytes(row_path(kinds[i], sources[i], keys[i]))
            i += 1
            continue
        j = i
        while j < len(ids) and kinds[j] == TAR and sources[j] == sources[i]:
            j += 1
        for offset, data in enumerate(_iter_tar_rows(sources[i], keys[i:j])):
            yield int(ids[i + offset]), data
        i = j


def read_row_bytes(kind: str, source: str, key: str) -> bytes:
    """Bytes of a single manifest row (random access; local tars only for speed)."""
    if kind == TAR:
        return next(_iter_tar_rows(source, [key]))
    return read_file_bytes(row_path(kind, source, key))


__all__ = [
    "FOLDER",
    "TAR",
    "LIST",
    "DEFAULT_EXTENSIONS",
    "SourceError",
    "Member",
    "classify",
    "list_folder",
    "has_class_layout",
    "class_label",
    "list_paths",
    "resolve_listed_path",
    "expand_shards",
    "iter_tar_members",
    "read_file_bytes",
    "row_path",
    "iter_bytes",
    "read_row_bytes",
]
