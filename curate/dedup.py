"""The dedup stage: exact duplicates, near-duplicates and eval-set decontamination of the pool.

reader : the manifest's ok pool and eval rows; the copy-detection embeddings (`embed/copy/`)
         when a copy-detection model is configured (`auto`: SSCD when installed), else the main
         ones (`embed/`); thresholds are those of that space (`curate.dedup_space`);
mapper : exact      - pool rows with equal sha1: the lowest id is kept, the others point to it;
         near       - k-NN graph (cosine >= dedup.threshold) over the pool rows left by exact
                      dedup, connected components, one kept per component (`mode: knn`, as in
                      DINOv2), or the same components built from all pairs inside each
                      spherical k-means cluster (`mode: semdedup`, after SemDeDup);
                      `grouping: star` keeps instead every image that is not a direct
                      near-duplicate of a kept one (no chains);
         decontam   - every (pool, eval) pair with cosine >= decontam.threshold, found
                      exactly (blocked matmul), so that the removal can be audited;
writer : dedup/exact.parquet (id, dup_of), dedup/near.parquet (id, component, keep),
         dedup/decontam.parquet (id, eval_set, eval_id, similarity), then _SUCCESS.json, which
         records the space and the thresholds applied (and where each came from).
         The curated pool (`curated_pool_ids`) is near.parquet's kept ids minus the ids in
         decontam.parquet; exact duplicates never reach near.parquet.

Keep rule inside a near-duplicate group (`dedup.keep`, `index.keep_rule`): `quality` keeps the
copy with the most pixels, then a lossless format over a lossy one, then the most bytes per
pixel, then the lowest id; `pixels` only the first and the last. Everything it needs is in the
manifest, and the result depends on the data only, not on order. near.parquet's `reason` says
which criterion made each kept image win.

The three files are three parts of the stage runner (`curate.stage`), each with the fingerprint
of its own inputs and settings; a rerun redoes only the files whose fingerprint changed (all of
them with `overwrite=true`). The vector work is `index.near_duplicates` and `index.components`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from lvd.common.devices import resolve_device
from lvd.common.errors import MissingInputError
from lvd.common.memory import memory_budget, rows_per_block
from lvd.common.ranks import Ranks, gather_rows, rank_slice
from lvd.common.run_folder import (
    content_fingerprint,
    curated_pool_ids,
    embedding_ids,
    read_frame,
    read_manifest,
    read_success,
    vector_files,
)
from lvd.curate.dedup_space import DedupSpace, Threshold, resolve_thresholds
from lvd.curate.embed import weights_record
from lvd.curate.stage import Parts, Stage, open_stage, torchrun_main, write_frame
from lvd.curate.workers import show_progress
from lvd.index.components import pairs_above
from lvd.index.io import EmbeddingRows, IdRows
from lvd.index.keep_rule import keep_priority, keep_reasons, quality_keys
from lvd.index.near_duplicates import (
    exact_graph_pays,
    near_duplicates_join,
    near_duplicates_knn,
    near_duplicates_semdedup,
)

log = logging.getLogger(__name__)

STAGE = "dedup"
POOL = "pool"
EVAL_PREFIX = "eval:"
EXACT, NEAR, DECONTAM = "exact", "near", "decontam"  # the stage's parts, each one file NAME.parquet

EXACT_SCHEMA = pa.schema([("id", pa.int64()), ("dup_of", pa.int64())])
NEAR_SCHEMA = pa.schema([("id", pa.int64()), ("component", pa.int64()), ("keep", pa.bool_()), ("reason", pa.string())])
DECONTAM_SCHEMA = pa.schema(
    [("id", pa.int64()), ("eval_set", pa.string()), ("eval_id", pa.int64()), ("similarity", pa.float32())]
)
# What dedup reads of the manifest (a 10M-row manifest whole is gigabytes in pandas).
MANIFEST_COLUMNS = ("id", "set", "sha1", "width", "height", "format", "bytes")
# Share of the pool whose removal by one near-duplicate component, or by decontamination,
# suggests a threshold too low for the embedding space (a warning, not an error).
SUSPICIOUS_FRACTION = 0.1


# ---------------------------------------------------------------- mappers (arrays in, frames out)


def exact_duplicates(ids: np.ndarray, sha1: np.ndarray) -> pd.DataFrame:
    """(id, dup_of) for every row whose content hash an earlier (lower) id already has."""
    frame = pd.DataFrame({"id": np.asarray(ids, np.int64), "sha1": np.asarray(sha1)}).sort_values("id", kind="stable")
    frame["dup_of"] = frame.groupby("sha1", sort=False)["id"].transform("min")
    return frame.loc[frame["id"] != frame["dup_of"], ["id", "dup_of"]].reset_index(drop=True)


def contamination_pairs(
    pool_x: np.ndarray, eval_x: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool row, eval row, similarity) of every pair with similarity >= threshold, exactly."""
    return pairs_above(pool_x, eval_x, threshold)


def warn_if_indiscriminate(component: np.ndarray, threshold: float, space: str) -> None:
    """Warn when one component swallows a large part of the pool: a threshold too low for the space.

    Connected components chain: in an embedding space where unrelated images are close (main
    embeddings rather than a copy-detection model), a threshold tuned for SSCD links nearly
    everything into one group and dedup would keep one image.
    """
    if len(component) < 100:
        return
    largest = int(np.bincount(component).max())
    if largest > SUSPICIOUS_FRACTION * len(component):
        log.warning(
            "dedup: one near-duplicate component holds %d of %d images at threshold %.3g in %s; the "
            "threshold is probably too low for this space (DINOv2's 0.6 is for SSCD copy-detection "
            "descriptors)",
            largest,
            len(component),
            threshold,
            space,
        )


# ---------------------------------------------------------------- readers


def embedding_folder(run_dir: Path, space: DedupSpace) -> Path:
    """Where the dedup embeddings are; they must come from the copy-detection model the config names."""
    embed = run_dir / "embed"
    if space.copy_detector is None:
        return embed
    copy = run_dir / space.folder
    made_with = ((read_success(embed) or {}).get("copy_detection") or {}).get("weights")
    wanted = weights_record(space.copy_detector.weights)
    if made_with is None or not any(copy.glob("part-*.npy")):
        raise MissingInputError(
            f"the copy-detection model {space.copy_detector.describe()} is configured, but {embed} "
            f"holds no copy-detection embeddings: run `lvd embed` again"
        )
    if made_with != wanted:
        raise MissingInputError(
            f"{copy} was embedded with {made_with}, but the config names {wanted}: run `lvd embed` again"
        )
    return copy


def _int64(series: pd.Series) -> np.ndarray:
    return series.to_numpy(dtype=np.int64)


def _pixels(frame: pd.DataFrame) -> np.ndarray:
    return frame["width"].fillna(0).to_numpy(np.int64) * frame["height"].fillna(0).to_numpy(np.int64)


def _keep_keys(frame: pd.DataFrame) -> np.ndarray:
    """The keep rule's keys of manifest rows (pixels, lossless, bytes per pixel)."""
    return quality_keys(_pixels(frame), frame["format"].fillna("").astype(str), frame["bytes"].fillna(0))


@dataclass
class Inputs:
    """What the mappers read: the pool and eval rows of the manifest, where their vectors are, and
    the space and thresholds near-copies are judged at."""

    pool: pd.DataFrame  # id and the keep rule's columns, sorted by id
    pool_sha1: np.ndarray  # 40 bytes per hash (S40), not a Python object each
    evals: pd.DataFrame  # id, set
    folder: Path
    space: DedupSpace
    near: Threshold
    decontam: Threshold | None
    budget: int
    device: str


def read_inputs(cfg) -> Inputs:
    run_dir = Path(cfg.run_dir)
    manifest = read_manifest(run_dir, columns=MANIFEST_COLUMNS).sort_values("id", kind="stable")
    pool = manifest[manifest["set"] == POOL].reset_index(drop=True)
    evals = manifest[manifest["set"].str.startswith(EVAL_PREFIX)].reset_index(drop=True)
    del manifest
    space, near_t, decontam_t = resolve_thresholds(cfg, decontaminate=len(evals) > 0)
    log.info(
        "dedup: near-copies judged in %s; dedup threshold %.3g (%s)%s",
        space.description,
        near_t.value,
        near_t.source,
        f", decontamination threshold {decontam_t.value:.3g} ({decontam_t.source})" if decontam_t else "",
    )
    # at 10M images the hashes as numpy str or Python objects would hold 1.6 GB through the stage
    sha1 = np.array(pool["sha1"].tolist(), dtype="S40")
    budget = memory_budget(cfg.get("memory_gb", "auto"))
    device = str(resolve_device(str(cfg.dedup.device)))
    folder = embedding_folder(run_dir, space)
    return Inputs(
        pool.drop(columns=["sha1"]), sha1, evals[["id", "set"]], folder, space, near_t, decontam_t, budget, device
    )


def near_settings(cfg, found: Inputs) -> dict:
    settings = {k: cfg.dedup[k] for k in ("mode", "k", "semdedup_clusters", "niter", "grouping", "keep")}
    return {**settings, "threshold": found.near.value}


def plan_parts(cfg, stage: Stage, found: Inputs) -> dict[str, tuple[str, list[str]]]:
    """Each file's fingerprint: exact from the pool's hashes; near from exact's, the vectors, the
    settings and the keep rule's keys; decontam from the pool, the eval sets and the vectors."""
    embed_fp = content_fingerprint(found.folder) or content_fingerprint(stage.run_dir / "embed")
    pool_ids, eval_ids = _int64(found.pool["id"]), _int64(found.evals["id"])
    exact = stage.fingerprint_of(EXACT, pool_ids, found.pool_sha1)
    near = stage.fingerprint_of(NEAR, exact, embed_fp, near_settings(cfg, found), int(cfg.seed), _keep_keys(found.pool))
    threshold = found.decontam.value if found.decontam else None
    evals = found.evals["set"].tolist()
    decontam = stage.fingerprint_of(DECONTAM, pool_ids, eval_ids, evals, embed_fp, threshold)
    return {name: (fp, [f"{name}.parquet"]) for name, fp in ((EXACT, exact), (NEAR, near), (DECONTAM, decontam))}


# ---------------------------------------------------------------- the stage


def stage_exact(stage: Stage, parts: Parts, found: Inputs) -> pd.DataFrame:
    """exact.parquet's rows: computed (every rank: it is cheap) and staged by rank 0, or read."""
    if EXACT not in parts.todo:
        return read_frame(parts.current(EXACT, "exact.parquet"))
    exact = exact_duplicates(_int64(found.pool["id"]), found.pool_sha1)
    if stage.ranks.rank == 0:
        write_frame(parts.path(EXACT, "exact.parquet"), exact, EXACT_SCHEMA)
        parts.done(EXACT)
        log.info("dedup: %d exact duplicates among %d pool images", len(exact), len(found.pool))
    return exact


def summary(cfg, parts: Parts, found: Inputs) -> dict:
    """dedup/_SUCCESS.json's own fields: the space, thresholds, settings and counts."""
    exact, near, decontam = (read_frame(parts.current(n, f"{n}.parquet")) for n in (EXACT, NEAR, DECONTAM))
    kept = curated_pool_ids(cfg.run_dir, near=near, decontam=decontam)
    space = found.space
    return {
        "embeddings": str(found.folder.relative_to(Path(cfg.run_dir))),
        "space": {
            "name": space.space,
            "description": space.description,
            "copy_detector": space.copy_detector.describe() if space.copy_detector else None,
        },
        "thresholds": {"dedup": found.near.record(), "decontam": found.decontam.record() if found.decontam else None},
        "settings": {
            "dedup": near_settings(cfg, found),
            "decontam_threshold": found.decontam.value if found.decontam else None,
        },
        "near_search": parts.info(NEAR).get("near_search"),
        "pool": int(len(found.pool)),
        "exact_duplicates": int(len(exact)),
        "near_checked": int(len(near)),
        "near_duplicates_removed": int((~near["keep"]).sum()),
        "decontam_pairs": int(len(decontam)),
        "decontaminated": int(decontam["id"].nunique()),
        "pool_kept": int(len(kept)),
        "fingerprints": {f"{n}.parquet": parts.plan[n][0] for n in (EXACT, NEAR, DECONTAM)},
    }


def run_dedup(cfg) -> Path:
    """Write exact.parquet, near.parquet and decontam.parquet for the run's pool.

    Under torchrun (`python -m lvd.curate.dedup CONFIG`) every rank joins its share of the
    inverted lists and checks its share of the pool against the eval sets; rank 0 groups the
    pairs and writes the same files one process would.
    """
    with open_stage(cfg, STAGE, inputs=("manifest", "embed"), device=cfg.dedup.device) as stage:
        found = read_inputs(cfg)
        parts = stage.parts(plan_parts(cfg, stage, found))
        if stage.up_to_date:
            log.info("dedup: up to date, nothing to do")
            return stage.folder
        exact = stage_exact(stage, parts, found)
        embedded = IdRows(embedding_ids(found.folder)) if {NEAR, DECONTAM} & set(parts.todo) else None
        if NEAR in parts.todo:
            near = near_frame(cfg, found, exact, embedded, stage.ranks)
            if near is not None:  # rank 0
                write_frame(parts.path(NEAR, "near.parquet"), near[0], NEAR_SCHEMA)
                parts.done(NEAR, near_search=near[1])
        if DECONTAM in parts.todo:
            pairs = decontam_frame(found, embedded, stage.ranks)
            if pairs is not None:  # rank 0
                write_frame(parts.path(DECONTAM, "decontam.parquet"), pairs, DECONTAM_SCHEMA)
                parts.done(DECONTAM)
        if stage.ranks.rank != 0:  # a helper rank: the same collective work, nothing written
            return stage.commit()
        info = summary(cfg, parts, found)
        stage.commit(**info)
    log.info("dedup: %d of %d pool images kept", info["pool_kept"], info["pool"])
    return stage.folder


def near_frame(cfg, found: Inputs, exact: pd.DataFrame, embedded: IdRows, ranks: Ranks):
    """near.parquet's rows (the pool left by exact dedup, grouped and kept by the configured
    rule), and how the near-duplicate pairs were searched; None on a helper rank."""
    survivors = found.pool[~found.pool["id"].isin(exact["id"])].reset_index(drop=True)
    rows = embedded.rows(_int64(survivors["id"]))
    if (rows < 0).any():
        log.warning(
            "dedup: %d pool images have no embedding (filtered out before embed, or undecodable); they are left out",
            int((rows < 0).sum()),
        )
        survivors, rows = survivors[rows >= 0].reset_index(drop=True), rows[rows >= 0]
    keys = _keep_keys(survivors)
    view = EmbeddingRows(vector_files(found.folder), rows)
    found_groups = near_groups(cfg, found, view, keep_priority(keys, str(cfg.dedup.keep)), ranks)
    if found_groups is None:
        return None
    component, keep, how = found_groups
    if str(cfg.dedup.grouping) == "components":  # star groups cannot chain
        warn_if_indiscriminate(component, found.near.value, found.space.description)
    reason = keep_reasons(component, keep, keys, str(cfg.dedup.keep))
    log.info(
        "dedup: %d near-duplicates removed from %d images (%d components)",
        int((~keep).sum()),
        len(survivors),
        int(component.max() + 1) if len(component) else 0,
    )
    frame = pd.DataFrame({"id": _int64(survivors["id"]), "component": component, "keep": keep, "reason": reason})
    return frame, how


def near_groups(cfg, found: Inputs, view: EmbeddingRows, priority: np.ndarray, ranks: Ranks):
    """(component, keep, how) of the view's rows by the configured mode; None on a helper rank.
    The list join runs on every rank; the in-memory graph and SemDeDup on rank 0 alone."""
    k, progress = int(cfg.dedup.k), show_progress(cfg.progress)
    common = dict(
        threshold=found.near.value,
        backend=str(cfg.dedup.backend),
        device=found.device,
        seed=int(cfg.seed),
        grouping=str(cfg.dedup.grouping),
    )
    if cfg.dedup.mode == "knn" and not exact_graph_pays(len(view), view.dim, k, found.device, found.budget):
        component, keep, how = near_duplicates_join(
            view, priority, k=k, budget=found.budget, progress=progress, ranks=ranks, **common
        )
        return (component, keep, how) if ranks.rank == 0 else None
    if ranks.rank != 0:
        return None
    if cfg.dedup.mode == "knn":
        component, keep = near_duplicates_knn(np.asarray(view), priority, k=k, **common)
        return component, keep, {"method": "knn-graph", "rows": len(view)}
    component, keep = near_duplicates_semdedup(
        np.asarray(view),
        priority,
        clusters=cfg.dedup.semdedup_clusters,
        niter=int(cfg.dedup.niter),
        progress=progress,
        **common,
    )
    return component, keep, {"method": "semdedup", "rows": len(view)}


def decontam_frame(found: Inputs, embedded: IdRows, ranks: Ranks) -> pd.DataFrame | None:
    """decontam.parquet's rows: every (pool, eval) pair at or above the threshold, the pool read in
    blocks (each rank its slice; rank 0 gets every pair, a helper rank None)."""
    threshold = found.decontam.value if found.decontam else None
    pool_ids, eval_ids = _int64(found.pool["id"]), _int64(found.evals["id"])
    p_rows, e_rows = embedded.rows(pool_ids), embedded.rows(eval_ids)
    if (e_rows < 0).any() and ranks.rank == 0:
        log.warning("dedup: %d eval images have no embedding; they cannot be checked", int((e_rows < 0).sum()))
    p_ok, e_ok = p_rows >= 0, e_rows >= 0
    pool_ids, eval_ids = pool_ids[p_ok], eval_ids[e_ok]
    eval_sets = found.evals["set"].str.slice(len(EVAL_PREFIX)).to_numpy(object)[e_ok]
    parts = vector_files(found.folder)
    eval_x = EmbeddingRows(parts, e_rows[e_ok])[:]
    mine = rank_slice(int(p_ok.sum()), ranks)
    pool_view = EmbeddingRows(parts, p_rows[p_ok][mine])
    pairs = [np.zeros((0, 3), np.float64)]  # float64 holds the rows exactly
    for start, block in pool_view.blocks(rows_per_block(found.budget, 4 * pool_view.dim + 4 * max(1, len(eval_x)))):
        q, b, sims = contamination_pairs(block, eval_x, threshold if threshold is not None else np.inf)
        pairs.append(np.stack([q + start + mine.start, b, sims], 1).astype(np.float64))
    pairs = gather_rows(np.concatenate(pairs), ranks)
    if ranks.rank != 0:
        return None
    q, b = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
    frame = pd.DataFrame(
        {
            "id": pool_ids[q],
            "eval_set": eval_sets[b],
            "eval_id": eval_ids[b],
            "similarity": pairs[:, 2].astype(np.float32),
        }
    )
    frame = frame.sort_values(["id", "eval_set", "eval_id"], kind="stable").reset_index(drop=True)
    removed = frame["id"].nunique()
    log.info("dedup: %d pool images match an eval image (%d pairs)", removed, len(frame))
    if len(found.pool) >= 100 and removed > SUSPICIOUS_FRACTION * len(found.pool):
        log.warning(
            "decontam: %d of %d pool images are within %.3g of an eval image; the threshold is "
            "probably too low for these embeddings",
            removed,
            len(found.pool),
            threshold,
        )
    return frame


def main(argv: list[str] | None = None) -> int:
    """`python -m lvd.curate.dedup CONFIG [key=value ...]`: the entry point for torchrun."""
    return torchrun_main(run_dedup, "lvd.curate.dedup", argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
