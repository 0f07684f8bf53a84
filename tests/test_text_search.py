"""Search by text end to end: a CLIP pair trained here on Fashion-MNIST captions, `embed.model: auto`
with its Hugging Face folder, `lvd embed`, `lvd index build`, then text queries through the
service, the shell and HTTP (clip-retrieval's /knn-service), and query arithmetic with texts.

No CLIP-like weights can be had offline, so the test trains a tiny contrastive pair on
"a photo of a CLASS" captions (a few seconds on one CPU thread) and checks that each caption
retrieves its own class far above chance (1 in 10).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
import torch
import torch.nn.functional as F
from index_support import running_server
from PIL import Image
from text_support import clip_tokenizer, tiny_config

from lvd.curate.config import load_config
from lvd.curate.demo.fashion_mnist import CLASSES, load_fashion_mnist
from lvd.curate.embed import run_embed
from lvd.curate.manifest import read_manifest, run_manifest
from lvd.index.store import BuildOptions, IndexStore
from lvd.serve.cli import main
from lvd.serve.query_mix import QueryPart
from lvd.serve.run_inputs import build
from lvd.serve.service import IndexService, Query, ServeOptions

pytestmark = [pytest.mark.needs("fashion_mnist"), pytest.mark.slow]

NAMES = [c.replace("-", " ") for c in CLASSES]
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
PER_CLASS = 30
K = 20


def caption(name: str) -> str:
    return f"a photo of a {name}"


def train_pair(folder, fm, steps: int = 300, seed: int = 0):
    """A tiny CLIPModel trained image-to-caption on Fashion-MNIST, saved as a Hugging Face folder."""
    from transformers import CLIPModel

    tok = clip_tokenizer(folder, words=("a", "photo", "of", *(w for n in NAMES for w in n.split())))
    torch.manual_seed(seed)
    model = CLIPModel(tiny_config("clip", len(tok), width=32, heads=2, image=28, patch=7))
    captions = tok([caption(n) for n in NAMES], padding=True, return_tensors="pt")
    x = torch.from_numpy(fm["train_x"][:20000].copy()).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    y = torch.from_numpy(fm["train_y"][:20000].astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        img = F.normalize(model.get_image_features(pixel_values=x[idx]).pooler_output, dim=-1)
        txt = F.normalize(model.get_text_features(**captions).pooler_output, dim=-1)
        loss = F.cross_entropy(model.logit_scale.exp() * img @ txt.t(), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(folder)
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": 28},
        "crop_size": {"height": 28, "width": 28},
        "do_center_crop": True,
        "image_mean": list(MEAN),
        "image_std": list(STD),
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))


@pytest.fixture(scope="module")
def text_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-search")
    fm = load_fashion_mnist()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_pair(root / "fm-clip", fm)
    finally:
        torch.set_num_threads(before)
    pool = root / "pool"
    pool.mkdir()
    rng = np.random.default_rng(1)
    for c in range(len(CLASSES)):
        for i in rng.choice(np.flatnonzero(fm["test_y"] == c), PER_CLASS, replace=False):
            Image.fromarray(fm["test_x"][i]).save(pool / f"c{c}-{i:05d}.png")
    cfg = load_config(
        None,
        [
            f"run_dir={root / 'run'}",
            f'sources.pool=["{pool}"]',
            "progress=false",
            "workers=0",
            "embed.model=auto",
            f"embed.weights={root / 'fm-clip'}",
            "embed.dtype=float32",
            "embed.device=cpu",
            "embed.copy_detection.weights=null",
        ],
    )
    run_manifest(cfg)
    run_embed(cfg)
    build(root / "run" / "embed", root / "index", BuildOptions(factory="Flat", progress=False))
    manifest = read_manifest(root / "run")
    truth = {int(i): int(k.split("-")[0][1:]) for i, k in zip(manifest["id"], manifest["key"])}
    return root, truth


def precision(hits: list[dict], truth: dict, cls: int) -> float:
    return float(np.mean([truth[h["id"]] == cls for h in hits]))


def test_text_queries_find_their_class_through_the_service_the_shell_and_http(text_index, capsys):
    root, truth = text_index
    store = IndexStore.open(root / "index")
    recorded = store.info["embedder"]
    assert recorded["kind"] == "contrastive" and recorded["text_tower"] is True and recorded["model"] == "CLIPModel"
    svc = IndexService("fm", store, ServeOptions())
    per_class = [precision(svc.by_text(caption(n), Query(k=K)), truth, c) for c, n in enumerate(NAMES)]
    print("precision@20 per class:", dict(zip(NAMES, per_class)))
    assert np.mean(per_class) > 0.35 and sum(p > 0.1 for p in per_class) >= 6  # chance is 0.1

    capsys.readouterr()
    assert main(["search", str(root / "index"), "--text", caption("bag"), "-k", "5", "--json"]) == 0
    shell = json.loads(capsys.readouterr().out)[0]["results"]
    assert [h["id"] for h in shell] == [h["id"] for h in svc.by_text(caption("bag"), Query(k=5))]

    with running_server(store, ServeOptions()) as url:
        body = {"text": caption("trouser"), "num_images": 10, "modality": "image"}
        hits = requests.post(url + "/knn-service", data=json.dumps(body), timeout=60).json()
        assert [h["id"] for h in hits] == [h["id"] for h in svc.by_text(caption("trouser"), Query(k=10))]
        assert all(h["url"].startswith(url + "/thumb/") for h in hits)
        page_answer = requests.get(url + "/api/search/text", params={"text": caption("trouser"), "k": 10}, timeout=60)
        assert [h["id"] for h in page_answer.json()["results"]] == [h["id"] for h in hits]


def test_text_arithmetic_equals_numpy(text_index):
    """+1 sandal -0.5 sneaker +0.3 image: the service's search equals brute force on numpy's sum."""
    root, _ = text_index
    store = IndexStore.open(root / "index")
    svc = IndexService("fm", store, ServeOptions())
    image = store.image_bytes(int(store.ids[7]))
    parts = [
        QueryPart(1.0, "text", caption("sandal")),
        QueryPart(-0.5, "text", caption("sneaker")),
        QueryPart(0.3, "image", image),
    ]
    rows = np.concatenate([svc.text_vectors([caption("sandal"), caption("sneaker")]), svc.image_vector(image)])
    q = (np.array([1.0, -0.5, 0.3])[:, None] * rows / np.linalg.norm(rows, axis=1, keepdims=True)).sum(0)
    x = np.stack([store.vector_of(int(i)) for i in store.ids]).astype(np.float64)
    want = store.ids[np.argsort(-(x @ (q / np.linalg.norm(q))), kind="stable")[:K]].tolist()
    assert [h["id"] for h in svc.by_parts(parts, Query(k=K))] == want
    text = f"+1 text:{caption('sandal')} -0.5 text:{caption('sneaker')}"
    assert main(["search", str(root / "index"), "--query", text, "-k", "3"]) == 0
