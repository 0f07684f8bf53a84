"""Running the lookup app on uvicorn: the listening socket, timeouts for slow clients, workers.

uvicorn's event loop keeps a stalled client from blocking anyone else, but it would keep such
a connection open forever: its keep-alive timer restarts on every byte, so a client that
never finishes its headers (or dribbles them) holds a socket. `DeadlineH11Protocol` gives a
connection `header_timeout` seconds from opening (or from its last answer) to complete a
request's headers, bytes or no bytes; the body then has `body_timeout` (`serve/guard.py`).

At the connection cap (`max_connections` open sockets, or as many requests running), new
requests are answered 503 at once, except `/api/health` and `/metrics`: an orchestrator probing
a loaded server must learn that it is loaded, not that it is dead. Every answer the protocol
writes itself (408, 400 for unreadable HTTP, 503) is JSON, like the app's.

The socket is bound here, before uvicorn starts, so that a port in use is one clear error
(a UserError, printed by the CLI) instead of a log line and an exit. With `workers > 1`, each
worker process opens the indexes itself, memory-mapped, so the vectors sit once in the page
cache; the catalog travels to the workers as JSON in an environment variable.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from dataclasses import asdict
from pathlib import Path

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from lvd.common.errors import UserError
from lvd.serve.observe import access_log_to_stderr
from lvd.serve.service import Catalog, IndexSpec, ServeOptions

SPEC_ENV = "LVD_SERVE_SPEC"


# answered at the connection cap too: they cost nothing and say how the server is
ALWAYS_ANSWERED = ("/api/health", "/metrics")


class ServeConfig(uvicorn.Config):
    """uvicorn's Config plus the header deadline and the connection cap (a plain class, so workers
    can unpickle it). uvicorn's own `limit_concurrency` stays off: the cap is applied per route."""

    def __init__(self, app, header_timeout: float = 10.0, max_connections: int | None = None, **kwargs):
        super().__init__(app, http=DeadlineH11Protocol, **kwargs)
        self.header_timeout = header_timeout
        self.max_connections = max_connections


class DeadlineH11Protocol(H11Protocol):
    """h11 protocol whose connections must complete request headers within a deadline, capped in
    number for every route but health and metrics, answering its own errors in JSON."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self._header_timeout = getattr(config, "header_timeout", 10.0)
        self._deadline = None
        cap = getattr(config, "max_connections", None)
        if cap is not None:
            self.app = _Capped(self.app, self, cap)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._request_running():
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._request_running():
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _request_running(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self._header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self._request_running() or self.transport.is_closing():
            return
        self.transport.write(_TIMEOUT_ANSWER)
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to unreadable HTTP (bad framing, headers too large), in JSON."""
        body = json.dumps({"error": f"invalid HTTP request: {msg}"}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
            try:
                self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:  # h11 cannot frame an answer in this state: close
                break
        self.transport.close()


class _Capped:
    """The app behind the connection cap: over it, every route but ALWAYS_ANSWERED gets a JSON 503."""

    def __init__(self, app, protocol: H11Protocol, cap: int):
        self.app, self.protocol, self.cap = app, protocol, cap

    async def __call__(self, scope, receive, send):
        p = self.protocol
        # this request's own connection and task are counted already
        busy = len(p.connections) > self.cap or len(p.tasks) > self.cap
        if busy and scope.get("path") not in ALWAYS_ANSWERED:
            body = b'{"error": "the server is at its connection limit; try again shortly"}'
            headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
            await send({"type": "http.response.start", "status": 503, "headers": headers + [(b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


_TIMEOUT_BODY = b'{"error": "the request headers did not arrive in time"}'
_TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (0: a free port); a one-line UserError when that fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"cannot listen on {host}:{port}: the port is in use; choose another with --port") from None
        if exc.errno == errno.EACCES:
            raise UserError(
                f"cannot listen on {host}:{port}: permission denied (ports below 1024 need privileges); "
                "choose another with --port"
            ) from None
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def server_config(app, opts: ServeOptions, workers: int = 1, log_level: str = "info") -> ServeConfig:
    """uvicorn settings from ServeOptions: limits, timeouts, graceful shutdown, our access log."""
    return ServeConfig(
        app,
        header_timeout=opts.header_timeout,
        max_connections=opts.max_connections,
        workers=workers,
        factory=isinstance(app, str),
        timeout_keep_alive=opts.keep_alive_timeout,
        timeout_graceful_shutdown=opts.shutdown_timeout,
        backlog=2048,
        access_log=False,
        log_level=log_level,
        server_header=False,
        h11_max_incomplete_event_size=64 * 1024,
        lifespan="off",
    )


def open_catalog(specs: list[IndexSpec], opts: ServeOptions, workers: int = 1) -> Catalog:
    """The indexes to serve, opened before anything is announced: a bad index folder fails here,
    once (with more workers, each maps them again itself)."""
    return Catalog.open(specs, opts, mmap=workers > 1)


def serve(
    specs: list[IndexSpec], opts: ServeOptions, sock: socket.socket, workers: int = 1, catalog: Catalog | None = None
) -> None:
    """Serve until SIGINT/SIGTERM, then finish the requests in progress (graceful shutdown)."""
    if workers > 1:
        from uvicorn.supervisors import Multiprocess

        if catalog is None:
            open_catalog(specs, opts, workers)
        os.environ[SPEC_ENV] = json.dumps({"specs": [_spec_json(s) for s in specs], "opts": asdict(opts)})
        config = server_config(f"{__name__}:app_from_environment", opts, workers)
        Multiprocess(config, sockets=[sock]).run()
        return
    from lvd.serve.app import create_app

    if opts.access_log:
        access_log_to_stderr()
    app = create_app(catalog or open_catalog(specs, opts), opts)
    uvicorn.Server(server_config(app, opts)).run(sockets=[sock])


def app_from_environment():
    """The app of one worker process, from the catalog the parent put in the environment."""
    from lvd.serve.app import create_app

    spec = json.loads(os.environ[SPEC_ENV])
    opts = ServeOptions(**{**spec["opts"], "cors_origins": tuple(spec["opts"]["cors_origins"])})
    specs = [IndexSpec(s["name"], Path(s["path"]), s.get("device"), s.get("dtype")) for s in spec["specs"]]
    if opts.access_log:
        access_log_to_stderr()
    return create_app(Catalog.open(specs, opts, mmap=True), opts)


def _spec_json(spec: IndexSpec) -> dict:
    return {"name": spec.name, "path": str(Path(spec.path).resolve()), "device": spec.device, "dtype": spec.dtype}
