"""Weighted k-NN classification on L2-normalised features (the DINO / dinov2 k-NN evaluation).

Each test vector takes its k most cosine-similar training vectors; neighbour j votes for its
class with weight exp(sim_j / T) (T = 0.07 in the papers), so close neighbours dominate and the
vote degrades gracefully as k grows. The neighbours are found once for the largest k and
reused for the smaller ones. Search is exact and chunked on both sides, so memory stays
bounded by `query_chunk × base_chunk` similarities whatever the set sizes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

WEIGHTINGS = ("exp", "uniform")


def _normalized(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
    return torch.nn.functional.normalize(t, dim=1)


def topk_cosine(
    base: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    query_chunk: int = 1024,
    base_chunk: int = 16384,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k most cosine-similar base rows of every query: (similarities, indices), best first."""
    device = torch.device(device)
    k = min(k, len(base))
    xb = _normalized(base, device)
    xq = _normalized(queries, device)
    sims = np.empty((len(xq), k), dtype=np.float32)
    idx = np.empty((len(xq), k), dtype=np.int64)
    for q0 in range(0, len(xq), query_chunk):
        q = xq[q0 : q0 + query_chunk]
        best_s = torch.full((len(q), 0), -torch.inf, device=device)
        best_i = torch.empty((len(q), 0), dtype=torch.long, device=device)
        for b0 in range(0, len(xb), base_chunk):
            s = q @ xb[b0 : b0 + base_chunk].T
            # Concatenate the running best with this chunk, keep the top k: exact merge.
            cand_s = torch.cat([best_s, s], dim=1)
            cand_i = torch.cat([best_i, torch.arange(b0, b0 + s.shape[1], device=device).expand(len(q), -1)], dim=1)
            best_s, pos = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
            best_i = cand_i.gather(1, pos)
        sims[q0 : q0 + len(q)] = best_s.cpu().numpy()
        idx[q0 : q0 + len(q)] = best_i.cpu().numpy()
    return sims, idx


def vote(
    neighbor_sims: np.ndarray,
    neighbor_labels: np.ndarray,
    n_classes: int,
    *,
    temperature: float = 0.07,
    weighting: str = "exp",
) -> np.ndarray:
    """Class scores (n_queries × n_classes) from the neighbours' similarities and labels."""
    if weighting == "exp":
        weights = np.exp(neighbor_sims.astype(np.float64) / temperature)
    elif weighting == "uniform":
        weights = np.ones(neighbor_sims.shape, dtype=np.float64)
    else:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, not {weighting!r}")
    scores = np.zeros((len(neighbor_labels), n_classes), dtype=np.float64)
    rows = np.broadcast_to(np.arange(len(neighbor_labels))[:, None], neighbor_labels.shape)
    np.add.at(scores, (rows, neighbor_labels), weights)
    return scores


def knn_scores(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    ks: Sequence[int] = (10, 20, 100, 200),
    *,
    temperature: float = 0.07,
    weighting: str = "exp",
    n_classes: int | None = None,
    device: str | torch.device = "cpu",
    query_chunk: int = 1024,
    base_chunk: int = 16384,
) -> dict[int, np.ndarray]:
    """Weighted k-NN class scores for each k; k larger than the training set is clamped."""
    train_y = np.asarray(train_y, dtype=np.int64)
    n_classes = int(train_y.max()) + 1 if n_classes is None else n_classes
    sims, idx = topk_cosine(
        train_x, test_x, max(ks), query_chunk=query_chunk, base_chunk=base_chunk, device=device
    )
    labels = train_y[idx]
    return {
        k: vote(sims[:, :k], labels[:, :k], n_classes, temperature=temperature, weighting=weighting)
        for k in ks
    }


def topk_accuracy(scores: np.ndarray, y: np.ndarray, k: int = 1) -> float:
    """Fraction of rows whose true class is among the k highest scores (ties: lower class first)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((order == np.asarray(y)[:, None]).any(axis=1).mean())


def knn_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    ks: Sequence[int] = (10, 20, 100, 200),
    **kwargs,
) -> dict[int, dict[str, float]]:
    """Top-1 (and top-5 when there are more than 5 classes) accuracy for each k."""
    scores = knn_scores(train_x, train_y, test_x, ks, **kwargs)
    result = {}
    for k, s in scores.items():
        result[k] = {"top1": topk_accuracy(s, test_y, 1)}
        if s.shape[1] > 5:
            result[k]["top5"] = topk_accuracy(s, test_y, 5)
    return result


def run_knn(cfg) -> Path:
    """`lvd eval knn CONFIG`: features of `eval.train` and `eval.test`, k-NN accuracies to JSON."""
    from pretrain.eval.stage import labelled_features, write_results

    c = cfg.eval
    data = labelled_features(cfg)
    ks = [int(k) for k in c.knn.ks]
    acc = knn_accuracy(
        data.train_x, data.train_y, data.test_x, data.test_y, ks,
        temperature=float(c.knn.temperature), n_classes=len(data.classes), device=data.device,
    )
    for k in ks:
        log.info("k-NN k=%d: top-1 %.4f", k, acc[k]["top1"])
    results = {
        "eval": "knn",
        "temperature": float(c.knn.temperature),
        "weighting": "exp",
        "accuracy": {str(k): v for k, v in acc.items()},
        **data.info(),
    }
    return write_results(cfg, "knn", results)
