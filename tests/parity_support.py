"""Shared pieces of the parity tests: transformers models with random weights, written into
Meta's hub layouts here in the tests (independently of lvd's own Hugging Face readers), and the
relative max difference the tests bound.

The key maps follow the released files: DINO v1 (`dino_deitsmall16_pretrain.pth`,
`dino_resnet50_pretrain.pth`, torchvision's ResNet-50 names without `fc`), DINOv3
(`dinov3_vits16_pretrain_lvd1689m-08c60483.pth`, `dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth`).
"""

from __future__ import annotations

import torch

TOL = 1e-4  # relative max difference: max |ours - reference| / max |reference|


def randomise(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Move every parameter (and BatchNorm statistic) away from its often constant initial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
    return model.eval()


def pixels(height: int, width: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (tuple(ours.shape), tuple(ref.shape))
    ours, ref = ours.detach().double(), ref.detach().double()
    return float((ours - ref).abs().max() / ref.abs().max())


def _legacy(sd: dict) -> dict:
    """transformers >= 5 in-memory names carry a `model.` prefix on some modules; the files do not."""
    return {k[len("model.") :] if k.startswith("model.") else k: v for k, v in sd.items()}


def vit_hf_to_dino(hf_model) -> dict:
    """A transformers `ViTModel` (without pooler) in the layout of `dino_deitsmall16_pretrain.pth`."""
    sd = hf_model.state_dict()  # in-memory names: layers.{i}.attention.q_proj, layers.{i}.mlp.fc1 …
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    for i in range(hf_model.config.num_hidden_layers):
        hf = f"layers.{i}."
        ours = f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[ours + f"attn.qkv.{kind}"] = torch.cat(
                [sd[hf + f"attention.{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0
            )
            out[ours + f"attn.proj.{kind}"] = sd[hf + f"attention.o_proj.{kind}"]
            out[ours + f"norm1.{kind}"] = sd[hf + f"layernorm_before.{kind}"]
            out[ours + f"norm2.{kind}"] = sd[hf + f"layernorm_after.{kind}"]
            out[ours + f"mlp.fc1.{kind}"] = sd[hf + f"mlp.fc1.{kind}"]
            out[ours + f"mlp.fc2.{kind}"] = sd[hf + f"mlp.fc2.{kind}"]
    return out


def dinov3_hf_to_meta(hf_model, key_bias_seed: int | None = 0, local_cls_norm: bool = False) -> dict:
    """A transformers `DINOv3ViTModel` in the layout of `dinov3_vits16_pretrain_lvd1689m-08c60483.pth`.

    transformers has no key bias; Meta's files store one and zero it through `bias_mask`. It
    is filled with random values here (`key_bias_seed`), so that parity shows the mask applied.
    """
    cfg = hf_model.config
    sd = _legacy(hf_model.state_dict())
    dim = cfg.hidden_size
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "storage_tokens": sd["embeddings.register_tokens"],
        "mask_token": sd["embeddings.mask_token"].reshape(1, dim),
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
        "rope_embed.periods": 1.0 / hf_model.rope_embeddings.inv_freq.float(),
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    gen = torch.Generator().manual_seed(key_bias_seed or 0)
    for i in range(cfg.num_hidden_layers):
        hf, ours = f"layer.{i}.", f"blocks.{i}."
        out[ours + "attn.qkv.weight"] = torch.cat([sd[hf + f"attention.{p}_proj.weight"] for p in "qkv"], dim=0)
        if cfg.query_bias:
            key_bias = torch.randn(dim, generator=gen) if key_bias_seed is not None else torch.zeros(dim)
            q, v = sd[hf + "attention.q_proj.bias"], sd[hf + "attention.v_proj.bias"]
            out[ours + "attn.qkv.bias"] = torch.cat([q, key_bias, v])
            out[ours + "attn.qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
        out[ours + "attn.proj.weight"] = sd[hf + "attention.o_proj.weight"]
        out[ours + "attn.proj.bias"] = sd[hf + "attention.o_proj.bias"]
        for n in (1, 2):
            out[ours + f"ls{n}.gamma"] = sd[hf + f"layer_scale{n}.lambda1"]
            out[ours + f"norm{n}.weight"] = sd[hf + f"norm{n}.weight"]
            out[ours + f"norm{n}.bias"] = sd[hf + f"norm{n}.bias"]
        names = (
            {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"}
            if cfg.use_gated_mlp
            else {"fc1": "up_proj", "fc2": "down_proj"}
        )
        for meta, hf_name in names.items():
            for kind in ("weight", "bias"):
                out[ours + f"mlp.{meta}.{kind}"] = sd[hf + f"mlp.{hf_name}.{kind}"]
    if local_cls_norm:  # stored by the 7B and satellite files, used only for local crops in training
        out["local_cls_norm.weight"] = torch.randn(dim, generator=gen)
        out["local_cls_norm.bias"] = torch.randn(dim, generator=gen)
    return out


def convnext_hf_to_meta(hf_model) -> dict:
    """A transformers `DINOv3ConvNextModel` in the layout of `dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth`."""
    sd = _legacy(hf_model.state_dict())
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "layer_norm":
            out[f"norm.{parts[1]}"] = value
            out[f"norms.3.{parts[1]}"] = value  # Meta's files store the final norm twice
            continue
        stage = parts[1]
        if parts[2] == "downsample_layers":
            out[f"downsample_layers.{stage}.{parts[3]}.{parts[4]}"] = value
            continue
        block, rest = parts[3], ".".join(parts[4:])
        rest = (
            rest.replace("depthwise_conv", "dwconv").replace("pointwise_conv", "pwconv").replace("layer_norm", "norm")
        )
        out[f"stages.{stage}.{block}.{rest}"] = value
    return out


def resnet_hf_to_torchvision(hf_model) -> dict:
    """A transformers `ResNetModel` in torchvision's ResNet layout, as `dino_resnet50_pretrain.pth` stores it."""
    out = {}
    for key, value in hf_model.state_dict().items():
        parts = key.split(".")
        stat = parts[-1]
        if parts[0] == "embedder":
            layer = "conv1" if parts[2] == "convolution" else "bn1"
            out[f"{layer}.{stat}"] = value
            continue
        stage, block = int(parts[2]) + 1, parts[4]
        if parts[5] == "shortcut":
            which = "0" if parts[6] == "convolution" else "1"
            out[f"layer{stage}.{block}.downsample.{which}.{stat}"] = value
        else:
            conv = int(parts[6]) + 1
            layer = f"conv{conv}" if parts[7] == "convolution" else f"bn{conv}"
            out[f"layer{stage}.{block}.{layer}.{stat}"] = value
    return out
