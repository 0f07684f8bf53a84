"""Training throughput of one DINOv2 step for ViT-S/14 on CPU, next to its parts and a peer.

Rows (images per second, one image = 2 global 224 px + 8 local 98 px crops):
  lvd full step      `Pretrainer.step`: kornia multi-crop, masking, teacher forward, student
                     forward/backward, DINO + iBOT + KoLeo (Sinkhorn-Knopp, 65,536 prototypes
                     per head), grad clipping, AdamW, EMA update
  lvd backbone       our ViT-S/14 alone: forward + backward of the same crops
  HF backbone        transformers' Dinov2Model ViT-S/14 (the peer): forward + backward of the
                     same crops
The ratios say what the SSL machinery costs on top of the backbone and how our backbone
compares with the peer's. Timed in one process; float32 by default, `--dtypes float32 bfloat16`
adds CPU bf16 autocast.

    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/pretrain_speed.py [--batch 4 --steps 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import nullcontext

import torch

from lvd.pretrain.models import build_backbone
from lvd.pretrain.train.config import load_config
from lvd.pretrain.train.trainer import Pretrainer


def timed(fn, steps: int) -> float:
    fn()  # warm-up (allocations, kernels)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def backbone_step(model, crops, amp):
    def run():
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else nullcontext()
        with ctx:
            loss = sum(model(c).float().square().mean() for c in crops)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return run


class HFBackbone(torch.nn.Module):
    """transformers' Dinov2Model ViT-S/14 returning the normalised CLS token, like ours."""

    def __init__(self):
        super().__init__()
        from transformers import Dinov2Config, Dinov2Model

        cfg = Dinov2Config(
            hidden_size=384,
            num_hidden_layers=12,
            num_attention_heads=6,
            patch_size=14,
            image_size=518,
            layerscale_value=1e-5,
            attn_implementation="sdpa",
        )
        self.model = Dinov2Model(cfg)

    def forward(self, x):
        return self.model(pixel_values=x).pooler_output


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4, help="images per step")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per row (after one warm-up)")
    ap.add_argument(
        "--dtypes",
        nargs="+",
        default=["float32"],
        choices=["float32", "bfloat16"],
        help="compute dtypes to time (bfloat16 = CPU autocast)",
    )
    args = ap.parse_args()
    b = args.batch
    torch.manual_seed(0)
    g = torch.randn(2 * b, 3, 224, 224)
    l = torch.randn(8 * b, 3, 98, 98)
    images = torch.randint(0, 256, (b, 3, 256, 256), dtype=torch.uint8)
    ours = build_backbone("dinov2_vits14", drop_path_rate=0.0).train()
    peer = HFBackbone().train()
    print(f"ViT-S/14, batch {b} images (2 x 224 px + 8 x 98 px crops each), {torch.get_num_threads()} threads")
    print(f"{'row':<18}{'dtype':<10}{'s/step':>9}{'img/s':>9}")
    for dtype in args.dtypes:
        amp = dtype == "bfloat16"
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(
                overrides=[
                    f"run_dir={tmp}",
                    "model.arch=dinov2_vits14",
                    "data.shards=unused",
                    f"data.batch_size_per_rank={b}",
                    "train.device=cpu",
                    f"train.dtype={dtype}",
                    "optim.epochs=1",
                    "optim.iters_per_epoch=100",
                    "optim.warmup_epochs=0",
                    "optim.freeze_last_layer_epochs=0",
                ]
            )
            step = Pretrainer(cfg).step
            it = iter(range(10**6))
            full = timed(lambda step=step, it=it: step(next(it), images), args.steps)
        mine = timed(backbone_step(ours, (g, l), amp), args.steps)
        theirs = timed(backbone_step(peer, (g, l), amp), args.steps)
        for name, s in (("lvd full step", full), ("lvd backbone", mine), ("HF backbone", theirs)):
            print(f"{name:<18}{dtype:<10}{s:9.2f}{b / s:9.2f}")
        print(f"  full step / backbone time: {full / mine:.2f}x;  HF / lvd backbone time: {theirs / mine:.2f}x")


if __name__ == "__main__":
    main()
