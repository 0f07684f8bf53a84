"""`lvd index serve`: an HTTP JSON API and a drop-an-image web page over an index folder.

Built on the standard library's `ThreadingHTTPServer`: the API is six small routes with
JSON and raw-bytes bodies, so a web framework (and its server, and their upgrades) would
add more surface than it removes. What a framework would otherwise give is done here on
purpose: a cap on simultaneous connections, a cap on simultaneous searches, an upload size
limit checked before reading, and one error path that turns every failure into a JSON 4xx/5xx.

Safety: binds 127.0.0.1 unless told otherwise; image bytes are only ever read through an
indexed id's manifest row (a request never names a path); text from the index reaches the
page through `textContent`, never as HTML.

Routes:
    GET  /                      the page
    GET  /api/health            {"status": "ok", "vectors": N}
    GET  /api/info              the index's info.json
    POST /api/search/image?k=K  body: the image file (raw bytes, or multipart field "image")
    POST /api/search/vector     body: {"vector": [...], "k": K}
    GET  /api/search/id/ID?k=K  neighbours of an indexed image
    GET  /thumb/ID              JPEG thumbnail of an indexed image
"""

from __future__ import annotations

import email.parser
import email.policy
import functools
import io
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np

from .store import IndexStore, embed_query_bytes
from .webpage import PAGE

log = logging.getLogger(__name__)

# Bodies up to this many times the upload limit are read (and dropped) before a 413 answer;
# larger ones are refused unread and the connection closed.
DRAIN_FACTOR = 4
_ID_ROUTE = re.compile(r"^/api/search/id/(-?\d+)$")
_THUMB_ROUTE = re.compile(r"^/thumb/(-?\d+)$")


class HTTPError(Exception):
    """An error answer: status and a message for the person or program that asked."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class ServeOptions:
    max_upload_bytes: int = 20 * 2**20
    max_k: int = 100
    default_k: int = 10
    # searches (and image decodes/embeddings) running at once; more wait their turn
    max_concurrent_searches: int = 4
    # open connections served at once; more wait in the listen backlog
    max_connections: int = 64
    thumb_size: int = 224
    thumb_cache: int = 1024
    max_pixels: int = 100_000_000
    device: str = "cpu"


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    cache: bool = False


def _json(obj, status: int = 200) -> Response:
    return Response(status, json.dumps(obj).encode())


class SearchApp:
    """Routes requests to an opened index; no sockets here, so it is testable on its own."""

    def __init__(self, store: IndexStore, opts: ServeOptions | None = None, embedder_factory=None):
        self.store, self.opts = store, opts or ServeOptions()
        self._search_slots = threading.BoundedSemaphore(self.opts.max_concurrent_searches)
        self._embedder_lock = threading.Lock()
        self._embedder = None
        self._embedder_error: str | None = None
        self._embedder_factory = embedder_factory or (lambda: store.embedder(self.opts.device))
        self.thumbnail = functools.lru_cache(maxsize=self.opts.thumb_cache)(self._thumbnail)

    # ---------------------------------------------------------------- dispatch
    def handle(self, method: str, target: str, headers, read_body) -> Response:
        url = urlsplit(target)
        path, query = url.path, parse_qs(url.query)
        method = "GET" if method == "HEAD" else method  # the handler drops the body
        try:
            if method == "GET" and path in ("/", "/index.html"):
                return Response(200, _page(), "text/html; charset=utf-8")
            if method == "GET" and path == "/api/health":
                return _json({"status": "ok", "vectors": len(self.store)})
            if method == "GET" and path == "/api/info":
                return _json(self.store.info)
            if path == "/api/search/image":
                self._require(method, "POST")
                return self.search_image(headers, read_body, query)
            if path == "/api/search/vector":
                self._require(method, "POST")
                return self.search_vector(headers, read_body)
            if m := _ID_ROUTE.match(path):
                self._require(method, "GET")
                return self.search_id(int(m.group(1)), query)
            if m := _THUMB_ROUTE.match(path):
                self._require(method, "GET")
                return Response(200, self.thumbnail(int(m.group(1))), "image/jpeg", cache=True)
            raise HTTPError(404, f"no such route: {path}")
        except HTTPError as exc:
            return _json({"error": exc.message}, exc.status)
        except Exception as exc:  # never let one request take the server down
            log.exception("error on %s %s", method, path)
            return _json({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500)

    @staticmethod
    def _require(method: str, wanted: str) -> None:
        if method != wanted:
            raise HTTPError(405, f"use {wanted} for this route")

    def _k(self, value) -> int:
        if value is None:
            return self.opts.default_k
        if isinstance(value, list):
            value = value[0]
        try:
            k = int(value)
        except (TypeError, ValueError):
            raise HTTPError(400, f"k must be an integer, got {value!r}") from None
        if not 1 <= k <= self.opts.max_k:
            raise HTTPError(400, f"k must be between 1 and {self.opts.max_k}")
        return k

    def _body(self, headers, read_body) -> bytes:
        length = headers.get("Content-Length")
        if length is None:
            raise HTTPError(411, "a Content-Length header is required")
        try:
            length = int(length)
        except ValueError:
            raise HTTPError(400, "invalid Content-Length") from None
        if length > self.opts.max_upload_bytes:
            if length <= DRAIN_FACTOR * self.opts.max_upload_bytes:
                # read and drop a moderately large body, so a browser sees this answer, not a reset
                for start in range(0, length, 2**20):
                    read_body(min(2**20, length - start))
            raise HTTPError(413, f"upload of {length} bytes exceeds the limit of {self.opts.max_upload_bytes} bytes")
        if length <= 0:
            raise HTTPError(400, "empty request body")
        return read_body(length)

    def _search(self, xq: np.ndarray, k: int) -> tuple[list[dict], float]:
        with self._search_slots:
            t0 = time.perf_counter()
            scores, rows = self.store.search(xq, k)
        hits = self.store.results(scores, rows)[0]
        for hit in hits:
            hit["id_str"] = str(hit["id"])  # ids are 64-bit; JavaScript numbers keep 53 bits
            hit["thumbnail"] = f"/thumb/{hit['id']}" if hit.get("source") else None
        return hits, round(1000 * (time.perf_counter() - t0), 3)

    # ---------------------------------------------------------------- routes
    def search_vector(self, headers, read_body) -> Response:
        try:
            payload = json.loads(self._body(headers, read_body))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HTTPError(400, f"body is not JSON: {exc}") from None
        if not isinstance(payload, dict) or "vector" not in payload:
            raise HTTPError(400, 'expected a JSON object {"vector": [...], "k": 10}')
        try:
            vec = np.asarray(payload["vector"], dtype=np.float32)
        except (TypeError, ValueError):
            raise HTTPError(400, "vector must be a list of numbers") from None
        if vec.ndim != 1 or vec.shape[0] != self.store.dim:
            raise HTTPError(400, f"vector must have {self.store.dim} numbers, got shape {list(vec.shape)}")
        if not np.isfinite(vec).all() or not np.any(vec):
            raise HTTPError(400, "vector must be finite and non-zero")
        hits, ms = self._search(vec[None], self._k(payload.get("k")))
        return _json({"results": hits, "took_ms": ms})

    def search_id(self, id_: int, query) -> Response:
        try:
            vec = self.store.vector_of(id_)
        except KeyError:
            raise HTTPError(404, f"id {id_} is not in the index") from None
        hits, ms = self._search(vec[None], self._k(query.get("k")))
        return _json({"query_id": id_, "results": hits, "took_ms": ms})

    def search_image(self, headers, read_body, query) -> Response:
        data = self._image_upload(headers, self._body(headers, read_body))
        k = self._k(query.get("k"))
        embedder = self._get_embedder()
        from lvd.pretrain.data.decode import DecodeError

        with self._search_slots:
            try:
                with self._embedder_lock:
                    vec = embed_query_bytes(embedder, [data], max_pixels=self.opts.max_pixels)
            except DecodeError as exc:
                raise HTTPError(400, f"cannot read the uploaded image: {exc}") from None
        hits, ms = self._search(vec, k)
        return _json({"results": hits, "took_ms": ms})

    @staticmethod
    def _image_upload(headers, body: bytes) -> bytes:
        ctype = headers.get("Content-Type", "application/octet-stream")
        if not ctype.lower().startswith("multipart/form-data"):
            return body
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {ctype}\r\n\r\n".encode("latin-1") + body)
        if not msg.is_multipart():
            raise HTTPError(400, "malformed multipart body")
        for part in msg.iter_parts():
            if part.get_param("name", header="content-disposition") == "image":
                return part.get_payload(decode=True) or b""
        raise HTTPError(400, 'multipart body has no field named "image"')

    def _get_embedder(self):
        with self._embedder_lock:
            if self._embedder is None and self._embedder_error is None:
                try:
                    self._embedder = self._embedder_factory()
                except Exception as exc:
                    log.exception("cannot load the index's embedder")
                    self._embedder_error = f"{type(exc).__name__}: {exc}"
            if self._embedder is None:
                raise HTTPError(503, f"search by image is unavailable: {self._embedder_error}")
            return self._embedder

    def _thumbnail(self, id_: int) -> bytes:
        from lvd.pretrain.data.decode import DecodeError, decode

        try:
            data = self.store.image_bytes(id_)
        except KeyError:
            raise HTTPError(404, f"id {id_} is not in the index") from None
        except (FileNotFoundError, OSError, KeyError) as exc:
            raise HTTPError(404, f"image of id {id_} cannot be read: {exc}") from None
        try:
            img = decode(data, max_pixels=self.opts.max_pixels)
        except DecodeError as exc:
            raise HTTPError(404, f"image of id {id_} cannot be decoded: {exc}") from None
        img.thumbnail((self.opts.thumb_size, self.opts.thumb_size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        return buf.getvalue()


def _page() -> bytes:
    return PAGE.encode("utf-8")


class _Handler(BaseHTTPRequestHandler):
    server_version = "lvd-index"
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection gives its slot back after this many seconds
    app: SearchApp  # set on a subclass per server

    def _serve(self) -> None:
        method = self.command
        try:
            resp = self.app.handle(method, self.path, self.headers, self.rfile.read)
        except Exception as exc:  # pragma: no cover - handle() already catches
            resp = _json({"error": str(exc)}, 500)
        if resp.status >= 400:
            # a refused body may be unread; close so it is never taken for the next request
            self.close_connection = True
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "max-age=3600" if resp.cache else "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(resp.body)

    do_GET = do_POST = do_HEAD = _serve

    def do_PUT(self):  # noqa: N802 - names fixed by BaseHTTPRequestHandler
        self._serve()

    do_DELETE = do_PATCH = do_PUT

    def log_message(self, fmt, *args):
        log.info("%s %s", self.address_string(), fmt % args)


class BoundedThreadingHTTPServer(ThreadingHTTPServer):
    """One thread per connection, at most `max_connections` at once (the rest wait to be accepted)."""

    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address, handler, max_connections: int):
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        self._slots.acquire()
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def make_server(store: IndexStore, host: str = "127.0.0.1", port: int = 8000,
                opts: ServeOptions | None = None, embedder_factory=None) -> BoundedThreadingHTTPServer:
    """A ready-to-run server (call `serve_forever()`); port 0 picks a free port."""
    app = SearchApp(store, opts, embedder_factory)
    handler = type("Handler", (_Handler,), {"app": app})
    return BoundedThreadingHTTPServer((host, port), handler, app.opts.max_connections)
