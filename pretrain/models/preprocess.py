"""Pixels for a model: shorter side resized, central square cropped, normalised on the device.

Images travel as uint8 H x W x 3 (4x less than float to move between processes and to the
GPU); normalisation happens on the batch, on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from lvd.pretrain.data.decode import center_crop, load_resized, resize_shorter


def check_resolution(resolution: int, patch_size: int) -> int:
    if resolution <= 0 or resolution % patch_size:
        raise ValueError(f"resolution {resolution} is not a positive multiple of the patch size {patch_size}")
    return int(resolution)


def auto_resolution(shorter_sides, patch_size: int, native: int, max_upscale: float = 4.0) -> int:
    """The model's own resolution, lowered for small images to about `max_upscale` x their median shorter side.

    Upsampling adds no detail but the cost grows with the square of the side: 28 px Fashion-MNIST
    embeds 4x cheaper at 112 px than at 224 px and, measured with the demo's ViT-S/14, curates
    better there. Rounded to the nearest multiple of the patch, at least 4 patches; an empty
    collection gets `native`.
    """
    if max_upscale <= 0:
        raise ValueError(f"max_upscale must be positive, got {max_upscale}")
    sides = np.asarray(shorter_sides, dtype=np.float64)
    if sides.size == 0:
        return int(native)
    side = int(round(max_upscale * float(np.median(sides)) / patch_size)) * patch_size
    return int(min(native, max(side, 4 * patch_size)))


def resize_side(resolution: int, resize_ratio: float) -> int:
    """Shorter side before the crop: 224 x 256/224 = 256 reproduces DINOv2's evaluation transform."""
    if resize_ratio < 1.0:
        raise ValueError(f"resize_ratio {resize_ratio} < 1 would crop outside the image")
    return int(round(resolution * resize_ratio))


def pil_to_square(img: Image.Image, resolution: int, resize_ratio: float = 1.0) -> np.ndarray:
    """An RGB PIL image -> uint8 resolution x resolution x 3."""
    img = resize_shorter(img.convert("RGB"), resize_side(resolution, resize_ratio), Image.Resampling.BICUBIC)
    return np.asarray(center_crop(img, resolution))


def bytes_to_square(data: bytes, resolution: int, resize_ratio: float = 1.0, **decode_kwargs) -> np.ndarray:
    """Encoded image bytes -> uint8 resolution x resolution x 3 (JPEGs decoded at reduced scale)."""
    img = load_resized(data, resize_side(resolution, resize_ratio), crop=False, **decode_kwargs)
    return np.asarray(center_crop(img, resolution))


def normalise(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float], device: torch.device) -> torch.Tensor:
    """uint8 B x H x W x 3 -> float32 B x 3 x H x W, standardised per channel, on `device`."""
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub_(m).div_(s).contiguous()
