"""Config -> backbone and labelled features, and results -> JSON: what `lvd eval` and `lvd viz` share.

The numeric parts (`knn`, `linear`) take arrays; this module is the thin reader/writer around
them: it builds the backbone named in the config, reads the labelled train and test sources,
maps their labels onto one vocabulary, and writes a results file atomically.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from lvd.common.atomic import atomic_write_bytes
from lvd.common.devices import resolve_device
from lvd.pretrain.data.labelled import encode_labels, iter_labelled, label_vocabulary
from lvd.pretrain.eval.features import Preprocessing, extract_labelled_features

log = logging.getLogger(__name__)


def plain(value):
    """A config node as plain Python (lists, dicts), anything else unchanged."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def load_model(
    model: str,
    weights: str | None,
    resolution: int | None,
    device: torch.device,
    overrides: dict | None = None,
    resize_ratio: float = 1.0,
):
    """The backbone named in a config (any registry name, or `auto` for a self-describing weights
    file), in eval mode on `device`, with its preprocessing.

    `weights: null` gives random weights: that is the baseline a pretraining run is compared
    with, so it is allowed, and logged loudly.
    """
    from lvd.pretrain.models import build_backbone
    from lvd.pretrain.models.registry import get_spec

    if weights is None:
        log.warning("%s: no weights given, evaluating RANDOM weights", model)
    backbone = build_backbone(model, weights=weights, **(overrides or {})).to(device).eval()
    spec = get_spec(backbone.arch_name)
    res = int(resolution or spec.resolution)
    if res % backbone.patch_size:
        raise ValueError(f"resolution {res} is not a multiple of the patch size {backbone.patch_size} of {model}")
    return backbone, Preprocessing(res, tuple(spec.mean), tuple(spec.std), float(resize_ratio))


@dataclass
class EvalData:
    """Train and test features with labels on one shared class vocabulary."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    device: torch.device
    meta: dict

    def info(self) -> dict:
        return {
            **self.meta,
            "n_train": int(len(self.train_y)),
            "n_test": int(len(self.test_y)),
            "n_classes": len(self.classes),
            "classes": self.classes,
        }


def _progress(cfg) -> bool | None:
    value = cfg.get("progress", "auto")
    return None if value == "auto" else bool(value)


def _path_stamp(spec) -> object:
    """What changes when a local source or weights file changes: sizes and mtimes."""
    if isinstance(spec, (list, tuple)):
        return [_path_stamp(s) for s in spec]
    if spec is None or str(spec).startswith("pkg://"):
        return spec
    paths = [Path(p) for p in sorted(glob.glob(str(spec)))] or [Path(str(spec))]
    stamp = []
    for p in paths:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.exists() else []
        stamp.append(
            [
                str(p),
                len(files),
                sum(f.stat().st_size for f in files),
                max((f.stat().st_mtime_ns for f in files), default=0),
            ]
        )
    return stamp


def feature_cache_path(cfg) -> Path:
    """`eval.output_dir/features/KEY.npz`, KEY a hash of everything the features depend on."""
    c = cfg.eval
    key = {
        name: plain(c.get(name))
        for name in (
            "model",
            "overrides",
            "weights",
            "resolution",
            "resize_ratio",
            "pooling",
            "dtype",
            "train",
            "test",
            "limit_train",
            "limit_test",
            "seed",
        )
    }
    key["stamps"] = [_path_stamp(plain(c.weights)), _path_stamp(plain(c.train)), _path_stamp(plain(c.test))]
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(c.output_dir) / "features" / f"{digest}.npz"


def _extract(cfg, device: torch.device) -> tuple[dict, Preprocessing]:
    c = cfg.eval
    torch.manual_seed(int(c.seed))  # random-weight baselines are reproducible too
    model, prep = load_model(c.model, c.weights, c.resolution, device, plain(c.get("overrides")), float(c.resize_ratio))
    common = dict(
        batch_size=int(c.batch_size),
        device=device,
        dtype=str(c.dtype),
        pooling=str(c.pooling),
        workers=int(c.workers),
        progress=_progress(cfg),
    )
    start = time.time()
    tr = extract_labelled_features(
        model, iter_labelled(plain(c.train), c.get("limit_train")), prep, desc="train features", **common
    )
    te = extract_labelled_features(
        model, iter_labelled(plain(c.test), c.get("limit_test")), prep, desc="test features", **common
    )
    arrays = {
        "train_x": tr.x,
        "train_labels": np.array(tr.labels),
        "train_skipped": np.array(tr.skipped, dtype=str),
        "test_x": te.x,
        "test_labels": np.array(te.labels),
        "test_skipped": np.array(te.skipped, dtype=str),
        "seconds": np.array(time.time() - start),
        "resolution": np.array(prep.resolution),
    }
    return arrays, prep


def labelled_features(cfg) -> EvalData:
    """Features of `eval.train` and `eval.test` from the configured backbone.

    With `eval.cache_features`, they are kept in `eval.output_dir/features/` under a key of
    the model, weights, preprocessing and sources (their sizes and mtimes included), so that
    `lvd eval linear` after `lvd eval knn` does not run the backbone twice.
    """
    c = cfg.eval
    if c.train is None or c.test is None:
        raise ValueError("eval.train and eval.test must both name a labelled source")
    device = resolve_device(str(c.device))
    cache = feature_cache_path(cfg) if c.get("cache_features", False) else None
    if cache is not None and cache.exists():
        with np.load(cache, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        log.info("features read from the cache %s", cache)
    else:
        arrays, _ = _extract(cfg, device)
        if cache is not None:
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            atomic_write_bytes(cache, buf.getvalue())
    tr_labels, te_labels = arrays["train_labels"].tolist(), arrays["test_labels"].tolist()
    classes = label_vocabulary(tr_labels, te_labels)
    unseen = sorted(set(te_labels) - set(tr_labels))
    if unseen:
        log.warning("test classes absent from the training source (always wrong): %s", unseen)
    meta = {
        "model": c.model,
        "weights": None if c.weights is None else str(c.weights),
        "resolution": int(arrays["resolution"]),
        "resize_ratio": float(c.resize_ratio),
        "pooling": str(c.pooling),
        "train": plain(c.train),
        "test": plain(c.test),
        "feature_dim": int(arrays["train_x"].shape[1]),
        "skipped_undecodable": {"train": arrays["train_skipped"].tolist(), "test": arrays["test_skipped"].tolist()},
        "feature_seconds": round(float(arrays["seconds"]), 3),
        "feature_cache": None if cache is None else str(cache),
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    return EvalData(
        arrays["train_x"],
        encode_labels(tr_labels, classes),
        arrays["test_x"],
        encode_labels(te_labels, classes),
        classes,
        device,
        meta,
    )


def write_results(cfg, name: str, results: dict) -> Path:
    """`eval.output_dir/NAME.json` (plus the merged config beside it); returns the JSON path."""
    out_dir = Path(cfg.eval.output_dir)
    path = out_dir / f"{name}.json"
    atomic_write_bytes(path, (json.dumps(results, indent=2, sort_keys=True) + "\n").encode())
    atomic_write_bytes(out_dir / f"{name}.config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
    log.info("wrote %s", path)
    return path
