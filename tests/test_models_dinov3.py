"""DINOv3 ViTs against transformers' `DINOv3ViTModel` (random weights written into Meta's hub layout).

transformers computes RoPE, the storage tokens and the SwiGLU variants with code of its own;
the hub layout (fused q/k/v with a masked key bias, `rope_embed.periods`, `storage_tokens`,
separate `w1`/`w2`/`w3`) is written by the tests' own key map (`parity_support`).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from parity_support import TOL, dinov3_hf_to_meta, pixels, randomise, rel_diff

from lvd.pretrain.models import build_backbone, get_spec
from lvd.pretrain.models.layers import rope_periods, swiglu_hidden_features

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=32)
VARIANTS = {
    # ViT-S/B/L/H style: GELU MLP, q/k/v biases (the key bias masked)
    "mlp": (dict(intermediate_size=128), {}),
    # ViT-S+/L+/H+ style: SwiGLU, hidden width rounded to 8
    "swiglu": (
        dict(intermediate_size=swiglu_hidden_features(32, 6.0, 8), use_gated_mlp=True, hidden_act="silu"),
        dict(ffn_layer="swiglu", mlp_ratio=6.0),
    ),
    # ViT-7B style: SwiGLU rounded to 64, no q/k/v bias, a stored local-crop CLS norm
    "7b": (
        dict(
            intermediate_size=swiglu_hidden_features(32, 3.0, 64),
            use_gated_mlp=True,
            hidden_act="silu",
            query_bias=False,
            value_bias=False,
        ),
        dict(ffn_layer="swiglu64", mlp_ratio=3.0, qkv_bias=False, local_cls_norm=True),
    ),
}


def _hf(seed=0, scale=0.2, **cfg):
    config = transformers.DINOv3ViTConfig(**{**TINY, "num_register_tokens": 4, **cfg})
    torch.manual_seed(seed)
    return randomise(transformers.DINOv3ViTModel(config), seed=seed, scale=scale)


def _pair(variant: str, name="dinov3_vit_tiny_p4", **hf_extra):
    hf_cfg, overrides = VARIANTS[variant]
    hf = _hf(**{**hf_cfg, **hf_extra})
    ours = build_backbone(name, **overrides).eval()
    ours.load_state_dict(dinov3_hf_to_meta(hf, local_cls_norm=bool(overrides.get("local_cls_norm"))), strict=True)
    return hf, ours


def _compare(ours, hf, x) -> float:
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        got = ours.forward_features(x)
    diffs = [
        rel_diff(got["x_norm_clstoken"], ref[:, 0]),
        rel_diff(got["x_storage_tokens"], ref[:, 1:5]),
        rel_diff(got["x_norm_patchtokens"], ref[:, 5:]),
    ]
    assert max(diffs) <= TOL, diffs
    return max(diffs)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dinov3_vit_matches_transformers(variant):
    hf, ours = _pair(variant)
    _compare(ours, hf, pixels(32, 32))  # the training size
    _compare(ours, hf, pixels(24, 48))  # non-square: each axis normalised on its own
    # sides that are not multiples of the patch: both crop to 8 x 11 patches
    _compare(ours, hf, pixels(34, 47))


def test_the_key_bias_is_masked_and_matters():
    hf, ours = _pair("mlp")
    x = pixels(24, 40)
    with torch.no_grad():
        masked = ours.forward_features(x)["x_norm_patchtokens"]
        for block in ours.blocks:
            block.attn.qkv.bias_mask.fill_(1.0)  # let the (random) key bias through
        unmasked = ours.forward_features(x)["x_norm_patchtokens"]
    assert rel_diff(unmasked, masked) > 100 * TOL  # with RoPE a key bias does not cancel


def test_rope_periods_follow_the_formula_and_load_as_stored():
    assert torch.allclose(rope_periods(64, 100.0)[[0, 1, 15]], torch.tensor([1.0, 100 ** (1 / 16), 100 ** (15 / 16)]))
    hf, ours = _pair("mlp")
    stored = ours.rope_embed.periods.clone()
    torch.testing.assert_close(stored, 1.0 / hf.rope_embeddings.inv_freq.float())
    # files of distilled models store bf16-rounded periods: those are used as stored
    rounded = dinov3_hf_to_meta(hf)
    rounded["rope_embed.periods"] = rounded["rope_embed.periods"].bfloat16().float()
    ours.load_state_dict(rounded)
    torch.testing.assert_close(ours.rope_embed.periods, stored.bfloat16().float(), rtol=0, atol=0)


def test_positions_are_augmented_in_training_only():
    torch.manual_seed(0)
    model = build_backbone("dinov3_vit_tiny_p4")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    x = pixels(32, 32)
    with torch.no_grad():
        model.eval()
        a, b = model(x), model(x)
        model.train()
        c, d = model(x), model(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(c, d)  # coordinates rescaled by a random factor per block
    assert model.rope_embed.rescale == 2.0


def test_attention_map_intermediate_layers_and_local_crop_norm():
    hf, ours = _pair("7b")
    hf.set_attn_implementation("eager")
    x = pixels(32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_attentions=True, output_hidden_states=True)
        attn = ours.get_last_selfattention(x)
        ((patches, cls, storage),) = ours.get_intermediate_layers(
            x, n=1, return_class_token=True, return_extra_tokens=True
        )
    assert len(ref.attentions) == 2 and rel_diff(attn, ref.attentions[-1]) <= TOL
    assert attn.shape == (2, 2, 1 + 4 + 64, 1 + 4 + 64)
    final = ref.last_hidden_state
    assert rel_diff(patches, final[:, 5:]) <= TOL and rel_diff(cls, final[:, 0]) <= TOL
    assert rel_diff(storage, final[:, 1:5]) <= TOL
    # local_cls_norm is used only for local crops in training (the 7B's and satellite models' rule)
    ours.train()
    ours.rope_embed.rescale = None
    with torch.no_grad():
        global_ = ours.forward_features(x)["x_norm_clstoken"]
        local = ours.forward_features(x, local_crops=True)
    assert rel_diff(global_, final[:, 0]) <= TOL
    torch.testing.assert_close(local["x_norm_clstoken"], ours.local_cls_norm(local["x_prenorm"][:, 0]))
    assert rel_diff(local["x_norm_patchtokens"], final[:, 5:]) <= TOL


def test_registry_entries_carry_preprocessing_and_files():
    spec = get_spec("dinov3_vitl16")
    assert (spec.resolution, spec.patch_size, spec.embed_dim, spec.family) == (224, 16, 1024, "dinov3")
    assert spec.mean == (0.485, 0.456, 0.406) and spec.weights_file == "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"
    sat = get_spec("dinov3_vitl16_sat493m")
    assert sat.mean == (0.430, 0.411, 0.296) and sat.std == (0.213, 0.156, 0.143)
    assert sat.weights_file == "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"


def _dinov3_keys(depth: int, ffn: str, qkv_bias: bool, local_cls_norm: bool) -> set[str]:
    """The tensors of Meta's DINOv3 ViT files (e.g. dinov3_vits16_pretrain_lvd1689m-08c60483.pth: 188)."""
    keys = {"cls_token", "storage_tokens", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    keys |= {"rope_embed.periods", "norm.weight", "norm.bias"}
    if local_cls_norm:
        keys |= {"local_cls_norm.weight", "local_cls_norm.bias"}
    per_block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias"]
    per_block += ["ls1.gamma", "norm2.weight", "norm2.bias", "ls2.gamma"]
    if qkv_bias:
        per_block += ["attn.qkv.bias", "attn.qkv.bias_mask"]
    layers = ("fc1", "fc2") if ffn == "mlp" else ("w1", "w2", "w3")
    per_block += [f"mlp.{layer}.{kind}" for layer in layers for kind in ("weight", "bias")]
    return keys | {f"blocks.{i}.{k}" for i in range(depth) for k in per_block}


@pytest.mark.parametrize(
    "name, n_keys, params, hidden",
    [
        # file names: dinov3_<arch>_pretrain_lvd1689m-<hash>.pth; parameter counts of Meta's hub models
        ("dinov3_vits16", 188, 21_601_152, 1536),
        ("dinov3_vits16plus", 212, 28_697_472, 1536),
        ("dinov3_vitb16", 188, 85_669_632, 3072),
        ("dinov3_vitl16", 368, 303_154_176, 4096),
        ("dinov3_vitl16_sat493m", 370, 303_156_224, 4096),
        ("dinov3_vitl16plus", 416, 403_915_776, 4096),
        ("dinov3_vith16plus", 552, 840_633_600, 5120),
        ("dinov3_vit7b16", 610, 6_716_043_264, 8192),
    ],
)
def test_hub_key_layout_of_the_dinov3_vits(name, n_keys, params, hidden):
    spec = get_spec(name)
    with torch.device("meta"):
        model = build_backbone(name)
    sd = model.state_dict()
    a = spec.arch
    assert set(sd) == _dinov3_keys(a["depth"], a["ffn_layer"], a["qkv_bias"], a["local_cls_norm"])
    assert len(sd) == n_keys
    assert sum(p.numel() for p in model.parameters()) == params
    dim = spec.embed_dim
    assert sd["mask_token"].shape == (1, dim) and sd["storage_tokens"].shape == (1, 4, dim)
    assert sd["rope_embed.periods"].shape == (dim // a["num_heads"] // 4,)
    first = "blocks.0.mlp.fc1.weight" if a["ffn_layer"] == "mlp" else "blocks.0.mlp.w1.weight"
    assert sd[first].shape == (hidden, dim)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, dim, depth, heads",
    [("dinov3_vits16", 384, 12, 6), ("dinov3_vitb16", 768, 12, 12), ("dinov3_vitl16", 1024, 24, 16)],
)
def test_full_size_dinov3_vits_match_transformers(name, dim, depth, heads):
    cfg = dict(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=4 * dim)
    hf = _hf(patch_size=16, image_size=224, scale=0.05, **cfg)
    ours = build_backbone(name).eval()
    ours.load_state_dict(dinov3_hf_to_meta(hf), strict=True)
    _compare(ours, hf, pixels(224, 224, n=1))
    _compare(ours, hf, pixels(160, 320, n=1))


@pytest.mark.slow
def test_vit7b_at_reduced_depth_matches_transformers():
    """Full width (4096, 32 heads of 128, SwiGLU 8192 rounded to 64, no q/k/v bias), one block."""
    hf_cfg, _ = VARIANTS["7b"]
    cfg = dict(hf_cfg, hidden_size=4096, num_attention_heads=32, num_hidden_layers=1, intermediate_size=8192)
    hf = _hf(patch_size=16, image_size=224, scale=0.02, **cfg)
    ours = build_backbone("dinov3_vit7b16", depth=1).eval()
    ours.load_state_dict(dinov3_hf_to_meta(hf, local_cls_norm=True), strict=True)
    assert ours.rope_embed.periods.shape == (32,)
    _compare(ours, hf, pixels(224, 224, n=1))
    _compare(ours, hf, pixels(160, 240, n=1))
