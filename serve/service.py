"""The lookup service's core: searches over opened indexes, with no sockets and no web framework.

`lvd index serve` puts an HTTP layer on top (`index/http_app.py`); everything a request can
ask for is decided here and raised as a `ServiceError` (status + message) when it cannot be
done, so the rules are testable without a server and the same for every route.

A `Catalog` holds one `IndexService` per index name (clip-retrieval's `indice_name`); each has
its own embedder settings, its own run annotations (set, label, cluster, near-duplicate group)
for filters and result dedup, and its own thumbnail cache. Methods are blocking and
thread-safe: the HTTP layer runs them in a thread pool.

A query is an image, a text (through the text tower of a CLIP / SigLIP index), a vector, an
indexed id, or a weighted sum of those (`serve/query_mix.py`). Decoding an image, for a query or
a thumbnail, is admitted under a byte budget shared by the server (`serve/pixel_budget.py`).

Safety: image bytes are only ever read through an indexed id's manifest row (a request never
names a path); absolute paths leave only with `expose_paths` (`serve/public.py`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

from lvd.common.errors import InputFormatError, UserError
from lvd.common.row_bytes import FOLDER, LIST, TAR, kind_of, row_path
from lvd.index.store import IndexFolderError, IndexStore
from lvd.serve.annotations import NO_CLUSTER, RunAnnotations
from lvd.serve.pixel_budget import BudgetBusy, BudgetExceeded, PixelBudget, decode_cost
from lvd.serve.public import public_info, public_key, scrub
from lvd.serve.query_embedding import index_embedder
from lvd.serve.query_mix import QueryPart, check_parts, combine
from lvd.serve.run_inputs import load_annotations
from lvd.serve.search_batch import SearchBatcher

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """A request that cannot be answered: an HTTP status and a message for whoever asked."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class ServeOptions:
    max_upload_bytes: int = 20 * 2**20
    max_k: int = 100
    default_k: int = 10
    # image decodes/embeddings and thumbnails running at once; more wait their turn
    max_concurrent_searches: int = 4
    # searches by vector or id waiting at once; those waiting together share one Faiss call
    max_waiting_searches: int = 16
    # open connections at once; more are answered 503 at once instead of queueing
    max_connections: int = 2048
    thumb_size: int = 224
    thumb_cache: int = 1024
    max_pixels: int = 100_000_000
    device: str = "cpu"
    expose_paths: bool = False
    # seconds: a connection must finish its request headers within `header_timeout` of opening
    # (or of its last answer), a request its body within `body_timeout`; idle keep-alive
    # connections close after `keep_alive_timeout`; on shutdown, requests get `shutdown_timeout`
    header_timeout: float = 10.0
    body_timeout: float = 20.0
    keep_alive_timeout: float = 5.0
    shutdown_timeout: float = 30.0
    cors_origins: tuple[str, ...] = ()
    access_log: bool = True  # one JSON line per request on stderr (lvd.serve.access)
    max_metadata_ids: int = 1000
    # bytes that images being decoded (queries, thumbnails) may hold at once, server-wide
    decode_memory: int = 2**30
    # values one set / label / cluster filter may list; JSON values (commas) one body may hold
    max_filter_values: int = 1000
    max_json_values: int = 100_000
    max_text_chars: int = 1000
    # the server's address as browsers reach it (behind a proxy); None: taken from each request
    public_url: str | None = None
    # None: no key needed; else every route but /api/health needs it (`serve/access.py`)
    api_key: str | None = None
    url_ttl: float = 3600.0


@dataclass(frozen=True)
class IndexSpec:
    """One index to serve: its name, its folder and how to embed query images for it."""

    name: str
    path: Path
    device: str | None = None  # None: ServeOptions.device
    dtype: str | None = None  # None: the dtype the embed stage used


@dataclass(frozen=True)
class Filters:
    """Restrict results to rows whose set, label or cluster is one of the given values."""

    sets: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    clusters: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.sets or self.labels or self.clusters)


@dataclass(frozen=True)
class Query:
    k: int
    filters: Filters = field(default_factory=Filters)
    deduplicate: bool = False
    return_embeddings: bool = False  # each hit carries its stored vector


class IndexService:
    """One opened index: search by vector, id, image bytes, text (an index embedded by a CLIP / SigLIP
    pair) or a weighted sum of those; metadata and thumbnails by id."""

    def __init__(
        self,
        name: str,
        store: IndexStore,
        opts: ServeOptions,
        device: str | None = None,
        dtype: str | None = None,
        embedder_factory=None,
        annotations: RunAnnotations | None = None,
        budget: PixelBudget | None = None,
    ):
        self.name, self.store, self.opts = name, store, opts
        self.budget = budget or PixelBudget(opts.decode_memory)
        spec = store.info.get("embedder") or {}
        self.text_tower = bool(spec.get("text_tower"))
        self._model_name = spec.get("model") or spec.get("kind") or "no recorded model"
        self.annotations = annotations or load_annotations(store)
        meta = store.meta
        self._set, self._label = _strings(meta["set"]), _strings(meta["label"])
        self._caption = _strings(meta["caption"]) if "caption" in meta.columns else None
        self._embedder_lock = threading.Lock()
        self._embedder = None
        self._embedder_error: str | None = None
        self._embedder_status = 503
        device = device or opts.device
        self._embedder_factory = embedder_factory or (lambda: index_embedder(store, device, dtype))
        self.thumbnail = functools.lru_cache(maxsize=opts.thumb_cache)(self._thumbnail)
        self._batcher = SearchBatcher(store.search)

    def __len__(self) -> int:
        return len(self.store)

    # ---------------------------------------------------------------- queries
    def k(self, value) -> int:
        """A requested number of results, checked (None: the default)."""
        if value is None:
            return self.opts.default_k
        try:
            k = int(value)
        except (TypeError, ValueError):
            raise ServiceError(400, f"k must be an integer, got {value!r}") from None
        if not 1 <= k <= self.opts.max_k:
            raise ServiceError(400, f"k must be between 1 and {self.opts.max_k}")
        return k

    def vector_query(self, values) -> np.ndarray:
        """A query vector from a JSON list: the index's dimension, finite, not all zero."""
        try:
            vec = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            raise ServiceError(400, "the vector must be a list of numbers") from None
        if vec.ndim != 1 or vec.shape[0] != self.store.dim:
            raise ServiceError(400, f"the vector must have {self.store.dim} numbers, got shape {list(vec.shape)}")
        with np.errstate(over="ignore"):
            in_range = np.isfinite(vec).all() and np.isfinite(vec.astype(np.float32)).all()
        if not in_range or not np.any(vec):
            raise ServiceError(400, "the vector must be finite, within float32 range, and non-zero")
        return (vec / np.linalg.norm(vec)).astype(np.float32)[None]  # in float64: large values do not overflow

    def by_vector(self, values, query: Query) -> list[dict]:
        return self.search(self.vector_query(values), query)

    def by_id(self, id_: int, query: Query) -> list[dict]:
        return self.search(self._stored(id_)[None], query)

    def by_image(self, data: bytes, query: Query) -> list[dict]:
        return self.search(self.image_vector(data), query)

    def by_text(self, text: str, query: Query) -> list[dict]:
        return self.search(self.text_vectors([text]), query)

    def by_parts(self, parts: list[QueryPart], query: Query) -> list[dict]:
        """Search by a weighted sum of image, text, embedding and id parts (`query_mix`)."""
        return self.search(self.mixed_vector(parts), query)

    def image_vector(self, data: bytes) -> np.ndarray:
        """A query image's 1 x d unit vector; its decode waits for room in the pixel budget."""
        if not data:
            raise ServiceError(400, "the image is empty")
        embedder = self._get_embedder()
        from lvd.pretrain.data.decode import DecodeError

        max_pixels = self.opts.max_pixels
        try:
            side = int(round(embedder.resolution * embedder.resize_ratio))
            with self._decoding(data, side):
                square = embedder.prepare_bytes(data, max_pixels=max_pixels)
        except DecodeError as exc:
            raise ServiceError(400, f"cannot read the uploaded image: {scrub(str(exc))}") from None
        with self._embedder_lock:
            return np.asarray(embedder.embed_uint8(np.stack([square])), dtype=np.float32)

    def text_vectors(self, texts: list[str]) -> np.ndarray:
        """Texts as unit vectors of the index's space, through its text tower."""
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise ServiceError(400, "the text is empty")
            if len(text) > self.opts.max_text_chars:
                raise ServiceError(400, f"a text may have at most {self.opts.max_text_chars} characters")
        if not self.text_tower:
            raise ServiceError(
                400,
                f"index {self.name!r} has no text encoder: its embedder ({self._model_name}) embeds images only; "
                "build the index from an embedding made with CLIP or SigLIP weights (embed.model: auto), or query "
                "with an image or a vector",
            )
        embedder = self._get_embedder()
        try:
            with self._embedder_lock:
                return np.asarray(embedder.embed_text(list(texts)), dtype=np.float32)
        except UserError as exc:  # the index says it has a text tower, but its files do not give one
            log.error("the text tower of index %r does not load: %s", self.name, exc)
            message = str(exc) if self.opts.expose_paths else scrub(str(exc))
            raise ServiceError(503, f"search by text is unavailable for index {self.name!r}: {message}") from None

    def mixed_vector(self, parts: list[QueryPart]) -> np.ndarray:
        """The normalised weighted sum of the parts' unit vectors (`query_mix.combine`)."""
        try:
            parts = check_parts(parts)
        except InputFormatError as exc:
            raise ServiceError(400, str(exc)) from None
        texts = [p.value for p in parts if p.kind == "text"]
        text_rows = iter(self.text_vectors(texts) if texts else [])
        rows = []
        for p in parts:
            if p.kind == "text":
                rows.append(next(text_rows))
            elif p.kind == "image":
                rows.append(self.image_vector(p.value)[0])
            elif p.kind == "id":
                rows.append(self._stored(p.value))
            else:
                rows.append(self.vector_query(p.value)[0])
        try:
            return combine(np.stack(rows), [p.weight for p in parts])
        except InputFormatError as exc:
            raise ServiceError(400, str(exc)) from None

    def _stored(self, id_) -> np.ndarray:
        try:
            return self.store.vector_of(int(id_))
        except (KeyError, OverflowError, ValueError, TypeError):
            raise ServiceError(404, f"id {id_} is not in index {self.name!r}") from None

    @contextlib.contextmanager
    def _decoding(self, data: bytes, side: int | None):
        """Room in the pixel budget to decode `data` (waiting for it); its refusals as service errors."""
        cost = decode_cost(data, side, self.opts.max_pixels)
        try:
            self.budget.acquire(cost)
        except BudgetExceeded as exc:
            raise ServiceError(413, str(exc)) from None
        except BudgetBusy as exc:
            raise ServiceError(503, str(exc)) from None
        try:
            yield
        finally:
            self.budget.release(cost)

    def search(self, xq: np.ndarray, query: Query) -> list[dict]:
        """The k best rows that pass the filters, one per near-duplicate group with `deduplicate`.

        Without filters or dedup this is one index search of k. With them, candidates are
        fetched in growing batches until k rows pass or the index has nothing more to give.
        Concurrent searches share Faiss calls (`index/search_batch.py`).
        """
        allowed = self._allowed(query.filters)
        n = len(self.store)
        plain = allowed is None and not query.deduplicate
        fetch = min(n, query.k if plain else max(4 * query.k, 64))
        while True:
            scores, rows = self._batcher.search(xq, fetch)
            picked = self._pick(scores[0], rows[0], allowed, query.deduplicate, query.k)
            if plain or len(picked) >= query.k or fetch >= n:
                hits = [self.record(row, score, rank) for rank, (row, score) in enumerate(picked, start=1)]
                if query.return_embeddings:
                    for hit, (row, _) in zip(hits, picked):
                        hit["embedding"] = self.store.index.reconstruct(int(row)).astype(float).tolist()
                return hits
            fetch = min(n, 4 * fetch)

    def _allowed(self, f: Filters) -> np.ndarray | None:
        if not f:
            return None
        for name, values in (("set", f.sets), ("label", f.labels), ("cluster", f.clusters)):
            if len(values) > self.opts.max_filter_values:
                raise ServiceError(400, f"a {name} filter may list at most {self.opts.max_filter_values} values")
        mask = np.ones(len(self.store), bool)
        if f.sets:
            mask &= pd.Series(self._set).isin(list(f.sets)).to_numpy()
        if f.labels:
            mask &= pd.Series(self._label).isin([str(v) for v in f.labels]).to_numpy()
        if f.clusters:
            if not self.annotations.has_clusters:
                raise ServiceError(
                    400, f"index {self.name!r} has no clusters: its run folder has no cluster stage output"
                )
            wanted = [c for c in f.clusters if -(2**63) <= c < 2**63]  # others match nothing
            mask &= np.isin(self.annotations.cluster, np.array(wanted, np.int64))
        return mask

    def _pick(self, scores, rows, allowed, deduplicate: bool, k: int) -> list[tuple[int, float]]:
        seen: set[int] = set()
        out = []
        for score, row in zip(scores.tolist(), rows.tolist()):
            if row < 0 or (allowed is not None and not allowed[row]):
                continue
            if deduplicate:
                group = int(self.annotations.group[row])
                if group in seen:
                    continue
                seen.add(group)
            out.append((row, score))
            if len(out) == k:
                break
        return out

    # ---------------------------------------------------------------- records
    def record(self, row: int, score: float | None = None, rank: int | None = None) -> dict:
        """What a visitor sees of one indexed row (absolute paths only with expose_paths)."""
        m = self.store.meta.iloc[row]
        id_ = int(self.store.ids[row])
        cluster = int(self.annotations.cluster[row])
        has_source = not pd.isna(m["source"])
        out = {"id": id_, "id_str": str(id_)}  # ids are 64-bit; JavaScript numbers keep 53 bits
        if rank is not None:
            out.update(rank=rank, score=float(score))
        key = None if pd.isna(m["key"]) else str(m["key"])
        out.update(
            set=self._set[row],
            label=self._label[row],
            cluster=None if cluster == NO_CLUSTER else cluster,
            kind=None if pd.isna(m["kind"]) else str(m["kind"]),
            key=public_key(key),
            thumbnail=f"/thumb/{id_}?index={quote(self.name)}" if has_source else None,
        )
        if self._caption is not None and self._caption[row] is not None:
            out["caption"] = self._caption[row]
        if self.opts.expose_paths and has_source and key is not None:
            out.update(source=str(m["source"]), path=_location(str(m["kind"]), str(m["source"]), key))
        return out

    def metadata(self, ids: list[int]) -> list[dict]:
        if len(ids) > self.opts.max_metadata_ids:
            raise ServiceError(400, f"at most {self.opts.max_metadata_ids} ids per request")
        rows, missing = [], []
        for id_ in ids:
            try:
                rows.append(self.store.row_of(int(id_)))
            except (KeyError, OverflowError):
                missing.append(id_)
        if missing:
            raise ServiceError(404, f"ids not in index {self.name!r}: {missing[:10]}")
        return [self.record(r) for r in rows]

    def info(self) -> dict:
        info = self.store.info if self.opts.expose_paths else public_info(self.store.info)
        return {
            **info,
            "name": self.name,
            "clusters": self.annotations.has_clusters,
            "duplicate_groups": self.annotations.has_groups,
        }

    # ---------------------------------------------------------------- embedder and thumbnails
    def _get_embedder(self):
        with self._embedder_lock:
            if self._embedder is None and self._embedder_error is None:
                try:
                    self._embedder = self._embedder_factory()
                except IndexFolderError as exc:  # the index cannot embed queries at all: the request's fault
                    self._embedder_error, self._embedder_status = str(exc), 400
                except Exception as exc:  # it should, but its model does not load: the server's fault
                    log.exception("cannot load the embedder of index %r", self.name)
                    self._embedder_error, self._embedder_status = f"{type(exc).__name__}: {exc}", 503
            if self._embedder is None:
                message = self._embedder_error if self.opts.expose_paths else scrub(self._embedder_error)
                raise ServiceError(
                    self._embedder_status, f"search by image or text is unavailable for index {self.name!r}: {message}"
                )
            return self._embedder

    def _thumbnail(self, id_: int) -> bytes:
        from lvd.pretrain.data.decode import DecodeError, decode

        try:
            data = self.store.image_bytes(id_)
        except (KeyError, OverflowError):
            raise ServiceError(404, f"id {id_} is not in index {self.name!r}") from None
        except OSError as exc:
            raise ServiceError(404, f"image of id {id_} cannot be read: {scrub(str(exc))}") from None
        try:
            with self._decoding(data, None):
                img = decode(data, max_pixels=self.opts.max_pixels)
                img.thumbnail((self.opts.thumb_size, self.opts.thumb_size))
        except DecodeError as exc:
            raise ServiceError(404, f"image of id {id_} cannot be decoded: {scrub(str(exc))}") from None
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        return buf.getvalue()


def _strings(column: pd.Series) -> np.ndarray:
    """A metadata column as str-or-None per row (parquet gives NaN, None or numbers for missing/labels)."""
    return np.array([None if pd.isna(v) else str(v) for v in column], dtype=object)


def _location(kind: str, source: str, key: str) -> str:
    """Where an image lives on the server: its path, or SHARD::MEMBER inside a tar."""
    kind = kind if kind in (FOLDER, LIST, TAR) else (kind_of(source) or FOLDER)
    if kind == TAR:
        return f"{source}::{key}"
    return str(Path(row_path(kind, source, key)).absolute())


class Catalog:
    """The indexes a server holds, by name; the first is the default for requests that name none."""

    def __init__(self, services: list[IndexService]):
        if not services:
            raise ValueError("a server needs at least one index")
        names = [s.name for s in services]
        if len(set(names)) != len(names):
            raise ValueError(f"index names must be unique, got {names}")
        self.services = {s.name: s for s in services}
        self.default = names[0]

    @classmethod
    def open(cls, specs: list[IndexSpec], opts: ServeOptions, mmap: bool = False) -> Catalog:
        budget = PixelBudget(opts.decode_memory)  # one for the server: decodes of every index share it
        return cls(
            [
                IndexService(s.name, IndexStore.open(s.path, mmap=mmap), opts, s.device, s.dtype, budget=budget)
                for s in specs
            ]
        )

    def get(self, name: str | None) -> IndexService:
        if name is None or name == "":
            return self.services[self.default]
        try:
            return self.services[name]
        except KeyError:
            raise ServiceError(404, f"no index named {name!r}; this server has {list(self.services)}") from None

    def names(self) -> list[str]:
        return list(self.services)

    def __len__(self) -> int:
        return sum(len(s) for s in self.services.values())
