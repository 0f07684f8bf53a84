"""Operations view of the lookup service: Prometheus metrics and one structured access-log line per request.

Metrics live in a registry owned by the app (prometheus-client's default registry is process
global state, and two apps in one process, as in the tests, must not share counters). Requests
are labelled by route template (`/api/search/id/{id}`), never by raw path, so a scan of random
URLs cannot grow the label set. With `--workers N` each worker counts its own requests.
"""

from __future__ import annotations

import json
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

access_log = logging.getLogger("lvd.serve.access")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def access_log_to_stderr() -> None:
    """Print the access log (one JSON object a line) on stderr, whatever the root logger's level.

    Called by the server's entry points (each worker process too), never on import.
    """
    if not access_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False


class ServiceMetrics:
    """The service's counters, in a registry of their own."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "lvd_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "lvd_http_request_duration_seconds",
            "Time from request start to the end of the answer",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "lvd_searches_in_flight",
            "Searches (and query-image embeddings) running or waiting",
            ["index"],
            registry=self.registry,
        )
        self.searches = Counter("lvd_searches", "Searches run", ["index", "by"], registry=self.registry)
        self.vectors = Gauge("lvd_index_vectors", "Vectors in each served index", ["index"], registry=self.registry)


class ObserveMiddleware:
    """Pure ASGI middleware: times each HTTP request, counts it, and logs it as one JSON line."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status, sent = 500, 0

        async def observed_send(message):
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            seconds = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            client = scope.get("client") or ("-", 0)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    json.dumps(
                        {
                            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
                            "client": f"{client[0]}:{client[1]}",
                            "method": scope["method"],
                            "path": scope["path"],
                            "route": route,
                            "status": status,
                            "ms": round(1000 * seconds, 3),
                            "bytes": sent,
                        }
                    )
                )
