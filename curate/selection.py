"""Which curated images become shards, and why each was chosen.

Two selections exist: retrieval around seed sets (`retrieve/neighbors.parquet`, DINOv2) and the
balanced sample of the hierarchical k-means (`cluster/balanced.parquet`, Vo et al. 2024), which
needs no seed set and no label. `shards.select` takes either or both; `auto` takes retrieval
when the config names seed sets, the balanced sample when it names none.

Every balanced image carries its provenance: the cluster it belongs to at every level, that
cluster's size in the curated pool and how many of its images the balanced sample drew.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lvd.common.run_folder import balanced_ids, level_assignments

SELECTIONS = ("retrieve", "balanced", "both")


def resolve_select(cfg) -> str:
    """`shards.select` with auto resolved from the configured seed sets."""
    select = str(cfg.shards.select)
    if select != "auto":
        return select
    seeds = cfg.sources.get("seeds") or {}
    return "retrieve" if len(seeds) else "balanced"


def uses_balanced(cfg) -> bool:
    return resolve_select(cfg) in ("balanced", "both")


def balanced_size(cfg, n_curated: int) -> int:
    """`cluster.balanced_sample`: a number as given; auto = a quarter of the curated pool when
    the shards take the balanced sample, else 0 (none drawn)."""
    value = cfg.cluster.balanced_sample
    if str(value) != "auto":
        return int(value)
    return max(1, n_curated // 4) if uses_balanced(cfg) and n_curated else 0


def level_table(assign: pd.DataFrame, picked: np.ndarray) -> pd.DataFrame:
    """Per cluster of one level: images in the curated pool and images the balanced sample drew."""
    sizes = assign.groupby("cluster").size().rename("size")
    drawn = assign[assign["id"].isin(picked)].groupby("cluster").size().rename("drawn")
    return pd.concat([sizes, drawn], axis=1).fillna(0).astype(np.int64)


def balanced_provenance(run_dir: Path) -> dict[int, list[dict]]:
    """{id: [{level, cluster, cluster_size, drawn, clusters}, ...]} for every balanced image."""
    picked = balanced_ids(run_dir)
    out: dict[int, list[dict]] = {int(i): [] for i in picked}
    for level, assign in enumerate(level_assignments(run_dir), start=1):
        table = level_table(assign, picked)
        mine = assign[assign["id"].isin(picked)]
        sizes = table["size"].reindex(mine["cluster"]).to_numpy()
        drawn = table["drawn"].reindex(mine["cluster"]).to_numpy()
        for id_, c, size, d in zip(mine["id"].tolist(), mine["cluster"].tolist(), sizes.tolist(), drawn.tolist()):
            out[int(id_)].append(
                {
                    "level": level,
                    "cluster": int(c),
                    "cluster_size": int(size),
                    "drawn": int(d),
                    "clusters": int(len(table)),
                }
            )
    return out


__all__ = [
    "SELECTIONS",
    "resolve_select",
    "uses_balanced",
    "balanced_size",
    "level_assignments",
    "balanced_ids",
    "level_table",
    "balanced_provenance",
]
