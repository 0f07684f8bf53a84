"""The trainer end to end on CPU: exact resume after a kill, DINO v1 mode, 2 gloo ranks equal 1
rank, and the exported teacher reloading bit-exactly through build_backbone."""

from __future__ import annotations

import copy
import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds
from PIL import Image

from lvd.pretrain.models import build_backbone
from lvd.pretrain.train import export_teacher, load_checkpoint, run_pretrain
from lvd.pretrain.train.checkpoint import list_checkpoints
from lvd.pretrain.train.config import load_config
from lvd.pretrain.train.metrics import read_metrics
from lvd.pretrain.train.ssl import MaskInfo, SSLModel, SSLObjective
from lvd.pretrain.train.trainer import forward_losses

HEAD = dict(out_dim=32, hidden_dim=24, bottleneck_dim=8, nlayers=3)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three shards of small random-texture images (PNG and JPEG)."""
    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for s in range(3):
        with wds.TarWriter(str(folder / f"s-{s:06d}.tar")) as w:
            for i in range(10):
                arr = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
                buf = io.BytesIO()
                fmt = "PNG" if i % 2 else "JPEG"
                Image.fromarray(arr).save(buf, fmt)
                w.write({"__key__": f"{s}-{i}", "png" if i % 2 else "jpg": buf.getvalue()})
    return str(folder / "*.tar")


def tiny_config(run_dir, shards, **extra):
    over = {
        "run_dir": str(run_dir),
        "model.arch": "vit_tiny_p4",
        "model.drop_path_rate": 0.1,
        "data.shards": shards,
        "data.batch_size_per_rank": 4,
        "data.num_workers": 0,
        "data.image_size": 40,
        "data.shuffle_buffer": 8,
        "data.shards_per_cycle": 2,
        "crops.global_size": 32,
        "crops.local_size": 16,
        "crops.n_local": 2,
        "dino_head.prototypes": 32,
        "dino_head.hidden_dim": 24,
        "dino_head.bottleneck_dim": 8,
        "ibot_head.prototypes": 32,
        "ibot_head.hidden_dim": 24,
        "ibot_head.bottleneck_dim": 8,
        "optim.epochs": 3,
        "optim.iters_per_epoch": 3,
        "optim.warmup_epochs": 1,
        "optim.warmup_teacher_temp_epochs": 1,
        "optim.freeze_last_layer_epochs": 1,
        "optim.lr": 0.05,
        "train.log_every": 1,
        "train.checkpoint_every": 4,
        "progress": False,
        "train.dtype": "float32",  # numbers compared across runs: never bf16, whatever the CPU
    }
    over.update(extra)
    return load_config(overrides=[f"{k}={v}" for k, v in over.items()])


def _losses(run_dir):
    rows = read_metrics(run_dir / "pretrain" / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]


# One uninterrupted reference run (9 iterations, a checkpoint after each, one loader worker)
# serves the resume, kill, last-layer and export tests.
REF = {"data.num_workers": 1, "train.checkpoint_every": 1, "train.keep_checkpoints": 20}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards):
    run_dir = tmp_path_factory.mktemp("reference")
    run_pretrain(tiny_config(run_dir, shards, **REF))
    return run_dir


@pytest.mark.slow
def test_stop_and_resume_reproduces_the_uninterrupted_run(tmp_path, shards, reference):
    run_pretrain(tiny_config(tmp_path, shards, **REF, **{"train.stop_after": 4}))
    assert not (tmp_path / "pretrain" / "_SUCCESS.json").exists()
    assert list_checkpoints(tmp_path / "pretrain" / "checkpoints")[-1][0] == 4
    run_pretrain(tiny_config(tmp_path, shards, **REF))
    a, b = _losses(reference), _losses(tmp_path)
    assert len(a) == 9 and a == b
    assert len({r["total"] for r in a}) > 1
    ta = torch.load(reference / "pretrain" / "teacher_backbone.pth", weights_only=True)
    tb = torch.load(tmp_path / "pretrain" / "teacher_backbone.pth", weights_only=True)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_losses(tmp_path, shards, reference):
    """SIGKILL a training process once a checkpoint exists, run again, compare with a clean run."""
    script = textwrap.dedent(f"""
        import sys, time
        import torch
        torch.set_num_threads(1)
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import test_train
        from lvd.pretrain.train import trainer
        step = trainer.Pretrainer.step
        def slow_step(self, it, images):
            time.sleep(0.5)  # leave the test time to kill us mid-run
            return step(self, it, images)
        trainer.Pretrainer.step = slow_step
        trainer.run_pretrain(test_train.tiny_config({str(tmp_path)!r}, {shards!r}, **test_train.REF))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    ckpts = tmp_path / "pretrain" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not list_checkpoints(ckpts) and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "pretrain" / "_SUCCESS.json").exists()
    assert 1 <= list_checkpoints(ckpts)[-1][0] < 9
    run_pretrain(tiny_config(tmp_path, shards, **REF))
    assert _losses(tmp_path) == _losses(reference)


def test_dino_v1_mode(tmp_path, shards):
    out = run_pretrain(tiny_config(tmp_path, shards, **{"mode": "dino", "optim.epochs": 1}))
    rows = read_metrics(out / "metrics.jsonl")
    assert set(rows[0]) >= {"dino", "total"} and "ibot" not in rows[0] and "koleo" not in rows[0]
    ckpt = load_checkpoint(list_checkpoints(out / "checkpoints")[-1][1])
    assert not any(k.startswith("ibot_head") for k in ckpt["student"])
    assert ckpt["config"]["mode"] == "dino"


def test_last_layer_frozen_in_the_first_epoch(reference):
    ck = {i: load_checkpoint(p)["student"] for i, p in list_checkpoints(reference / "pretrain" / "checkpoints")}
    for key in (
        "dino_head.last_layer.weight_v",
        "ibot_head.last_layer.weight_v",
        "dino_head.last_layer.weight_g",
        "ibot_head.last_layer.weight_g",
    ):  # the gains train too
        assert torch.equal(ck[1][key], ck[3][key])  # frozen through epoch 0 (iterations 0-2)
        assert not torch.equal(ck[3][key], ck[5][key])  # trained afterwards
    assert not torch.equal(ck[1]["dino_head.mlp.0.weight"], ck[3]["dino_head.mlp.0.weight"])


def test_exported_teacher_reloads_bit_exactly(tmp_path, reference):
    out = reference / "pretrain"
    ckpt_path = list_checkpoints(out / "checkpoints")[-1][1]
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["arch"] == {"name": "vit_tiny_p4", "overrides": {}}
    exported = export_teacher(ckpt_path, tmp_path / "teacher.pth")
    model = build_backbone("vit_tiny_p4", weights=str(exported))
    sd = model.state_dict()
    assert set(sd) == set(ckpt["teacher_backbone"])
    for k, v in sd.items():
        assert torch.equal(v, ckpt["teacher_backbone"][k]), k
    # the student moved away from the teacher: we did export the teacher, not the student
    assert any(not torch.equal(ckpt["student"]["backbone." + k], v) for k, v in ckpt["teacher_backbone"].items())
    final = torch.load(out / "teacher_backbone.pth", weights_only=True)
    assert all(torch.equal(final[k], v) for k, v in sd.items())
    x = torch.randn(2, 3, 32, 32)
    ref = build_backbone("vit_tiny_p4")
    ref.load_state_dict(ckpt["teacher_backbone"])
    assert torch.equal(model.eval()(x), ref.eval()(x))


# -- 2 gloo ranks against 1 rank ------------------------------------------------------------


def _batch(seed=0, b=4):
    g = torch.Generator().manual_seed(seed)
    global_crops = torch.randn(2 * b, 3, 32, 32, generator=g)
    local_crops = torch.randn(2 * b, 3, 16, 16, generator=g)  # 2 local views
    masks = torch.rand(2 * b, 64, generator=g) < 0.3
    masks[1] = False  # an image without masked patches
    return global_crops, local_crops, masks


def _rows(x, n_views, rank, world):
    """This rank's share of each view (views are stacked along dim 0)."""
    return torch.cat([v.chunk(world)[rank] for v in x.chunk(n_views)])


def _models(centering):
    """KoLeo is off: like DINOv2 it looks for nearest neighbours within a rank's own batch,
    so it is deliberately not batch-split invariant. Everything else must be."""
    torch.manual_seed(0)
    student = SSLModel(build_backbone("vit_tiny_p4"), HEAD, HEAD)
    teacher = copy.deepcopy(student).requires_grad_(False)
    objective = SSLObjective(32, 32, centering=centering, koleo_weight=0.0)
    return student, teacher, objective


def _step(student, teacher, objective, global_crops, local_crops, masks):
    losses = forward_losses(
        student, teacher, objective, global_crops, local_crops, MaskInfo.from_masks(masks), 0.05, None
    )
    losses["total"].backward()
    return losses


CENTERINGS = ("sinkhorn_knopp", "softmax")


def _rank_worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)  # first: a forked child must not use the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for centering in CENTERINGS:
        student, teacher, objective = _models(centering)
        ddp = torch.nn.parallel.DistributedDataParallel(student)
        g, l, m = _batch()
        losses = _step(
            ddp, teacher, objective, _rows(g, 2, rank, world), _rows(l, 2, rank, world), _rows(m, 2, rank, world)
        )
        grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
        torch.save(
            {"grads": grads, "centers": objective.state_dict(), "losses": {k: v.detach() for k, v in losses.items()}},
            os.path.join(out_dir, f"{centering}-rank{rank}.pt"),
        )
    dist.barrier()  # both ranks' results are saved
    # No destroy_process_group(): in this forked child it once deadlocked (its main thread, holding
    # the GIL, joined a gloo run-loop thread that waited for the GIL); the child exits with os._exit,
    # which ends those threads.


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gloo")
    # fork: a spawned child would spend seconds importing torch and this module again
    mp.start_processes(_rank_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True, start_method="fork")
    return out


@pytest.mark.parametrize("centering", CENTERINGS)
def test_two_gloo_ranks_equal_one_rank_gradients(two_rank_results, centering):
    student, teacher, objective = _models(centering)
    losses = _step(student, teacher, objective, *_batch())
    ranks = [torch.load(two_rank_results / f"{centering}-rank{r}.pt", weights_only=True) for r in range(2)]
    ref = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert set(ranks[0]["grads"]) == set(ref) and len(ref) > 10
    for name, grad in ref.items():
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for key, val in objective.state_dict().items():
        torch.testing.assert_close(ranks[0]["centers"][key], val, rtol=1e-5, atol=1e-6)
    mean_loss = (ranks[0]["losses"]["total"] + ranks[1]["losses"]["total"]) / 2
    torch.testing.assert_close(mean_loss, losses["total"].detach(), rtol=1e-5, atol=1e-6)


# -- torchrun: DDP and FSDP ranks -----------------------------------------------------------

_TORCHRUN_SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
import test_train
from lvd.pretrain.train import run_pretrain
# No KoLeo here: it is -log of nearest-neighbour distances, and this tiny model's features are
# nearly identical, so rounding-level differences between DDP and FSDP (seen on an AVX-512 BF16
# CPU: 19.152 vs 18.984 at the resumed iteration) become visible in it and in the weights.
# KoLeo itself is checked against references in test_losses.py.
extra = dict(test_train.REF, **{{"optim.epochs": 1, "train.parallel": sys.argv[2], "loss.koleo_weight": 0}})
if len(sys.argv) > 3:  # stop early, then resume in a new Pretrainer (same process group)
    run_pretrain(test_train.tiny_config(sys.argv[1], {shards!r}, **extra, **{{"train.stop_after": int(sys.argv[3])}}))
    import pathlib
    assert not (pathlib.Path(sys.argv[1]) / "pretrain" / "_SUCCESS.json").exists()
run_pretrain(test_train.tiny_config(sys.argv[1], {shards!r}, **extra))
"""


def _torchrun(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_ddp_equals_fsdp_and_fsdp_resumes(tmp_path, shards):
    """Two ranks under torchrun: DDP, and FSDP stopped after 2 iterations then resumed, agree."""
    script = tmp_path / "train.py"
    script.write_text(_TORCHRUN_SCRIPT.format(tests=os.path.dirname(__file__), shards=shards))
    _torchrun(script, tmp_path / "ddp", "ddp")
    _torchrun(script, tmp_path / "fsdp", "fsdp", 2)  # stopped after 2 of 3 iterations, then resumed
    ddp, fsdp = _losses(tmp_path / "ddp"), _losses(tmp_path / "fsdp")
    assert len(ddp) == len(fsdp) == 3
    for x, y in zip(ddp, fsdp):
        assert x.keys() == y.keys() and "koleo" not in x
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-6), (k, x[k], y[k])
    ckpt = load_checkpoint(list_checkpoints(tmp_path / "ddp" / "pretrain" / "checkpoints")[-1][1])
    assert ckpt["data"]["world_size"] == 2 and len(ckpt["data"]["positions"]) == 2
    a = torch.load(tmp_path / "ddp" / "pretrain" / "teacher_backbone.pth", weights_only=True)
    b = torch.load(tmp_path / "fsdp" / "pretrain" / "teacher_backbone.pth", weights_only=True)
    assert a.keys() == b.keys()
    # DDP and FSDP run AdamW on plain vs sharded tensors: the same maths, and the weights agree
    # to rounding (about 1e-13 has been seen), not necessarily bit for bit.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-8, msg=k)


def test_a_self_describing_export_loads_with_model_auto_and_no_overrides(tmp_path):
    """An lvd checkpoint trained with architecture overrides, exported as .safetensors, needs none of them."""
    from lvd.pretrain.models.embedder import Embedder
    from lvd.pretrain.models.weights import WeightsError
    from lvd.pretrain.train.checkpoint import FORMAT, atomic_save

    torch.manual_seed(0)
    overrides = {"num_register_tokens": 2, "embed_dim": 48, "num_heads": 4}
    trained = build_backbone("vit_tiny_p4", **overrides)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ckpt = tmp_path / "iter-1.pth"
    atomic_save(
        {
            "format": FORMAT,
            "arch": {"name": "vit_tiny_p4", "overrides": overrides},
            "teacher_backbone": trained.state_dict(),
        },
        ckpt,
    )
    exported = export_teacher(ckpt, tmp_path / "teacher.safetensors")
    model = build_backbone("auto", weights=str(exported))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), trained.eval()(x))
    assert Embedder("auto", exported, dtype="float32").info()["model"] == "vit_tiny_p4"
    with pytest.raises(WeightsError, match="shape"):  # the plain hub-layout export needs the overrides spelled out
        build_backbone("vit_tiny_p4", weights=str(export_teacher(ckpt, tmp_path / "teacher.pth")))
    with pytest.raises(WeightsError, match="names its architecture"):
        build_backbone("auto", weights=str(tmp_path / "teacher.pth"))


@pytest.mark.parametrize("bf16_faster", [True, False])
def test_train_dtype_auto_takes_bf16_only_where_native_and_measured_faster(monkeypatch, tmp_path, bf16_faster):
    from lvd.common import calibration, devices
    from lvd.pretrain.train import trainer

    monkeypatch.setenv("LVD_CACHE_DIR", str(tmp_path / f"cache-{bf16_faster}"))
    ran = []

    def step(dtype):
        ran.append(dtype)

    fast = torch.bfloat16 if bf16_faster else torch.float32
    monkeypatch.setattr(
        calibration,
        "time_interleaved",
        lambda jobs, repeats: {n: (j(), 1.0 if ran[-1] is fast else 2.0)[1] for n, j in jobs.items()},
    )
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "has_native_bf16", lambda device: True)
    assert trainer.autocast_dtype("auto", cpu, step, {"arch": "t"}) is (torch.bfloat16 if bf16_faster else None)
    assert set(ran) == {torch.float32, torch.bfloat16}  # both were timed
    monkeypatch.setattr(devices, "has_native_bf16", lambda device: False)
    ran.clear()
    assert trainer.autocast_dtype("auto", cpu, step, {"arch": "t"}) is None and ran == []  # emulated bf16: not timed
    assert trainer.autocast_dtype("bfloat16", cpu) is torch.bfloat16
    assert trainer.autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16


def test_a_bf16_training_step_keeps_losses_close_to_float32(tmp_path, shards):
    """bf16 autocast changes rounding only: the first losses of the same run agree closely."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        run_pretrain(tiny_config(tmp_path / dtype, shards, **{"train.dtype": dtype, "train.stop_after": 2}))
        losses[dtype] = _losses(tmp_path / dtype)
    assert len(losses["float32"]) == len(losses["bfloat16"]) == 2
    for a, b in zip(losses["float32"], losses["bfloat16"]):
        assert b["total"] == pytest.approx(a["total"], rel=0.02)


@pytest.mark.parametrize("uniform", [True, False])
def test_student_drop_path_follows_model_drop_path_uniform_and_the_teacher_never_drops(tmp_path, uniform):
    from lvd.pretrain.train.config import effective_loss_settings
    from lvd.pretrain.train.trainer import build_models

    cfg = tiny_config(
        tmp_path,
        "unused",
        **{"model.drop_path_rate": 0.2, "model.drop_path_uniform": uniform, "model.overrides.depth": 3},
    )
    student, teacher = build_models(cfg, effective_loss_settings(cfg), torch.device("cpu"))
    rates = [b.drop_path1.drop_prob for b in student.backbone.blocks]
    assert rates == pytest.approx([0.2, 0.2, 0.2] if uniform else [0.0, 0.1, 0.2], abs=1e-12)
    assert all(b.drop_path1.drop_prob == b.drop_path2.drop_prob == 0.0 for b in teacher.backbone.blocks)


def test_dinov2s_default_is_a_uniform_drop_path_rate():
    assert load_config().model.drop_path_uniform is True


def test_a_checkpoint_from_before_the_trainable_gain_resumes_with_gain_one(tmp_path, shards):
    # A run with frozen gains has exactly the older lvd optimiser layout (the gain in no group);
    # renaming its prototypes to `weight` and dropping the gains makes its checkpoint an older one.
    from lvd.pretrain.train.trainer import Pretrainer

    frozen = {"dino_head.norm_last_layer": True, "ibot_head.norm_last_layer": True, "train.stop_after": 4}
    run_pretrain(tiny_config(tmp_path, shards, **frozen))
    path = list_checkpoints(tmp_path / "pretrain" / "checkpoints")[-1][1]
    ckpt = torch.load(path, weights_only=True)
    for part in ("student", "teacher"):
        sd = ckpt[part]
        for head in ("dino_head", "ibot_head"):
            assert torch.equal(sd.pop(f"{head}.last_layer.weight_g"), torch.ones(32, 1))
            sd[f"{head}.last_layer.weight"] = sd.pop(f"{head}.last_layer.weight_v")
    torch.save(ckpt, path)

    cfg = tiny_config(tmp_path, shards, **{"train.stop_after": 6})  # the gains train from here on
    trainer = Pretrainer(cfg)
    trainer.resume()
    assert trainer.start == 4
    named = dict(trainer.student.named_parameters())
    gains = [named[f"{h}.last_layer.weight_g"] for h in ("dino_head", "ibot_head")]
    for head, g in zip(("dino_head", "ibot_head"), gains):
        assert g.requires_grad and torch.equal(g.detach(), torch.ones(32, 1)) and g not in trainer.optimizer.state
        assert torch.equal(named[f"{head}.last_layer.weight_v"].detach(), ckpt["student"][f"{head}.last_layer.weight"])
    # Every other parameter kept its AdamW moments: the same multiset of (shape, sum of exp_avg).
    loaded = sorted((tuple(s["exp_avg"].shape), float(s["exp_avg"].sum())) for p, s in trainer.optimizer.state.items())
    saved = sorted((tuple(s["exp_avg"].shape), float(s["exp_avg"].sum())) for s in ckpt["optimizer"]["state"].values())
    assert loaded == saved and len(loaded) == sum(p.requires_grad for p in named.values()) - 2

    run_pretrain(cfg)  # trains on: the gains move away from 1 (the last layer is not frozen after epoch 0)
    final = load_checkpoint(list_checkpoints(tmp_path / "pretrain" / "checkpoints")[-1][1])
    assert final["iteration"] == 6
    assert not torch.equal(final["student"]["dino_head.last_layer.weight_g"], torch.ones(32, 1))
