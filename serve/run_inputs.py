"""A run folder as the lookup service reads it: an embed folder's vectors, ids and model for an
index, the manifest's rows for its metadata, and what dedup and cluster said about each row.

`lvd.index.store` builds from arrays and frames; this module reads them from the run folder
through `lvd.common.run_folder`, the readers the stages use too.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from lvd.common.errors import UserError
from lvd.common.run_folder import (
    MANIFEST_SCHEMA,
    cluster_assignments,
    dedup_frame,
    embed_parts,
    manifest_columns,
    manifest_parts,
    read_manifest,
    read_success,
    run_dir_of,
)
from lvd.index import store as index_store
from lvd.index.store import (
    EMBEDDER_EXTRA_KEYS,
    EMBEDDER_KEYS,
    META_COLUMNS,
    OPTIONAL_META_COLUMNS,
    BuildOptions,
    IndexFolderError,
    IndexStore,
    VectorPart,
)
from lvd.serve.annotations import RunAnnotations

log = logging.getLogger(__name__)


def vector_parts(embed_dir: str | os.PathLike) -> list[VectorPart]:
    """The finished parts of an embed folder (never its copy/ sub-folder), in part order, each
    with its ids and a loader of its memory-mapped vectors."""
    parts = []
    for vectors, ids_path in embed_parts(embed_dir):
        ids = np.load(ids_path, allow_pickle=False).astype(np.int64, copy=False)
        shape = np.load(vectors, mmap_mode="r", allow_pickle=False).shape
        if len(shape) != 2 or shape[0] != len(ids):
            raise IndexFolderError(f"{vectors} and {ids_path.name} differ in length")
        parts.append(VectorPart(vectors.stem, ids, partial(np.load, vectors, mmap_mode="r", allow_pickle=False)))
    return parts


def embedder_record(embed_dir: str | os.PathLike) -> dict:
    """Model and preprocessing recorded by the embed stage (empty when it did not finish)."""
    record = read_success(embed_dir)
    if record is None:
        log.warning(
            "%s has no _SUCCESS.json: the index will not know its model, so search by image is unavailable", embed_dir
        )
        return {}
    return {key: record.get(key) for key in EMBEDDER_KEYS + EMBEDDER_EXTRA_KEYS if key in record}


def manifest_meta(embed_dir: str | os.PathLike) -> pd.DataFrame:
    """The metadata columns of the manifest's ok rows, from RUN/manifest beside RUN/embed (or
    RUN/embed/copy); an empty frame when there is no manifest there."""
    run_dir = run_dir_of(Path(embed_dir).resolve())
    if not manifest_parts(run_dir):
        log.warning("no manifest next to %s: results will have ids and scores only", embed_dir)
        return pd.DataFrame({"id": pd.Series([], dtype="int64")})
    present = manifest_columns(run_dir)
    wanted = [c for c in META_COLUMNS + OPTIONAL_META_COLUMNS if c in MANIFEST_SCHEMA.names or c in present]
    return read_manifest(run_dir, status="ok", columns=wanted)


def build(
    embed_dir: str | os.PathLike, out: str | os.PathLike, opts: BuildOptions | None = None, overwrite: bool = False
) -> dict:
    """`lvd index build`: an index over every part of an embed folder; returns its info.json."""
    embed_dir = Path(embed_dir).resolve()
    parts = vector_parts(embed_dir)
    meta, embedder = manifest_meta(embed_dir), embedder_record(embed_dir)
    return index_store.build(parts, str(embed_dir), meta, embedder, out, opts, overwrite)


def add(index_dir: str | os.PathLike, embed_dir: str | os.PathLike, opts: BuildOptions | None = None) -> dict:
    """`lvd index add`: the parts of an embed folder that the index does not hold yet."""
    embed_dir = Path(embed_dir).resolve()
    listed = IndexStore.open(index_dir).info.get("sources", [])
    sources = {s["embed_dir"]: vector_parts(s["embed_dir"]) for s in listed if s["embed_dir"] != str(embed_dir)}
    sources[str(embed_dir)] = vector_parts(embed_dir)
    meta, embedder = manifest_meta(embed_dir), embedder_record(embed_dir)
    return index_store.add(index_dir, sources, str(embed_dir), meta, embedder, opts)


def load_annotations(store: IndexStore) -> RunAnnotations:
    """Clusters and near-duplicate groups of the index's rows, from the run folders it was built from."""
    run_dirs = list(dict.fromkeys(run_dir_of(s["embed_dir"]) for s in store.info.get("sources", [])))
    try:
        frames = [
            (
                cluster_assignments(run, ["id", "cluster"], optional=True),
                dedup_frame(run, "near", ["id", "component"], optional=True),
                dedup_frame(run, "exact", ["id", "dup_of"], optional=True),
            )
            for run in run_dirs
        ]
        return RunAnnotations.from_frames(store.ids, frames)
    except (OSError, KeyError, ValueError, UserError) as exc:  # a damaged run folder must not stop the lookup
        log.warning("cannot read the cluster/dedup outputs of %s: %s", [str(d) for d in run_dirs], exc)
        return RunAnnotations.empty(len(store))
