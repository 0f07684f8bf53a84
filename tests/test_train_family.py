"""The trainer with the other DINO backbones: DINO's ResNet-50 recipe (mode dino, SGD, its crop
scales, a BatchNorm teacher in training mode) and ViTs of DINO v1 and DINOv3 initialised from
their weights files."""

from __future__ import annotations

import pytest
import torch
from test_train import one_thread, shards, tiny_config  # noqa: F401 (fixtures)

from lvd.common.config import ConfigError
from lvd.pretrain.models import build_backbone
from lvd.pretrain.train import load_checkpoint, run_pretrain
from lvd.pretrain.train.checkpoint import list_checkpoints
from lvd.pretrain.train.metrics import read_metrics

RESNET = {
    "mode": "dino",
    "model.arch": "dino_resnet_mini",
    "optim.optimizer": "sgd",
    "optim.lr": 0.03,
    "optim.scaling_rule": "linear_wrt_256",
    "optim.weight_decay": 1e-4,
    "optim.weight_decay_end": 1e-4,
    "optim.layerwise_decay": 1.0,
    "optim.epochs": 1,
    "crops.global_size": 64,
    "crops.local_size": 32,
    "crops.global_scale": "[0.14,1.0]",
    "crops.local_scale": "[0.05,0.14]",
    "data.image_size": 72,
}


def test_resnet_trains_with_dinos_recipe(tmp_path, shards):  # noqa: F811
    out = run_pretrain(tiny_config(tmp_path, shards, **RESNET))
    rows = read_metrics(out / "metrics.jsonl")
    assert set(rows[-1]) >= {"dino", "total"} and "ibot" not in rows[-1] and "koleo" not in rows[-1]
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in rows)
    ckpt = load_checkpoint(list_checkpoints(out / "checkpoints")[-1][1])
    assert ckpt["arch"] == {"name": "dino_resnet_mini", "overrides": {}}
    assert all("momentum_buffer" in s for s in ckpt["optimizer"]["state"].values())  # SGD's state
    assert ckpt["config"]["crops"]["global_scale"] == [0.14, 1.0]
    # the teacher ran in training mode: its BatchNorm statistics follow its own batches
    teacher = ckpt["teacher_backbone"]
    assert int(teacher["bn1.num_batches_tracked"]) == 3 and teacher["bn1.running_mean"].abs().sum() > 0
    student = ckpt["student"]
    assert not torch.equal(student["backbone.bn1.running_mean"], teacher["bn1.running_mean"])
    # the export describes itself
    model = build_backbone("auto", out / "teacher_backbone.safetensors").eval()  # records dino / resnet
    assert model.arch_name == "dino_resnet_mini" and model(torch.zeros(1, 3, 64, 64)).shape == (1, 256)


def test_convnets_need_mode_dino_and_resnets_ddp(tmp_path, shards):  # noqa: F811
    with pytest.raises(ConfigError, match="ConvNet: it has no patch tokens to mask"):
        tiny_config(tmp_path, shards, **{**RESNET, "mode": "dinov2"})
    with pytest.raises(ConfigError, match="BatchNorm, which FSDP does not shard"):
        tiny_config(tmp_path, shards, **{**RESNET, "train.parallel": "fsdp"})
    with pytest.raises(ConfigError, match="optim.optimizer"):
        tiny_config(tmp_path, shards, **{"optim.optimizer": "lamb"})


@pytest.mark.parametrize("arch", ["dino_vit_tiny_p4", "dinov3_vit_tiny_p4"])
def test_vits_of_dino_and_dinov3_train_from_their_weights(tmp_path, shards, arch):  # noqa: F811
    torch.manual_seed(0)
    start = build_backbone(arch)
    with torch.no_grad():
        for p in start.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    torch.save(start.state_dict(), tmp_path / "start.pth")
    cfg = tiny_config(tmp_path, shards, **{"model.arch": arch, "model.weights": str(tmp_path / "start.pth")})
    out = run_pretrain(cfg)
    rows = read_metrics(out / "metrics.jsonl")
    assert {"dino", "ibot", "koleo"} <= set(rows[-1])  # masked-patch training (mode dinov2)
    ckpt = load_checkpoint(list_checkpoints(out / "checkpoints")[-1][1])
    # DINO v1 has no mask token in its files: the student gains one, recorded for the export
    assert ckpt["arch"]["overrides"] == ({"mask_token": True} if arch.startswith("dino_") else {})
    model = build_backbone("auto", out / "teacher_backbone.safetensors").eval()
    assert model.arch_name == arch and model.mask_token is not None
