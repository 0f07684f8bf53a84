"""Value checks for configs, run when a config is loaded: one table per schema, one line per key.

A check returns an error message, or None when the value is fine; `config_problems` runs a table
over a config. The pipeline's table is `lvd.curate.config_checks.CHECKS`, the trainer's
`lvd.pretrain.train.config.CHECKS`.
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

Check = Callable[[object], str | None]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(lo: int | None = None, hi: int | None = None, nullable: bool = False) -> Check:
    def check(value):
        if value is None and nullable:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            return f"must be an integer{' or null' if nullable else ''}, got {value!r}"
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return f"must be {_range(lo, hi)}, got {value}"
        return None

    return check


def number(
    lo: float | None = None, hi: float | None = None, words: tuple[str, ...] = (), nullable: bool = False
) -> Check:
    def check(value):
        if value is None and nullable:
            return None
        if isinstance(value, str) and value in words:
            return None
        if not _is_number(value):
            allowed = " or ".join([*words, "a number", *(["null"] if nullable else [])])
            return f"must be {allowed}, got {value!r}"
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return f"must be {_range(lo, hi)}, got {value}"
        return None

    return check


def choice(*options) -> Check:
    def check(value):
        return None if value in options else f"must be one of {list(options)}, got {value!r}"

    return check


def boolean(value) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def _range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"within [{lo}, {hi}]"
    return f">= {lo}" if lo is not None else f"<= {hi}"


def config_problems(cfg: DictConfig, checks: dict[str, Check]) -> list[str]:
    """`key: message` for every value the table rejects (keys the config lacks are skipped)."""
    problems = []
    for key, check in checks.items():
        node = OmegaConf.select(cfg, key, default="\0missing")
        if node == "\0missing":
            continue
        message = check(node)
        if message:
            problems.append(f"{key} {message}")
    return problems
