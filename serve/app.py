"""The lookup service's HTTP layer: a FastAPI (ASGI) app over a `Catalog` of indexes.

Routes (every error is a JSON `{"error": message}` with a 4xx status; see /openapi.json):
    GET  /                         the drop-an-image page
    GET  /api/health               {"status": "ok", "vectors": N, "indices": {name: n}}
    GET  /api/info?index=NAME      the index's info.json (paths cut unless --expose-paths)
    POST /api/search/image?k=K     body: the image file (raw bytes, or multipart field "image")
    POST /api/search/vector        body: {"vector": [...], "k": K}
    GET  /api/search/id/ID?k=K     neighbours of an indexed image
    GET  /thumb/ID?index=NAME      JPEG thumbnail of an indexed image
    POST /knn-service              clip-retrieval's search (image as base64, or embedding_input)
    POST /metadata                 clip-retrieval's metadata of ids
    GET  /indices-list             clip-retrieval's list of index names
    GET  /metrics                  Prometheus metrics
The search routes also take `index`, `set`, `label`, `cluster` and `deduplicate`.

Searches are blocking (Faiss, the query-image model), so they run in thread pools (image work
bounded by `max_concurrent_searches`), and the event loop stays free for health probes and
slow clients.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import logging
import time
from functools import partial

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi import Query as Q
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from lvd.serve import schemas as m
from lvd.serve.guard import BodyGuard
from lvd.serve.observe import ObserveMiddleware, ServiceMetrics
from lvd.serve.service import Catalog, Filters, IndexService, Query, ServeOptions, ServiceError
from lvd.serve.webpage import PAGE

log = logging.getLogger(__name__)

ERRORS = {status: {"model": m.ErrorBody} for status in (400, 404, 408, 413)}


class Runner:
    """Runs a blocking service call in a bounded thread pool, counted in the metrics.

    Image work (decode, model, thumbnails) has `heavy` threads; searches by vector or id have
    `light` ones, most of which only wait for a Faiss call shared with the others.
    """

    HEAVY = ("image", "thumbnail")

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


def create_app(catalog: Catalog, opts: ServeOptions | None = None) -> FastAPI:
    """The ASGI app serving `catalog` (run it with uvicorn: `index/http_server.py`)."""
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
    run = Runner(metrics, opts.max_concurrent_searches, opts.max_waiting_searches)
    app.include_router(_lvd_routes(catalog, run))
    app.include_router(_clip_routes(catalog, run))
    app.include_router(_ops_routes(catalog, metrics))
    _add_error_handlers(app)
    app.openapi = partial(_openapi, app)
    app.add_middleware(BodyGuard, max_bytes=opts.max_upload_bytes, timeout=opts.body_timeout)
    if opts.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(opts.cors_origins), allow_methods=["GET", "POST"], allow_headers=["*"]
        )
    app.add_middleware(ObserveMiddleware, metrics=metrics)
    app.state.catalog, app.state.metrics = catalog, metrics
    return app


# ------------------------------------------------------------------------ lvd's own API


def _lvd_routes(catalog: Catalog, run: Runner) -> APIRouter:
    r = APIRouter()

    def params(
        k: int | None = Q(None, description="number of results (default 10)"),
        index: str | None = Q(None, description="index name (default: the first)"),
        set: list[str] | None = Q(None),
        label: list[str] | None = Q(None),
        cluster: list[int] | None = Q(None),
        deduplicate: bool = Q(False),
    ) -> tuple[IndexService, Query]:
        svc = catalog.get(index)
        return svc, Query(svc.k(k), _filters(set, label, cluster), deduplicate)

    @r.get("/", response_class=HTMLResponse, include_in_schema=False)
    @r.get("/index.html", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-store"})

    @r.get("/api/health", response_model=m.Health)
    async def health():
        return {"status": "ok", "vectors": len(catalog), "indices": {n: len(s) for n, s in catalog.services.items()}}

    @r.get("/api/info", responses=ERRORS)
    async def info(index: str | None = None) -> dict:
        return catalog.get(index).info()

    @r.post(
        "/api/search/vector", response_model=m.SearchAnswer, responses=ERRORS, openapi_extra=_json_body("VectorSearch")
    )
    async def search_vector(request: Request):
        body = await json_body(request, m.VectorSearch)
        svc = catalog.get(body.index)
        query = Query(svc.k(body.k), _filters(body.set, body.label, body.cluster), body.deduplicate)
        return await _answer(run, svc, "vector", svc.by_vector, body.vector, query)

    @r.get("/api/search/id/{id}", response_model=m.SearchAnswer, responses=ERRORS)
    async def search_id(id: int, p=Depends(params)):
        svc, query = p
        return await _answer(run, svc, "id", svc.by_id, id, query, query_id=id)

    @r.post(
        "/api/search/image",
        response_model=m.SearchAnswer,
        responses={**ERRORS, 503: {"model": m.ErrorBody}},
        openapi_extra={
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
        },
    )
    async def search_image(request: Request, p=Depends(params)):
        svc, query = p
        data = image_from_upload(request.headers.get("content-type", ""), await request.body())
        return await _answer(run, svc, "image", svc.by_image, data, query)

    @r.get("/thumb/{id}", response_class=Response, responses={**ERRORS, 200: {"content": {"image/jpeg": {}}}})
    async def thumb(id: int, index: str | None = None):
        svc = catalog.get(index)
        body = await run(svc, "thumbnail", svc.thumbnail, id)
        return Response(body, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return r


async def _answer(run: Runner, svc: IndexService, by: str, fn, arg, query: Query, **extra) -> JSONResponse:
    t0 = time.perf_counter()
    hits = await run(svc, by, fn, arg, query)
    return JSONResponse(
        {**extra, "index": svc.name, "results": hits, "took_ms": round(1000 * (time.perf_counter() - t0), 3)}
    )


def _filters(sets, labels, clusters) -> Filters:
    return Filters(tuple(sets or ()), tuple(labels or ()), tuple(clusters or ()))


def image_from_upload(content_type: str, body: bytes) -> bytes:
    """The image of an upload: the body itself, or the multipart field named "image"."""
    if not content_type.lower().startswith("multipart/form-data"):
        return body
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace") + body
    )
    if not msg.is_multipart():
        raise ServiceError(400, "malformed multipart body")
    for part in msg.iter_parts():
        if part.get_param("name", header="content-disposition") == "image":
            return part.get_payload(decode=True) or b""
    raise ServiceError(400, 'the multipart body has no field named "image"')


# ------------------------------------------------------------------------ clip-retrieval's API


def _clip_routes(catalog: Catalog, run: Runner) -> APIRouter:
    r = APIRouter()

    @r.post(
        "/knn-service",
        response_model=list[m.KnnHit],
        responses={**ERRORS, 503: {"model": m.ErrorBody}},
        openapi_extra=_json_body("KnnRequest"),
    )
    async def knn_service(request: Request):
        body = await json_body(request, m.KnnRequest)
        svc = catalog.get(body.indice_name)
        if body.modality != "image":
            raise ServiceError(400, f'index {svc.name!r} holds image embeddings only: use modality "image"')
        query = Query(svc.k(body.num_images), _filters(body.set, body.label, body.cluster), body.deduplicate)
        given = [f for f in ("text", "image", "image_url", "embedding_input") if getattr(body, f) not in (None, "")]
        if len(given) != 1:
            raise ServiceError(400, f"give exactly one of image (base64) or embedding_input, got {given or 'none'}")
        if given == ["text"]:
            raise ServiceError(
                400,
                f"no text encoder is configured for index {svc.name!r}: query with image (base64) or embedding_input",
            )
        if given == ["image_url"]:
            raise ServiceError(
                400,
                "image_url is refused: this server never fetches URLs; send the image itself, base64-encoded, as image",
            )
        if given == ["image"]:
            hits = await run(svc, "image", svc.by_image, _b64(body.image), query)
        else:
            hits = await run(svc, "vector", svc.by_vector, body.embedding_input, query)
        return JSONResponse([{**h, "similarity": h["score"]} for h in hits])

    @r.post(
        "/metadata", response_model=list[m.MetadataItem], responses=ERRORS, openapi_extra=_json_body("MetadataRequest")
    )
    async def metadata(request: Request):
        body = await json_body(request, m.MetadataRequest)
        svc = catalog.get(body.indice_name)
        records = await run(svc, "metadata", svc.metadata, body.ids)
        return JSONResponse([{"id": rec["id"], "metadata": rec} for rec in records])

    @r.get("/indices-list", response_model=list[str])
    async def indices_list():
        return catalog.names()

    return r


JSON_BODIES = (m.VectorSearch, m.KnnRequest, m.MetadataRequest)


async def json_body(request: Request, model):
    """The body as JSON whatever its Content-Type, as clip-retrieval's server (and lvd's earlier one)
    read it: its ClipClient sends none, and curl's `-d` says form-urlencoded."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


def _json_body(name: str) -> dict:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}},
        }
    }


def _b64(text: str) -> bytes:
    if text.startswith("data:") and "," in text:  # a data URL, as browsers make them
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ServiceError(400, "image is not valid base64") from None


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
