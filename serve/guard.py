"""Request bodies bounded in size and in time, before any route reads them.

A body announced larger than the limit is refused (413, connection closed), unread when it is
far larger (a moderate one is drained first, so that a browser sees the answer); a body
that grows past the limit while streaming (chunked, or a lying Content-Length) is cut off at
the limit; a body that does not arrive in full within `timeout` seconds of the request (a
Content-Length larger than what is sent, a client dribbling bytes) is answered 408. The errors
are raised as Starlette `HTTPException`s from `receive`, which FastAPI passes through to the
app's JSON error handler, so every route gets the same answers.
"""

from __future__ import annotations

import anyio
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

# Bodies announced up to this many times the limit are read (and dropped) before the 413, so a
# browser sees the answer rather than a reset connection; larger ones are refused unread.
DRAIN_FACTOR = 4


class BodyGuard:
    """Pure ASGI middleware limiting request bodies to `max_bytes`, read within `timeout` seconds."""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        announced = dict(scope["headers"]).get(b"content-length")
        if announced is not None:
            if not announced.isdigit():
                return await _refuse(scope, receive, send, 400, "invalid Content-Length")
            if int(announced) > self.max_bytes:
                if int(announced) <= DRAIN_FACTOR * self.max_bytes:
                    await self._drain(receive)
                return await _refuse(
                    scope,
                    receive,
                    send,
                    413,
                    f"a body of {int(announced)} bytes exceeds the limit of {self.max_bytes} bytes",
                )
        deadline = anyio.current_time() + self.timeout
        received, complete = 0, False

        async def guarded_receive():
            nonlocal received, complete
            if complete:  # later calls only wait for a disconnect: no deadline on those
                return await receive()
            try:
                with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(
                    408, f"the request body did not arrive within {self.timeout:g} s", headers={"Connection": "close"}
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(
                        413, f"the body exceeds the limit of {self.max_bytes} bytes", headers={"Connection": "close"}
                    )
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        await self.app(scope, guarded_receive, send)

    async def _drain(self, receive) -> None:
        """Read and drop a body, within the body deadline, so that the client reads our answer."""
        with anyio.move_on_after(self.timeout):
            while True:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return


async def _refuse(scope, receive, send, status: int, message: str) -> None:
    response = JSONResponse({"error": message}, status, headers={"Connection": "close"})
    await response(scope, receive, send)
