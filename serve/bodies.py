"""What the routes read from a request and add to an answer, within the server's limits.

- JSON bodies are read whatever their Content-Type (clip-retrieval's ClipClient sends none, its
  front end text/plain, curl's `-d` a form type), after a linear count of their values: a 14 MiB
  body holding a 3-million-item filter would otherwise become gigabytes of Python objects
  before any validation could refuse it.
- Image uploads are the raw body or a multipart field, parsed within limits
  (`serve/multipart.py`) in a worker thread, never on the event loop.
- An `image_url` is accepted only when it points at this server's own image route (a result's
  `url`): it is resolved locally to the index and id it names, never fetched.
- Hits get their image links: `thumbnail` (a path) and `url` (absolute, for clip-retrieval's
  front end, whose `<img>` shows it), signed when the server has a key.
"""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import parse_qs, urlsplit

import anyio
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from lvd.serve.access import PREFIX, Access
from lvd.serve.multipart import MultipartError, field, is_multipart
from lvd.serve.service import ServiceError

_THUMB = re.compile(r"/thumb/(-?\d{1,20})")


async def json_body(request: Request, model, max_values: int):
    """The body validated as `model`; one with more than `max_values` JSON values is a 413."""
    body = await request.body()
    if body.count(b",") >= max_values:
        raise ServiceError(413, f"the body holds more than {max_values} JSON values")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


async def image_upload(request: Request) -> bytes:
    """The uploaded image: the body itself, or its multipart field named "image"."""
    content_type = request.headers.get("content-type", "")
    body = await request.body()
    if not is_multipart(content_type):
        return body
    try:
        return await anyio.to_thread.run_sync(field, body, content_type)
    except MultipartError as exc:
        raise ServiceError(400, str(exc)) from None


def b64_image(text: str) -> bytes:
    if text.startswith("data:") and "," in text:  # a data URL, as browsers make them
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ServiceError(400, "image is not valid base64") from None


def base_url(request: Request, public_url: str | None) -> str:
    """The server's address as the client sees it (or as the operator declared it behind a proxy)."""
    return (public_url or str(request.base_url)).rstrip("/")


def own_image(url: str, request: Request, public_url: str | None, default_index: str) -> tuple[str, int]:
    """(index, id) of a URL of this server's image route; any other URL is a 400 (never fetched)."""
    refused = ServiceError(
        400,
        "image_url must be the url of a result of this server (its /thumb/ID route); other URLs are refused: "
        "this server never fetches URLs, send the image itself, base64-encoded, as image",
    )
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        raise refused from None
    bases = [urlsplit(base_url(request, None))] + ([urlsplit(public_url)] if public_url else [])
    for base in bases:
        if parts.scheme != base.scheme or parts.netloc.lower() != base.netloc.lower():
            continue
        path = parts.path
        prefix = base.path.rstrip("/")
        if prefix and not path.startswith(prefix + "/"):
            continue
        path = path[len(prefix) :]
        if path.startswith(PREFIX):  # a key in the path: what follows is the route
            path = "/" + path[len(PREFIX) :].partition("/")[2]
        match = _THUMB.fullmatch(path)
        if match:
            index = (parse_qs(parts.query).get("index") or [default_index])[0]
            return index, int(match.group(1))
    raise refused


def add_links(hits: list[dict], index: str, request: Request, access: Access, public_url: str | None) -> list[dict]:
    """Each hit with an image gets `thumbnail` (path) and `url` (absolute), signed when there is a key."""
    base = base_url(request, public_url)
    for hit in hits:
        if hit.get("thumbnail"):
            hit["thumbnail"] = access.thumb_path(index, hit["id"])
            hit["url"] = base + hit["thumbnail"]
    return hits
