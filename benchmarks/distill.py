"""Evidence that `mode: distill` works: a small student distilled from a trained teacher beats
the same student trained from scratch for the same number of iterations.

On the demo's data (Fashion-MNIST training images as label-free WebDataset shards, 32 px): a
teacher ViT (patch 4, 96-d, 4 blocks) is pretrained with `run_pretrain` (DINO + iBOT + KoLeo)
for --teacher-iters iterations. Then, for each of --seeds seeds, a smaller student (64-d, 4
blocks) trains for --iters iterations twice with one config that differs only in `mode`:
dinov2 (self-distillation from scratch) and distill (targets from the frozen teacher's
checkpoint, backbone and heads). Each exported EMA backbone's CLS features go through the
dinov2 weighted k-NN (T = 0.07) with Fashion-MNIST training images as the bank and test images
as queries. Printed: mean +- sd over the seeds for both students, the teacher's own figure, the
CPU kind and the wall-clock times.

    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/distill.py [--iters 150 --teacher-iters 600 --seeds 5]

Batch 64 per iteration, pretrain_learns's recipe (DINOv2's lr rule, 0.004 x sqrt(64 / 1024) =
0.001, and a teacher temperature held at 0.02). At DINO's usual temperatures this scale does not
learn within the budget, on a 2-core AVX2 machine:
- a warm-up from 0.04 to 0.07 (DINO's default): every run went flat, the DINO loss sitting at
  ln 1024 = 6.931 (the iBOT loss at half of it) from about iteration 60 on, with Sinkhorn-Knopp
  or softmax centering, in mode dino too, at 256 or 64 prototypes (ln K again), teacher momentum
  0.996, lr 0.0002-0.004 and without KoLeo or iBOT; the heads then map every image to one
  bottleneck direction (pairwise cosine 0.997) while the backbone's CLS features still differ
  (0.41), so the targets carry nothing;
- held at 0.04: a 96-d teacher began to leave ln K after about 100 iterations (6.57 at 400),
  64-d students did not within 150;
- held at 0.02: both leave it (a 64-d student at 6.74 after 150 iterations, 55.9 % k-NN), while a
  sharper student (0.05) went flat again.
The teacher's k-NN at each quarter of its training and its DINO loss against ln K are printed,
so a flat teacher shows. The teacher run is kept in --work and reused by a later invocation
whose teacher config is identical.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from pretrain_learns import features, knn_table, read_idx, train_config, write_shards

from lvd.pretrain.models import build_backbone
from lvd.pretrain.train import run_pretrain
from lvd.pretrain.train.checkpoint import list_checkpoints
from lvd.pretrain.train.metrics import read_metrics

ARCH = "vit_tiny_p4"
TEACHER = {"embed_dim": 96, "depth": 4, "num_heads": 4}
STUDENT = {"embed_dim": 64, "depth": 4, "num_heads": 4}
KS = (10, 20, 100, 200)
BATCH = 64


def config(run_dir: Path, shards: str, iters: int, overrides: dict, seed: int, **extra):
    """pretrain_learns's short recipe (10 schedule epochs) at batch 64 for `overrides`' size, with `extra`."""
    cfg = train_config(run_dir, shards, iters)
    cfg.model.overrides = overrides
    cfg.data.batch_size_per_rank = BATCH
    cfg.seed = seed
    for key, value in extra.items():
        node, _, leaf = key.rpartition(".")
        (cfg if not node else cfg[node])[leaf] = value
    return cfg


def knn(weights: Path, overrides: dict, bank, test) -> dict[int, float]:
    model = build_backbone(ARCH, weights=str(weights), **overrides)
    fb, ft = features(model, bank[0])["CLS"], features(model, test[0])["CLS"]
    return knn_table(fb, bank[1], ft, test[1])


def timed_run(cfg) -> tuple[Path, float]:
    t0 = time.perf_counter()
    out = Path(run_pretrain(cfg))
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=150, help="student iterations (both students)")
    ap.add_argument("--teacher-iters", type=int, default=600, help="teacher pretraining iterations")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--bank", type=int, default=10000, help="training images in the k-NN bank")
    ap.add_argument("--queries", type=int, default=5000, help="test images queried")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/lvd-bench-distill")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    train_x, train_y = read_idx("train-images-idx3-ubyte.gz"), read_idx("train-labels-idx1-ubyte.gz")
    test_x, test_y = read_idx("t10k-images-idx3-ubyte.gz"), read_idx("t10k-labels-idx1-ubyte.gz")
    shards = write_shards(train_x, work / "shards")
    bank, test = (train_x[: args.bank], train_y[: args.bank]), (test_x[: args.queries], test_y[: args.queries])
    print(
        f"CPU: {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )

    teacher_dir = work / f"teacher-{args.teacher_iters}"
    teacher_cfg = config(teacher_dir, shards, args.teacher_iters, TEACHER, 0)
    teacher_cfg.train.checkpoint_every = max(1, args.teacher_iters // 4)
    teacher_cfg.train.keep_checkpoints = 4
    saved = teacher_dir / "pretrain" / "config.yaml"
    done = (teacher_dir / "pretrain" / "_SUCCESS.json").exists()
    if not done or OmegaConf.to_container(OmegaConf.load(saved)) != OmegaConf.to_container(teacher_cfg):
        shutil.rmtree(teacher_dir, ignore_errors=True)  # reused only when trained with this very config
    teacher_out, teacher_s = timed_run(teacher_cfg)
    rows = read_metrics(teacher_out / "metrics.jsonl")
    uniform = np.log(teacher_cfg.dino_head.prototypes)  # the DINO loss of outputs uniform over the prototypes
    print(
        f"teacher {TEACHER}: {args.teacher_iters} iterations in {teacher_s / 60:.1f} min (0 if reused), "
        f"DINO loss {rows[0]['dino']:.3f} -> {rows[-1]['dino']:.3f} (flat outputs: {uniform:.3f})"
    )
    # The teacher's k-NN along its training: it should rise; a collapsed teacher's does not.
    checkpoints, curve = list_checkpoints(teacher_out / "checkpoints"), {}
    for it, path in checkpoints:
        acc = curve[it] = knn(path, TEACHER, bank, test)
        print(f"teacher at iteration {it:5d}: k-NN k=20 {100 * acc[20]:.2f}%")
    teacher_ckpt = checkpoints[-1][1]
    results = {"teacher": acc}

    runs: dict[str, list] = {"from scratch": [], "distilled": []}
    seconds: dict[str, list] = {"from scratch": [], "distilled": []}
    for seed in range(args.seeds):
        for name, extra in (
            ("from scratch", {}),
            ("distilled", {"mode": "distill", "distill.teacher": str(teacher_ckpt)}),
        ):
            run = work / f"{name.replace(' ', '-')}-seed{seed}"
            shutil.rmtree(run, ignore_errors=True)
            out, secs = timed_run(config(run, shards, args.iters, STUDENT, seed, **extra))
            rows = read_metrics(out / "metrics.jsonl")
            runs[name].append(knn(out / "teacher_backbone.pth", STUDENT, bank, test))
            seconds[name].append(secs)
            print(
                f"seed {seed} {name:12s}: {secs / 60:.1f} min, "
                f"DINO loss {rows[0]['dino']:.3f} -> {rows[-1]['dino']:.3f}, "
                f"k-NN k=20 {100 * runs[name][-1][20]:.2f}%"
            )

    print(
        f"\nFashion-MNIST weighted k-NN top-1 (T=0.07), bank {len(bank[0]):,} train, queries {len(test[0]):,} test; "
        f"students {STUDENT} x {args.iters} iterations (batch {BATCH}), mean +- sd over {args.seeds} seeds"
    )
    print(f"{'model':<34}" + "".join(f"{'k=' + str(k):>16}" for k in KS))
    print(f"{'teacher ' + str(TEACHER['embed_dim']) + '-d x ' + str(TEACHER['depth']):<34}", end="")
    print("".join(f"{100 * results['teacher'][k]:15.2f}%" for k in KS))
    for name, accs in runs.items():
        cells = []
        for k in KS:
            vals = 100 * np.array([a[k] for a in accs])
            cells.append(f"{vals.mean():8.2f} +- {vals.std(ddof=1) if len(vals) > 1 else 0.0:4.2f}")
        print(f"{'student, ' + name:<34}" + "".join(f"{c:>16}" for c in cells))
    gain = 100 * np.array([d[20] - s[20] for d, s in zip(runs["distilled"], runs["from scratch"])])
    print(f"distilled - from scratch, k=20, per seed: {np.round(gain, 2).tolist()} points")
    print(
        f"student minutes per run: from scratch {np.mean(seconds['from scratch']) / 60:.1f}, "
        f"distilled {np.mean(seconds['distilled']) / 60:.1f}"
    )
    summary = {
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "iters": args.iters,
        "teacher_iters": args.teacher_iters,
        "teacher": TEACHER,
        "student": STUDENT,
        "recipe": {k: teacher_cfg.optim[k] for k in ("lr", "scaling_rule", "teacher_temp", "warmup_teacher_temp")},
        "teacher_knn_by_iteration": {str(it): {str(k): v for k, v in acc.items()} for it, acc in curve.items()},
        "knn_top1": {
            "teacher": {str(k): v for k, v in results["teacher"].items()},
            **{name: [{str(k): v for k, v in a.items()} for a in accs] for name, accs in runs.items()},
        },
        "seconds": seconds,
    }
    (work / "result.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
