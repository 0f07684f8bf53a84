"""Weight formats of the DINO v1 and DINOv3 backbones, read by lvd's own loaders and compared
with transformers' outputs: Hugging Face folders, files under Meta's release names, DINO's
training checkpoints, lvd's exports, and strict loading's messages."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import transformers
from parity_support import TOL, pixels, randomise, rel_diff

from lvd.pretrain.models import WeightsError, build_backbone, get_spec, list_models
from lvd.pretrain.models.build import model_name
from lvd.pretrain.models.registry import all_specs
from lvd.pretrain.models.weights import load_weights, weights_arch_name
from lvd.pretrain.train.checkpoint import export_backbone


def _vit_hf(eps=1e-6, pooler=False):
    cfg = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        patch_size=4,
        image_size=32,
        layer_norm_eps=eps,
    )
    torch.manual_seed(0)
    return randomise(transformers.ViTModel(cfg, add_pooling_layer=pooler))


def _dinov3_hf(**extra):
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=32)
    cfg.update({"intermediate_size": 128, "num_register_tokens": 4, **extra})
    torch.manual_seed(0)
    return randomise(transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**cfg)))


def _check_tokens(ours, hf, x, prefix: int, **hf_kwargs):
    with torch.no_grad():
        ref = hf(pixel_values=x, **hf_kwargs).last_hidden_state
        got = ours.forward_features(x)
    assert rel_diff(got["x_norm_clstoken"], ref[:, 0]) <= TOL
    assert rel_diff(got["x_norm_patchtokens"], ref[:, prefix:]) <= TOL


def test_dino_vit_transformers_folder_loads_named_and_auto(tmp_path):
    hf = _vit_hf(pooler=True)  # a pooler is not part of DINO's backbone: it is left out
    hf.save_pretrained(tmp_path)
    for name in ("dino_vit_tiny_p4", "auto"):
        ours = build_backbone(name, tmp_path).eval()
        assert ours.arch_name == "dino_vit_tiny_p4"
        _check_tokens(ours, hf, pixels(32, 32), 1)
        # transformers resamples to the exact grid; lvd does the same for a transformers folder
        _check_tokens(ours, hf, pixels(24, 40), 1, interpolate_pos_encoding=True)
    assert model_name("auto", tmp_path) == "dino_vit_tiny_p4"
    # in-memory names of transformers >= 5 (layers.{i}.attention.q_proj, mlp.fc1), as torch.save stores them
    torch.save(hf.state_dict(), tmp_path / "in_memory.pth")
    _check_tokens(build_backbone("dino_vit_tiny_p4", tmp_path / "in_memory.pth").eval(), hf, pixels(32, 32), 1)


def test_dino_vit_folder_whose_config_says_eps_1e12_is_read_with_dinos_1e6(tmp_path):
    hf = _vit_hf(eps=1e-6)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["layer_norm_eps"] = 1e-12  # what the facebook/dino-* folders say
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = build_backbone("auto", tmp_path).eval()
    assert all(m.eps == 1e-6 for m in ours.modules() if isinstance(m, torch.nn.LayerNorm))
    _check_tokens(ours, hf, pixels(32, 32), 1)


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({}, "dinov3_vit_tiny_p4"),
        (dict(use_gated_mlp=True, hidden_act="silu", intermediate_size=88), "dinov3_vits16"),
        (dict(use_gated_mlp=True, hidden_act="silu", intermediate_size=64, query_bias=False, value_bias=False), None),
    ],
)
def test_dinov3_transformers_folder_loads_and_matches(tmp_path, extra, expected):
    hf = _dinov3_hf(**extra)
    hf.save_pretrained(tmp_path)
    ours = build_backbone("auto", tmp_path).eval()
    if expected:
        assert ours.arch_name == expected
    for side in ((32, 32), (24, 48), (34, 47)):
        _check_tokens(ours, hf, pixels(*side), 5)
    # the key bias is rebuilt as a masked zero, the periods from the config's RoPE base
    if extra.get("query_bias", True):
        assert torch.equal(ours.blocks[0].attn.qkv.bias_mask[32:64], torch.zeros(32))
    torch.testing.assert_close(ours.rope_embed.periods, 1.0 / hf.rope_embeddings.inv_freq.float())
    # the transformers >= 5 in-memory names (model.layer.{i}…), rebuilt with the same overrides
    torch.save(hf.state_dict(), tmp_path / "in_memory.pth")
    again = build_backbone(ours.arch_name, tmp_path / "in_memory.pth", **ours.arch_overrides).eval()
    _check_tokens(again, hf, pixels(32, 32), 5)


def test_dinov3_7b_transformers_folder_loads_under_the_registry_name(tmp_path):
    """transformers has no local-crop CLS norm; lvd builds the 7B without one from such a folder."""
    extra = dict(use_gated_mlp=True, hidden_act="silu", intermediate_size=64, query_bias=False, value_bias=False)
    hf = _dinov3_hf(**extra)
    hf.save_pretrained(tmp_path)
    overrides = dict(embed_dim=32, depth=2, num_heads=2, patch_size=4)
    ours = build_backbone("dinov3_vit7b16", tmp_path, **overrides).eval()
    assert ours.local_cls_norm is None and ours.blocks[0].attn.qkv.bias is None
    _check_tokens(ours, hf, pixels(32, 48), 5)


def test_dinov3_convnext_transformers_folder(tmp_path):
    cfg = transformers.DINOv3ConvNextConfig(depths=[1, 1, 2, 1], hidden_sizes=[16, 32, 48, 64])
    torch.manual_seed(0)
    hf = randomise(transformers.DINOv3ConvNextModel(cfg))
    hf.save_pretrained(tmp_path)
    ours = build_backbone("auto", tmp_path / "model.safetensors").eval()
    assert ours.arch_name == "dinov3_convnext_mini"
    assert torch.equal(ours.state_dict()["norms.3.weight"], ours.state_dict()["norm.weight"])
    for side in ((64, 64), (96, 160), (100, 130)):
        x = pixels(*side)
        with torch.no_grad():
            ref = hf(pixel_values=x).last_hidden_state
            got = ours.forward_features(x)
        assert rel_diff(got["x_norm_clstoken"], ref[:, 0]) <= TOL
        assert rel_diff(got["x_norm_patchtokens"], ref[:, 1:]) <= TOL


def test_release_file_names_pick_the_architecture(tmp_path):
    named = [s for s in all_specs() if s.weights_file]
    assert len(named) == 5 + 8 + 9 + 4  # DINO v1, DINOv2, DINOv3 ViTs, DINOv3 ConvNeXts
    for spec in named:
        path = tmp_path / spec.weights_file
        path.write_bytes(b"")  # the name alone answers; the content is not read
        assert weights_arch_name(path) == spec.name, spec.weights_file
    for alias, name in {
        "dinov3_vitl16_pretrain_lvd1689m.pth": "dinov3_vitl16",  # hash suffix dropped
        "dinov3_vit7b16_pretrain_sat493m-a6675841.pth": "dinov3_vit7b16_sat493m",
        "dino_vitbase8_pretrain_full_checkpoint.pth": "dino_vitb8",
    }.items():
        (tmp_path / alias).write_bytes(b"")
        assert weights_arch_name(tmp_path / alias) == name
    assert "dinov3_vitl16plus" in list_models() and get_spec("dinov3_vitl16plus").weights_file.endswith("46503df0.pth")


def test_dino_resnet50_release_file_loads_with_auto(tmp_path):
    """DINO's released file: torchvision's keys without fc (and without BatchNorm counters here)."""
    torch.manual_seed(0)
    source = randomise(build_backbone("dino_resnet50"), scale=0.02)
    sd = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "dino_resnet50_pretrain.pth"
    torch.save(sd, path)
    ours = build_backbone("auto", path).eval()
    assert ours.arch_name == "dino_resnet50"
    x = pixels(64, 96, n=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), source(x), rtol=0, atol=0)
    torch.save({**sd, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)}, tmp_path / "with_fc.pth")
    with pytest.raises(WeightsError, match="unexpected keys: fc.bias, fc.weight"):
        build_backbone("dino_resnet50", tmp_path / "with_fc.pth")


def test_dino_full_training_checkpoint_gives_the_teacher(tmp_path):
    torch.manual_seed(0)
    teacher = randomise(build_backbone("dino_vit_tiny_p4"))
    student = build_backbone("dino_vit_tiny_p4")
    ckpt = {
        "teacher": {
            **{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
            "head.last_layer.weight": torch.ones(3),
        },
        "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
        "optimizer": {},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=8, lr=0.0005, output_dir="/x"),
        "dino_loss": {"center": torch.zeros(1, 8)},
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    assert load_weights(path).format == "dino-checkpoint"
    assert weights_arch_name(path) == "dino_vits8"  # from the run's --arch and --patch_size
    ours = build_backbone("dino_vit_tiny_p4", path).eval()
    x = pixels(32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), teacher(x), rtol=0, atol=0)


def test_strict_loading_names_the_keys_of_dinov3_files(tmp_path):
    sd = build_backbone("dinov3_vit_tiny_p4").state_dict()
    broken = {k: v for k, v in sd.items() if k not in ("blocks.1.attn.qkv.bias_mask", "rope_embed.periods")}
    broken["blocks.0.mlp.w12.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(WeightsError) as err:
        build_backbone("dinov3_vit_tiny_p4", tmp_path / "broken.pth")
    message = str(err.value)
    assert "missing keys: blocks.1.attn.qkv.bias_mask, rope_embed.periods" in message
    assert "unexpected keys: blocks.0.mlp.w12.weight" in message


def test_satellite_files_bring_their_local_cls_norm(tmp_path, caplog):
    torch.manual_seed(0)
    sat = randomise(build_backbone("dinov3_vit_tiny_p4", local_cls_norm=True))
    torch.save(sat.state_dict(), tmp_path / "sat.pth")
    with caplog.at_level("WARNING"):
        ours = build_backbone("dinov3_vit_tiny_p4", tmp_path / "sat.pth").eval()
    assert ours.local_cls_norm is not None and "satellite" in caplog.text
    x = pixels(32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), sat(x), rtol=0, atol=0)


def test_a_dino_vit_can_gain_a_mask_token_for_masked_training(tmp_path):
    torch.manual_seed(0)
    torch.save(randomise(build_backbone("dino_vit_tiny_p4")).state_dict(), tmp_path / "dino.pth")
    model = build_backbone("dino_vit_tiny_p4", tmp_path / "dino.pth", mask_token=True)
    assert torch.equal(model.mask_token, torch.zeros(1, 32)) and model.arch_overrides == {"mask_token": True}
    # a family whose files hold a mask token gets no such allowance
    dinov2 = {k: v for k, v in build_backbone("vit_tiny_p4").state_dict().items() if k != "mask_token"}
    torch.save(dinov2, tmp_path / "dinov2.pth")
    with pytest.raises(WeightsError, match="missing keys: mask_token$"):
        build_backbone("vit_tiny_p4", tmp_path / "dinov2.pth")


@pytest.mark.parametrize("name", ["dino_vit_tiny_p4", "dinov3_vit_tiny_p4", "dinov3_convnext_mini", "dino_resnet_mini"])
def test_lvd_exports_describe_their_architecture(tmp_path, name):
    from safetensors import safe_open

    torch.manual_seed(0)
    source = randomise(build_backbone(name), scale=0.05)
    out = export_backbone(source.state_dict(), tmp_path / "backbone.safetensors", name, {})
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    spec = get_spec(name)
    assert (meta["lvd.arch"], meta["lvd.family"], meta["lvd.kind"]) == (name, spec.family, spec.kind)
    ours = build_backbone("auto", out).eval()
    x = pixels(64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.forward_features(x)["x_norm_patchtokens"], source.forward_features(x)["x_norm_patchtokens"]
        )
