"""Builders of small run folders for the index tests: manifest + embed parts, real photos.

Not a test module: tests/test_index_*.py import it.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import requests
from PIL import Image

# Manifest ids are 64-bit hashes; ids above 2**53 catch any place (JavaScript!) that rounds them.
FIRST_ID = 7_000_000_000_000_000_001
PHOTO_NAMES = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "rocket",
    "coins",
    "page",
    "brick",
    "grass",
    "gravel",
    "moon",
    "hubble_deep_field",
    "immunohistochemistry",
    "text",
    "clock",
)


def photos(size: int = 96) -> list[tuple[str, Image.Image]]:
    """Real photos shipped with scikit-image (offline), shrunk so tests stay fast."""
    import skimage.data

    out = []
    for name in PHOTO_NAMES:
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        img.thumbnail((size, size))
        out.append((name, img))
    return out


def clustered_unit_vectors(n: int, d: int, n_clusters: int = 50, spread: float = 1.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, n_clusters, n)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_embed(
    embed_dir: Path, ids: np.ndarray, x: np.ndarray, part_rows: int, first_part: int = 0, success: dict | None = None
) -> list[str]:
    """Embed-stage files as engineer A's stage writes them: float16 parts, int64 ids, _SUCCESS.json."""
    embed_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for p, start in enumerate(range(0, len(ids), part_rows), start=first_part):
        np.save(embed_dir / f"part-{p:05d}.npy", x[start : start + part_rows].astype(np.float16))
        np.save(embed_dir / f"ids-{p:05d}.npy", ids[start : start + part_rows].astype(np.int64))
        names.append(f"part-{p:05d}")
    if success is not None:
        (embed_dir / "_SUCCESS.json").write_text(json.dumps(success))
    return names


def write_manifest(run: Path, rows: list[dict], part: int = 0) -> None:
    """A manifest part with the contract's columns that the index reads."""
    (run / "manifest").mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    for col, default in (("label", None), ("status", "ok")):
        if col not in df.columns:
            df[col] = default
    df["id"] = df["id"].astype("int64")
    df.to_parquet(run / "manifest" / f"part-{part:05d}.parquet", index=False)


def photo_run(run: Path, size: int = 96) -> tuple[list[dict], dict[int, bytes]]:
    """Photos as manifest rows: most in a folder source, three inside a tar source.

    Returns the manifest rows and the file bytes of every id (what a thumbnail must come from).
    """
    folder = run / "images"
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    rows, data = [], {}
    tar_members = []
    for i, (name, img) in enumerate(photos(size)):
        buf = io.BytesIO()
        img.save(buf, format="PNG" if i % 2 else "JPEG")
        ext = "png" if i % 2 else "jpg"
        id_ = FIRST_ID + i
        data[id_] = buf.getvalue()
        if i < 12:
            key = f"sub/{name}.{ext}" if i % 3 == 0 else f"{name}.{ext}"
            (folder / key).write_bytes(buf.getvalue())
            rows.append({"id": id_, "set": "pool", "source": str(folder), "kind": "folder", "key": key})
        else:
            tar_members.append((f"{name}.{ext}", buf.getvalue(), id_))
    tar_path = run / "shard-000000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for key, payload, id_ in tar_members:
            info = tarfile.TarInfo(key)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
            rows.append({"id": id_, "set": "seed:demo", "source": str(tar_path), "kind": "tar", "key": key})
    write_manifest(run, rows)
    return rows, data


def embedded_photo_run(run: Path, model: str = "vit_tiny_p14") -> tuple[list[dict], dict[int, bytes], np.ndarray]:
    """`photo_run` plus the embed stage's files, made with the real Embedder (random tiny ViT).

    A random model still maps an identical image to an identical vector, which is all the
    search-by-image tests need; its weights are saved as a hub-layout .pth so that the index
    (and the server) load the very same model. With DINOv2's tiny LayerScale init a random
    model's CLS token is the same for every image, so CLS + mean patch token is used.
    """
    import torch

    from lvd.pretrain.models import build_backbone
    from lvd.pretrain.models.embedder import Embedder

    rows, data = photo_run(run)
    torch.manual_seed(0)
    weights = run / "weights" / f"{model}.pth"
    weights.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_backbone(model).state_dict(), weights)
    embedder = Embedder(model, weights, dtype="float32", cls_and_mean_patch=True)
    ids = np.array([r["id"] for r in rows], dtype=np.int64)
    squares = np.stack([embedder.prepare_bytes(data[i]) for i in ids.tolist()])
    x = embedder.embed_uint8(squares)
    write_embed(run / "embed", ids, x, part_rows=8, success={**embedder.info(), "counts": {"ok": len(ids)}})
    return rows, data, x


def wait_until_serving(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Poll URL/api/health until it answers 200; fail if the server process ends or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(url + "/api/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, "server did not come up"
        time.sleep(0.2)


class running_server:
    """`with running_server(store_or_catalog, opts) as url:` the real uvicorn server on a free loopback port.

    Runs in a thread with its own event loop, so tests talk to it over real sockets.
    """

    def __init__(self, served, opts=None, name: str = "index"):
        import uvicorn

        from lvd.serve.app import create_app
        from lvd.serve.server import bind, server_config
        from lvd.serve.service import Catalog, IndexService, ServeOptions

        self.opts = opts or ServeOptions()
        catalog = served if isinstance(served, Catalog) else Catalog([IndexService(name, served, self.opts)])
        self.app = create_app(catalog, self.opts)
        self.sock = bind("127.0.0.1", 0)
        self.server = uvicorn.Server(server_config(self.app, self.opts, log_level="warning"))

    def __enter__(self) -> str:
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        host, port = self.sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def curated_vector_run(run: Path, n_groups: int = 120, d: int = 16, seed: int = 0) -> dict:
    """A run folder without images: manifest, embed parts, dedup and cluster outputs, all made up.

    Near-duplicate groups are 1-4 noisy copies of a random direction (so copies are each
    other's neighbours); a few rows are exact copies of a group's first member (exact.parquet).
    Sets, labels and clusters are assigned at random; every third row has a caption (as a list
    source with a caption column would give). Returns the per-row truth the stages
    would have written, with the vectors as the index holds them (float16-rounded).
    """
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n_groups, d))
    sizes = rng.integers(1, 5, n_groups)
    group = np.repeat(np.arange(n_groups), sizes)
    x = base[group] + 0.08 * rng.standard_normal((len(group), d))
    exact_of = rng.choice(np.flatnonzero(np.r_[True, group[1:] != group[:-1]]), 10, replace=False)
    # same bytes, so the same group; a touch of noise keeps brute-force ties out of the comparisons
    x = np.concatenate([x, x[exact_of] + 0.01 * rng.standard_normal((len(exact_of), d))])
    group = np.concatenate([group, group[exact_of]])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)
    n = len(x)
    ids = np.int64(FIRST_ID) + 1000 + rng.permutation(10 * n)[:n].astype(np.int64)
    sets = rng.choice(np.array(["pool", "seed:birds", "eval:test"], object), n, p=[0.7, 0.2, 0.1])
    labels = np.where(sets == "seed:birds", rng.choice(np.array(["a", "b"], object), n), None)
    exact_rows = np.arange(n - len(exact_of), n)
    sets[exact_rows] = sets[exact_of]  # an exact copy is in the pool with its original, or not at all
    cluster = np.where(sets == "pool", rng.integers(0, 5, n), -1)
    cluster[exact_rows] = -1  # the cluster stage sees the deduplicated pool only
    captions = np.array([f"caption of row {r}" if r % 3 == 0 else None for r in range(n)], object)
    write_manifest(
        run,
        [
            {"id": int(i), "set": s, "source": None, "kind": None, "key": None, "label": lab, "caption": c}
            for i, s, lab, c in zip(ids, sets, labels, captions)
        ],
    )
    write_embed(run / "embed", ids, x, part_rows=200)
    (run / "dedup").mkdir(parents=True, exist_ok=True)
    survivors = np.setdiff1d(np.arange(n), exact_rows)
    pd.DataFrame(
        {
            "id": ids[survivors],
            "component": group[survivors] + 7,
            "keep": np.r_[True, group[survivors][1:] != group[survivors][:-1]],
            "reason": "pixels",
        }
    ).to_parquet(run / "dedup" / "near.parquet", index=False)
    pd.DataFrame({"id": ids[exact_rows], "dup_of": ids[exact_of]}).to_parquet(
        run / "dedup" / "exact.parquet", index=False
    )
    (run / "cluster").mkdir(parents=True, exist_ok=True)
    in_cluster = cluster >= 0
    pd.DataFrame({"id": ids[in_cluster], "cluster": cluster[in_cluster], "distance": np.float32(0)}).to_parquet(
        run / "cluster" / "assign.parquet", index=False
    )
    return {"ids": ids, "x": x, "set": sets, "label": labels, "cluster": cluster, "group": group, "caption": captions}
