"""ResNet-50 as DINO trained and released it: torchvision's layout, no classifier.

DINO's `dino_resnet50` is torchvision's `resnet50` with `fc` replaced by the identity, so its
output is the global average of the last feature map (2048 values, not normalised) and its
released file holds torchvision's keys minus `fc.*`. This module rebuilds that network
(bottleneck v1.5: the stride sits on the 3x3 convolution) with the DINO backbone interface.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

FEATURE_STRIDE = 32  # pixels per cell of the last feature map


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand x4, each with BatchNorm; projection shortcut when needed."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + shortcut)


class ResNet(nn.Module):
    """Bottleneck ResNet (`layers` blocks per stage, `width` channels after the stem).

    forward_features gives the pooled 2048-d feature as `x_norm_clstoken` (what DINO's model
    returns; there is no final norm, the name is the contract's) and the last map's cells as
    patch tokens. BatchNorm makes the output depend on train/eval mode: embed in eval mode.
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), width: int = 64, in_chans: int = 3) -> None:
        super().__init__()
        layers = [int(n) for n in layers]
        if len(layers) != 4:
            raise ValueError(f"a ResNet has 4 stages, got {layers}")
        self.conv1 = nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_planes = width
        for i, n in enumerate(layers):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(in_planes, planes, stride=2 if i > 0 and j == 0 else 1))
                in_planes = planes * Bottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.head = nn.Identity()
        self.embed_dim = self.num_features = in_planes
        self.patch_size = FEATURE_STRIDE
        self.n_blocks = 4
        self.num_register_tokens = self.n_storage_tokens = 0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal convolutions (fan-out), unit BatchNorm: torchvision's initialisation."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _stage_maps(self, x: torch.Tensor, last: int = 3):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(last + 1):
            x = getattr(self, f"layer{i + 1}")(x)
            yield x

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None, local_crops: bool = False) -> dict:
        if masks is not None:
            raise ValueError("a ResNet has no mask token: masked-patch training needs a ViT")
        *_, fmap = self._stage_maps(x)
        cells = fmap.flatten(2).transpose(1, 2)
        empty = cells[:, :0]
        return {
            "x_norm_clstoken": fmap.mean(dim=(-2, -1)),
            "x_norm_regtokens": empty,
            "x_storage_tokens": empty,
            "x_norm_patchtokens": cells,
            "x_prenorm": cells,
            "masks": masks,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature, B x 2048 (DINO's `dino_resnet50` output)."""
        return self.head(self.forward_features(x)["x_norm_clstoken"])

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | list[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Cells of the last `n` stage maps (or of the listed stages), as for the ConvNeXt; a
        ResNet has no final norm, so `norm` changes nothing."""
        wanted = list(range(4 - n, 4)) if isinstance(n, int) else list(n)
        if any(not 0 <= i < 4 for i in wanted):
            raise ValueError(f"stage indices {wanted} outside 0..3")
        maps = list(self._stage_maps(x, max(wanted))) if wanted else []
        out = []
        for i in wanted:
            fmap = maps[i]
            cells = fmap if reshape else fmap.flatten(2).transpose(1, 2)
            out.append((cells, fmap.mean(dim=(-2, -1))))
        return tuple(out) if return_class_token else tuple(cells for cells, _ in out)
