"""Student/teacher model and the DINOv2 objective, one training step's worth of maths.

`SSLModel` is backbone + DINO head (+ untied iBOT head); the student and the teacher are two
instances with identical parameter names, so the EMA update zips them. `SSLObjective` holds
the loss state (EMA centres) and turns both models' outputs into the weighted total loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lvd.pretrain.train.centering import CenterEMA, sinkhorn_knopp, softmax_center
from lvd.pretrain.train.distributed import all_reduce_sum
from lvd.pretrain.train.heads import DINOHead
from lvd.pretrain.train.losses import dino_loss, gram_loss, ibot_patch_loss, koleo_loss


class SSLModel(nn.Module):
    """Backbone + DINO head (+ iBOT head). forward() returns what the losses need."""

    def __init__(self, backbone: nn.Module, head: dict, ibot_head: dict | None):
        super().__init__()
        self.backbone = backbone
        self.dino_head = DINOHead(backbone.embed_dim, **head)
        self.ibot_head = DINOHead(backbone.embed_dim, **ibot_head) if ibot_head is not None else None

    def forward(
        self,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        mask_indices: torch.Tensor | None = None,
    ) -> dict:
        """global_crops: (n_global*B) x 3 x G x G; masks: bool (n_global*B) x N patches or None;
        mask_indices: flat indices of masked patches into (n_global*B*N) (for the iBOT head)."""
        g = self.backbone.forward_features(global_crops, masks=masks)
        cls = g["x_norm_clstoken"]
        all_cls = cls
        if local_crops is not None and local_crops.shape[0] > 0:
            local = self.backbone.forward_features(local_crops, local_crops=True)["x_norm_clstoken"]
            all_cls = torch.cat([cls, local])
        out = {"cls": cls, "dino": self.dino_head(all_cls), "patches": g["x_norm_patchtokens"]}
        if self.ibot_head is not None and mask_indices is not None:
            patches = g["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
            out["ibot"] = self.ibot_head(patches)
        return out


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p  # a DTensor's shard under FSDP


def _paired_parameters(target: nn.Module, source: nn.Module, trainable_only: bool):
    """(target, source) local tensors of same-named parameters; the names must pair up."""
    for model in (target, source):
        if hasattr(model, "reshard"):  # an FSDP2 root keeps its parameters gathered after forward
            model.reshard()
    targets, sources = [], []
    for (tn, tp), (sn, sp) in zip(target.named_parameters(), source.named_parameters(), strict=True):
        if tn != sn:
            raise RuntimeError(f"models differ: {tn} vs {sn}")
        if trainable_only and not sp.requires_grad:
            continue
        targets.append(_local(tp))
        sources.append(_local(sp.detach()))
    return targets, sources


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter.

    Parameters the student does not train (a frozen backbone, a frozen prototype gain) are left
    as they are: averaging equal values would only add rounding. Under FSDP both models are
    sharded alike, so each rank updates its local shards.
    """
    t_params, s_params = _paired_parameters(teacher, student, trainable_only=True)
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


@torch.no_grad()
def copy_parameters(target: nn.Module, source: nn.Module) -> None:
    """target's parameters <- source's, exactly (same names; local shards under FSDP)."""
    t_params, s_params = _paired_parameters(target, source, trainable_only=False)
    torch._foreach_copy_(t_params, s_params)


@dataclass
class MaskInfo:
    """Masks of the student's global crops and what the iBOT loss derives from them."""

    masks: torch.Tensor  # bool (n_global*B) x N
    indices: torch.Tensor  # flat indices of the masked patches, M
    weights: torch.Tensor  # M: 1 / masked patches of the patch's image
    n_images: int  # n_global*B

    @classmethod
    def from_masks(cls, masks: torch.Tensor) -> MaskInfo:
        flat = masks.flatten()
        per_image = masks.sum(-1, keepdim=True).clamp_min(1).float().expand_as(masks)
        return cls(masks, flat.nonzero().flatten(), (1.0 / per_image).flatten()[flat], masks.shape[0])


class SSLObjective(nn.Module):
    """Weighted DINO + iBOT + KoLeo loss; owns the EMA centres (saved in checkpoints)."""

    def __init__(
        self,
        dino_dim: int,
        ibot_dim: int | None,
        *,
        centering: str = "softmax",
        center_momentum: float = 0.9,
        sinkhorn_iters: int = 3,
        student_temp: float = 0.1,
        dino_weight: float = 1.0,
        ibot_weight: float = 1.0,
        koleo_weight: float = 0.1,
        gram_weight: float = 0.0,
        gram_remove_negative: str = "both",
    ):
        super().__init__()
        if centering not in ("softmax", "sinkhorn_knopp"):
            raise ValueError(f"centering must be softmax or sinkhorn_knopp, not {centering!r}")
        self.centering, self.sinkhorn_iters, self.student_temp = centering, sinkhorn_iters, student_temp
        self.weights = {"dino": dino_weight, "ibot": ibot_weight, "koleo": koleo_weight, "gram": gram_weight}
        self.gram_remove_negative = gram_remove_negative
        self.dino_center = CenterEMA(dino_dim, center_momentum)
        self.ibot_center = CenterEMA(ibot_dim, center_momentum) if ibot_dim else None

    def _targets(self, logits: torch.Tensor, center: CenterEMA, temp: float, n_samples=None) -> torch.Tensor:
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp, self.sinkhorn_iters, n_samples=n_samples)
        probs = softmax_center(logits, center.center, temp)
        center.update(logits)  # the centre used is the one from before this batch
        return probs

    def forward(
        self,
        student: dict,
        teacher: dict,
        n_global: int,
        teacher_temp: float,
        mask: MaskInfo | None,
        gram_targets: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The weighted terms and their `total`; `gram_targets` (the Gram teacher's patches of the
        global crops on the student's grid) adds the Gram anchoring term."""
        with torch.no_grad():
            t_dino = self._targets(teacher["dino"].float(), self.dino_center, teacher_temp)
        batch = teacher["dino"].shape[0] // n_global
        views = student["dino"].split(batch)  # n_global global views, then the local views
        out = {"dino": dino_loss(list(views), list(t_dino.split(batch)), self.student_temp)}
        if self.ibot_center is not None and self.weights["ibot"] > 0 and mask is not None:
            with torch.no_grad():
                n_masked = int(all_reduce_sum(torch.tensor([mask.indices.numel()], device=mask.indices.device)).item())
                t_ibot = (
                    self._targets(teacher["ibot"].float(), self.ibot_center, teacher_temp, n_samples=n_masked)
                    if n_masked > 0
                    else teacher["ibot"].float()
                )  # no masked patch anywhere: empty
            out["ibot"] = ibot_patch_loss(student["ibot"], t_ibot, mask.weights, mask.n_images, self.student_temp)
        if self.weights["koleo"] > 0:
            out["koleo"] = sum(koleo_loss(c) for c in student["cls"].chunk(n_global))
        if gram_targets is not None and self.weights["gram"] > 0:
            out["gram"] = gram_loss(student["patches"], gram_targets, self.gram_remove_negative)
        out["total"] = sum(self.weights[k] * v for k, v in out.items())
        return out
