"""`lvd index serve` against clients that misbehave: stalled and dribbling connections, short bodies,
a port in use, shutdown mid-request, and fuzzing of every route from the published OpenAPI schema."""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, settings
from index_support import FIRST_ID, curated_vector_run, running_server

from lvd.index.store import BuildOptions, IndexStore
from lvd.serve.cli import main
from lvd.serve.run_inputs import build
from lvd.serve.service import ServeOptions

STALLED = 200


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    truth = curated_vector_run(root / "run", n_groups=60)
    build(root / "run" / "embed", root / "index", BuildOptions(factory="Flat", progress=False))
    return root / "index", truth


@pytest.fixture(scope="module")
def strict_server(index_dir):
    """A server with short timeouts, so the tests see them act."""
    opts = ServeOptions(header_timeout=1.5, body_timeout=1.0, keep_alive_timeout=5, max_upload_bytes=2**16)
    with running_server(IndexStore.open(index_dir[0]), opts) as url:
        yield url, int(url.rsplit(":", 1)[1])


def health_seconds(url: str) -> float:
    t0 = time.perf_counter()
    r = requests.get(url + "/api/health", timeout=5)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    return time.perf_counter() - t0


def test_stalled_and_dribbling_connections_do_not_delay_health(strict_server):
    url, port = strict_server
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    socks = []
    try:
        for i in range(STALLED):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if i % 2:  # dribblers: a request line started, then a byte now and then
                s.sendall(b"GET /api/health HTTP/1.1\r\nHo")
            socks.append(s)
        time.sleep(0.3)
        for s in socks[1::2]:
            s.sendall(b"s")
        assert max(health_seconds(url) for _ in range(5)) < 1.0
        # the header deadline closes every one of them, the dribblers too (bytes do not reset it)
        deadline = time.monotonic() + 10
        open_socks = set(socks)
        while open_socks and time.monotonic() < deadline:
            for s in [s for s in open_socks if s.fileno() >= 0]:
                try:
                    s.sendall(b"x")
                except OSError:
                    open_socks.discard(s)
                    continue
            ready, _, _ = select.select(list(open_socks), [], [], 0.2)
            for s in ready:
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if not data or b"408" in data:
                    open_socks.discard(s)
        assert not open_socks, f"{len(open_socks)} stalled connections still open after 10 s"
        assert health_seconds(url) < 1.0
    finally:
        for s in socks:
            s.close()


def raw(port: int, data: bytes, wait: float = 10) -> tuple[bytes, float]:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out, time.perf_counter() - t0


@pytest.mark.slow
def test_a_body_shorter_than_announced_is_a_408_not_a_500(strict_server):
    url, port = strict_server
    out, seconds = raw(
        port,
        b"POST /api/search/vector HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"vector": [1, 2',
    )
    assert out.split()[1] == b"408" and b"did not arrive" in out and 0.9 < seconds < 5
    # a body dribbled slower than the body deadline allows
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /api/search/vector HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        answer = b""
        for _ in range(30):
            try:
                s.sendall(b" ")
            except OSError:
                break
            s.settimeout(0.1)
            try:
                answer += s.recv(4096)
            except TimeoutError:
                continue
            if answer:
                break
        assert answer.split()[1] == b"408"
    assert health_seconds(url) < 1.0


def test_bad_framing_gets_a_4xx(strict_server):
    _, port = strict_server
    for request, status in [
        (b"POST /api/search/vector HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", b"400"),
        (b"POST /api/search/vector HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n", b"413"),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"4"),
        (b"NONSENSE\r\n\r\n", b"400"),
    ]:
        out, _ = raw(port, request)
        assert out.split()[1].startswith(status), (request[:60], out[:200])


def test_a_port_in_use_is_one_line_and_exit_2(index_dir, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(index_dir[0]), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"lvd index: error: cannot listen on 127.0.0.1:{port}: the port is in use; choose another with --port "
        "(--debug shows the traceback)"
    )


@pytest.mark.slow
def test_workers_share_the_index_and_shut_down_gracefully(index_dir, tmp_path):
    """`--workers 2` on a memory-mapped index: correct answers; SIGTERM lets a request in progress finish."""
    path, truth = index_dir
    proc = subprocess.Popen(
        [sys.executable, "-m", "lvd.serve.cli", "serve", f"curated={path}", "--port", "0", "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        lines = []
        while "http://127.0.0.1:" not in (lines or [""])[-1]:
            lines.append(proc.stdout.readline())
            assert lines[-1] or proc.poll() is None, "".join(lines)
        port = int(lines[-1].split("http://127.0.0.1:")[1].split("/")[0])
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(url + "/api/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "server did not come up"
            time.sleep(0.2)
        q = truth["x"][3].astype(np.float64)
        want = truth["ids"][np.argsort(-(truth["x"] @ q), kind="stable")[:5]].tolist()
        for _ in range(6):  # spread over both workers
            out = requests.post(
                url + "/knn-service", data=json.dumps({"embedding_input": q.tolist(), "num_images": 5}), timeout=10
            ).json()
            assert [h["id"] for h in out] == want
        body = json.dumps({"vector": q.tolist(), "k": 5}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(
                b"POST /api/search/vector HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:10])
            )
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            s.sendall(body[10:])
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.split()[1] == b"200" and [h["id"] for h in json.loads(payload)["results"]] == want
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- fuzzing from the schema


FUZZ_EXAMPLES = int(os.environ.get("LVD_FUZZ_EXAMPLES", "30"))  # per operation; raise it for a longer hunt


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_5xx(index_dir):
    """schemathesis makes requests for every operation of /openapi.json, valid and not; none may crash."""
    import schemathesis
    from hypothesis import given

    from lvd.serve.app import create_app
    from lvd.serve.service import Catalog, IndexService

    opts = ServeOptions(max_upload_bytes=2**16)
    app = create_app(Catalog([IndexService("curated", IndexStore.open(index_dir[0]), opts)]), opts)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    seen: dict[str, list[int]] = {}
    for result in schema.get_all_operations():
        op = result.ok()

        @given(case=op.as_strategy())
        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def fuzz(case):
            if "id" in (case.path_parameters or {}) and not isinstance(case.path_parameters["id"], int):
                case.path_parameters["id"] = FIRST_ID
            response = case.call()
            seen.setdefault(f"{case.method} {case.path}", []).append(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.query, case.body, response.text[:300])
            if response.status_code >= 400:
                ctype = response.headers.get("content-type") or [""]  # schemathesis: a list per header
                assert ctype[0].startswith("application/json") and response.json()["error"]

        fuzz()
    print("fuzz:", {k: (len(v), sorted(set(v))) for k, v in seen.items()})
    assert {"POST /knn-service", "POST /metadata", "POST /api/search/vector", "GET /api/search/id/{id}"} <= set(seen)
    assert sum(len(v) for v in seen.values()) >= 5 * len(seen)
    assert any(200 in v for v in seen.values()) and any(400 in v for v in seen.values())
