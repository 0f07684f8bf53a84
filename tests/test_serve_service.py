"""`lvd index serve`: real HTTP requests on loopback (uvicorn), search by image / id / vector, errors, load."""

from __future__ import annotations

import io
import json
import socket
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from index_support import FIRST_ID, embedded_photo_run, running_server
from PIL import Image

from lvd.index.store import BuildOptions, IndexStore
from lvd.serve.cli import main
from lvd.serve.run_inputs import build
from lvd.serve.service import IndexService, Query, ServeOptions, ServiceError

K = 5


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    rows, data, x = embedded_photo_run(root / "run")
    build(root / "run" / "embed", root / "index", BuildOptions(progress=False))
    store = IndexStore.open(root / "index")
    opts = ServeOptions(max_upload_bytes=2**20, max_concurrent_searches=4)
    with running_server(store, opts) as url:
        yield {
            "url": url,
            "rows": rows,
            "data": data,
            "x": x.astype(np.float16).astype(np.float32),
            "ids": np.array([r["id"] for r in rows]),
            "root": root,
        }


def call(url, method="GET", body=None, headers=None, timeout=30):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type"), err.read()


def call_json(*args, **kwargs):
    status, ctype, body = call(*args, **kwargs)
    assert ctype.startswith("application/json"), (status, ctype, body[:200])
    return status, json.loads(body)


def raw_request(served, data: bytes) -> tuple[bytes, bytes]:
    """Send bytes as they are (urllib would normalise paths and always frame bodies); read to EOF."""
    with socket.create_connection(("127.0.0.1", int(served["url"].rsplit(":", 1)[1])), timeout=10) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (and closed) before the whole body was sent: read what it said
        raw = b""
        try:
            while chunk := sock.recv(65536):
                raw += chunk
        except ConnectionResetError:
            pass
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


def numpy_neighbours(s, q, k=K):
    sims = np.asarray(q, np.float64) @ s["x"].astype(np.float64).T
    return s["ids"][np.argsort(-sims, kind="stable")[:k]].tolist()


def test_health_and_info(served):
    assert call_json(served["url"] + "/api/health") == (200, {"status": "ok", "vectors": 15, "indices": {"index": 15}})
    status, info = call_json(served["url"] + "/api/info")
    assert status == 200 and info["embedder"]["model"] == "vit_tiny_p14" and info["n"] == 15


@pytest.mark.parametrize("multipart", [False, True])
def test_upload_of_an_indexed_photo_finds_itself_first(served, multipart):
    for r in served["rows"]:
        payload = served["data"][r["id"]]
        if multipart:
            boundary = "lvdtestboundary"
            body = (
                (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
                    f"Content-Type: application/octet-stream\r\n\r\n"
                ).encode()
                + payload
                + f"\r\n--{boundary}--\r\n".encode()
            )
            headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        else:
            body, headers = payload, {"Content-Type": "image/jpeg"}
        status, out = call_json(f"{served['url']}/api/search/image?k={K}", "POST", body, headers)
        assert status == 200, out
        first = out["results"][0]
        assert first["id"] == r["id"] and first["score"] > 0.999
        assert first["key"] == r["key"] and first["thumbnail"] == f"/thumb/{r['id']}?index=index"
        assert len(out["results"]) == K


def test_cli_search_by_image_finds_itself_first(served, capsys, tmp_path):
    r = served["rows"][13]  # a photo stored inside the tar source
    path = tmp_path / "query.bin"
    path.write_bytes(served["data"][r["id"]])
    assert main(["search", str(served["root"] / "index"), "--image", str(path), "-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["results"][0]["id"] == r["id"] and out[0]["results"][0]["kind"] == "tar"


def test_search_by_id_and_by_vector_match_numpy(served):
    for id_, v in zip(served["ids"][:5], served["x"][:5]):
        status, out = call_json(f"{served['url']}/api/search/id/{id_}?k={K}")
        assert status == 200 and [h["id"] for h in out["results"]] == numpy_neighbours(served, v)
    q = np.random.default_rng(0).standard_normal(served["x"].shape[1])
    status, out = call_json(
        served["url"] + "/api/search/vector",
        "POST",
        json.dumps({"vector": q.tolist(), "k": K}).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 200 and [h["id"] for h in out["results"]] == numpy_neighbours(served, q / np.linalg.norm(q))
    scores = [h["score"] for h in out["results"]]
    np.testing.assert_allclose(scores, np.sort(served["x"] @ (q / np.linalg.norm(q)))[::-1][:K], atol=1e-4)


def test_thumbnails_are_the_indexed_images(served):
    for r in served["rows"][::4]:
        status, ctype, body = call(f"{served['url']}/thumb/{r['id']}")
        assert status == 200 and ctype == "image/jpeg"
        thumb = Image.open(io.BytesIO(body)).convert("RGB")
        ref = Image.open(io.BytesIO(served["data"][r["id"]])).convert("RGB").resize(thumb.size)
        diff = np.abs(np.asarray(thumb, np.float32) - np.asarray(ref, np.float32)).mean()
        assert diff < 10, (r, diff)


@pytest.mark.parametrize(
    "path,status",
    [
        ("/thumb/999", 404),
        ("/thumb/../../../../etc/passwd", 404),
        ("/thumb/%2e%2e%2f%2e%2e%2fetc%2fpasswd", 404),
        ("/../../etc/passwd", 404),
        (f"/thumb/{FIRST_ID}/../../../etc/passwd", 404),
        ("/api/search/id/424242", 404),
        (f"/api/search/id/{FIRST_ID}?k=0", 400),
        (f"/api/search/id/{FIRST_ID}?k=abc", 400),
        (f"/api/search/id/{FIRST_ID}?k=1000000", 400),
        ("/api/search/image", 405),
    ],
)
def test_bad_gets_get_a_4xx_with_a_message(served, path, status):
    head, body = raw_request(served, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert head.split()[1] == str(status).encode(), head
    assert b"root:" not in body and json.loads(body)["error"]


@pytest.mark.parametrize(
    "route,body,ctype,status,message",
    [
        ("/api/search/image", b"certainly not an image", "image/jpeg", 400, "cannot read the uploaded image"),
        ("/api/search/image", b"\xff\xd8\xff\xe0" + b"\x00" * 64, "image/jpeg", 400, "cannot read"),
        (
            "/api/search/image",
            b'--b\r\nContent-Disposition: form-data; name="other"\r\n\r\nx\r\n--b--\r\n',
            "multipart/form-data; boundary=b",
            400,
            "no field named",
        ),
        ("/api/search/vector", b"{not json", "application/json", 400, "not JSON"),
        ("/api/search/vector", b"{not json", "text/plain", 400, "not JSON"),
        ("/api/search/vector", b'{"vector": [1, 2, 3]}', "application/json", 400, "must have"),
        ("/api/search/vector", b'{"vector": "abc"}', "application/json", 400, "vector: Input should be a valid array"),
        ("/api/search/vector", b'{"vector": [NaN' + b", 0" * 63 + b"]}", "application/json", 400, "finite"),
        ("/api/search/vector", b"[1, 2]", "application/json", 400, "body: Input should be an object"),
        ("/api/search/vector", b'{"vector": [1e400' + b", 0" * 63 + b"]}", "application/json", 400, "finite"),
        ("/api/search/vector", b'{"vector": [1' + b"0" * 400 + b", 0" * 63 + b"]}", "application/json", 400, "vector"),
        ("/api/search/vector", b'{"vector": [1' + b"0" * 5000 + b"]}", "application/json", 400, "body"),
        ("/api/search/vector", b'{"vector": ' + b"[" * 100000 + b"]" * 100000 + b"}", "application/json", 400, ""),
        ("/api/search/vector", b'{"vector": [1e39' + b", 0" * 63 + b"]}", "application/json", 400, "float32"),
    ],
)
def test_bad_posts_get_a_4xx_with_a_message(served, route, body, ctype, status, message):
    got, out = call_json(served["url"] + route, "POST", body, {"Content-Type": ctype})
    assert got == status and message in out["error"], out


def test_upload_limit_is_checked_before_reading(served):
    # announces 50 MB, sends none of it: the answer must come at once, and the connection close
    head, body = raw_request(
        served,
        b"POST /api/search/image HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 50000000\r\n\r\n",
    )
    assert head.split()[1] == b"413" and b"exceeds the limit" in body
    # a chunked body with nothing in it is an empty upload, not a crash
    head, body = raw_request(
        served,
        b"POST /api/search/image HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    assert head.split()[1] == b"400" and b"empty" in body
    # a chunked body that grows past the limit is cut off there
    chunk = b"x" * 2**16
    head, body = raw_request(
        served,
        b"POST /api/search/image HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 17
        + b"0\r\n\r\n",
    )
    assert head.split()[1] == b"413" and b"exceeds the limit" in body
    status, _, _ = call(served["url"] + "/api/search/image", "POST", b"x" * (2**20 + 1), {"Content-Type": "image/png"})
    assert status == 413
    assert call_json(served["url"] + "/api/health")[0] == 200  # still serving


def test_one_hundred_concurrent_searches(served):
    """100 clients at once (vector, id and image searches), each answer checked against numpy."""
    rng = np.random.default_rng(1)
    start = threading.Barrier(100, timeout=30)

    def one(i):
        start.wait()
        if i % 3 == 0:
            q = rng.standard_normal(served["x"].shape[1])
            q /= np.linalg.norm(q)
            status, out = call_json(
                served["url"] + "/api/search/vector",
                "POST",
                json.dumps({"vector": q.tolist(), "k": K}).encode(),
                {"Content-Type": "application/json"},
                timeout=60,
            )
            return status, [h["id"] for h in out["results"]], numpy_neighbours(served, q)
        j = i % len(served["ids"])
        if i % 3 == 1:
            status, out = call_json(f"{served['url']}/api/search/id/{served['ids'][j]}?k={K}", timeout=60)
            return status, [h["id"] for h in out["results"]], numpy_neighbours(served, served["x"][j])
        status, out = call_json(
            f"{served['url']}/api/search/image?k=1",
            "POST",
            served["data"][served["ids"][j]],
            {"Content-Type": "image/png"},
            timeout=60,
        )
        return status, [h["id"] for h in out["results"]], [int(served["ids"][j])]

    with ThreadPoolExecutor(max_workers=100) as pool:
        answers = list(pool.map(one, range(100)))
    for status, got, want in answers:
        assert status == 200 and got == want


def test_a_missing_image_file_gives_404_not_a_crash(tmp_path):
    run = tmp_path / "run"
    rows, _, _ = embedded_photo_run(run)
    build(run / "embed", tmp_path / "index", BuildOptions(progress=False))
    (run / "images" / rows[1]["key"]).unlink()
    with running_server(IndexStore.open(tmp_path / "index")) as url:
        status, out = call_json(f"{url}/thumb/{rows[1]['id']}")
        assert status == 404 and "cannot be read" in out["error"]
        assert call(f"{url}/thumb/{rows[2]['id']}")[0] == 200


def test_search_by_image_without_a_model_is_503_and_the_rest_still_works(served):
    store = IndexStore.open(served["root"] / "index")

    def no_model():
        raise RuntimeError("weights file /srv/secret/models/w.pth gone")

    svc = IndexService("index", store, ServeOptions(), embedder_factory=no_model)
    with pytest.raises(ServiceError) as err:
        svc.by_image(b"abc", Query(k=3))
    assert err.value.status == 503 and "gone" in err.value.message
    assert "/srv/secret" not in err.value.message and "w.pth" in err.value.message  # no absolute path leaves
    assert [h["id"] for h in svc.by_id(FIRST_ID, Query(k=3))] == numpy_neighbours(served, served["x"][0], 3)


def test_a_text_tower_that_does_not_load_is_503_without_paths(served):
    """The index records a text tower, but its tokenizer is gone from the weights folder."""
    from lvd.pretrain.models.weights import WeightsError

    store = IndexStore.open(served["root"] / "index")
    store.info = {**store.info, "embedder": {**store.info["embedder"], "text_tower": True}}

    class NoTokenizer:
        def embed_text(self, texts):
            raise WeightsError("/srv/secret/models/clip has no tokenizer files")

    svc = IndexService("index", store, ServeOptions(), embedder_factory=NoTokenizer)
    with pytest.raises(ServiceError) as err:
        svc.by_text("a cat", Query(k=3))
    assert err.value.status == 503 and "tokenizer" in err.value.message and "/srv/secret" not in err.value.message


def test_binds_loopback_by_default(served):
    from lvd.serve.server import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()
    import argparse

    from lvd.serve.cli import add_subcommands

    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["serve", "x"]).host == "127.0.0.1"


def test_page_is_served(served):
    status, ctype, body = call(served["url"] + "/")
    assert status == 200 and ctype.startswith("text/html") and b"Drop an image" in body
