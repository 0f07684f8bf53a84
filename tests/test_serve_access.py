"""An API key on `lvd index serve`: every route but /api/health needs it (header, ?key=, /key/KEY/ prefix),
image URLs in answers are signed and expire, the key never reaches the access log, and a server
on a non-loopback address refuses to start without a key unless told --insecure-public."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
import requests
from index_support import curated_vector_run, embedded_photo_run, running_server, wait_until_serving

from lvd.index.store import BuildOptions, IndexStore
from lvd.serve.access import Access
from lvd.serve.cli import check_exposure, is_loopback, main
from lvd.serve.run_inputs import build
from lvd.serve.service import Catalog, IndexService, ServeOptions

KEY = "s3cret-key-of-the-test"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    root = tmp_path_factory.mktemp("access")
    rows, data, x = embedded_photo_run(root / "photos")
    build(root / "photos" / "embed", root / "index", BuildOptions(factory="Flat", progress=False))
    opts = ServeOptions(api_key=KEY, url_ttl=2.0)
    catalog = Catalog([IndexService("photos", IndexStore.open(root / "index"), opts)])
    with running_server(catalog, opts) as url:
        yield url, np.array([r["id"] for r in rows]), x, root


def test_every_route_but_health_needs_the_key(keyed):
    url, ids, x, _ = keyed
    body = json.dumps({"embedding_input": x[0].tolist(), "num_images": 3})
    assert requests.get(url + "/api/health", timeout=10).status_code == 200
    for method, path, data in [
        ("GET", "/", None),
        ("GET", "/api/info", None),
        ("GET", f"/api/search/id/{ids[0]}", None),
        ("GET", "/indices-list", None),
        ("GET", "/metrics", None),
        ("GET", f"/thumb/{ids[0]}?index=photos", None),
        ("POST", "/knn-service", body),
        ("GET", "/openapi.json", None),
        ("GET", "/no/such/route", None),
    ]:
        r = requests.request(method, url + path, data=data, timeout=10)
        assert r.status_code == 401 and "API key" in r.json()["error"], (path, r.status_code, r.text[:100])
        r = requests.request(method, url + path, data=data, headers={"X-API-Key": "wrong"}, timeout=10)
        assert r.status_code == 401
    good = [
        {"headers": {"X-API-Key": KEY}},
        {"headers": {"Authorization": f"Bearer {KEY}"}},
        {"params": {"key": KEY}},
    ]
    for how in good:
        r = requests.post(url + "/knn-service", data=body, timeout=10, **how)
        assert r.status_code == 200 and r.json()[0]["id"] == ids[0], how
    # clip-retrieval's front appends its routes to the back-end URL: the key rides in the path
    r = requests.post(f"{url}/key/{KEY}/knn-service", data=body, timeout=10)
    assert r.status_code == 200 and r.json()[0]["id"] == ids[0]
    assert requests.get(f"{url}/key/{KEY}/indices-list", timeout=10).json() == ["photos"]
    assert requests.get(f"{url}/key/wrong/indices-list", timeout=10).status_code == 401


def test_image_urls_are_signed_expire_and_do_not_carry_the_key(keyed):
    url, ids, x, _ = keyed
    hits = requests.post(
        f"{url}/key/{KEY}/knn-service", data=json.dumps({"embedding_input": x[4].tolist(), "num_images": 2}), timeout=10
    ).json()
    link = hits[0]["url"]
    assert KEY not in link and "sig=" in link and link.startswith(url + "/thumb/")
    r = requests.get(link, timeout=10)
    assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"  # an <img> loads it without the key
    tampered = link.replace(f"/thumb/{hits[0]['id']}", f"/thumb/{hits[1]['id']}")
    assert requests.get(tampered, timeout=10).status_code == 401
    # a signed url still works as image_url (the front's "search by this image")
    r = requests.post(f"{url}/key/{KEY}/knn-service", data=json.dumps({"image_url": link, "num_images": 1}), timeout=10)
    assert r.status_code == 200 and r.json()[0]["id"] == hits[0]["id"]
    # expiry: windows of ttl seconds, valid for at least one and at most two
    access = Access(KEY, ttl=2.0)
    path = access.thumb_path("photos", int(ids[0]), now=100.0)
    expires = int(path.split("expires=")[1].split("&")[0])
    sig = path.split("sig=")[1]
    assert 102 <= expires <= 104 and access.thumb_path("photos", int(ids[0]), now=100.5) == path
    assert access.signed("photos", int(ids[0]), str(expires), sig, now=101.0)
    assert not access.signed("photos", int(ids[0]), str(expires), sig, now=expires + 0.1)
    assert not access.signed("other", int(ids[0]), str(expires), sig, now=101.0)
    stale = f"{url}/thumb/{ids[0]}?index=photos&expires={int(time.time()) - 1}&sig={sig}"
    assert requests.get(stale, timeout=10).status_code == 401


def test_the_key_never_reaches_the_access_log(keyed, caplog):
    url, ids, x, _ = keyed
    with caplog.at_level(logging.INFO, logger="lvd.serve.access"):
        requests.get(f"{url}/key/{KEY}/indices-list", timeout=10)
        requests.get(f"{url}/indices-list", params={"key": KEY}, timeout=10)
        deadline = time.monotonic() + 5
        while len(_logged(caplog, "/indices-list")) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if r.name == "lvd.serve.access"]
    assert all(KEY not in line for line in lines)
    ours = _logged(caplog, "/indices-list")  # a request of an earlier test may be logged here too
    assert len(ours) >= 2 and all(line["path"] == "/indices-list" for line in ours)


def _logged(caplog, route: str) -> list[dict]:
    """The access log's lines for `route`, as dicts."""
    lines = (json.loads(r.getMessage()) for r in caplog.records if r.name == "lvd.serve.access")
    return [line for line in lines if line["route"] == route]


def test_a_public_address_needs_a_key_or_insecure_public(tmp_path, capsys, monkeypatch):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.8.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
    check_exposure("127.0.0.1", None, False)
    check_exposure("0.0.0.0", KEY, False)
    check_exposure("0.0.0.0", None, True)
    with pytest.raises(ValueError, match="without an API key"):
        check_exposure("0.0.0.0", None, False)
    curated_vector_run(tmp_path / "run", n_groups=10)
    build(tmp_path / "run" / "embed", tmp_path / "index", BuildOptions(factory="Flat", progress=False))
    monkeypatch.delenv("LVD_API_KEY", raising=False)
    assert main(["serve", str(tmp_path / "index"), "--host", "0.0.0.0", "--port", "0"]) == 2
    captured = capsys.readouterr()
    assert "refusing to serve on 0.0.0.0 without an API key" in captured.err and "serving" not in captured.out
    assert len(captured.err.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_server_on_every_address_starts_with_the_key_from_the_environment(tmp_path):
    import os
    import subprocess
    import sys

    curated_vector_run(tmp_path / "run", n_groups=10)
    build(tmp_path / "run" / "embed", tmp_path / "index", BuildOptions(factory="Flat", progress=False))
    argv = [sys.executable, "-m", "lvd.serve.cli", "serve", str(tmp_path / "index"), "--host", "0.0.0.0", "--port", "0"]
    env = {**os.environ, "LVD_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "serving index on http://0.0.0.0:" in line, line
        url = f"http://127.0.0.1:{line.split('http://0.0.0.0:')[1].split('/')[0]}"
        wait_until_serving(url, proc)
        assert requests.get(url + "/indices-list", timeout=5).status_code == 401
        assert requests.get(url + "/indices-list", headers={"X-API-Key": KEY}, timeout=5).json() == ["index"]
    finally:
        proc.terminate()
        proc.wait(30)
