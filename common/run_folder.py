"""The run folder's contract, read: where each stage's outputs are, the one `_SUCCESS.json`
reader, the schema version, and readers of what the stages wrote (manifest rows, embedding
parts and their ids, near-duplicate groups, decontamination, cluster assignments, retrievals).

```
RUN/<stage>/_SUCCESS.json   the stage finished: schema, stage, fingerprint (of its settings and
                            inputs), content (of its outputs), then the stage's own counts
RUN/manifest/part-NNNNN.parquet          RUN/embed/part-NNNNN.npy, ids-NNNNN.npy (embed/copy/ too)
RUN/dedup/exact.parquet, near.parquet, decontam.parquet
RUN/cluster/centroids.npy, assign.parquet, level{t}/..., balanced.parquet
RUN/retrieve/neighbors.parquet           RUN/shards/...           RUN/report/index.html
```

Every stage and the lookup service read a run folder through here, so an older folder is read
the same way everywhere: schema 1 (folders written before `_SUCCESS.json` carried a schema) is
read, a manifest without an optional column gets that column's default, and what cannot be read
is refused with a one-line `UserError` naming the stage to run again, never an error from
inside pyarrow.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lvd.common.errors import InputFormatError, MissingInputError
from lvd.common.row_bytes import FOLDER, kind_of

SUCCESS_NAME = "_SUCCESS.json"
#: The run-folder layout this lvd writes. 1: before `_SUCCESS.json` carried `schema`; 2: every
#: stage's `_SUCCESS.json` carries schema, stage, fingerprint and content, and part-wise stages
#: mark each finished part with _done-PART.json.
SCHEMA_VERSION = 2
#: The oldest layout this lvd reads as a stage's input.
OLDEST_READABLE = 1
OK, QUARANTINED = "ok", "quarantined"


def stage_dir(run_dir: str | os.PathLike, stage: str) -> Path:
    return Path(run_dir) / stage


def _stage_of(folder: Path) -> str:
    """The stage a folder belongs to (RUN/embed/copy is embed's)."""
    return folder.parent.name if folder.name == "copy" and folder.parent.name == "embed" else folder.name


# ---------------------------------------------------------------- _SUCCESS.json


def read_success(folder: str | os.PathLike) -> dict | None:
    """The `_SUCCESS.json` of a stage folder; None when the stage has not finished there."""
    path = Path(folder) / SUCCESS_NAME
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InputFormatError(f"{path} is damaged ({exc}): run `lvd {_stage_of(Path(folder))}` again") from None
    if not isinstance(record, dict):
        raise InputFormatError(f"{path} is not a stage record: run `lvd {_stage_of(Path(folder))}` again")
    return record


def is_done(folder: str | os.PathLike) -> bool:
    return (Path(folder) / SUCCESS_NAME).is_file()


def schema_of(record: dict) -> int:
    """The run-folder schema a `_SUCCESS.json` was written in (1: before records carried one)."""
    return int(record.get("schema", 1))


def check_schema(record: dict, folder: str | os.PathLike) -> dict:
    """`record` when this lvd reads its schema; else a one-line refusal naming the stage to rerun."""
    version, stage = schema_of(record), _stage_of(Path(folder))
    if version > SCHEMA_VERSION:
        raise InputFormatError(
            f"{folder} was written by a newer lvd (run-folder schema {version}; this lvd reads "
            f"{OLDEST_READABLE} to {SCHEMA_VERSION}): run `lvd {stage}` again with this lvd, or upgrade lvd"
        )
    if version < OLDEST_READABLE:
        raise InputFormatError(
            f"{folder} was written by an older lvd (run-folder schema {version}, no longer read): "
            f"run `lvd {stage}` again"
        )
    return record


def finished(folder: str | os.PathLike, needed_by: str | None = None) -> dict:
    """The checked `_SUCCESS.json` of a stage whose outputs are read; MissingInputError when the
    stage has not finished (`needed_by` names the stage that reads it, for the message)."""
    folder = Path(folder)
    record = read_success(folder)
    if record is None:
        stage, reader = _stage_of(folder), f" ({needed_by} reads it)" if needed_by else ""
        raise MissingInputError(f"no finished {stage} in {folder}{reader}: run `lvd {stage}` first")
    return check_schema(record, folder)


# ---------------------------------------------------------------- fingerprints


def fingerprint(*parts) -> str:
    """Stable hash of JSON-able values and of numpy arrays (by content)."""
    h = hashlib.sha1()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


# Fields of a schema-1 `_SUCCESS.json` that describe the invocation, not its outputs; a schema-1
# folder's content fingerprint is its record without them.
_INVOCATION_KEYS = frozenset(
    {
        "finished_at",
        "host",
        "versions",
        "seconds",
        "world_size",
        "parts_written",
        "shards_written",
        "embedded_this_run_rank0",
        "thumbnails",
        "weights_sha1",
        "near_search",
    }
)


def content_fingerprint(folder: str | os.PathLike) -> str | None:
    """What a finished stage's outputs are, for the fingerprints of the stages that read them;
    None when it has not finished. Never where, when or how long it ran: a run folder moved to
    another machine is still up to date there."""
    record = read_success(folder)
    if record is None:
        return None
    check_schema(record, folder)
    if "content" in record:
        return str(record["content"])
    return fingerprint({k: v for k, v in record.items() if k not in _INVOCATION_KEYS})


# ---------------------------------------------------------------- parquet, refused in one line


def _read_parquet(path: Path, columns: Iterable[str] | None = None) -> pa.Table:
    """A parquet file of a stage, or a one-line refusal naming the stage (missing, damaged, or
    without a column asked for)."""
    stage = _stage_of(path.parent) if not path.parent.name.startswith("level") else "cluster"
    try:
        handle = pq.ParquetFile(path)
    except FileNotFoundError:
        raise MissingInputError(f"{path} is missing: run `lvd {stage}` first") from None
    except (OSError, pa.ArrowException) as exc:
        raise InputFormatError(f"{path} cannot be read ({exc}): run `lvd {stage}` again") from None
    wanted = None if columns is None else list(dict.fromkeys(columns))
    missing = [c for c in wanted or () if c not in handle.schema_arrow.names]
    if missing:
        raise InputFormatError(f"{path} has no column {missing}: run `lvd {stage}` again")
    try:
        return handle.read(columns=wanted)
    except (OSError, pa.ArrowException) as exc:
        raise InputFormatError(f"{path} cannot be read ({exc}): run `lvd {stage}` again") from None


def read_frame(path: str | os.PathLike, columns: Iterable[str] | None = None, optional: bool = False):
    """A stage's parquet output as pandas (None when `optional` and it is not there)."""
    path = Path(path)
    if optional and not path.is_file():
        return None
    return _read_parquet(path, columns).to_pandas()


# ---------------------------------------------------------------- manifest

MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("set", pa.string()),
        ("source", pa.string()),
        ("kind", pa.string()),
        ("key", pa.string()),
        ("label", pa.string()),
        ("bytes", pa.int64()),
        ("sha1", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("mode", pa.string()),
        ("frames", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)
#: The columns every manifest has (docs/architecture.md's contract): a reader that asks for one
#: that a part lacks is refused. The others are read as their default where a manifest (an older
#: lvd's, or one written by hand) lacks them: `kind` from the source's form, `status` ok, the rest null.
MANIFEST_REQUIRED = ("id", "set", "source", "key", "bytes", "sha1", "width", "height")


def manifest_parts(run_dir: str | os.PathLike) -> list[Path]:
    return sorted(stage_dir(run_dir, "manifest").glob("part-*.parquet"))


def _manifest_default(table: pa.Table, name: str) -> pa.Array:
    if name == "kind":
        kinds = {s: kind_of(s) or FOLDER for s in pc.unique(table["source"]).to_pylist()}
        return pa.array([kinds[s] for s in table["source"].to_pylist()], pa.string())
    if name == "status":
        return pa.array([OK] * len(table), pa.string())
    return pa.nulls(len(table), MANIFEST_SCHEMA.field(name).type)


def _read_manifest_part(path: Path, columns: list[str] | None) -> pa.Table:
    """One part with the manifest schema's types (`columns`: those; None: the schema's and any
    other the part has). A missing optional column gets its default; a missing required one, or
    an unknown one asked for, is refused."""
    try:
        present = pq.read_schema(path).names
    except (OSError, pa.ArrowException) as exc:
        raise InputFormatError(f"{path} cannot be read ({exc}): run `lvd manifest` again") from None
    if columns is None:
        wanted = MANIFEST_SCHEMA.names + [c for c in present if c not in MANIFEST_SCHEMA.names]
    else:
        wanted = list(columns)
    absent = [c for c in wanted if c not in present and (c in MANIFEST_REQUIRED or c not in MANIFEST_SCHEMA.names)]
    if absent:
        raise InputFormatError(
            f"{path} has no column {absent} (a manifest has {list(MANIFEST_REQUIRED)}): run `lvd manifest` again"
        )
    needs_source = "kind" in wanted and "kind" not in present
    read = [c for c in wanted if c in present] + (["source"] if needs_source and "source" not in wanted else [])
    table = _read_parquet(path, read)
    arrays = []
    for name in wanted:
        if name not in present:
            arrays.append(_manifest_default(table, name))
            continue
        column = table[name]
        target = MANIFEST_SCHEMA.field(name).type if name in MANIFEST_SCHEMA.names else column.type
        try:
            arrays.append(column if column.type == target else column.cast(target))
        except (pa.ArrowException, ValueError) as exc:
            raise InputFormatError(
                f"{path}: column {name!r} is not {target} ({exc}): run `lvd manifest` again"
            ) from None
    return pa.table(arrays, names=wanted)


def read_manifest(
    run_dir: str | os.PathLike,
    status: str | None = OK,
    sets: Iterable[str] | None = None,
    columns: Iterable[str] | None = None,
    ids=None,
) -> pd.DataFrame:
    """All manifest rows (or those of one status / some sets / some `ids`), in part order;
    `columns`: only those (and what the filters need), for readers of large manifests. The
    filters run on each part's Arrow table, so memory holds only the selected rows as pandas
    objects."""
    parts = manifest_parts(run_dir)
    if not parts:
        raise MissingInputError(f"no manifest in {run_dir}: run `lvd manifest` first")
    nullable = {pa.int32(): pd.Int32Dtype(), pa.int64(): pd.Int64Dtype()}.get
    wanted = None
    if columns is not None:
        filters = [*(["status"] if status else []), *(["set"] if sets is not None else [])]
        wanted = list(dict.fromkeys([*columns, *filters, *(["id"] if ids is not None else [])]))
    wanted_sets = None if sets is None else pa.array(list(sets), pa.string())
    wanted_ids = None if ids is None else pa.array(np.asarray(ids, np.int64))
    frames = []
    for path in parts:
        table = _read_manifest_part(path, wanted)
        if status is not None:
            table = table.filter(pc.equal(table["status"], status))
        if wanted_sets is not None:
            table = table.filter(pc.is_in(table["set"], value_set=wanted_sets))
        if wanted_ids is not None:
            table = table.filter(pc.is_in(table["id"], value_set=wanted_ids))
        frames.append(table.to_pandas(types_mapper=nullable))
    return pd.concat(frames, ignore_index=True)


def manifest_columns(run_dir: str | os.PathLike) -> set[str]:
    """The columns any manifest part has (a list source may add its own, such as `caption`)."""
    names: set[str] = set()
    for path in manifest_parts(run_dir):
        try:
            names.update(pq.read_schema(path).names)
        except (OSError, pa.ArrowException) as exc:
            raise InputFormatError(f"{path} cannot be read ({exc}): run `lvd manifest` again") from None
    return names


def manifest_counts(run_dir: str | os.PathLike) -> dict[tuple[str, str], int]:
    """{(set, status): rows}, sorted, counted part by part in Arrow (two columns read)."""
    counts: dict[tuple[str, str], int] = {}
    for path in manifest_parts(run_dir):
        table = _read_manifest_part(path, ["set", "status"]).group_by(["set", "status"]).aggregate([([], "count_all")])
        for name, status, n in zip(*(table[c].to_pylist() for c in ("set", "status", "count_all"))):
            counts[(name, status)] = counts.get((name, status), 0) + int(n)
    return dict(sorted(counts.items()))


def manifest_sets(run_dir: str | os.PathLike, status: str | None = OK) -> list[str]:
    """The distinct `set` names of the manifest's rows (of one status), sorted; reads one column."""
    names: set[str] = set()
    for path in manifest_parts(run_dir):
        table = _read_manifest_part(path, ["set", "status"] if status is not None else ["set"])
        if status is not None:
            table = table.filter(pc.equal(table["status"], status))
        names.update(pc.unique(table["set"]).to_pylist())
    return sorted(names)


# ---------------------------------------------------------------- embed

_PART = re.compile(r"^part-(\d+)\.npy$")


def embed_dir(run_dir: str | os.PathLike, space: str | None = None) -> Path:
    """RUN/embed, or one of its sub-spaces (`copy`: the copy-detection vectors)."""
    folder = stage_dir(run_dir, "embed")
    return folder / space if space else folder


def run_dir_of(embed_folder: str | os.PathLike) -> Path:
    """The run folder of an embed folder: RUN for RUN/embed, and for RUN/embed/copy too."""
    folder = Path(embed_folder)
    return folder.parent.parent if folder.name == "copy" and folder.parent.name == "embed" else folder.parent


def embed_parts(folder: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(vectors, ids) file pairs of an embedding folder, in part-number order.

    Parts are paired by their number, not by listing order, and a part without its ids file (or
    ids without a part) is an error rather than a silent truncation.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingInputError(f"embedding folder not found: {folder}")
    pairs = []
    for path in sorted(folder.iterdir()):
        match = _PART.match(path.name)
        if match is None:
            continue
        ids_path = folder / f"ids-{match.group(1)}.npy"
        if not ids_path.exists():
            raise MissingInputError(f"{path} has no ids file {ids_path.name}: run `lvd embed` again")
        pairs.append((path, ids_path))
    orphans = {p.name for p in folder.glob("ids-*.npy")} - {i.name for _, i in pairs}
    if orphans:
        raise MissingInputError(f"ids files without a part in {folder}: {sorted(orphans)}: run `lvd embed` again")
    return pairs


def vector_files(folder: str | os.PathLike) -> list[Path]:
    """The vector files of an embedding folder, in part order (what `index.io.EmbeddingRows` maps)."""
    return [vectors for vectors, _ in embed_parts(folder)]


def read_embed_part(vectors_path: Path, ids_path: Path, *, dtype=np.float32, mmap: bool = False):
    """One part as (ids int64, vectors `dtype`), checked to have one id per row."""
    vectors = np.load(vectors_path, mmap_mode="r" if mmap else None, allow_pickle=False)
    ids = np.load(ids_path, allow_pickle=False)
    if vectors.ndim != 2:
        raise InputFormatError(f"{vectors_path} is not a 2-D array (shape {vectors.shape}): run `lvd embed` again")
    if ids.shape != (len(vectors),):
        raise InputFormatError(
            f"{ids_path} holds {ids.shape} ids for {len(vectors)} rows of {vectors_path.name}: run `lvd embed` again"
        )
    if dtype is not None and not mmap:
        vectors = vectors.astype(dtype, copy=False)
    return ids.astype(np.int64, copy=False), vectors


def iter_embeddings(folder: str | os.PathLike, *, dtype=np.float32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (ids, vectors) part by part, so callers can stream folders larger than memory."""
    for vectors_path, ids_path in embed_parts(folder):
        yield read_embed_part(vectors_path, ids_path, dtype=dtype)


def load_embeddings(folder: str | os.PathLike, *, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """All parts of an embedding folder as (ids int64 [n], X `dtype` [n, d]).

    Rows keep part order; ids must be unique across parts (a repeated id would make the join
    with the manifest ambiguous). An empty folder gives (0,) ids and a (0, 0) array.
    """
    pairs = embed_parts(folder)
    if not pairs:
        return np.zeros(0, np.int64), np.zeros((0, 0), dtype or np.float32)
    parts = [read_embed_part(v, i, dtype=None, mmap=True) for v, i in pairs]
    dims = {p[1].shape[1] for p in parts}
    if len(dims) != 1:
        raise InputFormatError(f"parts of {folder} have different dimensions {sorted(dims)}: run `lvd embed` again")
    ids = np.concatenate([p[0] for p in parts])
    out = np.empty((len(ids), dims.pop()), dtype=dtype or parts[0][1].dtype)
    row = 0
    for _, vectors in parts:
        out[row : row + len(vectors)] = vectors
        row += len(vectors)
    if len(np.unique(ids)) != len(ids):
        raise InputFormatError(f"{folder} holds repeated ids: run `lvd embed` again")
    return ids, out


def embedding_ids(folder: str | os.PathLike) -> np.ndarray:
    """The ids of every row of an embedding folder, in part order, without reading the vectors."""
    pairs = embed_parts(folder)
    if not pairs:
        return np.zeros(0, np.int64)
    return np.concatenate([np.load(i, allow_pickle=False).astype(np.int64, copy=False) for _, i in pairs])


# ---------------------------------------------------------------- dedup


def dedup_frame(run_dir: str | os.PathLike, name: str, columns=None, optional: bool = False) -> pd.DataFrame | None:
    """dedup/NAME.parquet (exact: id, dup_of; near: id, component, keep, reason; decontam: id,
    eval_set, eval_id, similarity)."""
    return read_frame(stage_dir(run_dir, "dedup") / f"{name}.parquet", columns, optional)


def curated_pool_ids(run_dir, near: pd.DataFrame | None = None, decontam: pd.DataFrame | None = None) -> np.ndarray:
    """Sorted ids of the pool images that survive dedup: near.parquet's kept ids minus the ids in
    decontam.parquet (near.parquet already leaves out exact duplicates and images without an
    embedding)."""
    near = dedup_frame(run_dir, "near", ["id", "keep"]) if near is None else near
    decontam = dedup_frame(run_dir, "decontam", ["id"]) if decontam is None else decontam
    kept = near.loc[near["keep"], "id"].to_numpy(np.int64)
    return np.setdiff1d(kept, decontam["id"].to_numpy(np.int64))


# ---------------------------------------------------------------- cluster


def cluster_assignments(run_dir, columns=("id", "cluster", "distance"), optional: bool = False):
    """cluster/assign.parquet: each curated image's cluster (the coarsest level) and squared distance."""
    return read_frame(stage_dir(run_dir, "cluster") / "assign.parquet", columns, optional)


def cluster_centroids(run_dir) -> np.ndarray:
    path = stage_dir(run_dir, "cluster") / "centroids.npy"
    if not path.is_file():
        raise MissingInputError(f"{path} is missing: run `lvd cluster` first")
    return np.load(path, allow_pickle=False)


def level_assignments(run_dir) -> list[pd.DataFrame]:
    """(id, cluster) of every curated image at each level, finest first (flat: one level)."""
    folder, levels, t = stage_dir(run_dir, "cluster"), [], 1
    while (folder / f"level{t}" / "assign.parquet").is_file():
        levels.append(read_frame(folder / f"level{t}" / "assign.parquet", ["id", "cluster"]))
        t += 1
    return levels or [cluster_assignments(run_dir, ["id", "cluster"])]


def balanced_ids(run_dir) -> np.ndarray:
    path = stage_dir(run_dir, "cluster") / "balanced.parquet"
    if not path.is_file():
        raise MissingInputError(f"{path} is missing: run `lvd cluster` with cluster.balanced_sample > 0 (or auto)")
    return _read_parquet(path, ["id"]).column("id").to_numpy().astype(np.int64)


# ---------------------------------------------------------------- retrieve


def read_neighbors(run_dir, optional: bool = False) -> pd.DataFrame | None:
    """retrieve/neighbors.parquet: seed_set, seed_id, id, rank, similarity, mode, cluster, floor."""
    return read_frame(stage_dir(run_dir, "retrieve") / "neighbors.parquet", optional=optional)
