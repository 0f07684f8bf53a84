"""The lookup service's web stack: clip-retrieval's API, several indexes, filters, result dedup, metrics, paths.

Two indexes behind one uvicorn server on loopback: `photos` (real photos embedded by a tiny
ViT, so search by image works) and `curated` (made-up vectors with the dedup and cluster
outputs of a run). Every neighbour list is checked against brute-force numpy over the stored
vectors, and every filter against the truth the test wrote.
"""

from __future__ import annotations

import base64
import json
import logging
import re

import numpy as np
import pytest
import requests
from index_support import curated_vector_run, embedded_photo_run, running_server

from lvd.index.store import BuildOptions, IndexStore
from lvd.serve.run_inputs import build
from lvd.serve.service import Catalog, IndexService, ServeOptions

K = 5


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    rows, data, x = embedded_photo_run(root / "photos")
    build(root / "photos" / "embed", root / "photos-index", BuildOptions(factory="Flat", progress=False))
    truth = curated_vector_run(root / "curated")
    build(root / "curated" / "embed", root / "curated-index", BuildOptions(factory="Flat", progress=False))
    opts = ServeOptions(max_upload_bytes=2**20)
    catalog = Catalog(
        [
            IndexService("photos", IndexStore.open(root / "photos-index"), opts),
            IndexService("curated", IndexStore.open(root / "curated-index"), opts),
        ]
    )
    with running_server(catalog, opts) as url:
        yield {
            "url": url,
            "root": root,
            "rows": rows,
            "data": data,
            "x_raw": x,
            "x": x.astype(np.float16).astype(np.float32),
            "ids": np.array([r["id"] for r in rows]),
            "curated": truth,
        }


class ContractClient:
    """A client to clip-retrieval's contract, as its ClipClient speaks it: the same JSON fields, sent as
    text without a Content-Type header, answered by a list of {id, similarity, ...}."""

    def __init__(self, url: str, indice_name: str, num_images: int = 40, deduplicate: bool = True):
        self.url, self.indice_name, self.num_images, self.deduplicate = url, indice_name, num_images, deduplicate

    def query(self, text=None, image=None, embedding_input=None) -> list[dict]:
        if image is not None:
            with open(image, "rb") as f:
                image = base64.b64encode(f.read()).decode("utf-8")
        body = {
            "text": text,
            "image": image,
            "image_url": None,
            "embedding_input": embedding_input,
            "deduplicate": self.deduplicate,
            "use_safety_model": True,
            "use_violence_detector": True,
            "indice_name": self.indice_name,
            "use_mclip": False,
            "aesthetic_score": 9,
            "aesthetic_weight": 0.5,
            "modality": "image",
            "num_images": self.num_images,
            "num_result_ids": self.num_images,
        }
        return requests.post(self.url + "/knn-service", data=json.dumps(body), timeout=60).json()


def numpy_order(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Rows from most to least similar to q, by float64 brute force."""
    q = np.asarray(q, np.float64)
    return np.argsort(-(x.astype(np.float64) @ (q / np.linalg.norm(q))), kind="stable")


def post(url: str, path: str, body) -> tuple[int, object]:
    r = requests.post(url + path, json=body, timeout=60)
    return r.status_code, r.json()


def test_clip_client_contract_by_image_file_and_by_embedding(site, tmp_path):
    client = ContractClient(site["url"], "photos", num_images=K)
    for i in (0, 7, 13):  # 13 is a member of a tar source
        path = tmp_path / f"q{i}.img"
        path.write_bytes(site["data"][int(site["ids"][i])])
        got = client.query(image=str(path))
        want = site["ids"][numpy_order(site["x"], site["x_raw"][i])[:K]].tolist()
        assert [h["id"] for h in got] == want and got[0]["id"] == site["ids"][i]
        assert got[0]["similarity"] > 0.999 and all(isinstance(h["similarity"], float) for h in got)
    q = np.random.default_rng(3).standard_normal(site["x"].shape[1])
    got = client.query(embedding_input=q.tolist())
    order = numpy_order(site["x"], q)[:K]
    assert [h["id"] for h in got] == site["ids"][order].tolist()
    sims = site["x"][order] @ (q / np.linalg.norm(q))
    np.testing.assert_allclose([h["similarity"] for h in got], sims, atol=1e-4)
    hit = got[0]
    assert {"set", "label", "cluster"} <= set(hit) and hit["set"] in ("pool", "seed:demo")
    # as clip-retrieval's server does, the body is JSON whatever the Content-Type says (curl -d: a form)
    r = requests.post(
        site["url"] + "/knn-service",
        data=json.dumps({"embedding_input": q.tolist(), "num_images": K}),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=10,
    )
    assert r.status_code == 200 and [h["id"] for h in r.json()] == site["ids"][order].tolist()


def real_clip_client():
    """clip-retrieval's own ClipClient, from its installed clip_client.py.

    The package's __init__ imports its whole back end (flask, torch, faiss, ...), which the
    Makefile does not install; the client module itself needs only `requests`.
    """
    import importlib.util
    from pathlib import Path

    package = importlib.util.find_spec("clip_retrieval")  # locates, does not run __init__
    path = Path(package.submodule_search_locations[0]) / "clip_client.py"
    spec = importlib.util.spec_from_file_location("clip_retrieval_clip_client", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ClipClient


@pytest.mark.needs("clip_retrieval")
def test_the_real_clip_client_gets_correct_neighbours(site, tmp_path):
    client = real_clip_client()(site["url"] + "/knn-service", indice_name="photos", num_images=K)
    path = tmp_path / "query.jpg"
    path.write_bytes(site["data"][int(site["ids"][4])])
    got = client.query(image=str(path))
    assert [h["id"] for h in got] == site["ids"][numpy_order(site["x"], site["x_raw"][4])[:K]].tolist()
    q = np.random.default_rng(11).standard_normal(site["x"].shape[1])
    got = client.query(embedding_input=q.tolist())
    assert [h["id"] for h in got] == site["ids"][numpy_order(site["x"], q)[:K]].tolist()
    assert "no text encoder" in client.query(text="a cat")["error"]


def test_text_and_url_queries_are_refused_with_a_reason(site):
    client = ContractClient(site["url"], "photos")
    assert "no text encoder" in client.query(text="a cat")["error"]
    status, out = post(
        site["url"],
        "/knn-service",
        {"image_url": "http://127.0.0.1:1/x.jpg", "num_images": 3, "indice_name": "photos", "modality": "image"},
    )
    assert status == 400 and "never fetches" in out["error"]
    status, out = post(
        site["url"],
        "/knn-service",
        {"embedding_input": [1.0] * 64, "modality": "text", "num_images": 3, "indice_name": "photos"},
    )
    assert status == 400 and "image embeddings only" in out["error"]
    for body, message in [
        ({"image": "%%%not base64", "num_images": 3}, "base64"),
        ({"image": base64.b64encode(b"not a picture").decode(), "num_images": 3}, "cannot read"),
        ({"embedding_input": [1.0] * 64, "num_images": 0}, "k must be"),
        ({"embedding_input": [1.0] * 64, "num_images": 3, "indice_name": "nope"}, "no index named"),
        ({"num_images": 3}, "exactly one"),
    ]:
        status, out = post(site["url"], "/knn-service", body)
        assert status in (400, 404) and message in out["error"], (body, out)


def test_metadata_and_indices_list(site):
    assert requests.get(site["url"] + "/indices-list", timeout=10).json() == ["photos", "curated"]
    ids = [int(i) for i in site["ids"][[2, 13]]]
    status, out = post(site["url"], "/metadata", {"ids": ids, "indice_name": "photos"})
    assert status == 200 and [o["id"] for o in out] == ids
    assert [o["metadata"]["key"] for o in out] == [site["rows"][2]["key"], site["rows"][13]["key"]]
    status, out = post(site["url"], "/metadata", {"ids": [123], "indice_name": "photos"})
    assert status == 404 and "123" in out["error"]


def test_each_index_answers_from_its_own_vectors(site):
    cur = site["curated"]
    q = np.random.default_rng(5).standard_normal(cur["x"].shape[1])
    for name, x, ids in (("curated", cur["x"], cur["ids"]), ("photos", site["x"], site["ids"])):
        qq = np.resize(q, x.shape[1])
        status, out = post(
            site["url"], "/knn-service", {"embedding_input": qq.tolist(), "num_images": 7, "indice_name": name}
        )
        assert status == 200 and [h["id"] for h in out] == ids[numpy_order(x, qq)[:7]].tolist()
    # the curated index has no model: search by image says so, the photos index works
    status, out = post(
        site["url"],
        "/knn-service",
        {
            "image": base64.b64encode(site["data"][int(site["ids"][0])]).decode(),
            "num_images": 3,
            "indice_name": "curated",
        },
    )
    assert status == 400 and "does not record its model" in out["error"]
    health = requests.get(site["url"] + "/api/health", timeout=10).json()
    assert health["indices"] == {"photos": 15, "curated": len(cur["ids"])}


def reference(cur: dict, q: np.ndarray, k: int, sets=None, labels=None, clusters=None, dedup=False) -> list[int]:
    """Filtered, deduplicated neighbours from the test's own truth, by brute force."""
    out, seen = [], set()
    for row in numpy_order(cur["x"], q):
        if (
            (sets and cur["set"][row] not in sets)
            or (labels and cur["label"][row] not in labels)
            or (clusters and cur["cluster"][row] not in clusters)
        ):
            continue
        if dedup and cur["group"][row] in seen:
            continue
        seen.add(cur["group"][row])
        out.append(int(cur["ids"][row]))
        if len(out) == k:
            break
    return out


@pytest.mark.parametrize(
    "filters",
    [
        {},
        {"set": ["pool"]},
        {"set": ["seed:birds", "eval:test"]},
        {"label": ["a"]},
        {"cluster": [1, 3]},
        {"set": ["pool"], "cluster": [2]},
        {"deduplicate": True},
        {"cluster": [0], "deduplicate": True},
        {"set": ["seed:birds"], "label": ["b"], "deduplicate": True},
    ],
)
def test_filters_and_dedup_match_the_stage_outputs(site, filters):
    cur = site["curated"]
    rng = np.random.default_rng(len(json.dumps(filters)))
    for trial in range(4):
        q = cur["x"][rng.integers(len(cur["x"]))] if trial % 2 else rng.standard_normal(cur["x"].shape[1])
        want = reference(
            cur,
            q,
            12,
            filters.get("set"),
            filters.get("label"),
            filters.get("cluster"),
            filters.get("deduplicate", False),
        )
        status, out = post(
            site["url"],
            "/knn-service",
            {"embedding_input": q.tolist(), "num_images": 12, "indice_name": "curated", **filters},
        )
        assert status == 200 and [h["id"] for h in out] == want
        status, out = post(
            site["url"], "/api/search/vector", {"vector": q.tolist(), "k": 12, "index": "curated", **filters}
        )
        assert status == 200 and [h["id"] for h in out["results"]] == want
        by_row = {int(i): r for r, i in enumerate(cur["ids"])}
        for h in out["results"]:
            r = by_row[h["id"]]
            assert h["set"] == cur["set"][r] and h["label"] == cur["label"][r] and h.get("caption") == cur["caption"][r]
            assert h["cluster"] == (None if cur["cluster"][r] < 0 else int(cur["cluster"][r]))
    if filters.get("deduplicate"):  # the groups really collapse something here
        assert reference(cur, q, 12, dedup=False) != reference(cur, q, 12, dedup=True)


def test_filters_by_id_in_the_query_string(site):
    cur = site["curated"]
    row = int(np.flatnonzero(cur["set"] == "pool")[0])
    id_ = int(cur["ids"][row])
    r = requests.get(
        f"{site['url']}/api/search/id/{id_}",
        params={"index": "curated", "k": 6, "set": "pool", "cluster": [0, 4], "deduplicate": "true"},
        timeout=10,
    )
    assert r.status_code == 200
    assert [h["id"] for h in r.json()["results"]] == reference(cur, cur["x"][row], 6, ["pool"], None, [0, 4], True)
    r = requests.get(f"{site['url']}/api/search/id/{id_}", params={"index": "curated", "cluster": 10**30}, timeout=10)
    assert r.status_code == 200 and r.json()["results"] == []  # a cluster no row is in
    r = requests.get(
        f"{site['url']}/api/search/id/{site['ids'][0]}", params={"index": "photos", "cluster": 1}, timeout=10
    )
    assert r.status_code == 400 and "no clusters" in r.json()["error"]


def test_no_absolute_path_leaves_the_server(site):
    root = str(site["root"])
    answers = [
        requests.get(site["url"] + p, timeout=10).text
        for p in ("/api/info?index=photos", "/api/info?index=curated", f"/api/search/id/{site['ids'][13]}?index=photos")
    ]
    answers.append(ContractClient(site["url"], "photos").query(embedding_input=[1.0] * 64).__repr__())
    answers.append(requests.post(site["url"] + "/metadata", json={"ids": [int(site["ids"][1])]}, timeout=10).text)
    for text in answers:
        assert root not in text and not re.search(r'"/(tmp|home|root|srv|work)/', text), text[:300]
    opts = ServeOptions(expose_paths=True)
    svc = IndexService("photos", IndexStore.open(site["root"] / "photos-index"), opts)
    record = svc.metadata([int(site["ids"][1])])[0]
    assert record["path"].startswith(root) and "url" not in record  # the http layer adds the http url
    assert open(record["path"], "rb").read() == site["data"][int(site["ids"][1])]


def test_metrics_are_prometheus_text_in_a_registry_of_the_app(site):
    requests.get(site["url"] + "/api/health", timeout=10)
    requests.get(f"{site['url']}/api/search/id/{site['ids'][0]}?index=photos", timeout=10)
    text = requests.get(site["url"] + "/metrics", timeout=10).text
    assert re.search(r'lvd_http_requests_total\{method="GET",route="/api/health",status="200"\} [1-9]', text)
    assert re.search(r'lvd_http_request_duration_seconds_bucket\{le="0.5",route="/api/search/id/\{id\}"\} [1-9]', text)
    assert 'lvd_index_vectors{index="photos"} 15.0' in text
    assert 'lvd_searches_in_flight{index="photos"} 0.0' in text
    assert re.search(r'lvd_searches_total\{by="id",index="photos"\} [1-9]', text)
    # a second app starts from zero: nothing is shared through prometheus-client's global registry
    from lvd.serve.app import create_app

    other = create_app(Catalog([IndexService("x", IndexStore.open(site["root"] / "photos-index"), ServeOptions())]))
    from prometheus_client import generate_latest

    assert b"lvd_http_requests_total{" not in generate_latest(other.state.metrics.registry)


def test_access_log_is_one_json_line_per_request(site, caplog):
    import time

    def logged():
        return [json.loads(r.getMessage()) for r in caplog.records if r.name == "lvd.serve.access"]

    with caplog.at_level(logging.INFO, logger="lvd.serve.access"):
        requests.get(site["url"] + "/api/search/id/1?index=photos", timeout=10)
        deadline = time.monotonic() + 5  # the line is written once the answer is sent, in the server's thread
        while not any(e["route"] == "/api/search/id/{id}" for e in logged()) and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = logged()
    assert any(
        e["route"] == "/api/search/id/{id}" and e["status"] == 404 and e["method"] == "GET" and e["ms"] >= 0
        for e in lines
    ), lines


def test_openapi_schema_is_published(site):
    schema = requests.get(site["url"] + "/openapi.json", timeout=10).json()
    for path in ("/knn-service", "/metadata", "/indices-list", "/api/search/vector", "/api/search/id/{id}", "/metrics"):
        assert path in schema["paths"]
    knn = schema["components"]["schemas"]["KnnRequest"]["properties"]
    assert {
        "image",
        "image_url",
        "embedding_input",
        "num_images",
        "num_result_ids",
        "indice_name",
        "deduplicate",
        "modality",
    } <= set(knn)
    assert "422" not in json.dumps(schema["paths"])  # validation errors are 400 here, as documented


def test_indexes_are_named_on_the_command_line_or_in_a_file(tmp_path):
    from lvd.serve.cli import index_specs

    table = tmp_path / "indices.yaml"
    table.write_text("birds: {path: /data/birds-index, device: cuda:1, dtype: float32}\ncopies: /data/copy-index\n")
    specs = index_specs(["main=/data/main-index", "/data/other-index"], table)
    assert [(s.name, str(s.path), s.device, s.dtype) for s in specs] == [
        ("main", "/data/main-index", None, None),
        ("other-index", "/data/other-index", None, None),
        ("birds", "/data/birds-index", "cuda:1", "float32"),
        ("copies", "/data/copy-index", None, None),
    ]
    with pytest.raises(ValueError, match="repeat"):
        index_specs(["a=/x", "a=/y"], None)
    table.write_text("birds: {path: /x, colour: red}\n")
    with pytest.raises(ValueError, match="unknown keys"):
        index_specs([], table)
    with pytest.raises(ValueError, match="at least one"):
        index_specs([], None)


def test_each_index_embeds_queries_on_its_own_device(site, monkeypatch):
    """The per-index embedder settings reach the model loader (here: recorded on its way)."""
    from lvd.serve import service
    from lvd.serve.service import Query

    seen = []
    real = service.index_embedder

    def recording(store, device="cpu", dtype=None):
        seen.append((device, dtype))
        return real(store, device, dtype)

    monkeypatch.setattr(service, "index_embedder", recording)
    store = IndexStore.open(site["root"] / "photos-index")

    svc = IndexService("p", store, ServeOptions(device="cpu"), device="cpu", dtype="float32")
    hits = svc.by_image(site["data"][int(site["ids"][2])], Query(k=1))
    assert seen == [("cpu", "float32")] and hits[0]["id"] == site["ids"][2]


def test_every_hit_carries_an_absolute_url_that_loads_and_its_caption(site):
    """clip-retrieval's front shows a hit only with a url (its <img src>) or a caption."""
    q = np.random.default_rng(2).standard_normal(site["x"].shape[1])
    hits = ContractClient(site["url"], "photos", num_images=K).query(embedding_input=q.tolist())
    assert len(hits) == K
    for hit in hits:
        assert hit["url"] == site["url"] + hit["thumbnail"] and hit["url"].startswith(site["url"] + "/thumb/")
        r = requests.get(hit["url"], timeout=10)
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg" and r.content[:2] == b"\xff\xd8"
    cur = site["curated"]
    status, out = post(site["url"], "/knn-service", {"embedding_input": cur["x"][0].tolist(), "indice_name": "curated"})
    captions = {h["id"]: h.get("caption") for h in out}
    by_row = {int(i): c for i, c in zip(cur["ids"], cur["caption"])}
    assert status == 200 and any(captions.values()) and all(captions[i] == by_row[i] for i in captions)
    assert all("url" not in h for h in out)  # no image behind these rows: nothing to link
    # metadata carries the same links (the front merges them into its hits)
    status, meta = post(site["url"], "/metadata", {"ids": [hits[0]["id"]], "indice_name": "photos"})
    assert meta[0]["metadata"]["url"] == hits[0]["url"]
    # behind a proxy, the declared public address
    opts = ServeOptions(public_url="https://lookup.example.org/lvd")
    svc = IndexService("photos", IndexStore.open(site["root"] / "photos-index"), opts)
    with running_server(Catalog([svc]), opts) as url:
        out = requests.post(url + "/knn-service", data=json.dumps({"embedding_input": q.tolist()}), timeout=10).json()
        assert out[0]["url"].startswith("https://lookup.example.org/lvd/thumb/")


def test_image_url_of_a_result_searches_by_it_and_other_urls_are_refused(site):
    """The front's "search by this image" sends a result's url back: resolved locally, never fetched."""
    i = 6
    first = ContractClient(site["url"], "photos", num_images=K).query(embedding_input=site["x"][i].tolist())
    url = first[0]["url"]
    assert first[0]["id"] == site["ids"][i]
    status, out = post(site["url"], "/knn-service", {"image_url": url, "num_images": K, "indice_name": "photos"})
    assert status == 200 and [h["id"] for h in out] == site["ids"][numpy_order(site["x"], site["x"][i])[:K]].tolist()
    # the same image searched in another index: its bytes are read locally and embedded by that index's model
    status, out = post(site["url"], "/knn-service", {"image_url": url, "num_images": 3, "indice_name": "curated"})
    assert status == 400 and "does not record its model" in out["error"]
    host = site["url"].split("//")[1]
    for other in (
        "http://127.0.0.1:1/thumb/1?index=photos",  # another server
        f"http://{host}/api/info",  # not an image route
        f"file:///{host}/thumb/1",
        "not a url at all",
        f"http://{host}/thumb/../../etc/passwd",
    ):
        status, out = post(site["url"], "/knn-service", {"image_url": other, "num_images": 3})
        assert status == 400 and "never fetches" in out["error"], (other, out)
    status, out = post(site["url"], "/knn-service", {"image_url": f"http://{host}/thumb/123?index=photos"})
    assert status == 404 and "123" in out["error"]


def test_return_embeddings_gives_the_stored_vectors(site):
    cur = site["curated"]
    q = cur["x"][3]
    status, out = post(
        site["url"],
        "/knn-service",
        {"embedding_input": q.tolist(), "indice_name": "curated", "return_embeddings": True},
    )
    by_id = {int(i): r for r, i in enumerate(cur["ids"])}
    assert status == 200 and len(out) == 40
    for h in out:
        np.testing.assert_allclose(h["embedding"], cur["x"][by_id[h["id"]]], atol=1e-6)
    r = requests.get(
        f"{site['url']}/api/search/id/{cur['ids'][3]}",
        params={"index": "curated", "k": 4, "return_embeddings": "true"},
        timeout=10,
    ).json()
    assert [len(h["embedding"]) for h in r["results"]] == [cur["x"].shape[1]] * 4
    status, out = post(site["url"], "/api/search/vector", {"vector": q.tolist(), "index": "curated", "k": 3})
    assert all("embedding" not in h for h in out["results"])  # only when asked


def test_query_arithmetic_over_http_equals_numpy(site):
    """A JSON list of weighted parts (embedding, id, image) is normalised, summed, normalised, searched."""
    cur = site["curated"]
    rng = np.random.default_rng(9)
    e = rng.standard_normal(cur["x"].shape[1]) * 7.0  # any length: each part is normalised first
    parts = [
        {"weight": 0.7, "embedding": e.tolist()},
        {"weight": -0.2, "id": int(cur["ids"][5])},
        {"id": int(cur["ids"][9])},
    ]
    rows = np.stack([e, cur["x"][5], cur["x"][9]]).astype(np.float64)
    q = (np.array([0.7, -0.2, 1.0])[:, None] * rows / np.linalg.norm(rows, axis=1, keepdims=True)).sum(0)
    want = cur["ids"][numpy_order(cur["x"], q)[:8]].tolist()
    status, out = post(site["url"], "/api/search", {"query": parts, "k": 8, "index": "curated"})
    assert status == 200 and [h["id"] for h in out["results"]] == want
    status, out = post(site["url"], "/knn-service", {"query": parts, "num_images": 8, "indice_name": "curated"})
    assert status == 200 and [h["id"] for h in out] == want
    # an image part, by upload and by a result's url, in the photos index
    i, j = 2, 11
    url = ContractClient(site["url"], "photos", num_images=1).query(embedding_input=site["x"][j].tolist())[0]["url"]
    image = base64.b64encode(site["data"][int(site["ids"][i])]).decode()
    status, out = post(
        site["url"],
        "/api/search",
        {"query": [{"image": image}, {"weight": 0.5, "image_url": url}], "index": "photos", "k": K},
    )
    rows = np.stack([site["x_raw"][i], site["x"][j]]).astype(np.float64)
    q = (np.array([1.0, 0.5])[:, None] * rows / np.linalg.norm(rows, axis=1, keepdims=True)).sum(0)
    assert status == 200 and [h["id"] for h in out["results"]] == site["ids"][numpy_order(site["x"], q)[:K]].tolist()
    for bad, message in [
        ([{"weight": 1, "id": int(cur["ids"][1])}, {"weight": -1, "id": int(cur["ids"][1])}], "cancel out"),
        ([{"weight": 1}], "exactly one"),
        ([{"text": "a bird"}], "no text encoder"),
        ([{"id": 1}], "not in index"),
        ([{"embedding": [1.0] * 64}] * 17, "at most 16"),
    ]:
        status, out = post(site["url"], "/api/search", {"query": bad, "index": "curated"})
        assert 400 <= status < 500 and message in out["error"], (bad, out)
