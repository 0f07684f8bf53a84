"""Weighted k-NN classification on L2-normalised features (the DINO / dinov2 k-NN evaluation).

Each test vector takes its k most cosine-similar training vectors; neighbour j votes for its
class with weight exp(sim_j / T) (T = 0.07 in the papers), so close neighbours dominate and the
vote degrades gracefully as k grows. The neighbours are found once for the largest k and
reused for the smaller ones. The search is exact: Faiss's flat inner-product search on the
CPU, or a torch matmul + top-k chunked on both sides (any device, memory bounded by
`query_chunk × base_chunk` similarities whatever the set sizes).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

WEIGHTINGS = ("exp", "uniform")


def _normalized(x: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
    return torch.nn.functional.normalize(t, dim=1)


def _faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def _topk_faiss(xb: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    sims, idx = faiss.knn(np.ascontiguousarray(xq), np.ascontiguousarray(xb), k, metric=faiss.METRIC_INNER_PRODUCT)
    return sims, idx.astype(np.int64, copy=False)


def _topk_torch(
    xb: torch.Tensor, xq: torch.Tensor, k: int, query_chunk: int, base_chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    device = xb.device
    sims = np.empty((len(xq), k), dtype=np.float32)
    idx = np.empty((len(xq), k), dtype=np.int64)
    for q0 in range(0, len(xq), query_chunk):
        q = xq[q0 : q0 + query_chunk]
        best_s = torch.empty((len(q), 0), device=device)
        best_i = torch.empty((len(q), 0), dtype=torch.long, device=device)
        for b0 in range(0, len(xb), base_chunk):
            s = q @ xb[b0 : b0 + base_chunk].T
            # The running best concatenated with this chunk, top k kept: an exact merge.
            cand_s = torch.cat([best_s, s], dim=1)
            ids = torch.arange(b0, b0 + s.shape[1], device=device).expand(len(q), -1)
            cand_i = torch.cat([best_i, ids], dim=1)
            best_s, pos = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
            best_i = cand_i.gather(1, pos)
        sims[q0 : q0 + len(q)] = best_s.cpu().numpy()
        idx[q0 : q0 + len(q)] = best_i.cpu().numpy()
    return sims, idx


def topk_cosine(
    base: np.ndarray,
    queries: np.ndarray,
    k: int,
    *,
    backend: str = "auto",
    query_chunk: int = 1024,
    base_chunk: int = 16384,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k most cosine-similar base rows of every query: (similarities, indices), best first.

    backend: `faiss` (exact flat inner-product search, CPU), `torch` (chunked matmul + top-k
    on `device`, memory bounded by query_chunk × base_chunk), or `auto` (Faiss on the CPU when
    it is installed, torch otherwise).
    """
    device = torch.device(device)
    if backend == "auto":
        backend = "faiss" if device.type == "cpu" and _faiss_available() else "torch"
    k = min(k, len(base))
    xb = _normalized(base, device)
    xq = _normalized(queries, device)
    if backend == "faiss":
        if device.type != "cpu":
            raise ValueError("the faiss backend searches on the CPU; use backend='torch' on other devices")
        return _topk_faiss(xb.numpy(), xq.numpy(), k)
    if backend == "torch":
        return _topk_torch(xb, xq, k, query_chunk, base_chunk)
    raise ValueError(f"backend must be auto, faiss or torch, not {backend!r}")


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
    query_chunk: int = 1024,
    base_chunk: int = 16384,
) -> dict[int, np.ndarray]:
    """Weighted k-NN class scores for each k; k larger than the training set is clamped."""
    train_y = np.asarray(train_y, dtype=np.int64)
    n_classes = int(train_y.max()) + 1 if n_classes is None else n_classes
    sims, idx = topk_cosine(
        train_x,
        test_x,
        max(ks),
        backend=backend,
        query_chunk=query_chunk,
        base_chunk=base_chunk,
        device=device,
    )
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
    base_chunk: int = 16384,
) -> dict[int, dict[str, float]]:
    """Top-1 (and top-5 when there are more than 5 classes) accuracy for each k.

    Votes are counted a chunk of queries at a time, so 50,000 queries × 1,000 classes never
    sit in memory as one score matrix per k.
    """
    train_y = np.asarray(train_y, dtype=np.int64)
    test_y = np.asarray(test_y, dtype=np.int64)
    n_classes = int(max(train_y.max(), test_y.max())) + 1 if n_classes is None else n_classes
    sims, idx = topk_cosine(
        train_x,
        test_x,
        max(ks),
        backend=backend,
        query_chunk=query_chunk,
        base_chunk=base_chunk,
        device=device,
    )
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
