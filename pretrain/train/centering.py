"""Teacher-output normalisation: softmax centering with an EMA centre, or Sinkhorn-Knopp.

Both turn teacher logits (B x K) into target distributions that avoid collapse: centering
subtracts a running mean of the logits; Sinkhorn-Knopp makes the batch's assignment matrix
(approximately) equipartitioned over the K prototypes. Sums run over all ranks.
"""

from __future__ import annotations

import torch
from torch import nn

from lvd.pretrain.train.distributed import all_reduce_max, all_reduce_sum


def softmax_center(logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """softmax((logits - center) / temp) over the last axis."""
    return torch.softmax((logits.float() - center) / temp, dim=-1)


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, n_iters: int = 3, n_samples: int | None = None) -> torch.Tensor:
    """Target assignments Q (B x K) whose rows sum to 1 and whose columns sum to about B/K.

    `logits` holds this rank's rows; `n_samples` is the number of rows over all ranks (the
    default sums B over ranks). Alternates column (prototype) and row (sample) normalisation,
    finishing with rows, so each sample's target is an exact distribution.
    """
    logits = logits.float()
    # Shift by the max over all ranks (one constant everywhere, so the result is unchanged).
    shift = all_reduce_max(logits.max().reshape(1).clone()) if logits.numel() else logits.new_zeros(1)
    q = torch.exp((logits - shift) / temp).t()  # K x B
    k = q.shape[0]
    if n_samples is None:
        n_samples = int(all_reduce_sum(torch.tensor([q.shape[1]], device=q.device)).item())
    q /= all_reduce_sum(q.sum())
    for _ in range(n_iters):
        per_prototype = all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= per_prototype.clamp_min(1e-30)
        q /= k
        q /= q.sum(dim=0, keepdim=True).clamp_min(1e-30)
        q /= n_samples
    q *= n_samples
    return q.t()


class CenterEMA(nn.Module):
    """Running mean of teacher logits, `center <- m * center + (1 - m) * batch_mean` (all ranks)."""

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def update(self, logits: torch.Tensor) -> None:
        """Fold the mean of `logits` (N x K, this rank's rows) into the centre."""
        total = torch.cat([logits.float().sum(0), logits.new_tensor([logits.shape[0]], dtype=torch.float32)])
        all_reduce_sum(total)
        mean = total[:-1] / total[-1].clamp_min(1.0)
        self.center.mul_(self.momentum).add_(mean.unsqueeze(0), alpha=1 - self.momentum)
