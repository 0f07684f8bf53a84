"""Evaluation of frozen backbones: weighted k-NN and linear probes on labelled image sources."""

from lvd.pretrain.eval.knn import knn_accuracy, knn_scores, run_knn, topk_cosine
from lvd.pretrain.eval.linear import LinearProbe, fit_linear_probe, run_linear

__all__ = ["LinearProbe", "fit_linear_probe", "knn_accuracy", "knn_scores", "run_knn", "run_linear", "topk_cosine"]
