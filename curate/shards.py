"""The shards stage: the curated images as WebDataset tars with their provenance.

reader : the curated selection (`curate.selection`: retrieve/neighbors.parquet, who retrieved
         what; cluster/balanced.parquet, the balanced sample; or both) and the manifest (where
         the bytes are);
mapper : one sample per distinct image, every retrieval that chose it and its clusters at every
         level of the balanced sample merged into its JSON;
         samples shuffled with the run's seed, then cut into shards by count and bytes;
writer : worker processes write shards/PREFIX-NNNNNN.tar (`curate.shard_writer`), and the
         parent writes a parquet beside each tar (one row per sample) once its tar is in place.

Each shard (its tar and its parquet) is a part of the stage runner (`curate.stage`) whose
fingerprint is that of its samples and the writing settings. The shard plan depends only on the
inputs and the config, so a rerun rewrites exactly the shards that are missing or out of date,
byte for byte as before.

Under torchrun (`python -m lvd.curate.shards CONFIG`) every rank plans the same shards and writes
its round-robin share of those left to do; rank 0 commits once every rank has staged its shards.
The plan never depends on the rank count, so the folder is byte for byte one process's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from lvd.common.atomic import atomic_write_json
from lvd.common.errors import InputFormatError
from lvd.common.run_folder import manifest_sets, read_manifest, read_neighbors
from lvd.curate.selection import balanced_provenance, resolve_select
from lvd.curate.shard_writer import ShardSpec, write_shard
from lvd.curate.stage import Parts, open_stage, torchrun_main, write_table
from lvd.curate.workers import process_map, rank_workers, show_progress

log = logging.getLogger(__name__)

STAGE = "shards"
# Bytes a sample adds beyond its image: three 512-byte tar headers, JSON, padding.
SAMPLE_OVERHEAD = 2048


def merge_provenance(neighbors: pd.DataFrame) -> dict[int, list[dict]]:
    """Every retrieval of each image (seed set, seed, rank, similarity, cluster, mode, floor), sorted."""
    out: dict[int, list[dict]] = {}
    ordered = neighbors.sort_values(["id", "seed_set", "seed_id", "rank"], kind="stable")
    for row in ordered.itertuples(index=False):
        out.setdefault(int(row.id), []).append(
            {
                "seed_set": row.seed_set,
                "seed_id": int(row.seed_id),
                "rank": int(row.rank),
                "similarity": round(float(row.similarity), 6),
                "cluster": int(row.cluster),
                "mode": row.mode,
                "floor": None if pd.isna(getattr(row, "floor", None)) else round(float(row.floor), 6),
            }
        )
    return out


def class_index(manifest: pd.DataFrame) -> list[str]:
    """The labels of all seed sets, sorted: `.cls` holds an index into this list."""
    seeds = manifest[manifest["set"].str.startswith("seed:")]
    return sorted({str(v) for v in seeds["label"].dropna().unique()})


def sample_label(retrievals: list[dict], own_label, seed_labels: dict[int, str]) -> tuple[str | None, dict]:
    """(label, how it was given). A seed image keeps its own label; a retrieved image takes the
    label of its most similar seed among the retrievals that cleared a similarity floor: a
    neighbour that no floor vouches for gets no label."""
    if own_label is not None and any(r["mode"] == "seed" for r in retrievals):
        return str(own_label), {"from": "own"}
    eligible = [r for r in retrievals if r.get("floor") is not None and r["mode"] != "seed"]
    if not eligible:
        return None, {"from": None, "why": "retrieved without a similarity floor"}
    best = max(eligible, key=lambda r: (r["similarity"], -r["seed_id"]))
    label = seed_labels.get(best["seed_id"])
    if label is None:
        return None, {"from": None, "why": "the most similar seed has no label"}
    return label, {
        "from": "nearest seed",
        "seed_set": best["seed_set"],
        "seed_id": best["seed_id"],
        "similarity": best["similarity"],
        "floor": best["floor"],
    }


def plan_shards(sizes: np.ndarray, max_count: int, max_bytes: int) -> list[tuple[int, int]]:
    """[start, end) ranges: a shard closes before it would pass either limit (never empty).

    One binary search per shard on the running byte total, not a Python step per sample, so
    planning millions of samples takes milliseconds.
    """
    costs = np.asarray(sizes, np.int64) + SAMPLE_OVERHEAD
    total = np.concatenate([[0], np.cumsum(costs)])
    n, ranges, start = len(costs), [], 0
    while start < n:
        by_bytes = int(np.searchsorted(total, total[start] + max_bytes, side="right")) - 1
        end = max(start + 1, min(by_bytes, start + max_count, n))
        ranges.append((start, end))
        start = end
    return ranges


def _ext(key: str) -> str:
    ext = key.rsplit(".", 1)[-1].lower() if "." in key else "img"
    return "jpg" if ext == "jpeg" else ext


BALANCED_ONLY = {"from": None, "why": "chosen by the balanced sample; no seed set labels it"}


def curated_rows(run_dir: Path, ids: np.ndarray) -> pd.DataFrame:
    """The manifest rows of the curated images, in shard order (one filtered pass, not one lookup each)."""
    manifest = read_manifest(run_dir, status=None, ids=ids).set_index("id")
    missing = np.setdiff1d(ids, manifest.index.to_numpy())
    if len(missing):
        raise InputFormatError(
            f"curated images missing from the manifest (it changed since dedup): {missing[:5].tolist()}; "
            "run `lvd dedup` and the stages after it again"
        )
    manifest = manifest.reindex(ids)
    bad = manifest["status"].to_numpy() != "ok"
    if bad.any():
        first = int(ids[np.flatnonzero(bad)[0]])
        raise InputFormatError(
            f"curated image {first} is quarantined in the manifest ({manifest.loc[first, 'error']}); "
            "run `lvd dedup` and the stages after it again"
        )
    return manifest.reset_index()


def sample_row(m: dict, retrievals: list[dict], levels, seed_labels: dict, cls_of: dict) -> dict:
    """One sample: where its bytes are, its label and class, and its provenance JSON."""
    id_ = int(m["id"])
    own = None if pd.isna(m["label"]) else m["label"]
    label, label_from = sample_label(retrievals, own, seed_labels) if retrievals else (None, BALANCED_ONLY)
    selected_by = [
        name for name, chosen in (("retrieve", bool(retrievals)), ("balanced", levels is not None)) if chosen
    ]
    meta = {
        "id": id_,
        "set": m["set"],
        "source": m["source"],
        "key": m["key"],
        "sha1": m["sha1"],
        "width": int(m["width"]),
        "height": int(m["height"]),
        "label": label,
        "label_from": label_from,
        "source_label": own,
        "selected_by": selected_by,
        "retrieved": retrievals,
        "balanced": levels,
    }
    return {
        "__key__": f"{id_:019d}",
        "id": id_,
        "set": m["set"],
        "kind": m["kind"],
        "source": m["source"],
        "source_key": m["key"],
        "sha1": m["sha1"],
        "bytes": int(m["bytes"]),
        "width": int(m["width"]),
        "height": int(m["height"]),
        "ext": _ext(m["key"]),
        "label": label,
        "cls": cls_of.get(label) if label is not None else None,
        "seed_sets": ",".join(sorted({r["seed_set"] for r in retrievals})),
        "best_similarity": max((r["similarity"] for r in retrievals), default=float("nan")),
        "selected_by": ",".join(selected_by),
        "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
    }


def build_samples(cfg, run_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """One row per curated image with everything its sample needs, in shard order.

    The manifest is read for the curated images and the seed sets only (filtered part by part
    in Arrow), so a pool of millions that curates a few costs memory for the few."""
    select = resolve_select(cfg)
    provenance = merge_provenance(read_neighbors(run_dir)) if select in ("retrieve", "both") else {}
    balanced = balanced_provenance(run_dir) if select in ("balanced", "both") else {}
    seed_sets = [name for name in manifest_sets(run_dir, status=None) if name.startswith("seed:")]
    seeds = read_manifest(run_dir, status=None, sets=seed_sets, columns=["id", "set", "label"])
    classes = class_index(seeds)
    cls_of = {name: i for i, name in enumerate(classes)}
    seed_labels = {int(i): str(v) for i, v in zip(seeds["id"], seeds["label"]) if not pd.isna(v)}
    ids = np.array(sorted(set(provenance) | set(balanced)), dtype=np.int64)
    if cfg.shards.shuffle:
        ids = ids[np.random.default_rng(int(cfg.seed)).permutation(len(ids))]
    rows = [
        sample_row(m, provenance.get(int(m["id"]), []), balanced.get(int(m["id"])), seed_labels, cls_of)
        for m in curated_rows(run_dir, ids).to_dict("records")
    ]
    if cfg.shards.crops:
        add_crops(cfg, run_dir, rows, ids)
    return pd.DataFrame(rows), classes


def add_crops(cfg, run_dir: Path, rows: list[dict], ids: np.ndarray) -> None:
    """`shards.crops`: each row's kept boxes (`curate.crops`) as the crop samples that follow it."""
    from lvd.curate.crops import crop_samples, kept_boxes
    from lvd.curate.detect import read_detections
    from lvd.curate.detect_filter import filter_rules

    boxes = kept_boxes(read_detections(run_dir), ids, filter_rules(cfg)[0])
    for row in rows:
        meta = {"id": row["id"], "source": row["source"], "key": row["source_key"], "set": row["set"],
                "width": row["width"], "height": row["height"]}  # fmt: skip
        row["crops"] = crop_samples(row["__key__"], meta, boxes.get(row["id"], []))


PARQUET_COLUMNS = [
    "__key__",
    "id",
    "set",
    "source",
    "source_key",
    "sha1",
    "bytes",
    "width",
    "height",
    "ext",
    "label",
    "cls",
    "seed_sets",
    "best_similarity",
    "selected_by",
]


def samples_fingerprint(frame: pd.DataFrame, cfg) -> str:
    """What one shard holds: its samples (keys, contents, provenance, classes) and how they are written."""
    h = hashlib.sha1()
    h.update(repr((cfg.shards.resize, cfg.shards.quality, cfg.shards.mtime)).encode())
    for key, sha, blob, cls in zip(frame["__key__"], frame["sha1"], frame["json"], frame["cls"]):
        h.update(f"{key}\0{sha}\0{cls}\0".encode() + blob + b"\n")
    for crops in frame["crops"] if "crops" in frame else []:
        h.update(b"".join(meta for _, _, meta in crops) + b"\n")
    return h.hexdigest()


def _write_index(path: Path, frame: pd.DataFrame) -> None:
    table = frame[PARQUET_COLUMNS].astype({"cls": "Int64", "bytes": "Int64"})
    if "crops" in frame:  # a crop's row follows its image's: its key and size, `crop` in selected_by
        rows = []
        for sample, crops in zip(table.to_dict("records"), frame["crops"]):
            rows.append(sample)
            for key, (x0, y0, x1, y1), _ in crops:
                rows.append({**sample, "__key__": key, "bytes": pd.NA, "width": x1 - x0, "height": y1 - y0,
                             "ext": "jpg", "label": None, "cls": pd.NA, "selected_by": "crop"})  # fmt: skip
        table = pd.DataFrame(rows, columns=PARQUET_COLUMNS).astype(table.dtypes.to_dict())
    write_table(path, pa.Table.from_pandas(table, preserve_index=False))


def _spec(path: Path, frame: pd.DataFrame, cfg) -> ShardSpec:
    return ShardSpec(
        path=str(path),
        keys=frame["__key__"].tolist(),
        ids=[int(i) for i in frame["id"]],
        kinds=frame["kind"].tolist(),
        sources=frame["source"].tolist(),
        source_keys=frame["source_key"].tolist(),
        sha1s=frame["sha1"].tolist(),
        exts=frame["ext"].tolist(),
        jsons=frame["json"].tolist(),
        classes=[None if pd.isna(c) else int(c) for c in frame["cls"]],
        mtime=int(cfg.shards.mtime),
        resize=int(cfg.shards.resize) if cfg.shards.resize else None,
        quality=int(cfg.shards.quality),
        crops=frame["crops"].tolist() if "crops" in frame else None,
    )


def write_shards(cfg, frames: dict[str, pd.DataFrame], parts: Parts, ranks) -> None:
    """Worker processes write the tars of this rank's share of the shards left to do; the parent
    stages each one's parquet and marker (which records the tar's size) once its tar is in place."""
    mine = {name: frames[name] for name in parts.mine}
    specs = [_spec(parts.path(name, f"{name}.tar"), frame, cfg) for name, frame in mine.items()]
    by_path = {spec.path: name for spec, name in zip(specs, mine)}
    show = show_progress(cfg.progress) and ranks.rank == 0
    with tqdm(total=len(specs), unit="shard", desc="shards", disable=not show) as bar:
        for path, _count, size in process_map(write_shard, specs, rank_workers(cfg.workers, ranks)):
            name = by_path[path]
            _write_index(parts.path(name, f"{name}.parquet"), mine[name])
            # the fingerprint names the bytes: the writer is deterministic
            parts.done(name, content=parts.plan[name][0], bytes=int(size))
            bar.update(1)


def run_shards(cfg) -> Path:
    """Write every shard that is missing or out of date; then _SUCCESS.json."""
    optional = ("manifest", "cluster", "retrieve", *(("detect",) if cfg.shards.crops else ()))
    with open_stage(cfg, STAGE, optional=optional, device="cpu") as stage:
        samples, classes = build_samples(cfg, stage.run_dir)
        sizes = samples["bytes"].to_numpy() if len(samples) else np.zeros(0)
        ranges = plan_shards(sizes, int(cfg.shards.max_count), int(cfg.shards.max_bytes))
        frames = {f"{cfg.shards.prefix}-{n:06d}": samples.iloc[a:b] for n, (a, b) in enumerate(ranges)}
        plan = {
            name: (stage.fingerprint_of(samples_fingerprint(frame, cfg)), [f"{name}.tar", f"{name}.parquet"])
            for name, frame in frames.items()
        }
        parts = stage.parts(plan)
        if stage.up_to_date:
            log.info("shards: %d shards up to date", len(ranges))
            return stage.folder
        write_shards(cfg, frames, parts, stage.ranks)
        if stage.ranks.rank != 0:  # rank 0 commits every rank's shards
            return stage.commit()
        atomic_write_json(stage.path("classes.json"), {"classes": classes})
        written = sum(int(parts.info(name).get("bytes", 0)) for name in parts.todo)
        selected = {
            name: int(samples["selected_by"].str.contains(name).sum()) if len(samples) else 0
            for name in ("retrieve", "balanced")
        }
        stage.commit(
            shards=len(ranges),
            shards_written=len(parts.fresh),
            samples=int(len(samples)),
            select=resolve_select(cfg),
            selected=selected,
            bytes_written=int(written),
            classes=len(classes),
        )
    log.info("shards: %d samples in %d shards (%d written)", len(samples), len(ranges), len(parts.fresh))
    return stage.folder


def main(argv: list[str] | None = None) -> int:
    """`python -m lvd.curate.shards CONFIG [key=value ...]`: the entry point for torchrun."""
    return torchrun_main(run_shards, "lvd.curate.shards", argv)


if __name__ == "__main__":
    sys.exit(main())
