"""Config merging for every lvd config: defaults (a closed schema) -> a file -> `a.b=value` overrides.

A key the defaults do not list is an error naming it, so a typo never silently falls back to a
default; the only open mappings are those the defaults leave empty (`{}`), whose keys are the
user's (set names, architecture overrides). An override of `{}` or `[]` empties a mapping or a
list (a merge would keep the file's entries). The pipeline and the trainer load their configs
through `merge_config`, each with its own defaults file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from lvd.common.errors import InputFormatError

_ABSENT = object()


class ConfigError(InputFormatError):
    """A config file or override that does not fit the schema."""


def packaged_config_path(name: str) -> Path:
    """Path of a config shipped with lvd (`default`, `demo`, `lvd142m`, `pretrain`): the repository's
    `configs/`, installed as the package data `lvd.configs`, so a name works in a checkout and anywhere else."""
    stem = name[:-5] if name.endswith(".yaml") else name
    path = Path(str(resources.files("lvd.configs").joinpath(f"{stem}.yaml")))
    if not path.is_file():
        raise ConfigError(f"no packaged config named {name!r}")
    return path


def _open_empty_mappings(node: DictConfig) -> None:
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            if len(child) == 0:
                OmegaConf.set_struct(child, False)
            else:
                _open_empty_mappings(child)


def _key_error(exc: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    return ConfigError(
        f"unknown config key {key!r} in {origin}; the keys lvd knows are listed in its configs/*.yaml defaults"
    )


def merge_config(
    defaults_path: str | os.PathLike, path: str | os.PathLike | None = None, overrides: Sequence[str] | dict | None = ()
) -> DictConfig:
    """The defaults at `defaults_path`, the file at `path` (optional) and the overrides, merged and resolved."""
    cfg = OmegaConf.load(defaults_path)
    OmegaConf.set_struct(cfg, True)
    _open_empty_mappings(cfg)
    if path is not None:
        file_path = Path(path)
        try:
            file_cfg = OmegaConf.load(file_path)
        except Exception as exc:  # yaml errors come in several types
            raise ConfigError(f"cannot read config {file_path}: {exc}") from exc
        try:
            cfg = OmegaConf.merge(cfg, file_cfg)
        except ConfigKeyError as exc:
            raise _key_error(exc, str(file_path)) from None
        except (OmegaConfBaseException, TypeError, ValueError) as exc:
            raise ConfigError(f"{file_path}: {exc}") from None
    if isinstance(overrides, dict):
        overrides = [f"{k}={v}" for k, v in overrides.items()]
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, _, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if value in ("{}", "[]") and OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT:
            # merging an empty value would keep the file's entries: replace instead
            OmegaConf.update(cfg, key, {} if value == "{}" else [], merge=False)
            continue
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except ConfigKeyError as exc:
            raise _key_error(exc, f"override {item!r}") from None
        except Exception as exc:  # yaml syntax errors and type clashes alike
            raise ConfigError(
                f"override {item!r}: {exc} (quote values that contain YAML syntax such as braces or colons)"
            ) from None
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot resolve config: {exc}") from None
    return cfg
