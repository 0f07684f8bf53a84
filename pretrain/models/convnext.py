"""The DINOv3 ConvNeXt backbones (T/S/B/L), in the key layout of Meta's released files.

A stem (4x4 stride-4 convolution + LayerNorm over channels) and three downsamplers (LayerNorm +
2x2 stride-2 convolution) separate four stages of ConvNeXt blocks; the last feature map has
stride 32. For the DINO backbone contract the spatial mean of that map, taken before the final
LayerNorm, plays the CLS token and the map's cells play the patch tokens, both normalised by
the same final LayerNorm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lvd.pretrain.models.layers import DropPath

FEATURE_STRIDE = 32  # pixels per cell of the last feature map (4 x 2 x 2 x 2)


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channels of a B x C x H x W map, at every pixel (biased variance)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise convolution, LayerNorm, 4x MLP (GELU), per-channel `gamma`, residual."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # channels last for the norm and the MLP
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y)))) * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXt(nn.Module):
    """ConvNeXt with the DINO backbone interface (`forward_features`, `get_intermediate_layers`).

    `norms` holds Identity for stages 0-2 and the final `norm` itself for stage 3, so the final
    LayerNorm appears twice in `state_dict()` (`norm.*` and `norms.3.*`), as in Meta's files.
    Sides that are not multiples of 32 are floored by the strided convolutions.
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        layer_scale_init: float = 1e-6,
    ) -> None:
        super().__init__()
        depths, dims = [int(d) for d in depths], [int(d) for d in dims]
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"ConvNeXt has 4 stages; got depths {depths} and dims {dims}")
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), ChannelsFirstLayerNorm(dims[0]))]
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(ChannelsFirstLayerNorm(dims[i]), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2))
            )
        total = sum(depths)
        if drop_path_uniform:
            rates = [float(drop_path_rate)] * total
        else:  # a linear ramp over all blocks, 0 -> drop_path_rate
            rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.stages = nn.ModuleList()
        start = 0
        for depth, dim in zip(depths, dims):
            blocks = [ConvNeXtBlock(dim, rates[start + j], layer_scale_init) for j in range(depth)]
            self.stages.append(nn.Sequential(*blocks))
            start += depth
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.norms = nn.ModuleList([nn.Identity(), nn.Identity(), nn.Identity(), self.norm])
        self.head = nn.Identity()
        self.embed_dim = self.num_features = dims[-1]
        self.embed_dims = dims
        self.patch_size = FEATURE_STRIDE
        self.n_blocks = 4
        self.num_register_tokens = self.n_storage_tokens = 0
        self.layer_scale_init = layer_scale_init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal convolutions and linears (std 0.02), zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, ChannelsFirstLayerNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, ConvNeXtBlock):
                nn.init.constant_(module.gamma, self.layer_scale_init)

    def _stage_maps(self, x: torch.Tensor, last: int = 3):
        for i in range(last + 1):
            x = self.stages[i](self.downsample_layers[i](x))
            yield x

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None, local_crops: bool = False) -> dict:
        """Pooled feature (the CLS role) and the last map's cells as patch tokens, both normalised."""
        if masks is not None:
            raise ValueError("a ConvNeXt has no mask token: masked-patch training needs a ViT")
        *_, fmap = self._stage_maps(x)
        pooled = fmap.mean(dim=(-2, -1))
        cells = fmap.flatten(2).transpose(1, 2)
        x_norm = self.norm(torch.cat((pooled[:, None], cells), dim=1))
        empty = x_norm[:, 1:1]
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": empty,
            "x_storage_tokens": empty,
            "x_norm_patchtokens": x_norm[:, 1:],
            "x_prenorm": cells,
            "masks": masks,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)["x_norm_clstoken"])

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | list[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Cells of the last `n` stage maps (or of the listed stages), B x N x C (B x C x h x w
        with `reshape`), each optionally paired with its spatial mean; `norm` applies `norms[i]`
        (the final LayerNorm for stage 3 only)."""
        wanted = list(range(4 - n, 4)) if isinstance(n, int) else list(n)
        if any(not 0 <= i < 4 for i in wanted):
            raise ValueError(f"stage indices {wanted} outside 0..3")
        maps = list(self._stage_maps(x, max(wanted))) if wanted else []
        out = []
        for i in wanted:
            fmap = maps[i]
            pooled, cells = fmap.mean(dim=(-2, -1)), fmap.flatten(2).transpose(1, 2)
            if norm:
                pooled, cells = self.norms[i](pooled), self.norms[i](cells)
            if reshape:
                cells = cells.transpose(1, 2).reshape(fmap.shape).contiguous()
            out.append((cells, pooled))
        return tuple(out) if return_class_token else tuple(cells for cells, _ in out)
