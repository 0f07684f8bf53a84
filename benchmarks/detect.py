"""Grounding DINO detection speed: lvd's `GroundingDino.detect` vs transformers' own pipeline, same process.

No real Grounding DINO weights can be had offline, so both sides load one folder of random
weights saved by transformers (`save_pretrained`): speed does not depend on the weights' values.
Architectures (`--arch`):
- `tiny`: IDEA-Research/grounding-dino-tiny's (transformers' GroundingDinoConfig defaults:
  Swin-T backbone, BERT-base text encoder, 900 queries, 6 + 6 layers);
- `test`: the tiny random config of lvd's tests (tests/grounding_support.py).
Images: real photos from scikit-image, of their own sizes, resized by the processor to
`--sizes` (shorter side; the reference's is 800). Peer: the processor on images and text, the
model, `post_process_grounded_object_detection`; lvd: the same model through `GroundingDino`
(pixels prepared apart, the prompt tokenised once, boxes clipped). Interleaved rounds, best of each.
Prints images/s, the ratio, model GFLOP per image (counted by torch's FlopCounterMode: convolutions
and matmuls; deformable-attention sampling is not counted), achieved GFLOP/s against a 2048^3
matmul measured in the same run, and the CPU kind.

    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/detect.py [--arch tiny test] [--sizes 800 480]
        [--batch 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from lvd.common.devices import resolve_device
from lvd.pretrain.models.grounding import GroundingDino

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "motorcycle_left", "immunohistochemistry")
PROMPT = "a cat . a red square ."


def photos(n: int) -> list[Image.Image]:
    from skimage import data

    return [Image.fromarray(getattr(data, PHOTOS[i % len(PHOTOS)])()).convert("RGB") for i in range(n)]


def save_tiny_architecture(folder: Path) -> Path:
    """grounding-dino-tiny's architecture, random weights, the processor's reference settings."""
    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
    )

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from grounding_support import WORDS  # a small vocabulary: ids of the prompt's words only
    from transformers import BertTokenizer

    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(GroundingDinoConfig()).save_pretrained(folder)
    processor = GroundingDinoProcessor(GroundingDinoImageProcessorPil(), BertTokenizer(str(folder / "vocab.txt")))
    processor.save_pretrained(folder)
    return folder


def matmul_gflops(n: int = 2048, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    return 2 * n**3 * runs / (time.perf_counter() - start) / 1e9


def peer(model, processor, images, size: int):
    """transformers' own pipeline, end to end."""
    kwargs = {"size": {"shortest_edge": size, "longest_edge": round(size * 1333 / 800)}}
    inputs = processor(images=images, text=[PROMPT] * len(images), return_tensors="pt", **kwargs)
    with torch.no_grad():
        outputs = model(**inputs)
    return processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], 0.35, 0.25, [(im.height, im.width) for im in images]
    )


def model_gflop(ours: GroundingDino, images) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    pixels = ours.prepare(images[:1])
    with FlopCounterMode(display=False) as counter:
        ours.forward(pixels, PROMPT)
    return counter.get_total_flops() / 1e9


def rate(fn, images, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        fn(images[i : i + batch])
    return len(images) / (time.perf_counter() - start)


def compare(arch: str, folder: Path, args) -> None:
    from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

    theirs = GroundingDinoForObjectDetection.from_pretrained(str(folder)).float().eval()
    processor = GroundingDinoProcessor.from_pretrained(str(folder))
    images = photos(args.images)
    for size in args.sizes:
        ours = GroundingDino(folder, device="cpu", size=size)
        runners = {
            "transformers": lambda ims, s=size: peer(theirs, processor, ims, s),
            "lvd": lambda ims, o=ours: o.detect(ims, PROMPT, 0.35, 0.25),
        }
        for fn in runners.values():
            fn(images[: args.batch])  # warm-up
        best = dict.fromkeys(runners, 0.0)
        for _ in range(args.rounds):
            for name, fn in runners.items():
                best[name] = max(best[name], rate(fn, images, args.batch))
        gflop = model_gflop(ours, images)
        peak = matmul_gflops()
        print(f"== {arch}, shorter side {size} px, batch {args.batch}, {args.images} photos, {gflop:.1f} GFLOP/image")
        for name, r in best.items():
            achieved = r * gflop
            print(f"{name:>13}: {r:7.3f} img/s  {achieved:7.1f} GFLOP/s ({100 * achieved / peak:4.1f}% of {peak:.0f})")
        print(f"  lvd / transformers: {best['lvd'] / best['transformers']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["test", "tiny"], choices=["test", "tiny"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[800, 480])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(
        f"device {resolve_device('cpu')}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    for arch in args.arch:
        with tempfile.TemporaryDirectory() as tmp:
            if arch == "tiny":
                folder = save_tiny_architecture(Path(tmp))
            else:
                sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
                from grounding_support import save_tiny_grounding

                folder = save_tiny_grounding(Path(tmp))
            compare(arch, folder, args)


if __name__ == "__main__":
    main()
