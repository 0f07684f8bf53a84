"""Weighted k-NN classification on L2-normalised features (the DINO / dinov2 k-NN evaluation).

Each test vector takes its k most cosine-similar training vectors; neighbour j votes for its
class with weight exp(sim_j / T) (T = 0.07 in the papers), so close neighbours dominate and the
vote degrades gracefully as k grows. The neighbours are found once for the largest k and
reused for the smaller ones. The search is exact: lvd's one exact search (`lvd.index.backends`:
Faiss's flat inner-product search, or torch's blocked matmul + top-k on any device).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lvd.index.backends import get_backend

log = logging.getLogger(__name__)

WEIGHTINGS = ("exp", "uniform")


def topk_cosine(
    base: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    backend: str = "auto",
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k most cosine-similar base rows of every query: (similarities, indices), best first.

    The rows are L2-normalised here and searched by lvd's exact inner-product search
    (`lvd.index.backends`: `faiss`, `torch` in float32 on `device`, or `auto`).
    """
    k = min(k, len(base))
    xb, xq = _normalized(base), _normalized(queries)
    return get_backend(backend, device, "fp32").search(xb, xq, k)


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


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
    n = len(neighbor_labels)
    flat = (np.arange(n)[:, None] * n_classes + neighbor_labels).ravel()
    return np.bincount(flat, weights=weights.ravel(), minlength=n * n_classes).reshape(n, n_classes)


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
    backend: str = "auto",
) -> dict[int, np.ndarray]:
    """Weighted k-NN class scores for each k; k larger than the training set is clamped."""
    train_y = np.asarray(train_y, dtype=np.int64)
    n_classes = int(train_y.max()) + 1 if n_classes is None else n_classes
    sims, idx = topk_cosine(train_x, test_x, max(ks), backend=backend, device=device)
    labels = train_y[idx]
    return {k: vote(sims[:, :k], labels[:, :k], n_classes, temperature=temperature, weighting=weighting) for k in ks}


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
    *,
    temperature: float = 0.07,
    weighting: str = "exp",
    n_classes: int | None = None,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    query_chunk: int = 1024,
) -> dict[int, dict[str, float]]:
    """Top-1 (and top-5 when there are more than 5 classes) accuracy for each k.

    Votes are counted a chunk of queries at a time, so 50,000 queries × 1,000 classes never
    sit in memory as one score matrix per k.
    """
    train_y = np.asarray(train_y, dtype=np.int64)
    test_y = np.asarray(test_y, dtype=np.int64)
    n_classes = int(max(train_y.max(), test_y.max())) + 1 if n_classes is None else n_classes
    sims, idx = topk_cosine(train_x, test_x, max(ks), backend=backend, device=device)
    labels = train_y[idx]
    tops = (1, 5) if n_classes > 5 else (1,)
    hits = {k: dict.fromkeys(tops, 0.0) for k in ks}
    for q0 in range(0, len(test_y), query_chunk):
        rows = slice(q0, q0 + query_chunk)
        for k in ks:
            scores = vote(sims[rows, :k], labels[rows, :k], n_classes, temperature=temperature, weighting=weighting)
            for t in tops:
                hits[k][t] += topk_accuracy(scores, test_y[rows], t) * len(scores)
    return {k: {f"top{t}": hits[k][t] / len(test_y) for t in tops} for k in ks}


def run_knn(cfg) -> Path:
    """`lvd eval knn CONFIG`: features of `eval.train` and `eval.test`, k-NN accuracies to JSON."""
    from lvd.pretrain.eval.stage import labelled_features, write_results

    c = cfg.eval
    data = labelled_features(cfg)
    ks = [int(k) for k in c.knn.ks]
    acc = knn_accuracy(
        data.train_x,
        data.train_y,
        data.test_x,
        data.test_y,
        ks,
        temperature=float(c.knn.temperature),
        n_classes=len(data.classes),
        device=data.device,
        backend=str(c.knn.backend),
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
