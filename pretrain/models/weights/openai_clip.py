"""OpenAI CLIP / open_clip state dicts -> transformers' `CLIPModel` layout and config.

OpenAI released its ViT CLIP models as TorchScript archives whose state dict uses the names of
its `clip.model.CLIP` (`visual.conv1`, `visual.transformer.resblocks.N.attn.in_proj_weight`,
`token_embedding`, `text_projection`, ...); open_clip saves its CLIP models (the OpenAI
architecture, `open_clip_pytorch_model.bin` / `open_clip_model.safetensors`) under the same
names, with the architecture in `open_clip_config.json`. transformers' `CLIPModel` computes the
same functions under other names: the fused `in_proj` is split into q/k/v projections, and the
projections are stored transposed. The architecture is read from the tensors' shapes (as
OpenAI's own `build_model` does); what shapes cannot tell (the activation, the number of
heads where the head width is not 64) comes from open_clip's config when there is one.

Supported: the ViT towers with the plain transformer text tower (every OpenAI ViT model, and
open_clip's ViT CLIP models without timm or Hugging Face towers, layer scale or attention
pooling). Anything else is a `WeightsError` naming what is unsupported.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from lvd.pretrain.models.weights.hf_common import rename
from lvd.pretrain.models.weights.strict import WeightsError

# OpenAI's normalisation statistics (its `clip.py` preprocessing), used where nothing else is given
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_BLOCK = (
    (r"\.ln_1\.", ".layer_norm1."),
    (r"\.ln_2\.", ".layer_norm2."),
    (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
)
_RENAMES = (
    (r"^visual\.class_embedding$", "vision_model.embeddings.class_embedding"),
    (r"^visual\.conv1\.weight$", "vision_model.embeddings.patch_embedding.weight"),
    (r"^visual\.positional_embedding$", "vision_model.embeddings.position_embedding.weight"),
    (r"^visual\.ln_pre\.", "vision_model.pre_layrnorm."),
    (r"^visual\.ln_post\.", "vision_model.post_layernorm."),
    (r"^token_embedding\.weight$", "text_model.embeddings.token_embedding.weight"),
    (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight"),
    (r"^ln_final\.", "text_model.final_layer_norm."),
    (r"^logit_scale$", "logit_scale"),
)
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.*)$")
# open_clip settings that change the computation in ways CLIPModel cannot express
_UNSUPPORTED = {
    "vision_cfg": ("timm_model_name", "attentional_pool", "ls_init_value", "no_ln_pre", "final_ln_after_pool"),
    "text_cfg": ("hf_model_name", "ls_init_value", "final_ln_after_pool", "embed_cls", "no_causal_mask"),
}
# how CLIPModel pools: the class token of the image, the end-of-text token of the text
_POOLING = {"vision_cfg": "tok", "text_cfg": "argmax"}


def is_openai_clip(keys) -> bool:
    keys = set(keys)
    return "token_embedding.weight" in keys and any(k.startswith("visual.") for k in keys)


def _layers(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    found = {int(m.group(2)) for k in sd if (m := _RESBLOCK.match(k)) and (m.group(1) or "") == prefix}
    return max(found) + 1 if found else 0


def _check_open_clip_cfg(model_cfg: dict) -> None:
    for tower, names in _UNSUPPORTED.items():
        cfg = model_cfg.get(tower) or {}
        used = [n for n in names if cfg.get(n) not in (None, False, "", 0)]
        pool = cfg.get("pool_type")
        if pool not in (None, _POOLING[tower]):
            used.append(f"pool_type={pool}")
        if used:
            raise WeightsError(
                f"open_clip {tower} settings {used} have no counterpart in transformers' CLIPModel; "
                "lvd reads open_clip's plain ViT CLIP models"
            )


def clip_config(sd: Mapping[str, torch.Tensor], model_cfg: dict | None = None, quick_gelu: bool | None = None) -> dict:
    """A transformers `CLIPConfig` dict for an OpenAI-layout state dict (shapes), refined by
    open_clip's `model_cfg` (heads, activation). Without a config the activation is OpenAI's
    QuickGELU, as in every model OpenAI released."""
    if any(k.startswith("visual.layer1.") for k in sd):
        raise WeightsError("OpenAI's ResNet CLIP models (RN50, ...) have no transformers counterpart; use a ViT one")
    if "visual.conv1.weight" not in sd or "text_projection" not in sd:
        raise WeightsError("not an OpenAI / open_clip CLIP state dict (visual.conv1.weight or text_projection missing)")
    model_cfg = model_cfg or {}
    _check_open_clip_cfg(model_cfg)
    vcfg, tcfg = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    if quick_gelu is None:
        quick_gelu = bool(model_cfg.get("quick_gelu", True)) if model_cfg else True
    conv = sd["visual.conv1.weight"]
    v_width, patch = int(conv.shape[0]), int(conv.shape[-1])
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    t_width = int(sd["ln_final.weight"].shape[0])
    vocab, context = (int(s) for s in (sd["token_embedding.weight"].shape[0], sd["positional_embedding"].shape[0]))
    act = "quick_gelu" if quick_gelu else "gelu"
    v_heads = int(v_width // int(vcfg.get("head_width", 64)))
    t_heads = int(tcfg.get("heads", t_width // 64))
    if v_heads < 1 or t_heads < 1:
        raise WeightsError(f"cannot tell the attention heads of widths {v_width}/{t_width}: give open_clip_config.json")
    return {
        "model_type": "clip",
        "projection_dim": int(sd["text_projection"].shape[1]),
        "logit_scale_init_value": float(sd["logit_scale"]) if "logit_scale" in sd else 2.6592,
        "vision_config": {
            "hidden_size": v_width,
            "intermediate_size": int(sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            "num_hidden_layers": _layers(sd, "visual."),
            "num_attention_heads": v_heads,
            "image_size": patch * grid,
            "patch_size": patch,
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
        },
        "text_config": {
            "hidden_size": t_width,
            "intermediate_size": int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            "num_hidden_layers": _layers(sd, ""),
            "num_attention_heads": t_heads,
            "vocab_size": vocab,
            "max_position_embeddings": context,
            "hidden_act": act,
            "layer_norm_eps": 1e-5,
            # OpenAI's end-of-text token is the last of the vocabulary; the pooled token is its first occurrence
            "bos_token_id": vocab - 2,
            "eos_token_id": vocab - 1,
            "pad_token_id": vocab - 1,
        },
    }


def openai_clip_to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename, split the fused attention input projection, transpose the output projections.

    Keys that match nothing are kept as they are, so that strict loading names them.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in ("input_resolution", "context_length", "vocab_size") or key.endswith("attn_mask"):
            continue  # TorchScript archives' constants; the causal mask is rebuilt by the model
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
            continue
        m = _RESBLOCK.match(key)
        if m is None:
            out[rename(key, _RENAMES)] = value
            continue
        tower = "vision_model" if m.group(1) else "text_model"
        layer, rest = m.group(2), "." + m.group(3)
        base = f"{tower}.encoder.layers.{layer}"
        if rest in (".attn.in_proj_weight", ".attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{base}.self_attn.{name}.{kind}"] = part.contiguous()
            continue
        out[base + rename(rest, _BLOCK)] = value
    return out
