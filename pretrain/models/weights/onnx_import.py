"""Recover DINOv2 ViT weights from a torch.onnx export of a Hugging Face `Dinov2Model`.

The exporter keeps Hugging Face names for the tokens, the patch convolution, LayerNorms,
biases and LayerScales, but stores every linear weight as an anonymous `[in, out]` initializer
feeding a MatMul node whose *name* tells the layer (`/backbone/encoder/layer.3/mlp/fc1/MatMul`).
The position embedding is split into a CLS row and the patch rows, concatenated in-graph.
`onnx` is needed only here (the `demo` extra).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch

from lvd.pretrain.models.weights.huggingface import hf_to_hub
from lvd.pretrain.models.weights.strict import WeightsError

log = logging.getLogger(__name__)

_LINEAR_NODE = re.compile(
    r"^/(?P<scope>[\w.]+)/encoder/layer\.(?P<layer>\d+)/"
    r"(?P<path>attention/attention/(?:query|key|value)|attention/output/dense|mlp/fc1|mlp/fc2|mlp/weights_in|mlp/weights_out)/MatMul$"
)


def _initializers(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {init.name: numpy_helper.to_array(init) for init in graph.initializer}


def _linear_weights(graph, inits: dict[str, np.ndarray], scope: str) -> dict[str, np.ndarray]:
    out = {}
    for node in graph.node:
        m = _LINEAR_NODE.match(node.name)
        if node.op_type != "MatMul" or not m or m["scope"] != scope:
            continue
        weight = [inits[name] for name in node.input if name in inits]
        if len(weight) != 1 or weight[0].ndim != 2:
            raise WeightsError(f"ONNX node {node.name} has no single 2-D weight initializer")
        key = f"encoder.layer.{m['layer']}.{m['path'].replace('/', '.')}.weight"
        out[key] = weight[0].T  # MatMul stores [in, out]; nn.Linear wants [out, in]
    return out


def _position_embedding(graph, inits: dict[str, np.ndarray], scope: str, dim: int) -> np.ndarray:
    """CLS row (1x1xD) and patch rows (1xNxD, N square) among the embedding nodes' anonymous inputs."""
    prefix = f"/{scope}/embeddings/"
    anonymous = {
        name
        for node in graph.node
        if node.name.startswith(prefix)
        for name in node.input
        if name in inits and not name.startswith(f"{scope}.")
    }
    cls_rows = [inits[n] for n in anonymous if inits[n].shape == (1, 1, dim)]
    patch_rows = [
        inits[n]
        for n in anonymous
        if inits[n].ndim == 3
        and inits[n].shape[0] == 1
        and inits[n].shape[2] == dim
        and inits[n].shape[1] > 1
        and round(inits[n].shape[1] ** 0.5) ** 2 == inits[n].shape[1]
    ]
    if len(cls_rows) != 1 or len(patch_rows) != 1:
        raise WeightsError(
            f"cannot identify the position embedding in the ONNX graph: {len(cls_rows)} CLS-row and "
            f"{len(patch_rows)} patch-row candidates under {prefix}"
        )
    return np.concatenate([cls_rows[0], patch_rows[0]], axis=1)


def state_dict_from_onnx(path: str | Path, scope: str = "backbone") -> dict[str, torch.Tensor]:
    """Hub-layout state dict of the ViT inside the graph (`scope` = the HF module prefix)."""
    return hf_to_hub(hf_state_dict_from_onnx(path, scope))


def hf_state_dict_from_onnx(path: str | Path, scope: str = "backbone") -> dict[str, torch.Tensor]:
    """The same weights under Hugging Face `Dinov2Model` names (loadable into transformers).

    The mask token is not part of an inference graph; it is set to zeros (its Hugging Face
    initial value), which changes nothing unless the model is trained with masks.
    """
    import onnx

    graph = onnx.load(str(path)).graph
    inits = _initializers(graph)
    named = {k[len(scope) + 1 :]: v for k, v in inits.items() if k.startswith(f"{scope}.")}
    if "embeddings.cls_token" not in named:
        raise WeightsError(f"{path}: no initializer {scope}.embeddings.cls_token; not a Dinov2Model export")
    dim = named["embeddings.cls_token"].shape[-1]
    hf = {**named, **_linear_weights(graph, inits, scope)}
    hf["embeddings.position_embeddings"] = _position_embedding(graph, inits, scope, dim)
    hf.setdefault("embeddings.mask_token", np.zeros((1, dim), dtype=np.float32))
    log.info("imported %d tensors from ONNX graph %s", len(hf), path)
    return {k: torch.from_numpy(np.array(v, dtype=v.dtype, order="C", copy=True)) for k, v in hf.items()}
