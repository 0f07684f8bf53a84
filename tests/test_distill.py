"""mode: distill: a frozen teacher from a file (backbone and heads) gives the targets, the
student learns unmasked, the export is the student's EMA, resume is exact, and 2 ranks under
torchrun (DDP, and FSDP stopped and resumed) agree. Backbones without heads are refused, and
`model.freeze_backbone` fits heads on one so that it can teach."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from conftest import save_tiny_weights
from test_train import _torchrun, one_thread, shards, tiny_config  # noqa: F401 (fixtures)

from lvd.common.config import ConfigError
from lvd.common.errors import UserError
from lvd.pretrain.models import build_backbone
from lvd.pretrain.train import load_checkpoint, run_pretrain
from lvd.pretrain.train.checkpoint import list_checkpoints
from lvd.pretrain.train.distill import HeadlessTeacherError, head_shape, teacher_heads
from lvd.pretrain.train.metrics import read_metrics
from lvd.pretrain.train.ssl import MaskInfo, SSLModel, SSLObjective
from lvd.pretrain.train.trainer import Pretrainer, forward_losses

SMALL = {"model.overrides.embed_dim": 16, "model.overrides.depth": 1}  # the student: smaller than the teacher


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, shards):  # noqa: F811
    """A tiny ViT trained for 9 iterations: its last checkpoint holds backbone and both heads."""
    run = tmp_path_factory.mktemp("teacher")
    out = run_pretrain(tiny_config(run, shards))
    return list_checkpoints(out / "checkpoints")[-1][1]


def distill_config(run_dir, shards, teacher, **extra):  # noqa: F811
    return tiny_config(run_dir, shards, **{"mode": "distill", "distill.teacher": str(teacher), **SMALL, **extra})


def test_the_frozen_teacher_is_the_files_ema_model_with_its_heads_and_never_moves(tmp_path, shards, teacher_ckpt):  # noqa: F811
    trainer = Pretrainer(distill_config(tmp_path, shards, teacher_ckpt))
    saved = load_checkpoint(teacher_ckpt)["teacher"]  # the teacher run's EMA model: backbone + DINO + iBOT heads
    state = trainer.teacher.state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    assert not any(p.requires_grad for p in trainer.teacher.parameters()) and not trainer.teacher.training
    assert trainer.teacher is not trainer.ema and trainer.ema.backbone.embed_dim == 16
    trainer.run()
    assert all(torch.equal(trainer.teacher.state_dict()[k], saved[k]) for k in saved)
    out = tmp_path / "pretrain"
    rows = read_metrics(out / "metrics.jsonl")
    assert {"dino", "ibot", "koleo"} <= set(rows[-1]) and len(rows) == 9
    # the export is the student's EMA: the smaller architecture, the EMA model's backbone, not the student's
    ckpt = load_checkpoint(list_checkpoints(out / "checkpoints")[-1][1])
    exported = torch.load(out / "teacher_backbone.pth", weights_only=True)
    ema = {k[len("backbone.") :]: v for k, v in ckpt["teacher"].items() if k.startswith("backbone.")}
    assert exported["cls_token"].shape[-1] == 16 and all(torch.equal(exported[k], ema[k]) for k in ema)
    assert any(not torch.equal(ckpt["student"]["backbone." + k], v) for k, v in ema.items())
    info = json.loads((out / "_SUCCESS.json").read_text())
    assert info["mode"] == "distill" and info["exported"] == "the student's EMA"
    model = build_backbone("auto", out / "teacher_backbone.safetensors")
    assert model.embed_dim == 16 and len(model.blocks) == 1


def test_the_student_sees_its_global_crops_whole_and_learns_the_masked_positions():
    torch.manual_seed(0)
    head = dict(out_dim=32, hidden_dim=24, bottleneck_dim=8, nlayers=3)
    student = SSLModel(build_backbone("vit_tiny_p4", embed_dim=16, depth=1), head, head)
    teacher = SSLModel(build_backbone("vit_tiny_p4"), head, head).requires_grad_(False)
    seen = []
    inner = student.backbone.forward_features
    student.backbone.forward_features = lambda x, masks=None, **kw: seen.append(masks) or inner(x, masks=masks, **kw)
    masks = torch.zeros(4, 64, dtype=torch.bool)
    masks[0, :10] = masks[2, 5:30] = True
    mask = MaskInfo.from_masks(masks)
    g, loc = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16)
    losses = forward_losses(student, teacher, SSLObjective(32, 32), g, loc, mask, 0.05, None, mask_student=False)
    assert seen[0] is None  # global crops unmasked
    assert {"dino", "ibot", "koleo"} <= set(losses) and torch.isfinite(losses["total"])
    seen.clear()
    forward_losses(student, teacher, SSLObjective(32, 32), g, loc, mask, 0.05, None)  # self-distillation masks
    assert torch.equal(seen[0], masks)


@pytest.mark.slow
def test_distillation_resumes_exactly(tmp_path, shards, teacher_ckpt):  # noqa: F811
    extra = {"train.checkpoint_every": 1, "train.keep_checkpoints": 20, "distill.ibot_patches": "all"}
    run_pretrain(distill_config(tmp_path / "ref", shards, teacher_ckpt, **extra))
    run_pretrain(distill_config(tmp_path / "cut", shards, teacher_ckpt, **extra, **{"train.stop_after": 4}))
    run_pretrain(distill_config(tmp_path / "cut", shards, teacher_ckpt, **extra))
    rows = [
        [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_metrics(d / "pretrain" / "metrics.jsonl")]
        for d in (tmp_path / "ref", tmp_path / "cut")
    ]
    assert len(rows[0]) == 9 and rows[0] == rows[1]


def test_a_backbone_without_heads_is_refused_with_the_way_to_fit_them(tmp_path, shards):  # noqa: F811
    hub = save_tiny_weights("vit_tiny_p4", tmp_path / "vit_tiny_p4.pth")
    assert teacher_heads(hub) == {}
    cfg = distill_config(tmp_path, shards, hub, **{"distill.teacher_arch": "vit_tiny_p4"})
    with pytest.raises(HeadlessTeacherError, match="model.freeze_backbone=true") as info:
        Pretrainer(cfg)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="mode distill needs distill.teacher"):
        tiny_config(tmp_path, shards, mode="distill")


def test_prototypes_must_match_the_teachers(tmp_path, shards, teacher_ckpt):  # noqa: F811
    with pytest.raises(ConfigError, match="dino_head.prototypes must be the teacher's 32, not 64"):
        Pretrainer(distill_config(tmp_path, shards, teacher_ckpt, **{"dino_head.prototypes": 64}))


def test_freezing_the_backbone_fits_heads_that_make_a_hub_file_a_teacher(tmp_path, shards):  # noqa: F811
    hub = save_tiny_weights("vit_tiny_p4", tmp_path / "vit_tiny_p4.pth")
    frozen = {"model.weights": str(hub), "model.freeze_backbone": True, "optim.epochs": 1}
    out = run_pretrain(tiny_config(tmp_path / "heads", shards, **frozen))
    ckpt_path = list_checkpoints(out / "checkpoints")[-1][1]
    ckpt = load_checkpoint(ckpt_path)
    weights = torch.load(hub, weights_only=True)
    for part in ("student", "teacher"):  # the backbone is the file's, bit for bit; the heads trained
        assert all(torch.equal(ckpt[part]["backbone." + k], v) for k, v in weights.items())
    init = Pretrainer(tiny_config(tmp_path / "init", shards, **frozen)).student.state_dict()
    assert not torch.equal(ckpt["student"]["dino_head.mlp.0.weight"], init["dino_head.mlp.0.weight"])
    assert set(teacher_heads(ckpt_path)) == {"dino", "ibot"}
    run = run_pretrain(distill_config(tmp_path / "student", shards, ckpt_path, **{"optim.epochs": 1}))
    assert (run / "_SUCCESS.json").exists()


def test_a_dino_v1_training_checkpoint_teaches_with_its_dino_head(tmp_path, shards):  # noqa: F811
    """DINO v1's checkpoint.pth: `teacher` holds backbone. and head. (no iBOT head)."""
    torch.manual_seed(0)
    backbone = build_backbone("dino_vit_tiny_p4")
    head = SSLModel(backbone, dict(out_dim=32, hidden_dim=24, bottleneck_dim=8, nlayers=3), None).dino_head
    teacher = {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()}}
    teacher.update({f"head.{k}": v for k, v in head.state_dict().items()})
    ckpt = {"student": {}, "teacher": {f"module.{k}": v for k, v in teacher.items()}, "args": argparse.Namespace()}
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    heads = teacher_heads(path)
    assert set(heads) == {"dino"}
    assert head_shape(heads["dino"], "x") == {"out_dim": 32, "hidden_dim": 24, "bottleneck_dim": 8, "nlayers": 3}
    over = {"distill.teacher_arch": "dino_vit_tiny_p4", "model.arch": "dino_vit_tiny_p4", "optim.epochs": 1}
    with pytest.raises(ConfigError, match="no iBOT head"):
        Pretrainer(distill_config(tmp_path / "a", shards, path, **over))
    trainer = Pretrainer(distill_config(tmp_path / "b", shards, path, **over, **{"loss.ibot_weight": 0}))
    assert torch.equal(trainer.teacher.dino_head.last_layer.weight_v, head.last_layer.weight_v)
    assert trainer.teacher.ibot_head is None


_TORCHRUN_DISTILL = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
import test_distill, test_train
from lvd.pretrain.train import run_pretrain
# KoLeo off, as in test_train's torchrun test: rounding differences between DDP and FSDP show in it.
extra = dict(test_train.REF, **{{"optim.epochs": 1, "train.parallel": sys.argv[2], "loss.koleo_weight": 0,
                                 "loss.gram_weight": 1.0, "gram.start": 1}})
cfg = lambda **more: test_distill.distill_config(sys.argv[1], {shards!r}, {teacher!r}, **extra, **more)
if len(sys.argv) > 3:  # stop early, then resume in a new Pretrainer (same process group)
    run_pretrain(cfg(**{{"train.stop_after": int(sys.argv[3])}}))
run_pretrain(cfg())
"""


@pytest.mark.slow
def test_torchrun_distillation_with_gram_ddp_equals_fsdp_resumed(tmp_path, shards, teacher_ckpt):  # noqa: F811
    script = tmp_path / "distill.py"
    script.write_text(
        _TORCHRUN_DISTILL.format(tests=os.path.dirname(__file__), shards=shards, teacher=str(teacher_ckpt))
    )
    _torchrun(script, tmp_path / "ddp", "ddp")
    _torchrun(script, tmp_path / "fsdp", "fsdp", 2)
    ddp, fsdp = (read_metrics(tmp_path / d / "pretrain" / "metrics.jsonl") for d in ("ddp", "fsdp"))
    assert len(ddp) == len(fsdp) == 3 and "gram" in ddp[-1] and "ibot" in ddp[-1]
    for x, y in zip(ddp, fsdp):
        for k in x:
            if k != "images_per_s":
                assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), (k, x[k], y[k])
    ckpt = load_checkpoint(list_checkpoints(tmp_path / "fsdp" / "pretrain" / "checkpoints")[-1][1])
    assert ckpt["data"]["world_size"] == 2 and ckpt["gram"]["taken_at"] == 1
    a = torch.load(tmp_path / "ddp" / "pretrain" / "teacher_backbone.pth", weights_only=True)
    b = torch.load(tmp_path / "fsdp" / "pretrain" / "teacher_backbone.pth", weights_only=True)
    assert a["cls_token"].shape[-1] == 16
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-8, msg=k)
