"""Linear probe on frozen features: a softmax classifier, hyper-parameters picked on held-out data.

As in dinov2's linear evaluation, a whole grid of classifiers (learning rate × weight decay)
is trained at once, with SGD + momentum and a cosine schedule, on the same mini-batches, and
the best is chosen on data the classifiers did not train on (here a stratified split of the
training set, so the test set is never used for selection). The chosen setting is then
retrained on the whole training set.

Features are standardised per dimension first (train mean and std). A linear classifier can
absorb any such affine map, so this changes no attainable decision rule; it makes one
learning-rate grid fit backbones whose feature scales differ by orders of magnitude (random
init vs trained, CLS vs CLS+mean patch).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class LinearProbe:
    """A fitted probe: logits = ((x - mean) / std) @ weight + bias."""

    weight: np.ndarray  # D × C
    bias: np.ndarray  # C
    mean: np.ndarray  # D
    std: np.ndarray  # D
    lr: float
    weight_decay: float
    val_accuracy: dict[str, float] = field(default_factory=dict)  # "lr=..,wd=.." -> accuracy

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, dtype=np.float32) - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.decision_function(x).argmax(axis=1)


def stratified_split(y: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held-out): about `fraction` of each class held out, at least one kept."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        n_held = min(int(round(fraction * len(members))), len(members) - 1)
        held.append(members[:n_held])
        train.append(members[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def standardizer(x: np.ndarray, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of the training features (constant dimensions get std 1)."""
    mean = x.mean(axis=0, dtype=np.float64)
    std = x.std(axis=0, dtype=np.float64)
    return mean.astype(np.float32), np.where(std > eps, std, 1.0).astype(np.float32)


def train_linear_grid(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    grid: Sequence[tuple[float, float]],
    *,
    epochs: int = 100,
    batch_size: int = 1024,
    momentum: float = 0.9,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Train one linear classifier per (lr, weight_decay) on standardised `x`: (G×D×C, G×C).

    Loss is the mean cross-entropy per classifier; weight decay is on the weights, not the
    biases. Every classifier sees the same batches in the same order.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    xt = torch.as_tensor(x, dtype=torch.float32, device=device)
    yt = torch.as_tensor(y, dtype=torch.long, device=device)
    n, d = xt.shape
    g = len(grid)
    lr = torch.tensor([p[0] for p in grid], dtype=torch.float32, device=device).view(g, 1, 1)
    wd = torch.tensor([p[1] for p in grid], dtype=torch.float32, device=device).view(g, 1, 1)
    weight = torch.zeros(g, d, n_classes, device=device, requires_grad=True)
    bias = torch.zeros(g, 1, n_classes, device=device, requires_grad=True)
    w_velocity = torch.zeros_like(weight)
    b_velocity = torch.zeros_like(bias)
    steps_per_epoch = max(1, -(-n // batch_size))
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for s in range(steps_per_epoch):
            batch = order[s * batch_size : (s + 1) * batch_size]
            xb, yb = xt[batch], yt[batch]
            logits = torch.einsum("nd,gdc->gnc", xb, weight) + bias
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, n_classes), yb.repeat(g), reduction="sum"
            ) / len(yb)  # the sum over classifiers of each one's mean loss: independent gradients
            w_grad, b_grad = torch.autograd.grad(loss, [weight, bias])
            # SGD with momentum (torch.optim.SGD's update), one learning rate per classifier,
            # on a cosine schedule; weight decay on the weights only.
            scale = 0.5 * (1.0 + math.cos(math.pi * step / total))
            with torch.no_grad():
                w_velocity.mul_(momentum).add_(w_grad + wd * weight)
                b_velocity.mul_(momentum).add_(b_grad)
                weight.sub_(lr * scale * w_velocity)
                bias.sub_(lr * scale * b_velocity)
            step += 1
    return weight.detach().cpu().numpy(), bias.detach()[:, 0].cpu().numpy()


def fit_linear_probe(
    x: np.ndarray,
    y: np.ndarray,
    *,
    n_classes: int | None = None,
    lrs: Sequence[float] = (0.001, 0.01, 0.1, 1.0),
    weight_decays: Sequence[float] = (0.0, 1e-4, 1e-3),
    val_fraction: float = 0.2,
    epochs: int = 100,
    batch_size: int = 1024,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> LinearProbe:
    """Pick (lr, weight decay) on a held-out split of (x, y), then refit on all of it."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    n_classes = int(y.max()) + 1 if n_classes is None else n_classes
    grid = [(float(lr), float(wd)) for lr in lrs for wd in weight_decays]
    fit_idx, val_idx = stratified_split(y, val_fraction, seed)
    train_opts = dict(epochs=epochs, batch_size=batch_size, seed=seed, device=device)
    val_acc: dict[str, float] = {}
    best = grid[0]
    if len(grid) > 1:
        if len(val_idx) == 0:
            raise ValueError("val_fraction leaves no held-out sample to choose hyper-parameters on")
        mean, std = standardizer(x[fit_idx])
        W, b = train_linear_grid((x[fit_idx] - mean) / std, y[fit_idx], n_classes, grid, **train_opts)
        xv = (x[val_idx] - mean) / std
        accs = [float((((xv @ W[g]) + b[g]).argmax(1) == y[val_idx]).mean()) for g in range(len(grid))]
        val_acc = {f"lr={lr:g},wd={wd:g}": a for (lr, wd), a in zip(grid, accs)}
        best = grid[int(np.argmax(accs))]  # ties: the earliest grid point
        log.info("linear probe: best held-out accuracy %.4f at lr=%g wd=%g", max(accs), *best)
    mean, std = standardizer(x)
    W, b = train_linear_grid((x - mean) / std, y, n_classes, [best], **train_opts)
    return LinearProbe(W[0], b[0], mean, std, best[0], best[1], val_acc)


def run_linear(cfg) -> Path:
    """`lvd eval linear CONFIG`: features of `eval.train` / `eval.test`, a probe, accuracy to JSON."""
    from lvd.pretrain.eval.knn import topk_accuracy
    from lvd.pretrain.eval.stage import labelled_features, write_results

    c = cfg.eval
    data = labelled_features(cfg)
    lin = c.linear
    probe = fit_linear_probe(
        data.train_x,
        data.train_y,
        n_classes=len(data.classes),
        lrs=list(lin.lrs),
        weight_decays=list(lin.weight_decays),
        val_fraction=float(lin.val_fraction),
        epochs=int(lin.epochs),
        batch_size=int(lin.batch_size),
        seed=int(c.seed),
        device=data.device,
    )
    logits = probe.decision_function(data.test_x)
    accuracy = {"top1": topk_accuracy(logits, data.test_y, 1)}
    if logits.shape[1] > 5:
        accuracy["top5"] = topk_accuracy(logits, data.test_y, 5)
    log.info("linear probe: test top-1 %.4f", accuracy["top1"])
    results = {
        "eval": "linear",
        "accuracy": accuracy,
        "lr": probe.lr,
        "weight_decay": probe.weight_decay,
        "epochs": int(lin.epochs),
        "val_fraction": float(lin.val_fraction),
        "val_accuracy": probe.val_accuracy,
        **data.info(),
    }
    return write_results(cfg, "linear", results)
