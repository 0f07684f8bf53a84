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

Each file records a fingerprint of its inputs and settings in its parquet metadata; a rerun
redoes only the files whose fingerprint changed (all of them with `overwrite=true`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from lvd.common.errors import MissingInputError
from lvd.common.memory import memory_budget, rows_per_block
from lvd.curate.dedup_space import DedupSpace, resolve_thresholds
from lvd.curate.embed import weights_record
from lvd.curate.manifest import read_manifest
from lvd.curate.ranks import Ranks, gather_rows, in_ranks, rank_slice, torchrun_main
from lvd.curate.runio import (
    fingerprint,
    is_done,
    open_stage,
    parquet_fingerprint,
    read_success,
    stage_fingerprint,
    write_frame,
)
from lvd.curate.stage import StageOutputs
from lvd.curate.workers import show_progress
from lvd.index import ivf_join, ivf_switch
from lvd.index.backends import resolve_device
from lvd.index.components import duplicate_groups, group_duplicates, pairs_above
from lvd.index.io import EmbeddingRows, load_embedding_ids
from lvd.index.keep_rule import keep_priority, keep_reasons, quality_keys
from lvd.index.kmeans import kmeans
from lvd.index.knn import EXACT_MAX_ACCELERATOR, knn_graph

log = logging.getLogger(__name__)

STAGE = "dedup"
POOL = "pool"
EVAL_PREFIX = "eval:"

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
# SemDeDup mode without dedup.semdedup_clusters: about this many images per cluster.
SEMDEDUP_CLUSTER_SIZE = 1000


# ---------------------------------------------------------------- mappers (arrays in, frames out)


def exact_duplicates(ids: np.ndarray, sha1: np.ndarray) -> pd.DataFrame:
    """(id, dup_of) for every row whose content hash an earlier (lower) id already has."""
    frame = pd.DataFrame({"id": np.asarray(ids, np.int64), "sha1": np.asarray(sha1)}).sort_values("id", kind="stable")
    frame["dup_of"] = frame.groupby("sha1", sort=False)["id"].transform("min")
    return frame.loc[frame["id"] != frame["dup_of"], ["id", "dup_of"]].reset_index(drop=True)


def near_duplicates_knn(
    x: np.ndarray,
    priority: np.ndarray,
    *,
    k: int,
    threshold: float,
    backend: str = "auto",
    device: str = "cpu",
    seed: int = 0,
    grouping: str = "components",
) -> tuple[np.ndarray, np.ndarray]:
    """(component, keep) per row from the k-NN graph thresholded at `threshold` (DINOv2).

    The graph is exact for small pools and IVF past the exact/IVF crossover measured on this
    machine (`index.ivf_switch`), checked to keep the edges at or above the threshold; edges below
    it are dropped before the grouping (`index.components.group_duplicates`).
    """
    if len(x) < 2:
        return np.arange(len(x), dtype=np.int64), np.ones(len(x), bool)
    sims, neighbors = knn_graph(
        x, min(k, len(x) - 1), backend=backend, device=device, seed=seed, min_similarity=threshold
    )
    return duplicate_groups(sims, neighbors, threshold, priority, grouping)


def exact_graph_pays(n: int, d: int, k: int, device: str, budget: int) -> bool:
    """Whether the in-memory k-NN graph beats the list join for n rows.

    Both are matrix products at the same rate: an exact graph costs n^2 d, the join about
    n (nprobe LIST_SIZE + CHECK_QUERIES) d with nprobe up to 16, so a CPU searches exactly up to
    ~9k rows; an accelerator's tensor cores make n^2 affordable up to EXACT_MAX_ACCELERATOR. Past
    the memory budget (the float32 rows, the index and the graph) the join is the only way.
    """
    in_memory = n * (8 * d + 12 * k)
    if in_memory > budget:
        return False
    if resolve_device(device).type != "cpu":
        return n <= EXACT_MAX_ACCELERATOR
    return n <= ivf_join.NPROBES[-2] * ivf_join.LIST_SIZE + ivf_switch.CHECK_QUERIES


def near_duplicates_join(
    view,
    priority: np.ndarray,
    *,
    k: int,
    threshold: float,
    budget: int,
    backend: str = "auto",
    device: str = "cpu",
    seed: int = 0,
    grouping: str = "components",
    progress: bool = False,
    ranks: Ranks | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(component, keep, join report) of the rows of an `EmbeddingRows` view, read from the parts
    list group by list group (`index.ivf_join`): memory holds a few bytes per row, not the rows."""
    rows, cols, report = ivf_join.near_pairs(
        view,
        threshold,
        k,
        memory_budget=budget,
        seed=seed,
        backend=backend,
        device=device,
        spanning=grouping == "components",
        progress=progress,
        ranks=ranks,
    )
    component, keep = group_duplicates(len(view), rows, cols, priority, grouping)
    return component, keep, report.record()


def near_duplicates_semdedup(
    x: np.ndarray,
    priority: np.ndarray,
    *,
    threshold: float,
    clusters: int | None,
    niter: int = 20,
    seed: int = 0,
    backend: str = "auto",
    device: str = "cpu",
    progress: bool = False,
    grouping: str = "components",
) -> tuple[np.ndarray, np.ndarray]:
    """(component, keep) per row from all pairs >= threshold inside each spherical k-means cluster.

    SemDeDup (Abbas et al. 2023) compares only images of the same cluster, which makes all
    pairs affordable; pairs that k-means separates are not linked.
    """
    n = len(x)
    if n < 2:
        return np.arange(n, dtype=np.int64), np.ones(n, bool)
    k = int(clusters or max(1, round(n / SEMDEDUP_CLUSTER_SIZE)))
    k = max(1, min(k, n))
    assign = kmeans(x, k, niter=niter, seed=seed, spherical=True, backend=backend, device=device).assign
    rows, cols = [], []
    order = np.argsort(assign, kind="stable")
    bounds = np.searchsorted(assign[order], np.arange(k + 1))
    for c in tqdm(range(k), desc="semdedup", unit="cluster", disable=not progress):
        members = order[bounds[c] : bounds[c + 1]]
        if len(members) < 2:
            continue
        q, b, _ = pairs_above(x[members], x[members], threshold, exclude_self=True)
        rows.append(members[q])
        cols.append(members[b])
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    cols = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    return group_duplicates(n, rows, cols, priority, grouping)


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
    record = read_success(embed)
    if record is None:
        raise MissingInputError(f"no finished embeddings in {embed}: run `lvd embed` first")
    if space.copy_detector is None:
        return embed
    copy = run_dir / space.folder
    made_with = (record.get("copy_detection") or {}).get("weights")
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


def rows_of(ids: np.ndarray, emb_ids: np.ndarray) -> np.ndarray:
    """Row of each id in the embedding arrays (-1 where the id has no embedding)."""
    return pd.Index(emb_ids).get_indexer(np.asarray(ids, np.int64))


def _int64(series: pd.Series) -> np.ndarray:
    return series.to_numpy(dtype=np.int64)


def _pixels(frame: pd.DataFrame) -> np.ndarray:
    return frame["width"].fillna(0).to_numpy(np.int64) * frame["height"].fillna(0).to_numpy(np.int64)


def _keep_keys(frame: pd.DataFrame) -> np.ndarray:
    """The keep rule's keys of manifest rows (pixels, lossless, bytes per pixel)."""
    return quality_keys(_pixels(frame), frame["format"].fillna("").astype(str), frame["bytes"].fillna(0))


# ---------------------------------------------------------------- the stage


def run_dedup(cfg) -> Path:
    """Write exact.parquet, near.parquet and decontam.parquet for the run's pool.

    Under torchrun (`python -m lvd.curate.dedup CONFIG`) every rank joins its share of the
    inverted lists and checks its share of the pool against the eval sets; rank 0 groups the
    pairs and writes the same files one process would.
    """
    return in_ranks(_run_dedup, cfg, cfg.dedup.device)


def _run_dedup(cfg, ranks: Ranks) -> Path:
    started = time.time()
    run_dir = Path(cfg.run_dir)
    out = run_dir / STAGE
    if ranks.rank == 0:
        open_stage(cfg, STAGE)
    ranks.barrier()
    overwrite = bool(cfg.get("overwrite", False))
    device = str(resolve_device(str(cfg.dedup.device)))
    budget = memory_budget(cfg.get("memory_gb", "auto"))

    manifest = read_manifest(run_dir, columns=MANIFEST_COLUMNS).sort_values("id", kind="stable")
    pool = manifest[manifest["set"] == POOL].reset_index(drop=True)
    evals = manifest[manifest["set"].str.startswith(EVAL_PREFIX)].reset_index(drop=True)
    del manifest
    space, near_t, decontam_t = resolve_thresholds(cfg, decontaminate=len(evals) > 0)
    threshold = near_t.value
    decontam_threshold = decontam_t.value if decontam_t is not None else None
    folder = embedding_folder(run_dir, space)
    embed_fp = stage_fingerprint(folder) or stage_fingerprint(run_dir / "embed")
    log.info(
        "dedup: near-copies judged in %s; dedup threshold %.3g (%s)%s",
        space.description,
        threshold,
        near_t.source,
        f", decontamination threshold {decontam_threshold:.3g} ({decontam_t.source})" if decontam_t is not None else "",
    )

    def todo(name: str, fp: str) -> bool:
        return overwrite or parquet_fingerprint(out / name) != fp

    # 40 ASCII bytes per hash, not numpy's 160 (str) or a Python object each: at 10M images the
    # hashes alone would otherwise hold 1.6 GB through the whole stage
    pool_ids, pool_sha1 = _int64(pool["id"]), np.array(pool["sha1"].tolist(), dtype="S40")
    pool = pool.drop(columns=["sha1"])  # the near search needs ids and the keep rule's columns only
    exact_fp = fingerprint("exact", pool_ids, pool_sha1)
    near_settings = {k: cfg.dedup[k] for k in ("mode", "k", "semdedup_clusters", "niter", "grouping", "keep")}
    near_settings["threshold"] = threshold
    near_fp = fingerprint("near", exact_fp, embed_fp, near_settings, int(cfg.seed), _keep_keys(pool))
    eval_ids = _int64(evals["id"])
    decontam_fp = fingerprint("decontam", pool_ids, eval_ids, evals["set"].tolist(), embed_fp, decontam_threshold)
    fps = {"exact.parquet": exact_fp, "near.parquet": near_fp, "decontam.parquet": decontam_fp}
    if is_done(out) and not any(todo(n, fp) for n, fp in fps.items()):
        log.info("dedup: up to date, nothing to do")
        return out
    need_exact, need_near, need_decontam = (todo(n, fp) for n, fp in fps.items())
    ranks.barrier()  # every rank has read the finished files' fingerprints before rank 0 replaces any
    if ranks.rank != 0:  # a helper rank: the same collective work, nothing written
        exact = (
            exact_duplicates(pool_ids, pool_sha1) if need_exact else pq.read_table(out / "exact.parquet").to_pandas()
        )
        del pool_sha1
        emb_ids = load_embedding_ids(folder)
        if need_near:
            _near_frame(cfg, pool, exact, emb_ids, folder, threshold, device, space, budget, ranks)
        if need_decontam:
            _decontam_frame(pool, evals, emb_ids, folder, decontam_threshold, budget, ranks)
        ranks.barrier()  # rank 0 commits
        return out

    with StageOutputs(out) as staged:  # the last finished outputs stay as they are until commit
        if need_exact:
            exact = exact_duplicates(pool_ids, pool_sha1)
            write_frame(staged.path("exact.parquet"), exact, EXACT_SCHEMA, exact_fp)
            log.info("dedup: %d exact duplicates among %d pool images", len(exact), len(pool))
        exact = pq.read_table(staged.current("exact.parquet")).to_pandas()
        del pool_sha1

        emb_ids = load_embedding_ids(folder) if (need_near or need_decontam) else None
        how = None
        if need_near:
            near, how = _near_frame(cfg, pool, exact, emb_ids, folder, threshold, device, space, budget, ranks)
            write_frame(staged.path("near.parquet"), near, NEAR_SCHEMA, near_fp)
        near = pq.read_table(staged.current("near.parquet")).to_pandas()
        if need_decontam:
            pairs = _decontam_frame(pool, evals, emb_ids, folder, decontam_threshold, budget, ranks)
            write_frame(staged.path("decontam.parquet"), pairs, DECONTAM_SCHEMA, decontam_fp)
        decontam = pq.read_table(staged.current("decontam.parquet")).to_pandas()
        kept = curated_pool_ids(run_dir, near=near, decontam=decontam)
        staged.commit(
            embeddings=str(folder.relative_to(run_dir)),
            space={
                "name": space.space,
                "description": space.description,
                "copy_detector": space.copy_detector.describe() if space.copy_detector else None,
            },
            thresholds={"dedup": near_t.record(), "decontam": decontam_t.record() if decontam_t else None},
            settings={"dedup": near_settings, "decontam_threshold": decontam_threshold},
            near_search=how if how is not None else (read_success(out) or {}).get("near_search"),
            pool=int(len(pool)),
            exact_duplicates=int(len(exact)),
            near_checked=int(len(near)),
            near_duplicates_removed=int((~near["keep"]).sum()),
            decontam_pairs=int(len(decontam)),
            decontaminated=int(decontam["id"].nunique()),
            pool_kept=int(len(kept)),
            fingerprints=fps,
            world_size=ranks.world,
            seconds=round(time.time() - started, 3),
        )
    log.info("dedup: %d of %d pool images kept, %.1f s", len(kept), len(pool), time.time() - started)
    ranks.barrier()
    return out


def _near_frame(
    cfg,
    pool: pd.DataFrame,
    exact: pd.DataFrame,
    emb_ids,
    folder: Path,
    threshold: float,
    device: str,
    space: DedupSpace,
    budget: int,
    ranks: Ranks,
) -> tuple[pd.DataFrame, dict] | None:
    """near.parquet's rows (the pool left by exact dedup, grouped and kept by the configured
    rule), and how the near-duplicate pairs were searched; None on a helper rank."""
    survivors = pool[~pool["id"].isin(exact["id"])].reset_index(drop=True)
    rows = rows_of(_int64(survivors["id"]), emb_ids)
    if (rows < 0).any():
        log.warning("dedup: %d pool images have no embedding; they are left out", int((rows < 0).sum()))
        survivors, rows = survivors[rows >= 0].reset_index(drop=True), rows[rows >= 0]
    keys = _keep_keys(survivors)
    view, prio = EmbeddingRows(folder, rows), keep_priority(keys, str(cfg.dedup.keep))
    k, grouping, progress = int(cfg.dedup.k), str(cfg.dedup.grouping), show_progress(cfg.progress)
    common = dict(
        threshold=threshold, backend=str(cfg.dedup.backend), device=device, seed=int(cfg.seed), grouping=grouping
    )
    if cfg.dedup.mode == "knn" and not exact_graph_pays(len(view), view.dim, k, device, budget):
        component, keep, how = near_duplicates_join(
            view, prio, k=k, budget=budget, progress=progress, ranks=ranks, **common
        )
        if ranks.rank != 0:
            return None
    elif ranks.rank != 0:  # the in-memory paths run on rank 0 alone
        return None
    elif cfg.dedup.mode == "knn":
        component, keep = near_duplicates_knn(np.asarray(view), prio, k=k, **common)
        how = {"method": "knn-graph", "rows": len(view)}
    else:
        component, keep = near_duplicates_semdedup(
            np.asarray(view),
            prio,
            clusters=cfg.dedup.semdedup_clusters,
            niter=int(cfg.dedup.niter),
            progress=progress,
            **common,
        )
        how = {"method": "semdedup", "rows": len(view)}
    if grouping == "components":  # star groups cannot chain
        warn_if_indiscriminate(component, threshold, space.description)
    reason = keep_reasons(component, keep, keys, str(cfg.dedup.keep))
    log.info(
        "dedup: %d near-duplicates removed from %d images (%d components)",
        int((~keep).sum()),
        len(survivors),
        int(component.max() + 1) if len(component) else 0,
    )
    frame = pd.DataFrame({"id": _int64(survivors["id"]), "component": component, "keep": keep, "reason": reason})
    return frame, how


def _decontam_frame(
    pool: pd.DataFrame, evals: pd.DataFrame, emb_ids, folder: Path, threshold: float | None, budget: int, ranks: Ranks
) -> pd.DataFrame | None:
    """decontam.parquet's rows: every (pool, eval) pair at or above the threshold, the pool read in
    blocks (each rank its slice; rank 0 gets every pair, a helper rank None)."""
    pool_ids, eval_ids = _int64(pool["id"]), _int64(evals["id"])
    p_rows, e_rows = rows_of(pool_ids, emb_ids), rows_of(eval_ids, emb_ids)
    if (e_rows < 0).any() and ranks.rank == 0:
        log.warning("dedup: %d eval images have no embedding; they cannot be checked", int((e_rows < 0).sum()))
    p_ok, e_ok = p_rows >= 0, e_rows >= 0
    pool_ids, eval_ids = pool_ids[p_ok], eval_ids[e_ok]
    eval_sets = evals["set"].str.slice(len(EVAL_PREFIX)).to_numpy(object)[e_ok]
    eval_x = EmbeddingRows(folder, e_rows[e_ok])[:]
    mine = rank_slice(int(p_ok.sum()), ranks)
    pool_view = EmbeddingRows(folder, p_rows[p_ok][mine])
    found = [np.zeros((0, 3), np.float64)]
    for start, block in pool_view.blocks(rows_per_block(budget, 4 * pool_view.dim + 4 * max(1, len(eval_x)))):
        q, b, sims = contamination_pairs(block, eval_x, threshold if threshold is not None else np.inf)
        found.append(
            np.stack([q + start + mine.start, b, sims], 1).astype(np.float64)
        )  # float64 holds the rows exactly
    found = gather_rows(np.concatenate(found), ranks)
    if ranks.rank != 0:
        return None
    q, b = found[:, 0].astype(np.int64), found[:, 1].astype(np.int64)
    pairs = pd.DataFrame(
        {
            "id": pool_ids[q],
            "eval_set": eval_sets[b],
            "eval_id": eval_ids[b],
            "similarity": found[:, 2].astype(np.float32),
        }
    )
    pairs = pairs.sort_values(["id", "eval_set", "eval_id"], kind="stable").reset_index(drop=True)
    log.info("dedup: %d pool images match an eval image (%d pairs)", pairs["id"].nunique(), len(pairs))
    if len(pool) >= 100 and pairs["id"].nunique() > SUSPICIOUS_FRACTION * len(pool):
        log.warning(
            "decontam: %d of %d pool images are within %.3g of an eval image; the threshold is "
            "probably too low for these embeddings",
            pairs["id"].nunique(),
            len(pool),
            threshold,
        )
    return pairs


def curated_pool_ids(run_dir, near: pd.DataFrame | None = None, decontam: pd.DataFrame | None = None) -> np.ndarray:
    """Sorted ids of the pool images that survive all three filters (what `cluster` reads).

    near.parquet already leaves out exact duplicates and images without an embedding.
    """
    out = Path(run_dir) / STAGE
    near = pq.read_table(out / "near.parquet").to_pandas() if near is None else near
    decontam = pq.read_table(out / "decontam.parquet").to_pandas() if decontam is None else decontam
    kept = _int64(near.loc[near["keep"], "id"])
    return np.setdiff1d(kept, _int64(decontam["id"]))


def main(argv: list[str] | None = None) -> int:
    """`python -m lvd.curate.dedup CONFIG [key=value ...]`: the entry point for torchrun."""
    return torchrun_main(run_dedup, "lvd.curate.dedup", argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
