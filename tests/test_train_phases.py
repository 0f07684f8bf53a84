"""Training phases: the plan a config gives, a second phase at a larger crop (position
embeddings resampled, RoPE as it is), exact resume at the boundary and inside the second phase
(a SIGKILL included), and the resolution the export records."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from test_train import one_thread, shards, tiny_config  # noqa: F401 (fixtures)

from lvd.common.config import ConfigError
from lvd.pretrain.models import build_backbone
from lvd.pretrain.train import load_checkpoint, run_pretrain
from lvd.pretrain.train.checkpoint import export_resolution, list_checkpoints
from lvd.pretrain.train.metrics import read_metrics
from lvd.pretrain.train.phases import phase_at, plan_phases

# First phase: 3 epochs x 2 iterations at 32 px; then 4 iterations at 48 px (decoded at 56 px),
# its warm-up compressed to epochs of 1 iteration, the student restarted from the EMA teacher.
HIGH_RES = (
    "[{name: high_res, iterations: 4, crops: {global_size: 48, local_size: 24}, data: {image_size: 56},"
    " optim: {lr: 0.02, iters_per_epoch: 1, warmup_epochs: 1, momentum_teacher: 0.9}}]"
)
PHASED = {
    "optim.epochs": 3,
    "optim.iters_per_epoch": 2,
    "phases": HIGH_RES,
    "data.num_workers": 1,
    "train.checkpoint_every": 1,
    "train.keep_checkpoints": 20,
}


def _rows(run_dir):
    return [
        {k: v for k, v in r.items() if k != "images_per_s"}
        for r in read_metrics(run_dir / "pretrain" / "metrics.jsonl")
    ]


def test_the_plan_of_phases(tmp_path):
    cfg = tiny_config(tmp_path, "unused", **PHASED)
    main, high = plan_phases(cfg)
    assert (main.name, main.start, main.stop, main.init, main.global_size) == ("main", 0, 6, "weights", 32)
    assert (high.name, high.start, high.stop, high.init, high.global_size) == ("high_res", 6, 10, "from_ema", 48)
    assert high.cfg.crops.local_size == 24 and high.cfg.crops.n_local == main.cfg.crops.n_local  # inherited
    assert high.cfg.optim.lr == 0.02 and high.cfg.optim.weight_decay == main.cfg.optim.weight_decay
    assert high.cfg.data.image_size == 56 and main.cfg.data.image_size == 40
    assert [phase_at([main, high], i).name for i in (0, 5, 6, 9, 10)] == ["main"] * 2 + ["high_res"] * 3
    assert len(plan_phases(tiny_config(tmp_path, "unused"))) == 1  # the default: one phase, as ever


@pytest.mark.parametrize(
    ("phases", "message"),
    [
        ("[{crops: {global_size: 48}}]", "iterations must be a positive integer"),
        ("[{iterations: 2, optim: {epochs: 5}}]", "a phase's length is its `iterations`"),
        ("[{iterations: 2, model: {arch: vit_tiny_p4}}]", "the other settings hold for the whole run"),
        ("[{iterations: 2, init: scratch}]", "init must be one of"),
        ("[{iterations: 2, crops: {global_size: -1}}]", "crops.global_size"),
        ("[{iterations: 2, optim: {warmup_epochs: 3}}]", "more than the phase's 2"),
        ("[{iterations: 2, loss: {ibot_weight: 0}}]", "loss.ibot_weight cannot change in a phase"),
    ],
)
def test_a_phase_that_does_not_fit_is_a_config_error(tmp_path, phases, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, "unused", phases=phases)


def test_a_phase_crop_off_the_patch_grid_is_refused(tmp_path, shards):  # noqa: F811
    with pytest.raises(ConfigError, match="phase p2: crop size 50 is not a multiple of the patch size 4"):
        run_pretrain(tiny_config(tmp_path, shards, phases="[{name: p2, iterations: 3, crops: {global_size: 50}}]"))


@pytest.fixture(scope="module")
def phased_reference(tmp_path_factory, shards):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("phased")
    run_pretrain(tiny_config(run_dir, shards, **PHASED))
    return run_dir


def test_the_second_phase_trains_at_its_own_size_from_the_ema_teacher(phased_reference):
    out = phased_reference / "pretrain"
    rows = _rows(phased_reference)
    assert [r["phase"] for r in rows] == [0] * 6 + [1] * 4
    # the phase replays its schedules: a 1-iteration warm-up to its own lr (DINOv2's sqrt(batch 4 / 1024))
    assert rows[6]["lr"] == 0.0 and rows[7]["lr"] == pytest.approx(0.02 * (4 / 1024) ** 0.5)
    assert rows[6]["momentum"] == pytest.approx(0.9) and rows[5]["momentum"] > 0.99
    ck = {i: load_checkpoint(p) for i, p in list_checkpoints(out / "checkpoints")}
    assert [ck[i]["resolution"] for i in (6, 7)] == [32, 48] and [ck[i]["phase"] for i in (6, 7)] == [0, 1]
    # from_ema: a fresh optimiser at the boundary (AdamW counts its steps anew)
    steps = lambda c: {int(s["step"]) for s in c["optimizer"]["state"].values()}  # noqa: E731
    assert steps(ck[6]) == {6} and steps(ck[7]) == {1}
    # the stored position grid keeps its 8 x 8 cells; 48 px crops use it resampled to 12 x 12
    assert ck[10]["teacher_backbone"]["pos_embed"].shape == ck[1]["teacher_backbone"]["pos_embed"].shape
    assert export_resolution(out / "teacher_backbone.safetensors") == 48
    model = build_backbone("auto", out / "teacher_backbone.safetensors").eval()
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 32)
    import json

    info = json.loads((out / "_SUCCESS.json").read_text())
    assert info["resolution"] == 48 and [p["global_size"] for p in info["phases"]] == [32, 48]


@pytest.mark.slow
def test_resume_at_the_phase_boundary_equals_the_uninterrupted_run(tmp_path, shards, phased_reference):  # noqa: F811
    run_pretrain(tiny_config(tmp_path, shards, **PHASED, **{"train.stop_after": 6}))
    assert load_checkpoint(list_checkpoints(tmp_path / "pretrain" / "checkpoints")[-1][1])["phase"] == 0
    run_pretrain(tiny_config(tmp_path, shards, **PHASED))
    _assert_same_run(tmp_path, phased_reference)


@pytest.mark.slow
def test_a_run_killed_inside_the_second_phase_resumes_to_the_same_numbers(tmp_path, shards, phased_reference):  # noqa: F811
    script = textwrap.dedent(f"""
        import sys, time
        import torch
        torch.set_num_threads(1)
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import test_train, test_train_phases
        from lvd.pretrain.train import trainer
        step = trainer.Pretrainer.step
        def slow_step(self, it, images):
            if it >= 7:
                time.sleep(0.5)  # leave the test time to kill us inside the second phase
            return step(self, it, images)
        trainer.Pretrainer.step = slow_step
        trainer.run_pretrain(test_train.tiny_config({str(tmp_path)!r}, {shards!r}, **test_train_phases.PHASED))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    ckpts = tmp_path / "pretrain" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any(i >= 8 for i, _ in list_checkpoints(ckpts)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 8 <= list_checkpoints(ckpts)[-1][0] < 10
    run_pretrain(tiny_config(tmp_path, shards, **PHASED))
    _assert_same_run(tmp_path, phased_reference)


def _assert_same_run(run_dir, reference):
    assert _rows(run_dir) == _rows(reference)  # float32 numbers, compared exactly
    a = torch.load(reference / "pretrain" / "teacher_backbone.pth", weights_only=True)
    b = torch.load(run_dir / "pretrain" / "teacher_backbone.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ["dino_vit_tiny_p4", "dinov3_vit_tiny_p4"])
def test_dino_v1_and_rope_backbones_change_resolution_between_phases(tmp_path, shards, arch):  # noqa: F811
    """DINO v1 resamples its learned positions with its own offset; DINOv3's RoPE needs nothing."""
    over = {"model.arch": arch, "optim.epochs": 1, "optim.iters_per_epoch": 1, "optim.warmup_epochs": 0}
    phases = "[{iterations: 1, crops: {global_size: 48}, data: {image_size: 56}}]"
    out = run_pretrain(tiny_config(tmp_path, shards, **over, phases=phases))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["phase"] for r in rows] == [0, 1] and all(r["total"] == r["total"] for r in rows)
    model = build_backbone("auto", out / "teacher_backbone.safetensors").eval()
    assert model.arch_name == arch and export_resolution(out / "teacher_backbone.safetensors") == 48


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("demo_pretrain", []),
        ("demo_distill", ["distill.teacher=any.pth"]),
        ("demo_video", []),
        ("lvd142m_pretrain", []),
    ],
)
def test_packaged_training_configs_load(name, overrides):
    from lvd.common.config import packaged_config_path
    from lvd.pretrain.train.config import load_config

    assert plan_phases(load_config(packaged_config_path(name), overrides))


def test_the_lvd142m_recipe_ends_with_dinov2s_518_px_phase_its_schedules_compressed():
    from lvd.common.config import packaged_config_path
    from lvd.pretrain.train.config import load_config
    from lvd.pretrain.train.schedules import build_schedules

    main, high = plan_phases(load_config(packaged_config_path("lvd142m_pretrain")))
    assert (main.iterations, main.global_size, high.iterations, high.global_size) == (625_000, 224, 10_000, 518)
    assert high.init == "from_ema" and high.cfg.crops.local_size == 98 and high.cfg.crops.n_local == 8
    assert 518 % 14 == 0 and high.cfg.data.image_size == 592
    s = build_schedules(high.cfg.optim, high.iterations, high.cfg.optim.iters_per_epoch, 3072)
    # warm-up 80 epochs of 20; 0.25 x 2e-4 at 1024 images is 8.66e-5 at 3072 by DINOv2's sqrt rule
    assert s["lr"].argmax() == 1600 and s["lr"].max() == pytest.approx(8.66e-5, rel=1e-3)
    assert (s["teacher_temp"] < 0.07).sum() == 599 and s["last_layer_lr"][:20].max() == 0.0
    assert s["wd"][0] == pytest.approx(0.04) and s["momentum"][0] == pytest.approx(0.994)
