"""`lvd index serve` against clients that misbehave: stalled and dribbling connections, short bodies,
a port in use, shutdown mid-request, and fuzzing of every route from the published OpenAPI schema."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
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
from index_support import FIRST_ID, curated_vector_run, running_server, wait_until_serving

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
        start_new_session=True,  # its own process group, so a failure below takes the workers down too
    )
    try:
        lines = []
        while "http://127.0.0.1:" not in (lines or [""])[-1]:
            lines.append(proc.stdout.readline())
            assert lines[-1] or proc.poll() is None, "".join(lines)
        port = int(lines[-1].split("http://127.0.0.1:")[1].split("/")[0])
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, proc)
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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the supervisor and its worker processes
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


# ---------------------------------------------------------------- what an adversarial probe found


@pytest.fixture(scope="module")
def roomy_server(index_dir):
    """Bodies up to 8 MiB, so that the parsers, not the size limit, meet the hostile bodies."""
    opts = ServeOptions(max_upload_bytes=8 * 2**20, body_timeout=5.0)
    with running_server(IndexStore.open(index_dir[0]), opts) as url:
        yield url, int(url.rsplit(":", 1)[1])


def post_raw(port: int, path: str, body: bytes, content_type: str) -> tuple[bytes, float]:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return raw(port, head + body, wait=30)


def while_polling_health(url: str, action) -> tuple[object, float]:
    """Run `action` while /api/health is polled; returns its result and the slowest health answer."""
    import threading

    slowest, done = [0.0], threading.Event()

    def poll():
        while not done.is_set():
            slowest[0] = max(slowest[0], health_seconds(url))
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        result = action()
    finally:
        done.set()
        poller.join(10)
    return result, slowest[0]


def test_hostile_multipart_bodies_are_refused_fast_and_off_the_event_loop(roomy_server):
    url, port = roomy_server
    boundary = "b0undary"
    ctype = f"multipart/form-data; boundary={boundary}"
    many_params = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '.encode()
        + b"a=b; " * 100_000
        + f"\r\nContent-Type: image/png\r\n\r\nxx\r\n--{boundary}--\r\n".encode()
    )
    many_parts = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n'.encode() for i in range(100_000)
        )
        + f"--{boundary}--\r\n".encode()
    )
    assert len(many_params) > 500_000 and len(many_parts) > 5 * 2**20
    for body, message in ((many_params, b"longer than"), (many_parts, b"more than 16 parts")):
        (out, seconds), slowest_health = while_polling_health(
            url, lambda body=body: post_raw(port, "/api/search/image", body, ctype)
        )
        head, _, payload = out.partition(b"\r\n\r\n")
        assert head.split()[1] == b"400" and message in payload and b"application/json" in head, out[:300]
        assert seconds < 3 and slowest_health < 1.0, (seconds, slowest_health)
    # a well-formed upload still reaches the model (this index has none: that is what it says)
    good = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="meta"\r\n\r\n{{}}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + b"\x89PNG...."
        + f"\r\n--{boundary}--\r\n".encode()
    )
    out, _ = post_raw(port, "/api/search/image", good, ctype)
    assert out.split()[1] == b"400" and b"does not record its model" in out


def uploads(caplog) -> list[dict]:
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "lvd.serve.access"]
    return [e for e in lines if e["path"] == "/api/search/vector"]


def test_a_client_that_disconnects_mid_body_is_no_5xx_and_one_log_line(roomy_server, caplog):
    url, port = roomy_server
    before = requests.get(url + "/metrics", timeout=5).text
    with caplog.at_level(logging.INFO):
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(
                    b"POST /api/search/vector HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b'Content-Length: 100000\r\n\r\n{"vector": [1, 2, 3'
                )
                time.sleep(0.01)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(uploads(caplog)) < 20:
            time.sleep(0.05)
        time.sleep(0.3)
    after = requests.get(url + "/metrics", timeout=5).text
    assert not re.search(r'status="5\d\d"', after), [x for x in after.splitlines() if 'status="5' in x]
    gone = re.search(r'lvd_http_requests_total\{method="POST",route="/api/search/vector",status="499"\} (\d+)', after)
    was = re.search(r'lvd_http_requests_total\{method="POST",route="/api/search/vector",status="499"\} (\d+)', before)
    assert gone and int(float(gone.group(1))) - (int(float(was.group(1))) if was else 0) == 20
    access = uploads(caplog)
    others = [r for r in caplog.records if r.name != "lvd.serve.access" and r.levelno >= logging.WARNING]
    assert len(access) == 20 and all(r["status"] == 499 for r in access)
    assert others == [] and not any(r.exc_info for r in caplog.records), [r.getMessage() for r in others]


def test_huge_filters_are_refused_before_they_are_parsed(roomy_server, index_dir):
    url, port = roomy_server
    body = json.dumps({"embedding_input": [1.0] * 16, "set": ["pool"] * 1_000_000}).encode()
    assert 7 * 2**20 < len(body) < 8 * 2**20
    (out, seconds), slowest_health = while_polling_health(
        url, lambda: post_raw(port, "/knn-service", body, "application/json")
    )
    assert out.split()[1] == b"413" and b"JSON values" in out and seconds < 2 and slowest_health < 1.0
    r = requests.post(url + "/knn-service", json={"embedding_input": [1.0] * 16, "set": ["pool"] * 1001}, timeout=10)
    assert r.status_code == 400 and "at most 1000" in r.json()["error"]
    r = requests.get(url + f"/api/search/id/{index_dir[1]['ids'][0]}", params={"set": ["pool"] * 1001}, timeout=10)
    assert r.status_code == 400 and "at most 1000" in r.json()["error"]


def test_health_and_metrics_answer_at_the_connection_cap_and_errors_are_json(index_dir):
    opts = ServeOptions(max_connections=12, header_timeout=30)
    with running_server(IndexStore.open(index_dir[0]), opts) as url:
        port = int(url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(12)]
        try:
            time.sleep(0.2)
            for path in ("/api/health", "/metrics"):
                out, seconds = raw(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                assert out.split()[1] == b"200" and seconds < 1.0, out[:200]
            out, _ = raw(port, b"GET /indices-list HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head, _, payload = out.partition(b"\r\n\r\n")
            assert head.split()[1] == b"503" and b"application/json" in head and json.loads(payload)["error"]
        finally:
            for s in idle:
                s.close()
        time.sleep(0.3)
        assert requests.get(url + "/indices-list", timeout=5).status_code == 200
        # what the HTTP layer answers itself is JSON too
        out, _ = raw(port, b"NONSENSE\r\n\r\n")
        head, _, payload = out.partition(b"\r\n\r\n")
        assert head.split()[1] == b"400" and b"application/json" in head and json.loads(payload)["error"]


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated"])
def test_a_damaged_index_is_one_line_naming_the_file(index_dir, tmp_path, capsys, damage):
    import shutil

    path = tmp_path / "index"
    shutil.copytree(index_dir[0], path)
    faiss_file = next(path.glob("gen-*/index.faiss"))
    if damage == "missing":
        faiss_file.unlink()
    elif damage == "empty":
        faiss_file.write_bytes(b"")
    else:
        faiss_file.write_bytes(faiss_file.read_bytes()[:100])
    np.save(tmp_path / "q.npy", np.ones(16, np.float32))
    for argv in (["search", str(path), "--vector", str(tmp_path / "q.npy")], ["serve", str(path), "--port", "0"]):
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and str(faiss_file) in lines[0] and "damaged" in lines[0], lines
        assert damage == "truncated" or f"({damage})" in lines[0]
        assert "Traceback" not in captured.err and "serving" not in captured.out


def test_serving_a_missing_index_fails_before_announcing_anything(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope"), "--port", "0"]) == 2
    captured = capsys.readouterr()
    assert "serving" not in captured.out and "nope" in captured.err and len(captured.err.strip().splitlines()) == 1


def _png(side: int, seed: int) -> bytes:
    """A side x side RGB PNG of a few flat colours: tiny on disk, side² x 4 bytes once decoded."""
    import io

    from PIL import Image

    img = Image.new("RGB", (side, side), (seed * 40 % 256, 90, 200))
    img.paste((10, 200, 30), (0, 0, side // 2, side // 3))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_decodes_wait_for_room_in_the_pixel_budget(tmp_path):
    """Eight concurrent large PNGs take turns under the budget; one larger than the budget is a 413."""
    from concurrent.futures import ThreadPoolExecutor

    from index_support import embedded_photo_run

    from lvd.serve.pixel_budget import decode_cost
    from lvd.serve.service import IndexService, Query, ServiceError

    embedded_photo_run(tmp_path / "run")
    build(tmp_path / "run" / "embed", tmp_path / "index", BuildOptions(factory="Flat", progress=False))
    pngs = [_png(600, i) for i in range(8)]
    cost = decode_cost(pngs[0])
    assert cost >= 600 * 600 * 8  # the decoded RGB image and its copy
    svc = IndexService("p", IndexStore.open(tmp_path / "index"), ServeOptions(decode_memory=int(2.5 * cost)))
    svc.by_image(pngs[0], Query(k=1))  # load the model first
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda data: svc.by_image(data, Query(k=3)), pngs))
    assert all(len(a) == 3 for a in answers)
    assert cost <= svc.budget.high_water <= 2 * cost and svc.budget.waited > 0 and svc.budget.in_use == 0
    with pytest.raises(ServiceError) as refused:
        svc.by_image(_png(1000, 9), Query(k=1))
    assert refused.value.status == 413 and "decode budget" in refused.value.message


def _peak_rss_after(pid: int, action) -> int:
    """Bytes the process's peak resident memory rose above its current size during `action`."""

    def status(field: str) -> int:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(field)

    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) restarts from the current resident size
    before = status("VmRSS")
    action()
    return status("VmHWM") - before


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc peak-memory reset")
def test_the_adversarial_probe_against_a_real_server_process(tmp_path):
    """The cases as a probe found them, on a real `lvd index serve` process: hostile bodies are refused
    fast with bounded memory, concurrent large PNGs stay under the decode budget, and SIGTERM ends it."""
    from concurrent.futures import ThreadPoolExecutor

    from index_support import embedded_photo_run

    embedded_photo_run(tmp_path / "run")
    build(tmp_path / "run" / "embed", tmp_path / "index", BuildOptions(factory="Flat", progress=False))
    argv = [sys.executable, "-m", "lvd.serve.cli", "serve", str(tmp_path / "index"), "--port", "0"]
    argv += ["--max-upload", "16M", "--decode-memory", "300M", "--concurrency", "8", "--no-access-log"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving" in line, line
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, proc)
        requests.post(url + "/api/search/image", data=_png(64, 0), timeout=60).raise_for_status()  # model loaded

        def upload(data):
            return requests.post(url + "/api/search/image?k=2", data=data, timeout=120).status_code

        # 100 MB of pixels each once decoded: 8 at once would be 800 MB, the budget admits one at a time
        pngs = [_png(5000, i) for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            grew = _peak_rss_after(proc.pid, lambda: assert_all_200(pool.map(upload, pngs)))
        assert grew < 250 * 2**20, f"peak grew by {grew / 2**20:.0f} MiB"

        body = json.dumps({"embedding_input": [1.0] * 64, "set": ["pool"] * 2_000_000}).encode()
        answer = []
        grew = _peak_rss_after(proc.pid, lambda: answer.append(post_raw(port, "/knn-service", body, "text/plain")))
        assert answer[0][0].split()[1] == b"413" and answer[0][1] < 3 and grew < 100 * 2**20, grew

        boundary = "zz"
        hostile = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '.encode() + b"a=b; " * 3_000_000
        out, seconds = post_raw(port, "/api/search/image", hostile, f"multipart/form-data; boundary={boundary}")
        assert out.split()[1] == b"400" and seconds < 5
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_all_200(statuses) -> None:
    statuses = list(statuses)
    assert statuses == [200] * len(statuses), statuses
