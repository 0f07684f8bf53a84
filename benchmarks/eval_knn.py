"""Weighted k-NN evaluation: lvd (auto = Faiss search on the CPU; torch backend) vs Faiss and scikit-learn.

All three vote the same way (exp(sim / T), T = 0.07, k = 10, 20, 100, 200); the script checks
that the accuracies agree and prints the time of each and the ratios. Synthetic clustered
features of a ViT-S size (384-d) stand in for an ImageNet-like split.

    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/eval_knn.py [--train 60000 --test 10000]
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
from sklearn.neighbors import KNeighborsClassifier

from lvd.pretrain.eval.knn import knn_accuracy, topk_accuracy, vote

KS = (10, 20, 100, 200)
T = 0.07


def features(n, d, n_classes, seed):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(size=(n_classes, d)).astype(np.float32)
    y = rng.integers(0, n_classes, n)
    x = centres[y] + 4.0 * rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


def faiss_knn(train_x, train_y, test_x, test_y, n_classes):
    sims, idx = faiss.knn(test_x, train_x, max(KS), metric=faiss.METRIC_INNER_PRODUCT)
    labels = train_y[idx]
    return {k: topk_accuracy(vote(sims[:, :k], labels[:, :k], n_classes, temperature=T), test_y) for k in KS}


def sklearn_knn(train_x, train_y, test_x, test_y):
    out = {}
    for k in KS:
        clf = KNeighborsClassifier(k, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / T))
        out[k] = clf.fit(train_x, train_y).score(test_x, test_y)
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=60000)
    ap.add_argument("--test", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--sklearn-test", type=int, default=2000, help="sklearn is run on this many test rows")
    args = ap.parse_args()
    train_x, train_y = features(args.train, args.dim, args.classes, 0)
    test_x, test_y = features(args.test, args.dim, args.classes, 1)

    ours, t_ours = timed(lambda: knn_accuracy(train_x, train_y, test_x, test_y, KS, n_classes=args.classes))
    torch_b, t_torch = timed(
        lambda: knn_accuracy(train_x, train_y, test_x, test_y, KS, n_classes=args.classes, backend="torch")
    )
    peer, t_faiss = timed(lambda: faiss_knn(train_x, train_y, test_x, test_y, args.classes))
    for k in KS:
        assert abs(ours[k]["top1"] - peer[k]) < 1e-3, (k, ours[k], peer[k])
        assert abs(torch_b[k]["top1"] - peer[k]) < 1e-3, (k, torch_b[k], peer[k])
    m = args.sklearn_test
    ours_m, t_ours_m = timed(lambda: knn_accuracy(train_x, train_y, test_x[:m], test_y[:m], KS, n_classes=args.classes))
    skl, t_skl = timed(lambda: sklearn_knn(train_x, train_y, test_x[:m], test_y[:m]))
    for k in KS:
        assert abs(ours_m[k]["top1"] - skl[k]) < 1e-3, (k, ours_m[k], skl[k])

    print(f"train {args.train} x {args.dim}, test {args.test}, {args.classes} classes, k = {KS}")
    print("top-1:", {k: round(v["top1"], 4) for k, v in ours.items()}, "(faiss and sklearn agree to 1e-3)")
    print(f"lvd knn_accuracy (auto)    {t_ours:7.2f} s   lvd/faiss time ratio {t_ours / t_faiss:.2f}")
    print(f"lvd knn_accuracy (torch)   {t_torch:7.2f} s   lvd-torch/faiss time ratio {t_torch / t_faiss:.2f}")
    print(f"faiss.knn + numpy vote     {t_faiss:7.2f} s")
    print(
        f"on {m} test rows: lvd {t_ours_m:.2f} s, sklearn brute (4 ks) {t_skl:.2f} s   "
        f"sklearn/lvd {t_skl / t_ours_m:.1f}x"
    )


if __name__ == "__main__":
    main()
