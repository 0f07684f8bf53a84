"""Multi-head self-attention on PyTorch's fused kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Self-attention with one fused q/k/v projection (the DINOv2 `attn.qkv` layout).

    `scaled_dot_product_attention` picks the flash / memory-efficient / math kernel for the
    device, so the T x T attention matrix is never materialised where a fused kernel exists.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B x heads x N x head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self._heads(x)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention weights, B x heads x N x N (for visualisation; not the fast path)."""
        q, k, _ = self._heads(x)
        scale = q.shape[-1] ** -0.5
        return torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)
