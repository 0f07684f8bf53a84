"""The pretrain configuration: defaults from configs/pretrain.yaml, file and `a.b=v` overrides.

`lvd pretrain CONFIG [k=v]` does the same merge; this loader serves
scripts, tests and benchmarks that call `run_pretrain` directly.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from lvd.common.config import merge_config


def default_config_path() -> Path:
    """curate/configs/pretrain.yaml: beside this package in a checkout and in an installed `lvd` alike.

    Only the file is read; nothing of `curate` is imported (pretrain depends on no other package of ours).
    """
    path = Path(__file__).resolve().parents[2] / "curate" / "configs" / "pretrain.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the lvd installation is incomplete")
    return path


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> DictConfig:
    """defaults <- file <- overrides; keys absent from the defaults are errors (`lvd.common.config`)."""
    return merge_config(default_config_path(), path, overrides)


def effective_loss_settings(cfg: DictConfig) -> dict:
    """What the losses and masking really use once `mode` is applied (dino = DINO v1)."""
    dino_v1 = cfg.mode == "dino"
    if cfg.mode not in ("dino", "dinov2"):
        raise ValueError(f"mode must be dino or dinov2, not {cfg.mode!r}")
    return {
        "centering": "softmax" if dino_v1 else cfg.loss.centering,
        "ibot": (not dino_v1) and cfg.loss.ibot_weight > 0,
        "ibot_weight": 0.0 if dino_v1 else float(cfg.loss.ibot_weight),
        "koleo_weight": 0.0 if dino_v1 else float(cfg.loss.koleo_weight),
        "dino_weight": float(cfg.loss.dino_weight),
    }
