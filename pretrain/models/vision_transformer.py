"""The DINO vision transformers (DINO v1, DINOv2, DINOv3), assembled from `layers`.

One class covers the three generations; what differs is a handful of arguments:

| | DINO v1 | DINOv2 | DINOv3 |
|---|---|---|---|
| positions | learned grid, resampled | learned grid, resampled | RoPE on patch tokens |
| LayerScale | no | yes | yes |
| extra tokens | none | `register_tokens` (`_reg`) | 4 `storage_tokens` |
| q/k/v bias | plain | plain | key bias masked (`bias_mask`) |
| SwiGLU layout | - | fused `w12` | separate `w1`, `w2` |
| LayerNorm eps | 1e-6 | 1e-6 | 1e-5 |
| sides not a multiple of the patch | cropped | error | cropped |

The parameter names are those of each family's hub checkpoints (`cls_token`, `pos_embed`,
`register_tokens` / `storage_tokens`, `mask_token`, `rope_embed.periods`, `patch_embed.proj`,
`blocks.{i}.…`, `norm`, `local_cls_norm`), so a hub state_dict loads as is and `state_dict()`
is loadable by the hub code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lvd.pretrain.models.layers import Block, MaskedKeyBiasLinear, PatchEmbed, RopePositionEmbedding

POSITION_ENCODINGS = ("learned", "rope")
REGISTER_KEYS = ("register_tokens", "storage_tokens")


def drop_path_rates(rate: float, depth: int, uniform: bool = False) -> list[float]:
    """Stochastic-depth rate of each block: `rate` for all (dinov2's training default) or a
    linear ramp 0 -> `rate` (the hub constructors' default), deeper blocks dropping more."""
    if uniform:
        return [float(rate)] * depth
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


class DinoVisionTransformer(nn.Module):
    """ViT with a CLS token, optional register/storage tokens and an optional iBOT mask token.

    `img_size` fixes only the stored position-embedding grid of the learned encodings; any
    input is accepted (with `crop_remainder`, sides are cut down to multiples of the patch).
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
        position_encoding: str = "learned",
        rope_base: float = 100.0,
        rope_shift: float | None = None,
        rope_jitter: float | None = None,
        rope_rescale: float | None = None,
        norm_eps: float = 1e-6,
        mask_k_bias: bool = False,
        swiglu_fused: bool = True,
        register_key: str = "register_tokens",
        mask_token: bool = True,
        local_cls_norm: bool = False,
        crop_remainder: bool = False,
        token_init_std: float = 1e-6,
    ) -> None:
        super().__init__()
        if position_encoding not in POSITION_ENCODINGS:
            raise ValueError(f"position_encoding must be one of {POSITION_ENCODINGS}, not {position_encoding!r}")
        if register_key not in REGISTER_KEYS:
            raise ValueError(f"register_key must be one of {REGISTER_KEYS}, not {register_key!r}")
        if position_encoding == "learned" and img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the patch size {patch_size}")
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_register_tokens = num_register_tokens
        self.n_blocks = depth
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        self.token_init_std = token_init_std
        self.register_key = register_key

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, crop_remainder=crop_remainder)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if position_encoding == "learned":
            grid = img_size // patch_size
            self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
            self.rope_embed = None
        else:
            self.pos_embed = None
            self.rope_embed = RopePositionEmbedding(
                embed_dim // num_heads, rope_base, shift=rope_shift, jitter=rope_jitter, rescale=rope_rescale
            )
        registers = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        setattr(self, register_key, registers)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if mask_token else None
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
                norm_eps=norm_eps,
                mask_k_bias=mask_k_bias,
                swiglu_fused=swiglu_fused,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        # DINOv3 ViT-7B and the satellite ViT-L normalise local crops' CLS/storage tokens with
        # their own LayerNorm while training; evaluation always uses `norm`.
        self.local_cls_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if local_cls_norm else None
        self.head = nn.Identity()
        self.reset_parameters()

    @property
    def registers(self) -> torch.Tensor | None:
        """The register (DINOv2) or storage (DINOv3) tokens, 1 x R x D, or None."""
        return getattr(self, self.register_key)

    @property
    def n_storage_tokens(self) -> int:
        return self.num_register_tokens

    # -- initialisation ----------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Truncated-normal linears and position embeddings, small CLS/register tokens.

        The token scale is the family's (`token_init_std`: 1e-6 in DINOv2, 0.02 in DINO v1 and
        DINOv3); masked key biases get their 1/0/1 mask.
        """
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.rope_embed is not None:
            self.rope_embed.reset_parameters()
        nn.init.normal_(self.cls_token, std=self.token_init_std)
        if self.registers is not None:
            nn.init.normal_(self.registers, std=self.token_init_std)
        if self.mask_token is not None:
            nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            if isinstance(module, MaskedKeyBiasLinear):
                module.reset_mask()

    # -- tokens ------------------------------------------------------------------------------

    def interpolate_pos_encoding(self, n_tokens: int, height: int, width: int) -> torch.Tensor:
        """Learned position embeddings for an input of `height` x `width` pixels (1 x (1+h*w) x D).

        A square input with the stored number of patches uses the stored grid; otherwise it is
        resampled bicubically in float32. `interpolate_offset` reproduces the DINO v1 and DINOv2
        hub models (a scale factor of (new+offset)/old); 0 gives the exact target size, as
        Hugging Face and the DINOv2 register models do.
        """
        pos = self.pos_embed
        stored = pos.shape[1] - 1
        h, w = height // self.patch_size, width // self.patch_size
        if n_tokens - 1 == stored and height == width:
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
            if self.mask_token is None:
                raise ValueError("this backbone has no mask token (build it with mask_token=True to train with masks)")
            if masks.shape != tokens.shape[:2]:
                raise ValueError(f"mask shape {tuple(masks.shape)} != patch grid {tuple(tokens.shape[:2])}")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = torch.cat((self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens), dim=1)
        if self.pos_embed is not None:
            tokens = tokens + self.interpolate_pos_encoding(tokens.shape[1], height, width).to(tokens.dtype)
        if self.registers is not None:
            regs = self.registers.expand(b, -1, -1).to(tokens.dtype)
            tokens = torch.cat((tokens[:, :1], regs, tokens[:, 1:]), dim=1)
        return tokens

    def _run_blocks(self, x: torch.Tensor, tokens: torch.Tensor, blocks, taps: set[int] | None = None):
        """Run `blocks` on the `tokens` of image batch `x`: (final tokens, outputs of the blocks in `taps`).

        RoPE tables are computed once, or per block when training draws random coordinates
        (each block its own draw, as DINOv3 trains).
        """
        rope = None
        grid = self.patch_embed.grid(*x.shape[-2:])  # the patch grid the RoPE tables describe
        if self.rope_embed is not None and not self.rope_embed.augments:
            rope = self.rope_embed(*grid)
        outputs = []
        for i, blk in enumerate(blocks):
            if self.rope_embed is not None and self.rope_embed.augments:
                rope = self.rope_embed(*grid)
            tokens = blk(tokens, rope)
            if taps is not None and i in taps:
                outputs.append(tokens)
        return tokens, outputs

    # -- forward -----------------------------------------------------------------------------

    def _split(self, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = self.num_register_tokens
        return x_norm[:, 0], x_norm[:, 1 : r + 1], x_norm[:, r + 1 :]

    def _final_norm(self, tokens: torch.Tensor, local_crops: bool) -> torch.Tensor:
        if self.local_cls_norm is not None and self.training and local_crops:
            prefix = self.num_register_tokens + 1
            return torch.cat((self.local_cls_norm(tokens[:, :prefix]), self.norm(tokens[:, prefix:])), dim=1)
        return self.norm(tokens)

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None, local_crops: bool = False) -> dict:
        """The shared backbone contract: normalised CLS, register/storage and patch tokens.

        `local_crops` marks a batch of local crops (only models with `local_cls_norm` treat
        them differently, and only while training).
        """
        tokens = self.prepare_tokens_with_masks(x, masks)
        tokens, _ = self._run_blocks(x, tokens, self.blocks)
        x_norm = self._final_norm(tokens, local_crops)
        cls, regs, patches = self._split(x_norm)
        return {
            "x_norm_clstoken": cls,
            "x_norm_regtokens": regs,
            "x_storage_tokens": regs,
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
        last = max(wanted) + 1 if wanted else 0
        _, outputs = self._run_blocks(x, self.prepare_tokens_with_masks(x), self.blocks[:last], wanted)
        return outputs

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | list[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
        return_extra_tokens: bool = False,
    ) -> tuple:
        """Patch tokens of the last `n` blocks (or of the listed block indices).

        reshape=True gives B x D x h x w maps; return_class_token pairs each with its CLS token,
        return_extra_tokens with its register/storage tokens (CLS first when both).
        """
        outputs = self._block_outputs(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        r = self.num_register_tokens
        classes = [out[:, 0] for out in outputs]
        extras = [out[:, 1 : r + 1] for out in outputs]
        patches = [out[:, r + 1 :] for out in outputs]
        if reshape:
            h, w = self.patch_embed.grid(*x.shape[-2:])
            patches = [p.reshape(len(x), h, w, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        parts = [patches] + ([classes] if return_class_token else []) + ([extras] if return_extra_tokens else [])
        return tuple(zip(*parts)) if len(parts) > 1 else tuple(patches)

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention weights of the last block, B x heads x T x T (T counts CLS and registers)."""
        tokens = self.prepare_tokens_with_masks(x)
        tokens, _ = self._run_blocks(x, tokens, self.blocks[:-1])
        rope = self.rope_embed(*self.patch_embed.grid(*x.shape[-2:])) if self.rope_embed is not None else None
        last = self.blocks[-1]
        return last.attn.attention_map(last.norm1(tokens), rope)
