"""The DINOv2 vision transformer, assembled from `layers`.

The parameter names are those of the DINOv2 hub checkpoints (`cls_token`, `pos_embed`,
`register_tokens`, `mask_token`, `patch_embed.proj`, `blocks.{i}.…`, `norm`), so a hub
state_dict loads as is and `state_dict()` is loadable by the hub code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lvd.pretrain.models.layers import Block, LayerNorm, PatchEmbed


def drop_path_rates(rate: float, depth: int, uniform: bool = False) -> list[float]:
    """Stochastic-depth rate of each block: `rate` for all (dinov2's training default) or a
    linear ramp 0 -> `rate` (the hub constructors' default), deeper blocks dropping more."""
    if uniform:
        return [float(rate)] * depth
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


class DinoVisionTransformer(nn.Module):
    """ViT with a CLS token, optional register tokens and an iBOT mask token.

    `img_size` fixes only the stored position-embedding grid; any input whose sides are
    multiples of the patch size is accepted (the grid is resampled bicubically).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        ffn_layer: str = "mlp",
        init_values: float | None = 1e-5,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        num_register_tokens: int = 0,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the patch size {patch_size}")
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_register_tokens = num_register_tokens
        self.n_blocks = depth
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        grid = img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        rates = drop_path_rates(drop_path_rate, depth, drop_path_uniform)
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                ffn_layer=ffn_layer,
                init_values=init_values,
                drop_path=rate,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
            )
            for rate in rates
        )
        self.norm = LayerNorm(embed_dim)
        self.head = nn.Identity()
        self.reset_parameters()

    # -- initialisation ----------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Truncated-normal linears and position embeddings, tiny CLS/register tokens (DINOv2's)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # -- tokens ------------------------------------------------------------------------------

    def interpolate_pos_encoding(self, n_tokens: int, height: int, width: int) -> torch.Tensor:
        """Position embeddings for an input of `height` x `width` pixels (1 x (1+h*w) x D).

        The stored grid is resampled bicubically in float32. `interpolate_offset` reproduces the
        DINOv2 hub models (a scale factor of (new+offset)/old); 0 gives the exact target size, as
        Hugging Face and the register models do.
        """
        pos = self.pos_embed
        stored = pos.shape[1] - 1
        h, w = height // self.patch_size, width // self.patch_size
        if n_tokens - 1 == stored and h == w:
            return pos
        side = int(math.sqrt(stored))
        grid = pos[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            scale = ((h + self.interpolate_offset) / side, (w + self.interpolate_offset) / side)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=self.interpolate_antialias)
        else:
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=self.interpolate_antialias)
        if grid.shape[-2:] != (h, w):
            raise RuntimeError(f"position grid resampled to {tuple(grid.shape[-2:])}, expected {(h, w)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat((pos[:, :1], grid.to(pos.dtype)), dim=1)

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Pixels -> [CLS, registers, patches] tokens; masked patches become the mask token."""
        b, _, height, width = x.shape
        tokens = self.patch_embed(x)
        if masks is not None:
            if masks.shape != tokens.shape[:2]:
                raise ValueError(f"mask shape {tuple(masks.shape)} != patch grid {tuple(tokens.shape[:2])}")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = torch.cat((self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(tokens.shape[1], height, width).to(tokens.dtype)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(b, -1, -1).to(tokens.dtype)
            tokens = torch.cat((tokens[:, :1], regs, tokens[:, 1:]), dim=1)
        return tokens

    # -- forward -----------------------------------------------------------------------------

    def _split(self, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = self.num_register_tokens
        return x_norm[:, 0], x_norm[:, 1 : r + 1], x_norm[:, r + 1 :]

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict:
        tokens = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            tokens = blk(tokens)
        x_norm = self.norm(tokens)
        cls, regs, patches = self._split(x_norm)
        return {
            "x_norm_clstoken": cls,
            "x_norm_regtokens": regs,
            "x_norm_patchtokens": patches,
            "x_prenorm": tokens,
            "masks": masks,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised CLS token, B x D."""
        return self.head(self.forward_features(x)["x_norm_clstoken"])

    def _block_outputs(self, x: torch.Tensor, n: int | list[int]) -> list[torch.Tensor]:
        wanted = set(range(self.n_blocks - n, self.n_blocks)) if isinstance(n, int) else set(n)
        bad = [i for i in wanted if not 0 <= i < self.n_blocks]
        if bad:
            raise ValueError(f"block indices {sorted(bad)} outside 0..{self.n_blocks - 1}")
        tokens = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens)
            if i in wanted:
                outputs.append(tokens)
        return outputs

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | list[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Patch tokens of the last `n` blocks (or of the listed block indices).

        reshape=True gives B x D x h x w maps; return_class_token pairs each with its CLS token.
        """
        outputs = self._block_outputs(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        r = self.num_register_tokens
        classes = [out[:, 0] for out in outputs]
        patches = [out[:, r + 1 :] for out in outputs]
        if reshape:
            b, _, height, width = x.shape
            h, w = height // self.patch_size, width // self.patch_size
            patches = [p.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, classes))
        return tuple(patches)

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights of the last block, B x heads x T x T (T counts CLS and registers)."""
        tokens = self.prepare_tokens_with_masks(x)
        for blk in self.blocks[:-1]:
            tokens = blk(tokens)
        last = self.blocks[-1]
        return last.attn.attention_map(last.norm1(tokens))
