"""The lookup service's HTTP layer: a FastAPI (ASGI) app over a `Catalog` of indexes.

Routes (every error is a JSON `{"error": message}` with a 4xx status; see /openapi.json):
    GET  /                         the search page (drop an image, or type a text)
    GET  /api/health               {"status": "ok", "vectors": N, "indices": {name: n}}
    GET  /api/info?index=NAME      the index's info.json (paths cut unless --expose-paths)
    POST /api/search/image?k=K     body: the image file (raw bytes, or multipart field "image")
    POST /api/search/vector        body: {"vector": [...], "k": K}
    GET  /api/search/text?text=T   search by text (indexes embedded with CLIP or SigLIP)
    GET  /api/search/id/ID?k=K     neighbours of an indexed image
    POST /api/search               body: {"query": [{"weight": W, "text"|"image"|"embedding"|"id": ...}]}
    GET  /thumb/ID?index=NAME      JPEG thumbnail of an indexed image
    POST /knn-service              clip-retrieval's search (text, image as base64, image_url of a
                                   result, embedding_input; lvd's query)
    POST /metadata                 clip-retrieval's metadata of ids
    GET  /indices-list             clip-retrieval's list of index names
    GET  /metrics                  Prometheus metrics
The search routes also take `index`, `set`, `label`, `cluster`, `deduplicate` and
`return_embeddings`; every hit with an image carries its `thumbnail` path and absolute `url`.

Searches are blocking (Faiss, the query models), so they run in thread pools (image and text
work bounded by `max_concurrent_searches`), and the event loop stays free for health probes and
slow clients. A client that disconnects while sending is answered 499 (its doing, not the
server's), logged once by the access log.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from types import SimpleNamespace

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi import Query as Q
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from lvd.serve import schemas as m
from lvd.serve.access import Access, KeyGuard
from lvd.serve.bodies import add_links, b64_image, image_upload, json_body, own_image
from lvd.serve.guard import BodyGuard
from lvd.serve.observe import ObserveMiddleware, ServiceMetrics
from lvd.serve.query_mix import QueryPart
from lvd.serve.service import Catalog, Filters, IndexService, Query, ServeOptions, ServiceError
from lvd.serve.webpage import PAGE

log = logging.getLogger(__name__)

ERRORS = {status: {"model": m.ErrorBody} for status in (400, 404, 408, 413)}


class Runner:
    """Runs a blocking service call in a bounded thread pool, counted in the metrics.

    Model work (image decodes, image and text embeddings, thumbnails) has `heavy` threads;
    searches by vector or id have `light` ones, most of which only wait for a Faiss call shared
    with the others.
    """

    HEAVY = ("image", "thumbnail", "text", "query")

    def __init__(self, metrics: ServiceMetrics, heavy: int, light: int):
        self.metrics = metrics
        self.heavy, self.light = anyio.CapacityLimiter(heavy), anyio.CapacityLimiter(light)

    async def __call__(self, svc: IndexService, by: str, fn, *args):
        gauge = self.metrics.in_flight.labels(svc.name)
        gauge.inc()
        try:
            limiter = self.heavy if by in self.HEAVY else self.light
            return await anyio.to_thread.run_sync(partial(fn, *args), limiter=limiter)
        finally:
            gauge.dec()
            self.metrics.searches.labels(svc.name, by).inc()


class Context:
    """What every route shares: the catalog, the runner, the options and the key."""

    def __init__(self, catalog: Catalog, run: Runner, opts: ServeOptions, access: Access):
        self.catalog, self.run, self.opts, self.access = catalog, run, opts, access

    async def body(self, request: Request, model):
        return await json_body(request, model, self.opts.max_json_values)

    def links(self, hits: list[dict], svc: IndexService, request: Request) -> list[dict]:
        return add_links(hits, svc.name, request, self.access, self.opts.public_url)

    def query(self, svc: IndexService, k, given, cap_k: bool = False) -> Query:
        """A Query from a body's (or the query string's) k, filters, dedup and return_embeddings;
        with `cap_k`, a k above the largest allowed is lowered to it instead of refused."""
        if cap_k and isinstance(k, int):
            k = min(k, self.opts.max_k)
        filters = Filters(tuple(given.set or ()), tuple(given.label or ()), tuple(given.cluster or ()))
        return Query(svc.k(k), filters, given.deduplicate, given.return_embeddings)

    async def parts(self, parts: list[m.QueryPartBody], svc: IndexService, request: Request) -> list[QueryPart]:
        """The query parts of a body, decoded in a worker thread (base64, image files of other indexes)."""
        return await anyio.to_thread.run_sync(lambda: [self.part(p, svc, request) for p in parts])

    def part(self, p: m.QueryPartBody, svc: IndexService, request: Request) -> QueryPart:
        """A query part of a body; an image_url of this server becomes its id, or its bytes when
        the image belongs to another index (whose vectors are another space)."""
        given = [f for f in ("text", "image", "image_url", "embedding", "id") if getattr(p, f) not in (None, "")]
        if len(given) != 1:
            raise ServiceError(
                400, f"each query part needs exactly one of text, image, image_url, embedding, id; got {given}"
            )
        kind = given[0]
        if kind == "image":
            return QueryPart(p.weight, "image", b64_image(p.image))
        if kind == "image_url":
            kind, value = self.image_of_url(p.image_url, svc, request)
            return QueryPart(p.weight, kind, value)
        return QueryPart(p.weight, kind, getattr(p, kind))

    def image_of_url(self, url: str, svc: IndexService, request: Request) -> tuple[str, object]:
        """("id", id) for a url of an image of `svc`; ("image", bytes) for one of another index."""
        index, id_ = own_image(url, request, self.opts.public_url, self.catalog.default)
        if index == svc.name:
            return "id", id_
        other = self.catalog.get(index)
        try:
            return "image", other.store.image_bytes(id_)
        except (KeyError, OverflowError):
            raise ServiceError(404, f"id {id_} is not in index {index!r}") from None
        except OSError:
            raise ServiceError(404, f"the image of id {id_} cannot be read") from None


def create_app(catalog: Catalog, opts: ServeOptions | None = None) -> FastAPI:
    """The ASGI app serving `catalog` (run it with uvicorn: `serve/server.py`)."""
    opts = opts or ServeOptions()
    app = FastAPI(
        title="lvd image lookup",
        version="1",
        docs_url=None,
        redoc_url=None,
        description="Nearest-neighbour image lookup over lvd indexes; clip-retrieval compatible routes.",
    )
    metrics = ServiceMetrics()
    for name, svc in catalog.services.items():
        metrics.vectors.labels(name).set(len(svc))
    access = Access(opts.api_key, opts.url_ttl)
    ctx = Context(catalog, Runner(metrics, opts.max_concurrent_searches, opts.max_waiting_searches), opts, access)
    app.include_router(_page_routes(ctx))
    app.include_router(_search_routes(ctx))
    app.include_router(clip_routes(ctx))
    app.include_router(_ops_routes(catalog, metrics))
    _add_error_handlers(app)
    app.openapi = partial(_openapi, app)
    app.add_middleware(BodyGuard, max_bytes=opts.max_upload_bytes, timeout=opts.body_timeout)
    app.add_middleware(KeyGuard, access=access, default_index=catalog.default)
    if opts.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(opts.cors_origins), allow_methods=["GET", "POST"], allow_headers=["*"]
        )
    app.add_middleware(ObserveMiddleware, metrics=metrics)
    app.state.catalog, app.state.metrics = catalog, metrics
    return app


# ------------------------------------------------------------------------ lvd's own API


# The request body of an image search, for the OpenAPI schema: raw bytes or a multipart form.
IMAGE_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary"}},
                }
            },
        },
    }
}


def _search_routes(ctx: Context) -> APIRouter:
    """lvd's search API: by vector, text, a weighted mix, id or uploaded image."""
    r = APIRouter()
    catalog, run = ctx.catalog, ctx.run

    def params(
        k: int | None = Q(None, description="number of results (default 10)"),
        index: str | None = Q(None, description="index name (default: the first)"),
        set: list[str] | None = Q(None),
        label: list[str] | None = Q(None),
        cluster: list[int] | None = Q(None),
        deduplicate: bool = Q(False),
        return_embeddings: bool = Q(False, description="each result carries its stored vector"),
    ) -> tuple[IndexService, Query]:
        svc = catalog.get(index)
        given = SimpleNamespace(
            set=set, label=label, cluster=cluster, deduplicate=deduplicate, return_embeddings=return_embeddings
        )
        return svc, ctx.query(svc, k, given)

    async def answer(svc: IndexService, by: str, fn, arg, query: Query, request: Request, **extra) -> JSONResponse:
        t0 = time.perf_counter()
        hits = ctx.links(await run(svc, by, fn, arg, query), svc, request)
        took = round(1000 * (time.perf_counter() - t0), 3)
        return JSONResponse({**extra, "index": svc.name, "results": hits, "took_ms": took})

    @r.post(
        "/api/search/vector", response_model=m.SearchAnswer, responses=ERRORS, openapi_extra=_json_body("VectorSearch")
    )
    async def search_vector(request: Request):
        body = await ctx.body(request, m.VectorSearch)
        svc = catalog.get(body.index)
        return await answer(svc, "vector", svc.by_vector, body.vector, ctx.query(svc, body.k, body), request)

    @r.get("/api/search/text", response_model=m.SearchAnswer, responses={**ERRORS, 503: {"model": m.ErrorBody}})
    async def search_text(request: Request, text: str = Q(description="what to look for"), p=Depends(params)):
        svc, query = p
        return await answer(svc, "text", svc.by_text, text, query, request)

    @r.post(
        "/api/search",
        response_model=m.SearchAnswer,
        responses={**ERRORS, 503: {"model": m.ErrorBody}},
        openapi_extra=_json_body("MixedSearch"),
    )
    async def search_mixed(request: Request):
        body = await ctx.body(request, m.MixedSearch)
        svc = catalog.get(body.index)
        parts = await ctx.parts(body.query, svc, request)
        return await answer(svc, "query", svc.by_parts, parts, ctx.query(svc, body.k, body), request)

    @r.get("/api/search/id/{id}", response_model=m.SearchAnswer, responses=ERRORS)
    async def search_id(id: int, request: Request, p=Depends(params)):
        svc, query = p
        return await answer(svc, "id", svc.by_id, id, query, request, query_id=id)

    @r.post(
        "/api/search/image",
        response_model=m.SearchAnswer,
        responses={**ERRORS, 503: {"model": m.ErrorBody}},
        openapi_extra=IMAGE_UPLOAD_BODY,
    )
    async def search_image(request: Request, p=Depends(params)):
        svc, query = p
        return await answer(svc, "image", svc.by_image, await image_upload(request), query, request)

    return r


def _page_routes(ctx: Context) -> APIRouter:
    """The page, health, an index's description and thumbnails: everything but search."""
    r = APIRouter()
    catalog, run = ctx.catalog, ctx.run

    @r.get("/", response_class=HTMLResponse, include_in_schema=False)
    @r.get("/index.html", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-store"})

    @r.get("/api/health", response_model=m.Health)
    async def health():
        return {"status": "ok", "vectors": len(catalog), "indices": {n: len(s) for n, s in catalog.services.items()}}

    @r.get("/api/info", responses=ERRORS)
    async def info(index: str | None = None) -> dict:
        svc = catalog.get(index)
        return {**svc.info(), "text_tower": svc.text_tower}

    @r.get("/thumb/{id}", response_class=Response, responses={**ERRORS, 200: {"content": {"image/jpeg": {}}}})
    async def thumb(id: int, index: str | None = None):
        svc = catalog.get(index)
        body = await run(svc, "thumbnail", svc.thumbnail, id)
        return Response(body, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return r


# ------------------------------------------------------------------------ clip-retrieval's API


def clip_routes(ctx: Context) -> APIRouter:
    """clip-retrieval's back-end routes, as its ClipClient and its web front call them."""
    r = APIRouter()
    catalog, run = ctx.catalog, ctx.run

    @r.post(
        "/knn-service",
        response_model=list[m.KnnHit],
        responses={**ERRORS, 503: {"model": m.ErrorBody}},
        openapi_extra=_json_body("KnnRequest"),
    )
    async def knn_service(request: Request):
        body = await ctx.body(request, m.KnnRequest)
        svc = catalog.get(body.indice_name)
        if body.modality != "image":
            raise ServiceError(400, f'index {svc.name!r} holds image embeddings only: use modality "image"')
        # the front asks for 10,000 results to download them: it gets the most the server gives
        query = ctx.query(svc, body.num_images, body, cap_k=True)
        fields = ("text", "image", "image_url", "embedding_input", "query")
        given = [f for f in fields if getattr(body, f) not in (None, "", [])]
        if len(given) != 1:
            raise ServiceError(
                400,
                "give exactly one of text, image (base64), image_url (a result's url), embedding_input or query; "
                f"got {given or 'none'}",
            )
        if given == ["text"]:
            hits = await run(svc, "text", svc.by_text, body.text, query)
        elif given == ["image"]:
            hits = await run(svc, "image", svc.by_image, await anyio.to_thread.run_sync(b64_image, body.image), query)
        elif given == ["image_url"]:
            kind, value = await anyio.to_thread.run_sync(ctx.image_of_url, body.image_url, svc, request)
            hits = await (
                run(svc, "id", svc.by_id, value, query)
                if kind == "id"
                else run(svc, "image", svc.by_image, value, query)
            )
        elif given == ["query"]:
            hits = await run(svc, "query", svc.by_parts, await ctx.parts(body.query, svc, request), query)
        else:
            hits = await run(svc, "vector", svc.by_vector, body.embedding_input, query)
        return JSONResponse([{**h, "similarity": h["score"]} for h in ctx.links(hits, svc, request)])

    @r.post(
        "/metadata", response_model=list[m.MetadataItem], responses=ERRORS, openapi_extra=_json_body("MetadataRequest")
    )
    async def metadata(request: Request):
        body = await ctx.body(request, m.MetadataRequest)
        svc = catalog.get(body.indice_name)
        records = ctx.links(await run(svc, "metadata", svc.metadata, body.ids), svc, request)
        return JSONResponse([{"id": rec["id"], "metadata": rec} for rec in records])

    @r.get("/indices-list", response_model=list[str])
    async def indices_list():
        return catalog.names()

    return r


JSON_BODIES = (m.VectorSearch, m.MixedSearch, m.KnnRequest, m.MetadataRequest)


def _json_body(name: str) -> dict:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
        }
    }


# ------------------------------------------------------------------------ operations and errors


def _ops_routes(catalog: Catalog, metrics: ServiceMetrics) -> APIRouter:
    r = APIRouter()

    @r.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return r


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request, exc: ServiceError):
        return JSONResponse({"error": exc.message}, exc.status)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request, exc: ClientDisconnect):  # nobody reads it; the access log records the 499
        return JSONResponse({"error": "the client disconnected before its request was complete"}, 499)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return JSONResponse({"error": validation_message(exc.errors())}, 400)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = f"no such route: {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse({"error": message}, exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crash(request, exc: Exception):  # logged by the server; the client learns nothing internal
        log.error("error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": "internal error"}, 500)


def validation_message(errors) -> str:
    """Pydantic's errors as one line a person can act on: `field: what is wrong; ...`."""
    parts = []
    for e in list(errors)[:5]:
        if e.get("type") == "json_invalid":
            parts.append(f"the body is not JSON: {e.get('ctx', {}).get('error', '')}".rstrip(": "))
            continue
        loc = [str(p) for p in e.get("loc", ())]
        where = ".".join(loc[1:]) or (loc[0] if loc else "request")
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, with validation errors documented as what they are here (400 ErrorBody), and the
    served index names as the values `index` / `indice_name` may take."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        names = {"anyOf": [{"type": "string", "enum": app.state.catalog.names()}, {"type": "null"}]}
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                responses = op.get("responses", {})
                if responses.pop("422", None) is not None and "400" not in responses:
                    responses["400"] = {
                        "description": "Bad Request",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
                    }
                for param in op.get("parameters", []):
                    if param["name"] == "index":
                        param["schema"] = {**param["schema"], **names}
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in JSON_BODIES:  # read by json_body, so FastAPI does not list them itself
            components[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for model in components.values():
            for field in ("index", "indice_name"):
                if field in model.get("properties", {}):
                    model["properties"][field] = {**model["properties"][field], **names}
        app.openapi_schema = schema
    return app.openapi_schema
