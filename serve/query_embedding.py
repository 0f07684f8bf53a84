"""Query images embedded the way the index's own vectors were: the model its embed stage recorded.

The index folder records which model made its vectors (`info.json`'s `embedder`); queries must go
through the same model, preprocessing included, or their similarities mean nothing. This lives in
the service, not in `lvd.index`, because only here do vectors meet models.
"""

from __future__ import annotations

import numpy as np

from lvd.index.store import IndexFolderError, IndexStore
from lvd.pretrain.models.embedder import embedder_from_info


def index_embedder(store: IndexStore, device: str = "cpu", dtype: str | None = None):
    """The model that made `store`'s vectors, to embed query images the same way.

    A registry backbone, or a copy-detection model (ONNX through onnxruntime, or TorchScript) for
    an index built from RUN/embed/copy. The compute dtype defaults to the one the embed stage used
    (float16 only on a GPU).
    """
    spec = store.info.get("embedder") or {}
    if not spec.get("model") and not spec.get("kind"):
        raise IndexFolderError("this index does not record its model (embed/_SUCCESS.json was missing at build time)")
    if spec.get("weights") is None:
        raise IndexFolderError(
            f"this index was embedded with randomly initialised {spec.get('model')} weights, which "
            "cannot be recreated to embed a query; search by id or by vector instead"
        )
    dtype = dtype or spec.get("dtype") or "auto"
    if dtype in ("float16", "fp16") and not str(device).startswith("cuda"):
        dtype = "auto"
    return embedder_from_info(spec, device=device, dtype=dtype)


def embed_query_bytes(embedder, blobs: list[bytes], max_pixels: int | None = None) -> np.ndarray:
    """Query images through the embed stage's own path: decode + resize + crop, then the model.

    Raises `pretrain.data.decode.DecodeError` for bytes that are not a usable image.
    """
    squares = [embedder.prepare_bytes(b, max_pixels=max_pixels) for b in blobs]
    return np.asarray(embedder.embed_uint8(np.stack(squares)), dtype=np.float32)
