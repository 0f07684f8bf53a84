"""Builders of small run folders for the index tests: manifest + embed parts, real photos.

Not a test module: tests/test_index_*.py import it.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

# Manifest ids are 64-bit hashes; ids above 2**53 catch any place (JavaScript!) that rounds them.
FIRST_ID = 7_000_000_000_000_000_001
PHOTO_NAMES = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "page", "brick", "grass",
               "gravel", "moon", "hubble_deep_field", "immunohistochemistry", "text", "clock")


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


def write_embed(embed_dir: Path, ids: np.ndarray, x: np.ndarray, part_rows: int, first_part: int = 0,
                success: dict | None = None) -> list[str]:
    """Embed-stage files as engineer A's stage writes them: float16 parts, int64 ids, _SUCCESS.json."""
    embed_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for p, start in enumerate(range(0, len(ids), part_rows), start=first_part):
        np.save(embed_dir / f"part-{p:05d}.npy", x[start:start + part_rows].astype(np.float16))
        np.save(embed_dir / f"ids-{p:05d}.npy", ids[start:start + part_rows].astype(np.int64))
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


class running_server:
    """`with running_server(store_or_catalog, opts) as url:` the real uvicorn server on a free loopback port.

    Runs in a thread with its own event loop, so tests talk to it over real sockets.
    """

    def __init__(self, served, opts=None, name: str = "index"):
        from lvd.index.http_app import create_app
        from lvd.index.http_server import bind, server_config
        from lvd.index.service import Catalog, IndexService, ServeOptions

        import uvicorn

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
