"""Results to take away: a search's hits as a parquet table, or as WebDataset shards of the images.

`lvd index search ... --out results.parquet` writes one row per hit (query, rank, id, score, key,
set, label, cluster, and the stored vector with --return-embeddings); `--out results/` writes
each hit image once, with its original bytes, into `results/results-NNNNNN.tar` (written by the
`webdataset` library): `KEY.EXT` the image, `KEY.json` its provenance (the queries that found
it, with rank and score; its id, set, source, key, label, cluster), `KEY.label` its label where
it has one. Such shards are a source `lvd run` reads, as a seed set (their labels included) or
a pool. Files appear only when complete: the table through a temporary name, the shards in a
temporary folder moved into place.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from lvd.common.atomic import atomic_path
from lvd.common.errors import InputFormatError
from lvd.common.media import IMAGE_EXTENSIONS
from lvd.index.store import IndexStore
from lvd.serve.annotations import NO_CLUSTER, RunAnnotations

SHARD_PATTERN = "results-%06d.tar"
SHARD_MTIME = 0.0  # fixed member times: the same results give the same bytes


def results_table(
    store: IndexStore,
    names: list[str],
    scores: np.ndarray,
    rows: np.ndarray,
    annotations: RunAnnotations,
    embeddings: bool = False,
) -> pd.DataFrame:
    """One row per hit of each query, in query then rank order."""
    records = []
    for name, srow, rrow in zip(names, scores, rows):
        for rank, (score, row) in enumerate(((s, int(r)) for s, r in zip(srow, rrow) if r >= 0), start=1):
            m = store.meta.iloc[row]
            cluster = int(annotations.cluster[row])
            record = {
                "query": name,
                "rank": rank,
                "id": int(store.ids[row]),
                "score": float(score),
                "key": _text(m["key"]),
                "set": _text(m["set"]),
                "label": _text(m["label"]),
                "cluster": None if cluster == NO_CLUSTER else cluster,
                "caption": _text(m["caption"]) if "caption" in m.index else None,
                "kind": _text(m["kind"]),
                "source": _text(m["source"]),
            }
            if embeddings:
                record["embedding"] = store.index.reconstruct(row).astype(np.float32)
            records.append(record)
    table = pd.DataFrame.from_records(
        records,
        columns=["query", "rank", "id", "score", "key", "set", "label", "cluster", "caption", "kind", "source"]
        + (["embedding"] if embeddings else []),
    )
    return table.astype({"rank": "int32", "id": "int64", "score": "float32", "cluster": "Int64"})


def _text(value) -> str | None:
    return None if pd.isna(value) else str(value)


def write_parquet(table: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    return path


def write_shards(table: pd.DataFrame, store: IndexStore, folder: str | Path, max_count: int = 10_000) -> list[Path]:
    """Each hit image once, with its provenance, as WebDataset shards in `folder` (new or empty)."""
    import webdataset as wds

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputFormatError(f"{folder} exists and is not an empty folder: choose a new folder for the shards")
    if folder.exists():
        folder.rmdir()
    found_by = {}
    for hit in table.to_dict("records"):
        hit = {k: (None if k != "embedding" and pd.isna(v) else v) for k, v in hit.items()}  # NaN/NA: missing
        found_by.setdefault(int(hit["id"]), (hit, []))[1].append(
            {"query": hit["query"], "rank": int(hit["rank"]), "score": float(hit["score"])}
        )
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        with wds.ShardWriter(str(tmp / SHARD_PATTERN), maxcount=max_count, verbose=0, mtime=SHARD_MTIME) as sink:
            for id_, (hit, queries) in found_by.items():
                sink.write(_sample(store, id_, hit, queries))
    return sorted(folder.glob("results-*.tar"))


def _sample(store: IndexStore, id_: int, hit: dict, queries: list[dict]) -> dict:
    try:
        data = store.image_bytes(id_)
    except (OSError, KeyError) as exc:
        raise InputFormatError(f"the image of id {id_} cannot be read for the shards: {exc}") from None
    provenance = {
        "id": int(id_),
        "set": hit["set"],
        "source": hit["source"],
        "key": hit["key"],
        "label": hit["label"],
        "cluster": None if hit["cluster"] is None else int(hit["cluster"]),
        "caption": hit["caption"],
        "retrieved": queries,
    }
    sample = {
        "__key__": f"{id_:019d}" if id_ >= 0 else f"n{-id_:019d}",
        _extension(hit["key"], data): data,
        "json": json.dumps(provenance, sort_keys=True).encode(),
    }
    if hit["label"] is not None:
        sample["label"] = str(hit["label"]).encode()
    return sample


def _extension(key: str | None, data: bytes) -> str:
    """The image's own extension, or its format's where the key has none lvd reads as an image."""
    ext = (key or "").rsplit(".", 1)[-1].lower() if key and "." in key else ""
    if ext in IMAGE_EXTENSIONS:
        return ext
    from lvd.pretrain.data.decode import probe

    fmt = probe(data).format.lower()
    return {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt)
