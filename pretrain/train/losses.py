"""DINOv2 objectives: DINO cross-entropy, iBOT masked-patch cross-entropy, KoLeo regulariser;
and DINOv3's Gram anchoring loss.

Pure functions of tensors: teacher targets come in already normalised (see `centering`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dino_loss(
    student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor], student_temp: float = 0.1
) -> torch.Tensor:
    """Mean cross-entropy H(teacher view i, student view v) over every pair with v != i.

    Views are aligned by index: student views 0..n_t-1 are the same global crops the teacher
    saw, so those same-view pairs are skipped; the remaining student views (local crops) are
    compared with every teacher view. Each pair's term is averaged over the batch.
    """
    log_p = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_logits]
    total, n_pairs = 0.0, 0
    for i, t in enumerate(teacher_probs):
        for v, lp in enumerate(log_p):
            if v == i:
                continue
            total = total + (-(t * lp).sum(-1)).mean()
            n_pairs += 1
    if n_pairs == 0:
        raise ValueError("the DINO loss needs at least one pair of different views")
    return total / n_pairs


def ibot_patch_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    weights: torch.Tensor,
    n_images: int,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """Cross-entropy on masked patches, each image weighted equally.

    `student_logits`, `teacher_probs`: M x K for the M masked patches of the batch; `weights`:
    M, 1 / (masked patches of that patch's image); `n_images`: images in the batch (an image
    without masked patches counts in the denominator, contributing zero).
    """
    ce = -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)
    return (ce * weights).sum() / max(n_images, 1)


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimate -mean(log d_nn) of L2-normalised rows.

    Stable at small batches: a duplicated row has d_nn = 0, which gives log(eps) (finite) and,
    since the distance is sqrt(|a-b|^2 + eps^2), a finite zero gradient instead of NaN.
    Fewer than two rows have no neighbour: the loss is 0.
    """
    if x.shape[0] < 2:
        return x.sum() * 0.0
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        sim = x @ x.t()
        sim.fill_diagonal_(-2.0)
        nn_idx = sim.argmax(dim=1)
    d = torch.sqrt(((x - x[nn_idx]) ** 2).sum(-1) + eps * eps)
    return -torch.log(d + eps).mean()


def gram_loss(student: torch.Tensor, teacher: torch.Tensor, remove_negative: str = "both") -> torch.Tensor:
    """Mean of (S - T)^2 over B x P x P, S and T the per-image Gram matrices of normalised patches.

    The mean over all entries of every image is DINOv3's MSE with `img_level`; the paper writes
    the squared Frobenius norm, P^2 times larger per image, and DINOv3's weights (2.0, 1.5) go
    with the mean.

    `student`, `teacher`: B x P x D patch features of the same B images on the same P-patch
    grid. `remove_negative`: both (negative similarities of S and T set to 0), teacher (of T
    only: what DINOv3's `remove_only_teacher_neg` amounts to, as its student condition tests the
    already clipped teacher) or none (DINOv3's training configs). Computed in float32.
    """
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"student patches {tuple(student.shape)} and teacher patches {tuple(teacher.shape)} differ")
    t = F.normalize(teacher.float(), dim=-1)
    s = F.normalize(student.float(), dim=-1)
    t_gram = t @ t.transpose(1, 2)
    s_gram = s @ s.transpose(1, 2)
    if remove_negative in ("both", "teacher"):
        t_gram = t_gram.clamp_min(0.0)
    if remove_negative == "both":
        s_gram = s_gram.clamp_min(0.0)
    return (s_gram - t_gram).square().mean()
