"""Where images come from: folders, WebDataset tar shards and parquet/CSV path lists.

A source spec is a string. `classify` tells its kind; `list_folder`, `read_path_list` and
`expand_shards` enumerate what it holds (files are listed, not read). Streaming a shard
(`iter_tar_members`) and reading a manifest row's bytes back (`iter_bytes`, `read_row_bytes`)
live in `lvd.common.row_bytes`, shared with the lookup service, and are imported here. Every
listing is sorted so that reruns see the same order.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Iterable

from lvd.common import media
from lvd.common.errors import InputFormatError
from lvd.common.media import IMAGE_EXTENSIONS, LABEL_EXTENSIONS  # noqa: F401 (read through this module)
from lvd.common.row_bytes import (  # noqa: F401 (a manifest row's bytes: read where the service reads them too)
    FOLDER,
    LIST,
    TAR,
    Member,
    is_local,
    iter_bytes,
    iter_tar_members,
    kind_of,
    read_file_bytes,
    read_row_bytes,
    resolve_listed_path,
    row_path,
)

log = logging.getLogger(__name__)

DEFAULT_EXTENSIONS = IMAGE_EXTENSIONS


class SourceError(InputFormatError):
    """A source spec that does not name anything lvd can read."""


def classify(spec: str) -> str:
    """folder, tar or list, from the spec's form (and the file system for folders)."""
    kind = kind_of(spec)
    if kind is not None:
        return kind
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


def read_path_list(list_file: str) -> tuple[list[str], list[str | None]]:
    """The paths (the `path` column) of a parquet or CSV list, each once in the file's order,
    and their labels (a `label` column, else None)."""
    import pandas as pd  # imported here: decoding workers import this module and need no pandas

    try:
        frame = pd.read_parquet(list_file) if list_file.lower().endswith(".parquet") else pd.read_csv(list_file)
    except FileNotFoundError:
        raise SourceError(f"path list not found: {list_file}") from None
    except Exception as exc:  # pyarrow's and pandas' parse errors alike
        raise SourceError(f"{list_file} is not a readable parquet or CSV path list ({exc})") from None
    if "path" not in frame.columns:
        raise SourceError(f"{list_file}: a path list needs a column named 'path' (has {list(frame.columns)})")
    labels = frame["label"].astype("string") if "label" in frame.columns else pd.Series([None] * len(frame))
    paths, out_labels, seen = [], [], set()
    for path, label in zip(frame["path"].astype(str), labels):
        if path in seen:  # the same file listed twice is one input
            log.warning("%s lists %s more than once; it is kept once", list_file, path)
            continue
        seen.add(path)
        paths.append(path)
        out_labels.append(None if pd.isna(label) else str(label))
    return paths, out_labels


def expand_shards(spec: str) -> list[str]:
    """Brace patterns and (for local paths) globs, expanded to the list of shard URLs."""
    try:
        return media.expand_shards(spec)
    except FileNotFoundError as exc:
        raise SourceError(str(exc)) from None


def tar_link_members(path: str) -> list[tuple[str, str]]:
    """(name, target) of the symbolic and hard link members of a local tar.

    WebDataset reads regular files only and passes links over without a word; the manifest
    lists them as quarantined rows so that nothing in a shard goes unaccounted for.
    """
    with tarfile.open(path, "r:*") as tar:
        return [(m.name, m.linkname) for m in tar if m.issym() or m.islnk()]


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
    "read_path_list",
    "resolve_listed_path",
    "expand_shards",
    "iter_tar_members",
    "read_file_bytes",
    "row_path",
    "iter_bytes",
    "read_row_bytes",
]
