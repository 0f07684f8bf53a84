"""One prepared GPU run: what lvd's heavy parts achieve on the device at hand, in one table.

Rows (bf16 wherever the device has it natively, lvd's one `auto` dtype rule):
  embed     ViT-L/14 (dinov2_vitl14) and dinov3_vitl16: images/s at the model's resolution, and
            MFU (model FLOPs per second over the device's peak dense bf16 rate)
  train     one DINOv2 training step of ViT-L/14 (`Pretrainer.step`: multi-crop, teacher,
            student forward/backward, losses, AdamW, EMA) with FSDP on one rank: images/s, MFU
  k-means   1M x 1024 into 100k clusters on the torch backend (lvd's Lloyd with bounds)
  k-NN      exact k-NN graph of 1M x 512, k = 64, on the torch backend

FLOPs of the models are counted by torch.utils.flop_counter on one pass (forward, or the whole
training step with its backward); k-means and k-NN count the dense product 2 n m d (what an
unpruned search performs), so their MFU is a dense-equivalent rate. The peak is the vendor's
dense bf16 figure for GPUs this suite knows, and a large matmul measured in the same run (the
device's own roofline) for every device; both ratios are printed. Models are built through
`lvd.pretrain.models.build_backbone(name)`; a name the installed registry does not know is
skipped with a note. A row that fails prints its error and the others still run (exit 1).

`--smoke` runs every row end to end on the CPU with tiny registry sizes and data, so that the
script is known to work before device time is spent on it.

    python benchmarks/gpu_suite.py                 # on the GPU machine
    python benchmarks/gpu_suite.py --smoke         # anywhere, in about a minute
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent))

from embed import matmul_gflops  # noqa: E402

from lvd.common.devices import autocast, resolve_device, resolve_dtype  # noqa: E402
from lvd.index.backends import engine_dtype  # noqa: E402

#: vendor dense bf16 peak (TFLOP/s, without sparsity) by a piece of the device name; first match wins
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM (HBM3)
    ("A100", 312.0),
    ("L40S", 362.0),
)


@dataclass(frozen=True)
class Sizes:
    embed_models: tuple[str, ...]
    embed_batch: int
    embed_iters: int
    train_arch: str
    train_batch: int
    train_steps: int
    train_overrides: tuple[str, ...]
    kmeans: tuple[int, int, int, int]  # rows, dim, clusters, iterations
    knn: tuple[int, int, int]  # rows, dim, k


FULL = Sizes(
    embed_models=("dinov2_vitl14", "dinov3_vitl16"),
    embed_batch=256,
    embed_iters=10,
    train_arch="dinov2_vitl14",
    train_batch=32,
    train_steps=5,
    train_overrides=(),
    kmeans=(1_000_000, 1024, 100_000, 10),
    knn=(1_000_000, 512, 64),
)
SMOKE = Sizes(
    embed_models=("vit_tiny_p14", "dinov3_vit_tiny_p4"),
    embed_batch=4,
    embed_iters=2,
    train_arch="vit_tiny_p14",
    train_batch=2,
    train_steps=2,
    train_overrides=(
        "data.image_size=40",
        "crops.global_size=28",
        "crops.local_size=14",
        "crops.n_local=2",
        "dino_head.prototypes=32",
        "dino_head.hidden_dim=24",
        "dino_head.bottleneck_dim=8",
        "ibot_head.prototypes=32",
        "ibot_head.hidden_dim=24",
        "ibot_head.bottleneck_dim=8",
    ),
    kmeans=(4000, 32, 50, 3),
    knn=(3000, 32, 8),
)


@dataclass
class Row:
    name: str
    size: str
    dtype: str = ""
    rate: str = ""
    tflops: float | None = None  # achieved (model or dense-equivalent) TFLOP/s
    note: str = ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def vendor_peak(device: torch.device) -> float | None:
    """The datasheet's dense bf16 TFLOP/s of this GPU, None when unknown (and on CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for piece, peak in PEAK_BF16_TFLOPS if piece in name), None)


def counted_flops(fn) -> int:
    """FLOPs of one call of `fn`, counted per operator (SDPA on CPUs included)."""
    cpu_sdpa = {
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, out_shape=None, **kw: (
            sdpa_flop_count(q, k, v)
        ),
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
            lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v)
        ),
    }
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn, device: torch.device, iters: int) -> float:
    """Seconds per call after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def known_models() -> set[str]:
    from lvd.pretrain.models import list_models

    return set(list_models())


def embed_row(name: str, device: torch.device, sizes: Sizes) -> Row:
    from lvd.pretrain.models import build_backbone, get_spec

    if name not in known_models():
        return Row(f"embed {name}", "-", note="skipped: the installed model registry does not know this name")
    side = get_spec(name).resolution
    dtype = resolve_dtype("auto", device)
    model = build_backbone(name).to(device).eval()
    x = torch.randn(sizes.embed_batch, 3, side, side, device=device)

    def run():
        with torch.inference_mode(), autocast(device, dtype):
            return model(x)

    flops = counted_flops(run)
    seconds = timed(run, device, sizes.embed_iters)
    return Row(
        f"embed {name}",
        f"batch {sizes.embed_batch} at {side} px",
        str(dtype).removeprefix("torch."),
        f"{sizes.embed_batch / seconds:.1f} img/s",
        flops / seconds / 1e12,
        f"{flops / sizes.embed_batch / 1e9:.3g} GFLOP/image (counted)",
    )


@contextlib.contextmanager
def one_rank_group(device: torch.device):
    """A torch.distributed group of one rank (nccl on CUDA, gloo on CPUs), so the trainer wraps in FSDP."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        device_id=device if device.type == "cuda" else None,
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def train_row(device: torch.device, sizes: Sizes) -> Row:
    from lvd.pretrain.train.config import load_config
    from lvd.pretrain.train.trainer import Pretrainer

    arch, batch = sizes.train_arch, sizes.train_batch
    if arch not in known_models():
        return Row(f"train {arch}", "-", note="skipped: the installed model registry does not know this name")
    with tempfile.TemporaryDirectory() as tmp, one_rank_group(device):
        cfg = load_config(
            overrides=[
                f"run_dir={tmp}",
                f"model.arch={arch}",
                "data.shards=unused",
                f"data.batch_size_per_rank={batch}",
                f"train.device={device}",
                "train.dtype=auto",
                "train.parallel=fsdp",
                "optim.epochs=1",
                "optim.iters_per_epoch=100",
                "optim.warmup_epochs=0",
                "optim.freeze_last_layer_epochs=0",
                "progress=false",
                *sizes.train_overrides,
            ]
        )
        trainer = Pretrainer(cfg)
        side = int(cfg.data.image_size)
        images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8)
        steps = iter(range(100))
        trainer.step(next(steps), images)  # warm-up: allocations, FSDP's first gathers
        flops = counted_flops(lambda: trainer.step(next(steps), images))
        seconds = timed(lambda: trainer.step(next(steps), images), device, sizes.train_steps)
        dtype = "float32" if trainer.amp is None else str(trainer.amp).removeprefix("torch.")
        crops = f"2 x {cfg.crops.global_size} + {cfg.crops.n_local} x {cfg.crops.local_size} px"
    return Row(
        f"train {arch} (FSDP, 1 rank)",
        f"batch {batch} ({crops} crops)",
        dtype,
        f"{batch / seconds:.1f} img/s",
        flops / seconds / 1e12,
        f"{seconds:.3f} s/step, {flops / 1e12:.3g} TFLOP/step (counted)",
    )


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    """Unit-norm rows, filled a block at a time (1M x 1024 float32 is 4 GB)."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, d), np.float32)
    for start in range(0, n, 65536):
        block = rng.standard_normal((min(65536, n - start), d), dtype=np.float32)
        x[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x


def kmeans_row(device: torch.device, sizes: Sizes) -> Row:
    from lvd.index.kmeans import kmeans

    n, d, k, niter = sizes.kmeans
    x = unit_rows(n, d, 0)
    start = time.perf_counter()
    result = kmeans(x, k, niter=niter, backend="torch", device=device, algorithm="lloyd", progress=False)
    seconds = time.perf_counter() - start
    return Row(
        "k-means, torch backend (Lloyd, bounds)",
        f"{n} x {d} -> {k}, {niter} iterations",
        engine_dtype("auto", device),
        f"{seconds:.1f} s ({seconds / niter:.2f} s/iteration)",
        2.0 * n * k * d * (niter + 1) / seconds / 1e12,
        f"dense-equivalent; inertia {result.inertia:.4g}",
    )


def knn_row(device: torch.device, sizes: Sizes) -> Row:
    from lvd.index.knn import knn_graph

    n, d, k = sizes.knn
    x = unit_rows(n, d, 1)
    start = time.perf_counter()
    D, I = knn_graph(x, k, method="exact", backend="torch", device=device)
    seconds = time.perf_counter() - start
    own = (I == np.arange(n)[:, None]).any()
    return Row(
        "exact k-NN graph, torch backend",
        f"{n} x {d}, k = {k}",
        engine_dtype("auto", device),
        f"{seconds:.1f} s",
        2.0 * n * n * d / seconds / 1e12,
        f"dense-equivalent; {'SELF FOUND (wrong)' if own else 'no self edges'}",
    )


def print_table(rows: list[Row], peak: float | None, roofline: float) -> None:
    print(f"{'row':<40} {'size':<36} {'dtype':<9} {'rate':<28} {'TFLOP/s':>9} {'MFU':>6} {'/matmul':>8}  note")
    for r in rows:
        if r.tflops is None:
            print(f"{r.name:<40} {r.size:<36} {r.dtype:<9} {r.rate:<28} {'':>9} {'':>6} {'':>8}  {r.note}")
            continue
        mfu = f"{100 * r.tflops / peak:5.1f}%" if peak else "-"
        print(
            f"{r.name:<40} {r.size:<36} {r.dtype:<9} {r.rate:<28} {r.tflops:9.4g} {mfu:>6} "
            f"{100 * r.tflops / roofline:7.1f}%  {r.note}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: check that every row runs")
    parser.add_argument("--device", default=None, help="default: cuda when present (cpu with --smoke)")
    parser.add_argument("--only", nargs="+", choices=["embed", "train", "kmeans", "knn"], default=None)
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    device = resolve_device(args.device or ("cpu" if args.smoke else "auto"))
    if device.type == "cuda":  # an explicit index: torch.cuda.set_device and NCCL refuse a bare "cuda"
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    matmul_dtype = resolve_dtype("auto", device)
    roofline = matmul_gflops(matmul_dtype, device, n=8192 if device.type == "cuda" else 1024, seconds=1.0) / 1e3
    peak = vendor_peak(device)
    print(
        f"device {name}; torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads; {'smoke sizes' if args.smoke else 'full sizes'}"
    )
    print(
        f"peak: {f'{peak:.0f} TFLOP/s dense bf16 (datasheet)' if peak else 'no datasheet figure'}; "
        f"measured {str(matmul_dtype).removeprefix('torch.')} matmul {roofline:.3f} TFLOP/s (the /matmul column)"
    )
    jobs = [("embed", lambda m=m: embed_row(m, device, sizes)) for m in sizes.embed_models]
    jobs += [("train", lambda: train_row(device, sizes))]
    jobs += [("kmeans", lambda: kmeans_row(device, sizes)), ("knn", lambda: knn_row(device, sizes))]
    rows, failed = [], False
    for kind, job in jobs:
        if args.only and kind not in args.only:
            continue
        try:
            row = job()
        except Exception as err:  # one broken row must not cost the others' device time
            traceback.print_exc()
            row, failed = Row(kind, "-", note=f"FAILED: {type(err).__name__}: {err}"[:200]), True
        print(f"  done: {row.name}: {row.rate or row.note}", flush=True)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, peak, roofline)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
