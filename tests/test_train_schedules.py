"""Schedules and optimiser groups: warm-ups, cosine ends, layer-wise decay, frozen last layer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lvd.pretrain.train.param_groups import layer_id, param_groups
from lvd.pretrain.train.schedules import build_schedules, cosine_schedule, linear_warmup_constant


def test_cosine_schedule_closed_form():
    s = cosine_schedule(1.0, 0.1, total_iters=14, warmup_iters=4)
    np.testing.assert_allclose(s[:4], [0.0, 0.25, 0.5, 0.75])
    n = 10
    np.testing.assert_allclose(s[4:], [0.1 + 0.45 * (1 + math.cos(math.pi * i / n)) for i in range(n)])
    assert s[4] == 1.0 and len(s) == 14


def test_teacher_temperature_warmup():
    s = linear_warmup_constant(0.04, 0.07, total_iters=6, warmup_iters=4)
    np.testing.assert_allclose(s, [0.04, 0.05, 0.06, 0.07, 0.07, 0.07])


def test_build_schedules():
    optim = OmegaConf.create(
        dict(
            lr=0.004,
            scale_lr=True,
            min_lr=1e-6,
            warmup_epochs=1,
            weight_decay=0.04,
            weight_decay_end=0.4,
            momentum_teacher=0.992,
            final_momentum_teacher=1.0,
            teacher_temp=0.07,
            warmup_teacher_temp=0.04,
            warmup_teacher_temp_epochs=2,
            freeze_last_layer_epochs=1,
        )
    )
    s = build_schedules(optim, total_iters=50, iters_per_epoch=10, global_batch_size=256)
    assert s["lr"].max() == pytest.approx(0.004 * 256 / 1024)
    assert s["lr"][0] == 0.0 and s["lr"][10] == pytest.approx(0.001)
    assert (s["last_layer_lr"][:10] == 0).all() and (s["last_layer_lr"][10:] == s["lr"][10:]).all()
    assert s["wd"][0] == pytest.approx(0.04) and s["wd"][-1] == pytest.approx(0.4, rel=1e-2)
    assert s["momentum"][0] == pytest.approx(0.992) and s["momentum"][-1] == pytest.approx(1.0, abs=1e-4)
    assert np.all(np.diff(s["momentum"]) >= 0)
    assert s["teacher_temp"][0] == pytest.approx(0.04) and s["teacher_temp"][19:].min() == pytest.approx(0.07)


@pytest.mark.parametrize(
    ("rule", "lr", "batch", "expected"),
    [
        ("sqrt_wrt_1024", 0.004, 64, 0.001),  # DINOv2's base lr at a global batch of 64
        ("sqrt_wrt_1024", 0.004, 1024, 0.004),
        ("linear_wrt_256", 0.0005, 1024, 0.002),  # DINO v1's ViT lr (0.0005 per 256 images)
        ("linear_wrt_1024", 0.004, 256, 0.001),
        ("none", 0.004, 64, 0.004),
    ],
)
def test_lr_scaling_rules(rule, lr, batch, expected):
    optim = OmegaConf.create(
        dict(
            lr=lr,
            scaling_rule=rule,
            scale_lr=None,
            min_lr=0.0,
            warmup_epochs=0,
            weight_decay=0.04,
            weight_decay_end=0.04,
            momentum_teacher=0.99,
            final_momentum_teacher=0.99,
            teacher_temp=0.04,
            warmup_teacher_temp=0.04,
            warmup_teacher_temp_epochs=0,
            freeze_last_layer_epochs=0,
        )
    )
    assert build_schedules(optim, 10, 10, batch)["lr"][0] == pytest.approx(expected)


def test_a_config_with_the_older_scale_lr_keeps_its_meaning():
    from lvd.pretrain.train.config import load_config

    on = load_config(overrides=["optim.scale_lr=true", "optim.scaling_rule=sqrt_wrt_1024"])
    off = load_config(overrides=["optim.scale_lr=false"])
    s_on = build_schedules(on.optim, 100, 1, 256)
    s_off = build_schedules(off.optim, 100, 1, 256)
    assert s_on["lr"].max() == pytest.approx(0.004 * 256 / 1024) and s_off["lr"].max() == pytest.approx(0.004)


def test_an_unknown_scaling_rule_is_a_config_error():
    from lvd.common.config import ConfigError
    from lvd.pretrain.train.config import load_config

    with pytest.raises(ConfigError, match="scaling_rule"):
        load_config(overrides=["optim.scaling_rule=sqrt"])


class _Tiny(nn.Module):
    """Parameter names in the DINOv2 hub layout."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        bb = self.backbone
        bb.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        bb.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        bb.patch_embed = nn.Module()
        bb.patch_embed.proj = nn.Conv2d(3, 4, 2, 2)
        bb.blocks = nn.ModuleList([nn.Module() for _ in range(3)])
        for b in bb.blocks:
            b.norm1 = nn.LayerNorm(4)
            b.mlp = nn.Linear(4, 4)
        bb.norm = nn.LayerNorm(4)
        self.dino_head = nn.Module()
        self.dino_head.mlp = nn.Linear(4, 4)
        self.dino_head.last_layer = nn.Linear(4, 8, bias=False)


def test_layer_ids_follow_the_hub_names():
    assert layer_id("backbone.cls_token", 12) == 0
    assert layer_id("backbone.patch_embed.proj.weight", 12) == 0
    assert layer_id("backbone.blocks.0.attn.qkv.weight", 12) == 1
    assert layer_id("backbone.blocks.11.mlp.fc2.bias", 12) == 12
    assert layer_id("backbone.norm.weight", 12) == 13
    assert layer_id("dino_head.mlp.0.weight", 12) == 13


def test_param_groups_multipliers():
    model = _Tiny()
    groups = param_groups(model, n_blocks=3, layer_decay=0.5, patch_embed_lr_mult=0.2)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    g = lambda n: by_param[id(named[n])]  # noqa: E731
    assert g("backbone.blocks.2.mlp.weight")["lr_multiplier"] == 0.5
    assert g("backbone.blocks.0.mlp.weight")["lr_multiplier"] == 0.125
    assert g("backbone.cls_token")["lr_multiplier"] == 0.0625
    assert g("backbone.patch_embed.proj.weight")["lr_multiplier"] == pytest.approx(0.0625 * 0.2)
    assert g("dino_head.mlp.weight")["lr_multiplier"] == 1.0
    assert g("backbone.blocks.1.mlp.bias")["wd_multiplier"] == 0.0
    assert g("backbone.blocks.1.norm1.weight")["wd_multiplier"] == 0.0
    assert g("backbone.blocks.1.mlp.weight")["wd_multiplier"] == 1.0
    assert g("dino_head.last_layer.weight")["is_last_layer"]
    assert not g("dino_head.mlp.weight")["is_last_layer"]
    assert sum(len(x["params"]) for x in groups) == len(named)


@pytest.mark.parametrize("frozen", [False, True])
def test_the_prototype_gain_is_grouped_as_dinov2_groups_it(frozen):
    # dinov2: every `last_layer` parameter is a last-layer one (lr 0 in the first epochs), head
    # parameters get lr multiplier 1 whatever the layer decay, and the gain (named neither bias,
    # norm nor gamma) is decayed. A frozen gain is in no group at all.
    from lvd.pretrain.train.heads import DINOHead

    model = _Tiny()
    model.dino_head = DINOHead(4, out_dim=8, hidden_dim=6, bottleneck_dim=3, nlayers=2, norm_last_layer=frozen)
    groups = param_groups(model, n_blocks=3, layer_decay=0.5, patch_embed_lr_mult=0.2)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    gain, protos = named["dino_head.last_layer.weight_g"], named["dino_head.last_layer.weight_v"]
    assert by_param[id(protos)]["is_last_layer"] and by_param[id(protos)]["lr_multiplier"] == 1.0
    if frozen:
        assert id(gain) not in by_param
    else:
        g = by_param[id(gain)]
        assert g["is_last_layer"] and g["lr_multiplier"] == 1.0 and g["wd_multiplier"] == 1.0
    assert not by_param[id(named["dino_head.mlp.0.weight"])]["is_last_layer"]
