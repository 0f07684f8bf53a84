"""What the curation stages said about each indexed row: its cluster and its near-duplicate group.

The lookup service filters results by cluster and collapses near-duplicates to one result, so it
needs, per index row, the `cluster` stage's assignment (cluster/assign.parquet's id, cluster) and
the `dedup` stage's groups (near.parquet's id, component; an exact duplicate in exact.parquet's
id, dup_of joins the group of the copy it duplicates). This module takes those frames, one set
per run folder the index was built from (`lvd.serve.run_inputs` reads them); a run without those
stages simply has no clusters or groups.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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
    def from_frames(cls, ids: np.ndarray, runs: list[tuple]) -> RunAnnotations:
        """Per-row arrays from each run's (assign, near, exact) frames, any of them None when that
        stage did not run there."""
        ids = np.asarray(ids, np.int64)
        assign = _concat([a for a, _, _ in runs])
        near = _concat([n for _, n, _ in runs], offset_components=True)
        exact = _concat([e for _, _, e in runs])
        cluster = np.full(len(ids), NO_CLUSTER, np.int64)
        if assign is not None:
            cluster = _lookup(assign.set_index("id")["cluster"], ids, NO_CLUSTER)
        group = -1 - np.arange(len(ids), dtype=np.int64)
        if near is not None:
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


def _concat(frames: list[pd.DataFrame | None], offset_components: bool = False) -> pd.DataFrame | None:
    """The runs' frames as one, each id once; components are numbered per run, so with
    `offset_components` each run's numbers are moved apart so that they never collide."""
    present = [f for f in frames if f is not None]
    if offset_components:
        present = [f.assign(component=f["component"] + (offset << 40)) for offset, f in enumerate(present)]
    return pd.concat(present, ignore_index=True).drop_duplicates("id") if present else None


def _lookup(series: pd.Series, ids: np.ndarray, missing: int) -> np.ndarray:
    values = series.reindex(ids).to_numpy()
    out = np.full(len(ids), missing, np.int64)
    ok = ~pd.isna(values)
    out[ok] = values[ok].astype(np.int64)
    return out
