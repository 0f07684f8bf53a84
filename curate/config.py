"""Pipeline configuration: packaged defaults -> a config file -> dotted overrides.

The defaults are a closed schema: a key that `configs/default.yaml` does not list is an
error naming that key, so a typo never silently falls back to a default. The only open
mappings are those the defaults leave empty (`{}`), such as the seed and eval source tables,
whose keys are the user's set names.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from lvd.common.config import ConfigError, merge_config, packaged_config_path  # noqa: F401 (ConfigError: raised for the pipeline too)


def resolve_config_path(spec: str | os.PathLike) -> Path:
    """A config argument is a file path, or the name of a packaged config."""
    path = Path(spec)
    if path.is_file():
        return path
    try:
        return packaged_config_path(path.name if path.suffix == ".yaml" else str(spec))
    except ConfigError:
        raise ConfigError(f"config file not found: {spec}") from None


def load_config(
    path: str | os.PathLike | None = None, overrides: Sequence[str] = (), defaults: str = "default"
) -> DictConfig:
    """Merge the defaults, an optional config file and `a.b=value` overrides; check the keys.

    `defaults` names the packaged schema: `default` for the pipeline, `pretrain` for training.
    """
    cfg = merge_config(
        packaged_config_path(defaults), resolve_config_path(path) if path is not None else None, overrides
    )
    if defaults == "default":
        from lvd.curate.config_checks import config_problems

        problems = config_problems(cfg)
        if problems:
            raise ConfigError("; ".join(problems))
    elif defaults == "pretrain":
        from lvd.pretrain.train.config import check_values

        check_values(cfg)
    return cfg


def save_config(cfg: DictConfig, run_dir: str | os.PathLike) -> Path:
    """Write the merged config as RUN/config.yaml (atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    from lvd.common.atomic import atomic_write_text

    return atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))


def as_list(value) -> list:
    """A config value that may be a scalar or a list, as a plain list."""
    if value is None:
        return []
    if isinstance(value, (ListConfig, list, tuple)):
        return list(value)
    return [value]


def named_sources(mapping) -> list[tuple[str, list[str]]]:
    """`{NAME: SOURCE | [SOURCE...]}` as a name-sorted list of (name, [source, ...])."""
    return [(str(name), [str(s) for s in as_list(mapping[name])]) for name in sorted(mapping or {})]


def iter_keys(cfg: DictConfig, prefix: str = "") -> Iterable[str]:
    """Every dotted leaf key of a config (for listing and tests)."""
    for key in cfg:
        value = cfg[key]
        dotted = f"{prefix}{key}"
        if isinstance(value, DictConfig) and len(value):
            yield from iter_keys(value, dotted + ".")
        else:
            yield dotted
