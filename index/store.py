"""An index folder: the Faiss index, the manifest id of every row, and what is needed to show it.

```
INDEX_DIR/
  info.json            the commit point: plan, tuned search parameters, measured recall,
                       the embedder (model, weights, resolution, mean, std), parts added
  gen-000001/
    index.faiss        row r of the index ...
    ids.npy            ... is manifest id ids[r] (int64) ...
    meta.parquet       ... and meta row r: id, set, source, kind, key, label
```

A build or an `add` writes a complete new generation folder and only then replaces
`info.json` (atomically) to point at it, so a killed run leaves the previous index intact.
`build` and `add` take arrays and frames: the vectors as named parts (`VectorPart`: ids and a
loader of the memory-mapped rows), the metadata rows, and the embedder's description. Reading
them from a run folder is the caller's (`lvd.serve.run_inputs`); `info.json` records each
source by the name the caller gives it (the embed folder) and the parts it took.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from lvd.common.atomic import atomic_path, atomic_write_json
from lvd.common.errors import InputFormatError, MissingInputError, UserError
from lvd.common.memory import memory_budget
from lvd.common.row_bytes import RowReader
from lvd.index import ann
from lvd.index.io import IdRows

log = logging.getLogger(__name__)

INFO_NAME = "info.json"
FORMAT = "lvd-index"
FORMAT_VERSION = 1
META_COLUMNS = ("id", "set", "source", "kind", "key", "label")
# kept in the index's metadata when the manifest has them (a list source's captions)
OPTIONAL_META_COLUMNS = ("caption",)
# embed/_SUCCESS.json fields that define the embedding space; vectors from two different
# spaces must never share an index.
EMBEDDER_KEYS = (
    "kind",
    "model",
    "weights",
    "resolution",
    "resize_ratio",
    "mean",
    "std",
    "dim",
    "cls_and_mean_patch",
    "layout",
    "output",
    "space",
    "text_tower",
)
# recorded too, but not part of the space: a bf16 and an fp32 run of one model are comparable
EMBEDDER_EXTRA_KEYS = ("dtype", "weights_layout")


class IndexFolderError(UserError, RuntimeError):
    """A missing, inconsistent or incompatible index folder; the message says which."""


@contextlib.contextmanager
def _damaged(path: Path):
    """A file of an index folder that cannot be read is one IndexFolderError naming it (Faiss,
    numpy, pyarrow and json each raise their own kind of error, with a traceback)."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        reason = "missing" if not path.exists() else ("empty" if path.is_file() and not path.stat().st_size else "")
        detail = reason or " ".join(str(exc).split())[:200] or type(exc).__name__
        raise IndexFolderError(
            f"{path} cannot be read ({detail}): the index is damaged; rebuild it with `lvd index build --overwrite`"
        ) from None


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class VectorPart:
    """One part of the vectors an index is built from: its name (as info.json records it), its
    int64 ids, and a loader of its (rows, d) vectors, called only while the part is read, so a
    build holds one memory-mapped part at a time, not every part."""

    name: str
    ids: np.ndarray
    load: Callable[[], np.ndarray]

    def vectors(self) -> np.ndarray:
        x = self.load()
        if x.ndim != 2 or len(x) != len(self.ids):
            raise IndexFolderError(f"part {self.name}: {x.shape} vectors for {len(self.ids)} ids")
        return x


def aligned_meta(meta: pd.DataFrame, ids: np.ndarray) -> pd.DataFrame:
    """The metadata rows of `ids`, in their order (None where `meta` lacks an id): META_COLUMNS
    and those of OPTIONAL_META_COLUMNS that `meta` has; the last row of a repeated id wins."""
    keep = [c for c in META_COLUMNS + OPTIONAL_META_COLUMNS if c in meta.columns]
    table = meta[keep].drop_duplicates("id", keep="last").set_index("id") if "id" in keep else pd.DataFrame()
    aligned = table.reindex(pd.Index(np.asarray(ids, np.int64), name="id")).reset_index()
    for col in META_COLUMNS:
        if col not in aligned.columns:
            aligned[col] = None
    missing = int(aligned["source"].isna().sum())
    if missing:
        log.warning("%d of %d ids have no manifest row (no thumbnail for them)", missing, len(ids))
    extra = [c for c in OPTIONAL_META_COLUMNS if c in aligned.columns]
    return aligned[list(META_COLUMNS) + extra].astype({"id": "int64"})


# --------------------------------------------------------------------------- atomic files


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_json(path, obj, default=_json_default)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return str(value)


# --------------------------------------------------------------------------- the index folder


class IndexStore:
    """An opened index folder: search by vector, look up rows by id, read indexed image bytes."""

    def __init__(self, path: Path, info: dict, index: faiss.Index, ids: np.ndarray, meta: pd.DataFrame):
        self.path, self.info, self.index, self.ids, self.meta = Path(path), info, index, ids, meta
        if not (index.ntotal == len(ids) == len(meta)):
            raise IndexFolderError(f"{path}: index has {index.ntotal} rows, ids {len(ids)}, metadata {len(meta)}")
        self._rows = IdRows(ids, check_unique=False)  # unique by construction (build and add check)
        self._reader = RowReader()  # /image requests seek straight to a tar member
        ann.set_search_params(index, info.get("search_params", {}))

    @classmethod
    def open(cls, path: str | os.PathLike, mmap: bool = False) -> IndexStore:
        """Open an index folder; `mmap` maps the vectors read-only, so processes share one copy."""
        path = Path(path)
        info_path = path / INFO_NAME
        if not info_path.is_file():
            raise IndexFolderError(
                f"{path} is not an lvd index folder (no {INFO_NAME}); build one with `lvd index build`"
            )
        with _damaged(info_path):
            info = json.loads(info_path.read_text())
            if info.get("format") != FORMAT:
                raise IndexFolderError(f"{info_path} is not an lvd index ({info.get('format')!r})")
            gen = path / info["generation"]
        flags = (faiss.IO_FLAG_MMAP | getattr(faiss, "IO_FLAG_MMAP_IFC", 0) | faiss.IO_FLAG_READ_ONLY) if mmap else 0
        with _damaged(gen / "index.faiss"):
            index = faiss.read_index(str(gen / "index.faiss"), flags)
        with _damaged(gen / "ids.npy"):
            ids = np.load(gen / "ids.npy", allow_pickle=False)
        with _damaged(gen / "meta.parquet"):
            meta = pd.read_parquet(gen / "meta.parquet")
        return cls(path, info, index, ids, meta)

    @property
    def dim(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    def row_of(self, id_: int) -> int:
        """Index row of a manifest id; KeyError when it is not indexed."""
        return self._rows.row(id_)

    def vector_of(self, id_: int) -> np.ndarray:
        """The stored vector of an indexed id (exact for Flat/HNSW/IVF-Flat, decoded for PQ)."""
        return self.index.reconstruct(self.row_of(id_))

    def search(self, xq: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) for float32 queries; rows are -1 where fewer than k results exist."""
        xq = np.ascontiguousarray(np.atleast_2d(xq), dtype=np.float32)
        if xq.shape[1] != self.dim:
            raise InputFormatError(f"query dimension {xq.shape[1]} does not match the index ({self.dim})")
        if not np.all(np.isfinite(xq)):
            raise InputFormatError("query vector has NaN or infinite values")
        norms = np.linalg.norm(xq, axis=1, keepdims=True)
        xq = xq / np.where(norms > 0, norms, 1)
        return self.index.search(xq, min(k, len(self)) if len(self) else k)

    def results(self, scores: np.ndarray, rows: np.ndarray) -> list[list[dict]]:
        """Search output as records: rank, id, score and the manifest metadata of each hit."""
        out = []
        for srow, rrow in zip(scores, rows):
            hits = []
            for rank, (score, row) in enumerate(((s, r) for s, r in zip(srow, rrow) if r >= 0), start=1):
                m = self.meta.iloc[int(row)]
                hits.append(
                    {
                        "rank": rank,
                        "id": int(self.ids[row]),
                        "score": float(score),
                        **{c: (None if pd.isna(m[c]) else str(m[c])) for c in META_COLUMNS if c != "id"},
                    }
                )
            out.append(hits)
        return out

    def image_bytes(self, id_: int, max_bytes: int = 256 * 2**20) -> bytes:
        """Raw bytes of an indexed image, located only through its manifest row (never a request path)."""
        m = self.meta.iloc[self.row_of(id_)]
        if pd.isna(m["source"]) or pd.isna(m["key"]):
            raise MissingInputError(f"id {id_} has no manifest source")
        return self._reader.read(str(m["kind"]), str(m["source"]), str(m["key"]), max_bytes)


# --------------------------------------------------------------------------- build and add


def _next_generation(path: Path, info: dict | None) -> str:
    last = int(info["generation"].split("-")[1]) if info else 0
    return f"gen-{last + 1:06d}"


def _write_generation(path: Path, name: str, index: faiss.Index, ids: np.ndarray, meta: pd.DataFrame) -> None:
    gen = path / name
    if gen.exists():  # left by a killed run: never pointed at by info.json
        shutil.rmtree(gen)
    with atomic_path(gen) as tmp:
        tmp.mkdir(parents=True)
        faiss.write_index(index, str(tmp / "index.faiss"))
        np.save(tmp / "ids.npy", ids.astype(np.int64))
        meta.to_parquet(tmp / "meta.parquet", index=False)


def _commit(path: Path, info: dict, previous: dict | None) -> None:
    _write_json(path / INFO_NAME, info)
    if previous and previous.get("generation") != info["generation"]:
        shutil.rmtree(path / previous["generation"], ignore_errors=True)


Sources = dict[str, list[VectorPart]]  # a source's name (its embed folder) -> its parts, in order


class _Rows:
    """Every indexed vector in index order, read part by part from the sources info.json lists.

    The first occurrence of an id wins (as in the index); `hold` ids are left out, so
    exact search over this stream is exact search over what the index holds.
    """

    def __init__(self, listed: list[dict], parts: Sources, batch: int = 65536):
        self.listed, self.parts, self.batch = listed, parts, batch

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        seen: set[int] = set()
        for src in self.listed:
            by_name = {p.name: p for p in self.parts.get(src["embed_dir"], [])}
            for name in src["parts"]:
                if name not in by_name:
                    raise IndexFolderError(f"{src['embed_dir']} no longer holds {name}, which the index holds")
                ids, x = by_name[name].ids, by_name[name].vectors()
                first = np.fromiter((i not in seen for i in ids.tolist()), bool, len(ids))
                seen.update(ids.tolist())
                for start in range(0, len(ids), self.batch):
                    keep = first[start : start + self.batch]
                    yield (
                        ids[start : start + self.batch][keep],
                        np.asarray(x[start : start + self.batch][keep], np.float32),
                    )


def _exact_truth(
    rows: Iterator[tuple[np.ndarray, np.ndarray]], xq: np.ndarray, k: int, leave_out: np.ndarray
) -> np.ndarray:
    """Ids of the exact k nearest of each query among the streamed rows (queries left out)."""
    heap = faiss.ResultHeap(len(xq), k, keep_max=True)
    leave_out = set(leave_out.tolist())
    for ids, x in rows:
        keep = np.fromiter((i not in leave_out for i in ids.tolist()), bool, len(ids))
        ids, x = ids[keep], x[keep]
        if not len(ids):
            continue
        kk = min(k, len(ids))
        d, i = ann.exact_search(x, xq, kk)
        labels = np.where(i >= 0, ids[np.maximum(i, 0)], -1)
        if kk < k:
            d = np.pad(d, ((0, 0), (0, k - kk)), constant_values=-np.inf)
            labels = np.pad(labels, ((0, 0), (0, k - kk)), constant_values=-1)
        heap.add_result(np.ascontiguousarray(d, np.float32), np.ascontiguousarray(labels, np.int64))
    heap.finalize()
    return heap.I


class _Adder:
    """Adds new rows to an index, holding back a calibration sample until the parameter is tuned.

    Tuning needs queries the index does not contain; a sample of the new rows serves, and is
    added last, after tuning. Index row order = the order rows were added (kept in `ids`).
    """

    def __init__(self, index: faiss.Index, ids: np.ndarray, hold: np.ndarray, progress: bool | None, total: int):
        self.index, self.hold = index, set(hold.tolist())
        self.ids = [ids]
        self.held_ids: list[np.ndarray] = []
        self.held_x: list[np.ndarray] = []
        self.bar = tqdm(total=total, unit="vec", desc="add", disable=None if progress is None else not progress)

    def add(self, ids: np.ndarray, x: np.ndarray) -> None:
        held = np.fromiter((i in self.hold for i in ids.tolist()), bool, len(ids))
        if (~held).any():
            self.index.add(np.ascontiguousarray(x[~held], np.float32))
            self.ids.append(ids[~held])
        if held.any():
            self.held_ids.append(ids[held])
            self.held_x.append(np.asarray(x[held], np.float32))
        self.bar.update(len(ids))

    def held(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.held_ids:
            return np.zeros(0, np.int64), np.zeros((0, self.index.d), np.float32)
        return np.concatenate(self.held_ids), np.concatenate(self.held_x)

    def finish(self) -> np.ndarray:
        held_ids, held_x = self.held()
        if len(held_ids):
            self.index.add(held_x)
            self.ids.append(held_ids)
        self.bar.close()
        return np.concatenate(self.ids).astype(np.int64)


def _tune_and_finish(adder: _Adder, rows: _Rows, k: int, target: float) -> tuple[np.ndarray, dict, float, int]:
    held_ids, held_x = adder.held()
    if ann.is_exact(adder.index):
        params, recall = {}, 1.0
    elif len(held_ids) == 0:
        params, recall = None, None
    else:
        truth = _exact_truth(iter(rows), held_x, k, leave_out=held_ids)
        labels = np.concatenate(adder.ids)
        params, recall = ann.tune(adder.index, held_x, truth, k=k, target=target, labels=labels)
    return adder.finish(), params, recall, len(held_ids)


@dataclass
class BuildOptions:
    factory: str = "auto"
    memory_gb: str | float = "auto"  # the pipeline's memory_gb: GiB, or auto
    target_recall: float = 0.95
    k: int = 10
    calibration_queries: int = 1000
    device: str = "auto"
    seed: int = 0
    progress: bool | None = None


def build(
    parts: list[VectorPart],
    source: str,
    meta: pd.DataFrame,
    embedder: dict,
    out: str | os.PathLike,
    opts: BuildOptions | None = None,
    overwrite: bool = False,
) -> dict:
    """Build an index over every part of a source (its name, e.g. an embed folder, is recorded),
    with `meta` rows (by id) and the `embedder` that made the vectors; returns the info written
    to info.json."""
    opts = opts if opts is not None else BuildOptions()
    out = Path(out)
    previous = _read_info(out)
    if previous and not overwrite:
        raise IndexFolderError(
            f"{out} already holds an index; use `lvd index add` to extend it or --overwrite to rebuild"
        )
    if not parts:
        raise IndexFolderError(f"no vectors in {source}")
    listed = [{"embed_dir": source, "parts": [p.name for p in parts]}]
    rows = _Rows(listed, {source: parts})
    all_ids = np.concatenate([p.ids for p in parts])
    _check_unique(all_ids)
    n, d = len(all_ids), int(parts[0].vectors().shape[1])
    t0 = time.perf_counter()
    budget = memory_budget(opts.memory_gb)
    plan, index, ids, params, recall, n_queries = _planned_fill(n, d, rows, all_ids, opts, budget)
    if params is None:
        log.warning("too few vectors to measure recall; search parameters left at Faiss defaults")
        params = {}
    _enable_lookup(index)
    plan.search_params = params
    info = _info(out, previous, plan, index, n, d, params, recall, n_queries, opts, budget)
    info.update(embedder=embedder, sources=listed, build_seconds=round(time.perf_counter() - t0, 3))
    out.mkdir(parents=True, exist_ok=True)
    _write_generation(out, info["generation"], index, ids, aligned_meta(meta, ids))
    _commit(out, info, previous)
    return info


def _info(out: Path, previous, plan, index, n: int, d: int, params, recall, n_queries, opts, budget) -> dict:
    """info.json of a new build (the caller adds its embedder, sources and time)."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "generation": _next_generation(out, previous),
        "n": n,
        "dim": d,
        "metric": "inner_product",
        "plan": plan.to_dict(),
        "factory": plan.factory,
        "search_params": params,
        "expected_recall": {
            "k": opts.k,
            "recall": recall,
            "target": opts.target_recall,
            "queries": n_queries,
            "how": "exact" if ann.is_exact(index) else "held-out indexed vectors vs exact search",
        },
        "calibration_queries": opts.calibration_queries,
        "memory_budget": budget,
        "seed": opts.seed,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _planned_fill(n: int, d: int, rows: _Rows, all_ids: np.ndarray, opts: BuildOptions, budget: int):
    """The index plan (the factory given, or chosen for n x d within the budget) and its filled index."""
    auto = opts.factory in (None, "", "auto")
    plan = ann.choose_index(n, d, budget) if auto else ann.plan_from_factory(opts.factory, n, d)
    index, ids, params, recall, n_queries = _fill(plan, d, rows, all_ids, opts)
    if auto and plan.family == "ivf_flat":
        # measured at full scale: how much must IVF scan on this data? weakly clustered data
        # (IVF scanning much of it) gets a graph instead, when one fits the budget
        nlist = ann._ivf_of(index).nlist
        scan = params.get("nprobe", nlist) / nlist if recall is not None else None
        alternative = ann.choose_index(n, d, budget, ivf_scan=scan)
        if alternative.family == "hnsw":
            del index
            return (alternative, *_fill(alternative, d, rows, all_ids, opts))
        plan = alternative  # same index, with the measured scan in its reason
    return plan, index, ids, params, recall, n_queries


def _fill(plan: ann.IndexPlan, d: int, rows: _Rows, all_ids: np.ndarray, opts: BuildOptions):
    """Train (on a sample), add every row, tune on held-back rows: (index, ids, params, recall, n_queries)."""
    n = len(all_ids)
    print(f"building {plan.factory} over {n} x {d} vectors: {plan.reason}", flush=True)
    sample = None
    if plan.train_size:
        picked = ann.sample_rows(n, plan.train_size, opts.seed)
        sample = np.concatenate([x for _, x in _select(rows, all_ids, picked)])
    index = ann.trained_index(plan, d, sample, device=opts.device or "auto", seed=opts.seed)
    del sample
    # at most a tenth of the data held back for calibration, so the tuned index is the real one
    n_hold = 0 if ann.is_exact(index) else min(opts.calibration_queries, n // 10)
    hold = all_ids[ann.sample_rows(n, n_hold, opts.seed + 1)] if n_hold else np.zeros(0, np.int64)
    adder = _Adder(index, np.zeros(0, np.int64), hold, opts.progress, n)
    for ids, x in rows:
        adder.add(ids, x)
    ids, params, recall, n_queries = _tune_and_finish(adder, rows, opts.k, opts.target_recall)
    return index, ids, params, recall, n_queries


def _select(rows: _Rows, all_ids: np.ndarray, wanted_rows: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The vectors of some row numbers (training sample), streamed."""
    wanted = set(all_ids[wanted_rows].tolist())
    for ids, x in rows:
        keep = np.fromiter((i in wanted for i in ids.tolist()), bool, len(ids))
        if keep.any():
            yield ids[keep], x[keep]


def _new_ids(store: IndexStore, parts: list[VectorPart], source: str) -> np.ndarray:
    """The ids of new parts that the index does not hold yet (those it holds are skipped, with a warning)."""
    for p in parts:
        d = p.vectors().shape[1]
        if d != store.dim:
            raise IndexFolderError(f"part {p.name} of {source} has dimension {d}, the index {store.dim}")
    new_ids = np.concatenate([p.ids for p in parts])
    fresh = store._rows.rows(new_ids) < 0
    _check_unique(new_ids[fresh])
    if (~fresh).any():
        log.warning("%d ids of %s are already indexed and are skipped", int((~fresh).sum()), source)
    return new_ids[fresh]


def _check_same_space(old: dict, embedder: dict, new: str) -> None:
    """Vectors of two embedding spaces never share an index."""
    clash = {k: (old[k], embedder[k]) for k in EMBEDDER_KEYS if k in old and k in embedder and old[k] != embedder[k]}
    if clash:
        raise IndexFolderError(f"{new} was embedded differently from the index (index, new): {clash}")


def _added(store: IndexStore, sources: Sources, new: str, parts: list[VectorPart], opts: BuildOptions, listed):
    """The index's ids with the new parts' fresh rows added, and the re-tuned search (params,
    recall, queries; params None when too few new rows were held back to measure it)."""
    fresh_ids = _new_ids(store, parts, new)
    n_hold = min(opts.calibration_queries, len(fresh_ids) // 10) if not ann.is_exact(store.index) else 0
    n_hold = n_hold if n_hold >= 100 else 0  # a few new rows do not change the recall measured before
    hold = fresh_ids[ann.sample_rows(len(fresh_ids), n_hold, opts.seed + 1)] if n_hold else np.zeros(0, np.int64)
    adder = _Adder(store.index, store.ids, hold, opts.progress, sum(len(p.ids) for p in parts))
    for ids, x in _Rows([{"embed_dir": new, "parts": [p.name for p in parts]}], sources):
        keep = store._rows.rows(ids) < 0
        adder.add(ids[keep], x[keep])
    return _tune_and_finish(adder, _Rows(listed, sources), opts.k, opts.target_recall)


def add(
    index_dir: str | os.PathLike,
    sources: Sources,
    new: str,
    meta: pd.DataFrame,
    embedder: dict,
    opts: BuildOptions | None = None,
) -> dict:
    """Add the parts of the source `new` that the index does not hold yet, without retraining.

    `sources` holds the parts of every source the index lists (to measure recall over all it
    holds) and of `new`; `meta` the metadata rows of the new ids. Ids already indexed are
    skipped (an image is never indexed twice). When enough new rows arrive, the search
    parameter is re-tuned on a held-back sample of them so that `expected_recall` stays true
    for the grown index.
    """
    index_dir = Path(index_dir)
    store = IndexStore.open(index_dir)
    info = json.loads(json.dumps(store.info))
    recorded = info["expected_recall"]
    opts = opts or BuildOptions(
        k=recorded["k"],
        target_recall=recorded["target"],
        calibration_queries=info.get("calibration_queries", 1000),
        seed=info.get("seed", 0),
    )
    old = info.get("embedder") or {}
    _check_same_space(old, embedder, new)
    entry = next((s for s in info["sources"] if s["embed_dir"] == new), None)
    if entry is None:
        entry = {"embed_dir": new, "parts": []}
        info["sources"].append(entry)
    new_parts = [p for p in sources[new] if p.name not in set(entry["parts"])]
    if not new_parts:
        print(f"nothing to add: every part of {new} is indexed")
        return info
    entry["parts"].extend(p.name for p in new_parts)
    ids, params, recall, n_queries = _added(store, sources, new, new_parts, opts, info["sources"])
    if params is None:  # nothing held back: keep what was measured before
        params, recall, n_queries = info["search_params"], recorded["recall"], recorded["queries"]
    ann.set_search_params(store.index, params)
    info.update(
        generation=_next_generation(index_dir, store.info),
        n=len(ids),
        search_params=params,
        expected_recall={**recorded, "recall": recall, "queries": n_queries},
        embedder=old or embedder,
        updated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    info["plan"]["search_params"] = params
    grown = pd.concat([store.meta, aligned_meta(meta, ids[len(store.ids) :])], ignore_index=True)
    _write_generation(index_dir, info["generation"], store.index, ids, grown)
    _commit(index_dir, info, store.info)
    return info


def _read_info(path: Path) -> dict | None:
    p = Path(path) / INFO_NAME
    return json.loads(p.read_text()) if p.is_file() else None


def _check_unique(ids: np.ndarray) -> None:
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise IndexFolderError(f"ids repeat in the embeddings (e.g. {uniq[counts > 1][:5].tolist()})")


def _enable_lookup(index: faiss.Index) -> None:
    """IVF indexes need a direct map to reconstruct a vector by row (search by id)."""
    ivf = ann._ivf_of(index)
    if ivf is not None:
        ivf.make_direct_map()
