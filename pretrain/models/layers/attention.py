"""Multi-head self-attention on PyTorch's fused kernel, with optional RoPE and masked key bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lvd.pretrain.models.layers.rope import apply_rope

Rope = tuple[torch.Tensor, torch.Tensor]  # (sin, cos), each patches x head_dim


class MaskedKeyBiasLinear(nn.Linear):
    """The fused q/k/v projection of the DINOv3 ViTs: its key bias is multiplied by 0.

    Without RoPE a key bias adds the same logit to every key of a query and cancels in the
    softmax; with RoPE it is rotated per position and would not cancel, so DINOv3 zeroes it.
    The 0/1 `bias_mask` (1 for q, 0 for k, 1 for v) is a stored buffer, as in the released files.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if out_features % 3:
            raise ValueError(f"a q/k/v projection needs a multiple of 3 outputs, got {out_features}")
        if bias:
            self.register_buffer("bias_mask", key_bias_mask(out_features), persistent=True)

    def reset_mask(self) -> None:
        if self.bias is not None:
            with torch.no_grad():
                self.bias_mask.copy_(key_bias_mask(self.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.bias_mask.to(self.bias.dtype) if self.bias is not None else None
        return F.linear(x, self.weight, bias)


def key_bias_mask(out_features: int) -> torch.Tensor:
    third = out_features // 3
    mask = torch.ones(out_features)
    mask[third : 2 * third] = 0.0
    return mask


class Attention(nn.Module):
    """Self-attention with one fused q/k/v projection (the `attn.qkv` layout of the DINO hubs).

    `scaled_dot_product_attention` picks the flash / memory-efficient / math kernel for the
    device, so the T x T attention matrix is never materialised where a fused kernel exists.
    `rope` (sin, cos) rotates the queries and keys of the last patch tokens (DINOv3).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        mask_k_bias: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        linear = MaskedKeyBiasLinear if mask_k_bias else nn.Linear
        self.qkv = linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def _heads(self, x: torch.Tensor, rope: Rope | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B x heads x N x head_dim
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self._heads(x, rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def attention_map(self, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
        """Softmax attention weights, B x heads x N x N (for visualisation; not the fast path)."""
        q, k, _ = self._heads(x, rope)
        scale = q.shape[-1] ** -0.5
        return torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)
