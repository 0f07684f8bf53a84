"""What the curation stages said about each indexed row: its cluster and its near-duplicate group.

The lookup service filters results by cluster and collapses near-duplicates to one result, so it
needs, per index row, the `cluster` stage's assignment (`RUN/cluster/assign.parquet`) and the
`dedup` stage's groups (`RUN/dedup/near.parquet` components; an exact duplicate in
`RUN/dedup/exact.parquet` joins the group of the copy it duplicates). Files are read directly,
not through `curate/` (dependencies go curate -> index); a run without those stages simply has
no clusters or groups.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

NO_CLUSTER = -1


@dataclass(frozen=True)
class RunAnnotations:
    """Per-row arrays aligned with an index's `ids`.

    `cluster[r]` is the row's cluster (NO_CLUSTER where the cluster stage did not assign it);
    `group[r]` is its near-duplicate group, with every row outside any group given a distinct
    negative value, so equal groups mean "the same picture" and nothing else.
    """

    cluster: np.ndarray
    group: np.ndarray
    has_clusters: bool
    has_groups: bool

    @classmethod
    def empty(cls, n: int) -> RunAnnotations:
        return cls(np.full(n, NO_CLUSTER, np.int64), -1 - np.arange(n, dtype=np.int64), False, False)

    @classmethod
    def load(cls, run_dirs: list[Path], ids: np.ndarray) -> RunAnnotations:
        """Read the cluster and dedup outputs of the run folders an index was built from."""
        ids = np.asarray(ids, np.int64)
        assign = _concat([d / "cluster" / "assign.parquet" for d in run_dirs], ["id", "cluster"])
        near = _concat([d / "dedup" / "near.parquet" for d in run_dirs], ["id", "component"])
        exact = _concat([d / "dedup" / "exact.parquet" for d in run_dirs], ["id", "dup_of"])
        cluster = np.full(len(ids), NO_CLUSTER, np.int64)
        if assign is not None:
            cluster = _lookup(assign.set_index("id")["cluster"], ids, NO_CLUSTER)
        group = -1 - np.arange(len(ids), dtype=np.int64)
        if near is not None:
            # components are numbered per run; offset each run's numbers so they never collide
            component = near.set_index("id")["component"]
            if exact is not None:
                rep = exact.set_index("id")["dup_of"]
                extra = component.reindex(rep.to_numpy()).to_numpy()
                known = ~np.isnan(extra.astype(float))
                component = pd.concat([component, pd.Series(extra[known].astype(np.int64), index=rep.index[known])])
            component = component[~component.index.duplicated(keep="first")]
            found = _lookup(component, ids, -1)
            group = np.where(found >= 0, found, group)
        return cls(cluster, group, assign is not None, near is not None)


def _concat(paths: list[Path], columns: list[str]) -> pd.DataFrame | None:
    frames = []
    for offset, path in enumerate(p for p in paths if p.is_file()):
        df = pd.read_parquet(path, columns=columns)
        if "component" in columns and offset:
            df["component"] = df["component"] + (offset << 40)
        frames.append(df)
    return pd.concat(frames, ignore_index=True).drop_duplicates("id") if frames else None


def _lookup(series: pd.Series, ids: np.ndarray, missing: int) -> np.ndarray:
    values = series.reindex(ids).to_numpy()
    out = np.full(len(ids), missing, np.int64)
    ok = ~pd.isna(values)
    out[ok] = values[ok].astype(np.int64)
    return out
