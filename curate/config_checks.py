"""Value checks for the pipeline config, run when it is loaded.

The defaults fix which keys exist; these checks fix what each may hold (type, range, choice,
registry name), so `lvd config` rejects what a run would reject, before any stage starts.
One table, one line per key: a check returns an error message, or None when the value is fine.
"""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig

from lvd.common.config_checks import Check, boolean, choice, integer, number
from lvd.common.config_checks import config_problems as common_problems


def registry_model(value) -> str | None:
    from lvd.pretrain.models.registry import list_models

    names = list_models()
    if value == "auto" or value in names:
        return None
    return (
        f"must be auto (the architecture the weights file records) or a registry model ({', '.join(names)}), "
        f"got {value!r}"
    )


def copy_space(value) -> str | None:
    from lvd.pretrain.models.copy_detection import KNOWN_SPACES

    return (
        None
        if value is None or value in KNOWN_SPACES
        else f"must be null or one of {list(KNOWN_SPACES)}, got {value!r}"
    )


def resolution(value) -> str | None:
    if value is None or value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return None
    return f"must be null, auto or a number of pixels, got {value!r}"


def phrase_list(value) -> str | None:
    if isinstance(value, (list, tuple, ListConfig)) and all(isinstance(v, str) and v.strip() for v in value):
        return None
    return f"must be a list of phrases, e.g. [dog, a watermark], got {value!r}"


DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
BACKENDS = ("auto", "faiss", "torch")

CHECKS: dict[str, Check] = {
    "seed": integer(lo=0),
    "workers": number(lo=0, words=("auto",)),
    "progress": lambda v: None if v in (True, False, "auto") else f"must be true, false or auto, got {v!r}",
    "overwrite": boolean,
    "memory_gb": number(lo=1e-9, words=("auto",)),
    "decode.max_pixels": integer(lo=1, nullable=True),
    "decode.max_bytes": integer(lo=1, nullable=True),
    "manifest.part_size": integer(lo=1),
    "manifest.follow_symlinks": boolean,
    "embed.model": registry_model,
    "embed.allow_random": boolean,
    "embed.resolution": resolution,
    "embed.max_upscale": number(lo=1e-9),
    "embed.batch_size": integer(lo=1),
    "embed.dtype": choice(*DTYPES),
    "embed.cls_and_mean_patch": boolean,
    "embed.resize_ratio": number(lo=1.0),
    "embed.part_size": integer(lo=1),
    "embed.threads": number(lo=1, words=("auto",)),
    "embed.copy_detection.space": copy_space,
    "embed.copy_detection.resolution": integer(lo=1),
    "detect.box_threshold": number(lo=0.0, hi=1.0),
    "detect.text_threshold": number(lo=0.0, hi=1.0),
    "detect.size": integer(lo=128, nullable=True),
    "detect.batch_size": integer(lo=1),
    "detect.part_size": integer(lo=1),
    "filter.require.phrases": phrase_list,
    "filter.exclude.phrases": phrase_list,
    "filter.require.min_score": number(lo=0.0, hi=1.0),
    "filter.require.min_area": number(lo=0.0, hi=1.0),
    "filter.exclude.min_score": number(lo=0.0, hi=1.0),
    "filter.exclude.min_area": number(lo=0.0, hi=1.0),
    "dedup.k": integer(lo=1),
    "dedup.threshold": number(words=("auto",)),
    "dedup.backend": choice(*BACKENDS),
    "dedup.mode": choice("knn", "semdedup"),
    "dedup.grouping": choice("components", "star"),
    "dedup.keep": choice("quality", "pixels"),
    "dedup.semdedup_clusters": integer(lo=1, nullable=True),
    "dedup.niter": integer(lo=1),
    "decontam.threshold": number(words=("auto",)),
    "cluster.k": integer(lo=1),
    "cluster.method": choice("flat", "hierarchical"),
    "cluster.niter": lambda v: None if v == "auto" else integer(lo=1)(v),
    "cluster.spherical": boolean,
    "cluster.balanced_sample": lambda v: None if v == "auto" else integer(lo=0)(v),
    "cluster.backend": choice(*BACKENDS),
    "retrieve.mode": choice("sample", "cluster"),
    "retrieve.n": integer(lo=1),
    "retrieve.m": integer(lo=1),
    "retrieve.target": integer(lo=1, nullable=True),
    "retrieve.min_similarity": number(words=("auto",), nullable=True),
    "retrieve.floor_quantile": number(lo=0.0, hi=1.0),
    "retrieve.include_seeds": boolean,
    "retrieve.backend": choice(*BACKENDS),
    "shards.select": choice("auto", "retrieve", "balanced", "both"),
    "shards.max_count": integer(lo=1),
    "shards.max_bytes": integer(lo=1),
    "shards.shuffle": boolean,
    "shards.resize": integer(lo=1, nullable=True),
    "shards.quality": integer(lo=1, hi=100),
    "shards.mtime": integer(lo=0),
    "shards.crops": boolean,
}


def config_problems(cfg: DictConfig) -> list[str]:
    """`key: message` for every pipeline value the table rejects."""
    return common_problems(cfg, CHECKS)
