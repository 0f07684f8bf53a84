"""Who may use the lookup service: an API key, and signed, expiring image URLs.

`lvd index serve` shows thumbnails of private collections. With a key (`--api-key`, or the
LVD_API_KEY environment variable) every route except `/api/health` needs it, in one of the
forms each kind of client can send:

- a header, `X-API-Key: KEY` or `Authorization: Bearer KEY` (programs, curl);
- the query parameter `key=KEY` (a person opening lvd's page at `http://HOST:PORT/?key=KEY`);
- the path prefix `/key/KEY/` (clip-retrieval's web front appends its routes to the back-end
  URL it is given and can send neither headers nor query parameters:
  `?back=http://HOST:PORT/key/KEY`).

Image URLs in answers carry a signature instead of the key: `/thumb/ID?index=NAME&expires=T&sig=S`,
an HMAC of the key over the index, the id and the expiry. An `<img>` loads them without the
key, they stop working after T, and they reveal nothing of the key. Expiries are rounded to
windows of `ttl` seconds, so the same picture keeps the same URL (and browser cache) for a while.
The key is compared in constant time and never reaches the access log (paths are logged
without their query, and the `/key/KEY` prefix is cut before anything logs the path).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import time
from urllib.parse import parse_qs, quote

from starlette.responses import JSONResponse

OPEN_PATHS = ("/api/health",)
PREFIX = "/key/"
KEY_ENV = "LVD_API_KEY"


class Access:
    """The server's key (None: everyone may use it) and the signing of image URLs."""

    def __init__(self, key: str | None = None, ttl: float = 3600.0):
        self.key = key or None
        self.ttl = float(ttl)
        self._secret = hashlib.sha256(b"lvd image urls\x00" + key.encode()).digest() if key else b""

    def __bool__(self) -> bool:
        return self.key is not None

    def thumb_path(self, index: str, id_: int, now: float | None = None) -> str:
        """The path (and query) of an image, signed when there is a key."""
        path = f"/thumb/{int(id_)}?index={quote(index, safe='')}"
        if not self:
            return path
        now = time.time() if now is None else now
        expires = int((math.floor(now / self.ttl) + 2) * self.ttl)
        return f"{path}&expires={expires}&sig={self._sign(index, int(id_), expires)}"

    def _sign(self, index: str, id_: int, expires: int) -> str:
        mac = hmac.new(self._secret, f"{index}\x00{id_}\x00{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:18]).decode()

    def signed(self, index: str, id_: int, expires: str, sig: str, now: float | None = None) -> bool:
        """True for an unexpired signature of this image."""
        if not self or not expires.isdigit() or len(expires) > 12:
            return False
        if int(expires) < (time.time() if now is None else now):
            return False
        return hmac.compare_digest(self._sign(index, id_, int(expires)).encode(), sig.encode())

    def key_ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.key.encode())


class KeyGuard:
    """Pure ASGI middleware: requests without the key (or a valid image signature) get a JSON 401."""

    def __init__(self, app, access: Access, default_index: str):
        self.app, self.access, self.default_index = app, access, default_index

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.access or self._allowed(scope):
            return await self.app(scope, receive, send)
        response = JSONResponse(
            {
                "error": "this server needs its API key: send it as the X-API-Key header, as "
                "'Authorization: Bearer KEY', as ?key=KEY, or as the path prefix /key/KEY/"
            },
            401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)

    def _allowed(self, scope) -> bool:
        path = scope["path"]
        if path.startswith(PREFIX):  # cut the key out of the path, whatever it is, before anyone logs it
            given, _, rest = path[len(PREFIX) :].partition("/")
            scope["path"], scope["raw_path"] = "/" + rest, ("/" + rest).encode()
            return self.access.key_ok(given)
        if path in OPEN_PATHS:
            return True
        headers = dict(scope["headers"])
        bearer = headers.get(b"authorization", b"").decode("latin-1")
        candidates = [headers.get(b"x-api-key", b"").decode("latin-1") or None]
        if bearer.lower().startswith("bearer "):
            candidates.append(bearer[7:].strip())
        try:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"), max_num_fields=64)
        except ValueError:  # more fields than any client of this server sends
            return False
        candidates += query.get("key", [])[:1]
        if any(self.access.key_ok(c) for c in candidates if c):
            return True
        return self._signed_image(path, query)

    def _signed_image(self, path: str, query: dict) -> bool:
        id_text = path[len("/thumb/") :] if path.startswith("/thumb/") else ""
        if not id_text.lstrip("-").isdigit():
            return False
        index = (query.get("index") or [self.default_index])[0]
        expires, sig = (query.get("expires") or [""])[0], (query.get("sig") or [""])[0]
        return self.access.signed(index, int(id_text), expires, sig)
