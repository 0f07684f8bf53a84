"""Gram anchoring: the loss against a numpy reference, the teacher's grid resampling, the
Gram crops, and the trainer's Gram teacher (copies of the EMA teacher, exact resume)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_train import one_thread, shards, tiny_config  # noqa: F401 (fixtures)

from lvd.common.config import ConfigError
from lvd.pretrain.train import load_checkpoint, run_pretrain
from lvd.pretrain.train.augment import MultiCrop
from lvd.pretrain.train.checkpoint import list_checkpoints
from lvd.pretrain.train.gram import resize_patch_grid
from lvd.pretrain.train.losses import gram_loss
from lvd.pretrain.train.metrics import read_metrics


def numpy_gram_loss(student: np.ndarray, teacher: np.ndarray, remove_negative: str) -> float:
    """DINOv3's definition written out per image in float64: cosine Gram matrices, optional
    clipping of negative entries, mean squared difference over every entry of every image."""
    total, count = 0.0, 0
    for s, t in zip(student.astype(np.float64), teacher.astype(np.float64)):
        s = s / np.linalg.norm(s, axis=1, keepdims=True)
        t = t / np.linalg.norm(t, axis=1, keepdims=True)
        gs, gt = s @ s.T, t @ t.T
        if remove_negative in ("both", "teacher"):
            gt = np.where(gt < 0, 0.0, gt)
        if remove_negative == "both":
            gs = np.where(gs < 0, 0.0, gs)
        total += ((gs - gt) ** 2).sum()
        count += gs.size
    return total / count


@pytest.mark.parametrize("remove_negative", ["both", "teacher", "none"])
@pytest.mark.parametrize("shape", [(1, 4, 3), (3, 7, 5), (2, 16, 8)])
def test_gram_loss_matches_a_numpy_reference(remove_negative, shape):
    rng = np.random.default_rng(sum(shape))
    student = rng.normal(size=shape).astype(np.float32)
    teacher = rng.normal(size=shape[:2] + (shape[2] + 3,)).astype(np.float32)  # widths may differ
    got = gram_loss(torch.from_numpy(student), torch.from_numpy(teacher), remove_negative)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(numpy_gram_loss(student, teacher, remove_negative), rel=1e-5, abs=1e-7)


def test_gram_loss_differs_by_clipping_and_is_zero_for_equal_structure():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(2, 9, 4)).astype(np.float32))
    y = torch.from_numpy(rng.normal(size=(2, 9, 4)).astype(np.float32))
    values = {mode: float(gram_loss(x, y, mode)) for mode in ("both", "teacher", "none")}
    assert len(set(values.values())) == 3  # the three clipping rules are different rules
    # The Gram matrix ignores rotations and scale of the features: only the structure counts.
    q, _ = torch.linalg.qr(torch.randn(4, 4))
    assert float(gram_loss(x, 3.0 * x @ q, "none")) == pytest.approx(0.0, abs=1e-10)


def test_gram_loss_gradient_reaches_the_student_only():
    student = torch.randn(2, 5, 3, requires_grad=True)
    teacher = torch.randn(2, 5, 3, requires_grad=True)
    gram_loss(student, teacher.detach(), "none").backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None


def test_resize_patch_grid_keeps_a_linear_ramp_inside_the_grid():
    """Bicubic resampling reproduces a linear function exactly away from the borders: output
    cell i of a 2x downsampling samples input coordinate 2i + 0.5 (align_corners false)."""
    h = w = 8
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ramp = np.stack([0.5 * ys + 2.0 * xs, -xs + 3.0], axis=-1).reshape(1, h * w, 2).astype(np.float32)
    out = resize_patch_grid(torch.from_numpy(ramp), (h, w), (4, 4)).numpy().reshape(4, 4, 2)
    cy, cx = np.meshgrid(2 * np.arange(4) + 0.5, 2 * np.arange(4) + 0.5, indexing="ij")
    expected = np.stack([0.5 * cy + 2.0 * cx, -cx + 3.0], axis=-1)
    np.testing.assert_allclose(out[1:3, 1:3], expected[1:3, 1:3], atol=1e-4)
    same = torch.from_numpy(ramp)
    assert resize_patch_grid(same, (h, w), (h, w)) is same


def test_gram_crops_show_the_student_global_crops_region_at_twice_the_size():
    """Smooth random images: each student global crop must match its own Gram crop (resized
    down) far better than another image's, whatever the colour distortions did."""
    torch.manual_seed(0)
    images = torch.nn.functional.interpolate(torch.rand(6, 3, 4, 4), size=(64, 64), mode="bilinear")
    crops = MultiCrop(16, 8, 0, (0.3, 1.0), (0.05, 0.3), (0.0,) * 3, (1.0,) * 3, gram_size=32)(images)
    assert [tuple(c.shape) for c in crops.gram_crops] == [(6, 3, 32, 32)] * 2
    assert [tuple(c.shape) for c in crops.global_crops] == [(6, 3, 16, 16)] * 2
    student = crops.global_crops[0].mean(1).flatten(1)  # the first view is never solarised
    gram = torch.nn.functional.avg_pool2d(crops.gram_crops[0].mean(1, keepdim=True), 2).flatten(1)
    corr = np.corrcoef(student.numpy(), gram.numpy())[:6, 6:]
    assert np.diag(corr).mean() > 0.85 and np.diag(corr).min() > 0.6
    assert np.abs(corr[~np.eye(6, dtype=bool)]).mean() < 0.4


GRAM = {
    "loss.gram_weight": 1.0,
    "gram.start": 2,
    "gram.refresh": 3,
    "train.checkpoint_every": 1,
    "train.keep_checkpoints": 20,
}


@pytest.mark.slow
def test_gram_teacher_is_the_ema_teacher_copied_at_start_and_each_refresh_and_resumes_exactly(tmp_path, shards):  # noqa: F811
    ref = tmp_path / "ref"
    run_pretrain(tiny_config(ref, shards, **GRAM))
    ckpts = {i: load_checkpoint(p) for i, p in list_checkpoints(ref / "pretrain" / "checkpoints")}
    assert ckpts[2]["gram"] is None  # written before iteration 2, when the copy is taken
    for written, taken in ((3, 2), (5, 2), (6, 5), (8, 5), (9, 8)):
        gram = ckpts[written]["gram"]
        assert gram["taken_at"] == taken
        ema = ckpts[taken]["teacher_backbone"]  # the EMA teacher just before iteration `taken`
        assert gram["backbone"].keys() == ema.keys()
        assert all(torch.equal(gram["backbone"][k], v) for k, v in ema.items())
    rows = read_metrics(ref / "pretrain" / "metrics.jsonl")
    assert ["gram" in r for r in rows] == [False, False] + [True] * 7
    assert all(r["gram"] > 0 for r in rows[2:])
    for stop in (5,):  # resumed from a checkpoint holding the first copy, right where the refresh is due
        run = tmp_path / f"stop{stop}"
        run_pretrain(tiny_config(run, shards, **GRAM, **{"train.stop_after": stop}))
        run_pretrain(tiny_config(run, shards, **GRAM))
        strip = lambda rs: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rs]  # noqa: E731
        assert strip(read_metrics(run / "pretrain" / "metrics.jsonl")) == strip(rows)


def test_gram_teacher_at_twice_the_resolution_trains(tmp_path, shards):  # noqa: F811
    over = {**GRAM, "gram.teacher_resolution": 2, "gram.start": 0, "optim.epochs": 1, "data.image_size": 64}
    out = run_pretrain(tiny_config(tmp_path, shards, **over))
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 3 and all(np.isfinite(r["gram"]) and r["gram"] > 0 for r in rows)


def test_gram_settings_are_checked(tmp_path, shards):  # noqa: F811
    with pytest.raises(ConfigError, match="gram.teacher_resolution"):
        tiny_config(tmp_path, shards, **{"gram.teacher_resolution": 3})
    with pytest.raises(ConfigError, match="gram.remove_negative"):
        tiny_config(tmp_path, shards, **{"gram.remove_negative": "student"})
