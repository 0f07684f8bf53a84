"""Labelled image sources for evaluation: class folders and WebDataset shards with `.cls`.

Evaluation needs (image bytes, label) pairs and nothing else, so both source kinds are read
into the same small record and decoded later, batch by batch, by the feature extractor (the
bytes of a large eval set are never all held at once). Labels stay strings here: a class
folder's name, or the text of a shard's `.cls` member; the caller builds one label vocabulary
over the train and test sources so that both sides share class indices.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import webdataset as wds

from lvd.common.media import IMAGE_EXTENSIONS, expand_shards, is_image_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledSample:
    """One labelled image, still encoded."""

    key: str  # path relative to the class-folder root, or the shard sample's __key__
    data: bytes
    label: str


def iter_class_folder(
    root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> Iterator[LabelledSample]:
    """Images under `root/CLASS/...` (searched recursively), labelled CLASS, in sorted order."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class sub-folders (expected ROOT/CLASS/image files)")
    for cls in classes:
        files = sorted(p for p in (root / cls).rglob("*") if p.is_file() and is_image_name(p.name, extensions))
        for path in files:
            yield LabelledSample(path.relative_to(root).as_posix(), path.read_bytes(), cls)


def _shard_urls(pattern: str) -> list[str]:
    return expand_shards(pattern, sort=True)


def _image_member(sample: dict, extensions: Sequence[str]) -> str | None:
    names = sorted(k for k in sample if not k.startswith("__") and k.lower() in extensions)
    return names[0] if names else None


def iter_labelled_shards(pattern: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> Iterator[LabelledSample]:
    """Samples of WebDataset shards that carry an image member and a `.cls` label, in shard order.

    A sample without a label or without an image is an error: an evaluation set with holes
    would report an accuracy over a set other than the one named.
    """
    dataset = wds.WebDataset(_shard_urls(pattern), shardshuffle=False, empty_check=False)
    for sample in dataset:
        key = sample["__key__"]
        if "cls" not in sample:
            raise ValueError(f"{sample.get('__url__', pattern)}: sample {key!r} has no .cls label")
        member = _image_member(sample, extensions)
        if member is None:
            raise ValueError(f"{sample.get('__url__', pattern)}: sample {key!r} has no image member")
        label = bytes(sample["cls"]).decode("utf-8").strip()
        yield LabelledSample(key, bytes(sample[member]), label)


def iter_labelled(source: str | os.PathLike | Sequence, limit: int | None = None) -> Iterator[LabelledSample]:
    """A labelled source (a class folder, a shard pattern, or a list of them), optionally truncated.

    `limit` keeps the first `limit` samples of the whole source; a folder is read in sorted
    class order, so a limit on a folder keeps whole classes first. Use shards or a full source
    when the classes must stay balanced.
    """
    if not isinstance(source, (str, os.PathLike)):  # list, tuple, ListConfig
        parts: Iterable[LabelledSample] = (s for one in source for s in iter_labelled(one))
    elif Path(source).is_dir():
        parts = iter_class_folder(source)
    else:
        parts = iter_labelled_shards(str(source))
    yield from islice(parts, limit)


def label_vocabulary(*label_lists: Iterable[str]) -> list[str]:
    """Class names of several label lists, sorted numerically when they are all integers."""
    names = set()
    for labels in label_lists:
        names.update(labels)
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def encode_labels(labels: Sequence[str], vocabulary: Sequence[str]) -> np.ndarray:
    """Label strings to int64 indices into `vocabulary`."""
    index = {name: i for i, name in enumerate(vocabulary)}
    return np.fromiter((index[name] for name in labels), dtype=np.int64, count=len(labels))
