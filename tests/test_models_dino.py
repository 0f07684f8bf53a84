"""DINO v1 ViTs against transformers' `ViTModel` (random weights written into DINO's hub layout).

DINO resamples its learned 14 x 14 (or 28 x 28) position grid with a bicubic scale factor of
(new + 0.1) / old; transformers resamples to the exact size. The non-square checks therefore
give transformers a model of that very input size whose position table is resampled by a
numpy implementation of DINO's rule (below), so that neither side shares lvd's code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers
from parity_support import TOL, pixels, randomise, rel_diff, vit_hf_to_dino

from lvd.pretrain.models import build_backbone, get_spec

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, patch_size=4)


def _hf_vit(image_size, seed=0, scale=0.2, **extra):
    # DINO's LayerNorm eps is 1e-6 (the hub's config.json says 1e-12, transformers' default)
    cfg = transformers.ViTConfig(**{**TINY, **extra}, image_size=image_size, layer_norm_eps=1e-6, qkv_bias=True)
    torch.manual_seed(seed)
    return randomise(transformers.ViTModel(cfg, add_pooling_layer=False), seed=seed, scale=scale)


def _bicubic_weights(t: float, a: float = -0.75) -> np.ndarray:
    """Cubic-convolution weights of the 4 source samples around a point at fraction t (Keys, a=-0.75)."""

    def k(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    return np.array([k(t + 1), k(t), k(1 - t), k(2 - t)])


def _resample_axis(grid: np.ndarray, axis: int, n_out: int, scale: float) -> np.ndarray:
    """Bicubic resampling along one axis with a given scale factor (source = (i+0.5)/scale - 0.5, edges clamped)."""
    n_in = grid.shape[axis]
    rows = []
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        base = math.floor(src)
        w = _bicubic_weights(src - base)
        idx = np.clip(np.arange(base - 1, base + 3), 0, n_in - 1)
        rows.append(np.tensordot(w, np.take(grid, idx, axis=axis), axes=([0], [axis])))
    return np.moveaxis(np.stack(rows), 0, axis)


def dino_position_table(pos_embed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DINO v1's `interpolate_pos_encoding` for an h x w patch grid, in numpy (float64)."""
    pos = pos_embed.double().numpy()[0]
    side = int(round(math.sqrt(pos.shape[0] - 1)))
    grid = pos[1:].reshape(side, side, -1)
    grid = _resample_axis(grid, 0, h, (h + 0.1) / side)
    grid = _resample_axis(grid, 1, w, (w + 0.1) / side)
    return torch.from_numpy(np.concatenate([pos[:1], grid.reshape(h * w, -1)])[None]).float()


def _ours(hf, **overrides):
    model = build_backbone("dino_vit_tiny_p4", **overrides).eval()
    model.load_state_dict(vit_hf_to_dino(hf), strict=True)
    return model


def _compare(ours, hf, x, **hf_kwargs):
    with torch.no_grad():
        ref = hf(pixel_values=x, **hf_kwargs).last_hidden_state
        got = ours.forward_features(x)
    assert rel_diff(got["x_norm_clstoken"], ref[:, 0]) <= TOL
    assert rel_diff(got["x_norm_patchtokens"], ref[:, 1:]) <= TOL
    assert got["x_norm_regtokens"].shape == (len(x), 0, ref.shape[-1])
    return rel_diff(got["x_norm_patchtokens"], ref[:, 1:])


def test_dino_vit_matches_transformers_at_its_stored_grid():
    hf = _hf_vit(32)
    ours = _ours(hf)
    _compare(ours, hf, pixels(32, 32))
    # a square input with the stored number of patches keeps the stored grid: 34 px -> 8 x 8 patches
    _compare(ours, hf, pixels(34, 34)[..., :32, :32])


def test_dino_vit_resamples_positions_by_dinos_rule_at_a_non_square_size():
    hf = _hf_vit(32)
    ours = _ours(hf)
    h, w = 6, 10  # 24 x 40 pixels
    wide = _hf_vit((24, 40))
    sd = wide.state_dict()
    sd.update({k: v for k, v in hf.state_dict().items() if k != "embeddings.position_embeddings"})
    sd["embeddings.position_embeddings"] = dino_position_table(hf.embeddings.position_embeddings.detach(), h, w)
    wide.load_state_dict(sd)
    _compare(ours, wide, pixels(24, 40))
    # the exact-size rule (what transformers itself does when asked to interpolate) differs by
    # far more than the tolerance: the offset is what makes the rule DINO's
    exact = _ours(hf, interpolate_offset=0.0)
    with torch.no_grad():
        a = ours.forward_features(pixels(24, 40))["x_norm_patchtokens"]
        b = exact.forward_features(pixels(24, 40))["x_norm_patchtokens"]
    assert rel_diff(a, b) > 100 * TOL
    _compare(exact, hf, pixels(24, 40), interpolate_pos_encoding=True)


def test_sides_that_are_not_multiples_of_the_patch_are_cropped_bottom_right():
    hf = _hf_vit(32)
    ours = _ours(hf)
    x = pixels(27, 43)
    with torch.no_grad():
        full = ours.forward_features(x)
        cropped = ours.forward_features(x[..., :24, :40].contiguous())
    torch.testing.assert_close(full["x_norm_patchtokens"], cropped["x_norm_patchtokens"], rtol=0, atol=0)
    assert full["x_norm_patchtokens"].shape == (2, 6 * 10, 32)


def test_last_selfattention_and_intermediate_layers_match_transformers():
    hf = _hf_vit(32)
    hf.set_attn_implementation("eager")  # the kernel that returns attention weights
    ours = _ours(hf)
    x = pixels(32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_attentions=True, output_hidden_states=True)
        attn = ours.get_last_selfattention(x)
        (p1, c1), (p2, c2) = ours.get_intermediate_layers(x, n=2, return_class_token=True)
    assert rel_diff(attn, ref.attentions[-1]) <= TOL
    # DINO's get_intermediate_layers normalises each block output with the final norm
    normed = [hf.layernorm(h) for h in ref.hidden_states[-2:]]
    assert rel_diff(p1, normed[0][:, 1:]) <= TOL and rel_diff(c1, normed[0][:, 0]) <= TOL
    assert rel_diff(p2, normed[1][:, 1:]) <= TOL and rel_diff(c2, normed[1][:, 0]) <= TOL


def test_dino_vit_has_no_layerscale_registers_or_mask_token():
    model = build_backbone("dino_vits16")
    assert model.mask_token is None and model.registers is None
    assert not any(".ls1." in k or ".ls2." in k for k in model.state_dict())
    with pytest.raises(ValueError, match="no mask token"):
        model.forward_features(torch.zeros(1, 3, 32, 32), masks=torch.zeros(1, 4, dtype=torch.bool))
    spec = get_spec("dino_vits8")
    assert (spec.resolution, spec.patch_size, spec.embed_dim, spec.family) == (224, 8, 384, "dino")
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    assert spec.weights_file == "dino_deitsmall8_pretrain.pth"


def _dino_vit_keys(depth: int) -> set[str]:
    """The tensors of dino_deitsmall16_pretrain.pth (and the other DINO v1 ViT files): 4 + 12 per block + 2."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    per_block = [
        "norm1.weight",
        "norm1.bias",
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
    ]
    return keys | {f"blocks.{i}.{k}" for i in range(depth) for k in per_block}


@pytest.mark.parametrize(
    "name, dim, patch, grid, params",
    [
        # file: dino_deitsmall16_pretrain.pth, dino_deitsmall8_pretrain.pth, dino_vitbase16_pretrain.pth,
        # dino_vitbase8_pretrain.pth (parameter counts of the models DINO's hubconf builds)
        ("dino_vits16", 384, 16, 14, 21_665_664),
        ("dino_vits8", 384, 8, 28, 21_670_272),
        ("dino_vitb16", 768, 16, 14, 85_798_656),
        ("dino_vitb8", 768, 8, 28, 85_807_872),
    ],
)
def test_hub_key_layout_of_the_dino_vits(name, dim, patch, grid, params):
    with torch.device("meta"):
        model = build_backbone(name)
    sd = model.state_dict()
    assert set(sd) == _dino_vit_keys(12) and len(sd) == 150
    assert sd["pos_embed"].shape == (1, grid * grid + 1, dim)
    assert sd["patch_embed.proj.weight"].shape == (dim, 3, patch, patch)
    assert sd["blocks.11.attn.qkv.weight"].shape == (3 * dim, dim)
    assert sd["blocks.11.mlp.fc1.weight"].shape == (4 * dim, dim)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.slow
@pytest.mark.parametrize("size, dim, heads", [("s", 384, 6), ("b", 768, 12)])
def test_full_size_dino_vits_match_transformers(size, dim, heads):
    cfg = dict(hidden_size=dim, num_hidden_layers=12, num_attention_heads=heads, intermediate_size=4 * dim)
    # smaller perturbations at full width: with 0.2 the random 12-block net is so ill-conditioned
    # that float32 rounding alone moves its output by ~1e-4 (transformers against itself in float64)
    cfg.update(patch_size=16, scale=0.05)
    hf = _hf_vit(224, **cfg)
    ours = build_backbone(f"dino_vit{size}16").eval()
    ours.load_state_dict(vit_hf_to_dino(hf), strict=True)
    _compare(ours, hf, pixels(224, 224, n=1))
    wide = _hf_vit((160, 320), **cfg)
    sd = {k: v for k, v in hf.state_dict().items() if k != "embeddings.position_embeddings"}
    sd["embeddings.position_embeddings"] = dino_position_table(hf.embeddings.position_embeddings.detach(), 10, 20)
    wide.load_state_dict(sd)
    _compare(ours, wide, pixels(160, 320, n=1))
