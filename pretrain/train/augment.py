"""DINOv2 multi-crop augmentation, batched on the training device with kornia.

The data loader only decodes images to a fixed-size uint8 square (see `stream`); cropping and
photometric jitter run here on whole batches, on the GPU when training on one. The recipe is
DINOv2's: random resized crop + horizontal flip, colour jitter (p 0.8), greyscale (p 0.2),
Gaussian blur (p 1.0 on the first global crop, 0.1 on the second, 0.5 on local crops),
solarisation (p 0.2, second global crop only), then mean/std normalisation.

For a Gram teacher at a higher resolution (DINOv3's high-resolution Gram anchoring) the global
crops are first cut at the Gram teacher's size; that undistorted crop, only normalised, is the
Gram teacher's input, and the student's global crop is the same crop resized down, then
distorted as usual. The two then show the same region of the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MultiCropOutput:
    global_crops: list[torch.Tensor]  # n_global tensors, B x 3 x G x G, normalised
    local_crops: list[torch.Tensor]  # n_local tensors, B x 3 x L x L, normalised
    gram_crops: list[torch.Tensor] | None = None  # n_global tensors, B x 3 x R x R (gram_size R), normalised


def _geometry(size: int, scale: tuple[float, float]) -> list[nn.Module]:
    return [K.RandomResizedCrop((size, size), scale=tuple(scale), resample="BICUBIC"), K.RandomHorizontalFlip(p=0.5)]


def _view(
    size: int, scale: tuple[float, float], blur_p: float, solarize_p: float, mean, std, crop: bool = True
) -> K.AugmentationSequential:
    """One view's augmentation; `crop` false leaves out the random resized crop and the flip."""
    steps: list[nn.Module] = [
        *(_geometry(size, scale) if crop else []),
        K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
    ]
    if blur_p > 0:
        steps.append(K.RandomGaussianBlur(9, (0.1, 2.0), p=blur_p))
    if solarize_p > 0:
        # thresholds/additions of 0 = a fixed threshold of 0.5 (128 of 255), as torchvision's.
        steps.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=solarize_p))
    steps.append(K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std)))
    return K.AugmentationSequential(*steps)


class MultiCrop(nn.Module):
    """uint8 images B x 3 x S x S -> 2 global + n_local augmented, normalised float crops."""

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        global_scale=(0.32, 1.0),
        local_scale=(0.05, 0.32),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        gram_size: int | None = None,
    ):
        super().__init__()
        self.n_local, self.global_size = n_local, global_size
        crop_globals = gram_size is None
        self.global1 = _view(global_size, global_scale, 1.0, 0.0, mean, std, crop=crop_globals)
        self.global2 = _view(global_size, global_scale, 0.1, 0.2, mean, std, crop=crop_globals)
        self.local = _view(local_size, local_scale, 0.5, 0.0, mean, std) if n_local > 0 else None
        self.gram = None
        if gram_size is not None:
            self.gram = nn.ModuleList([K.AugmentationSequential(*_geometry(gram_size, global_scale)) for _ in range(2)])
            self.gram_normalize = K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> MultiCropOutput:
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        gram_crops = None
        if self.gram is None:
            globals_ = [self.global1(x).contiguous(), self.global2(x).contiguous()]
        else:
            cut = [g(x) for g in self.gram]
            size = (self.global_size, self.global_size)
            small = [F.interpolate(c, size=size, mode="bicubic", antialias=True, align_corners=False) for c in cut]
            globals_ = [view(s.clamp_(0, 1)).contiguous() for view, s in zip((self.global1, self.global2), small)]
            gram_crops = [self.gram_normalize(c.clamp(0, 1)).contiguous() for c in cut]
        locals_: list[torch.Tensor] = []
        if self.local is not None:
            # One call for all local crops: every image repeated n_local times.
            many = self.local(x.repeat(self.n_local, 1, 1, 1))
            locals_ = [c.contiguous() for c in many.chunk(self.n_local, dim=0)]
        return MultiCropOutput(globals_, locals_, gram_crops)
