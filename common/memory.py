"""The memory budget of the vector stages (`memory_gb`), and block sizes derived from it.

Dedup, cluster and retrieve read embeddings from the memory-mapped float16 parts in blocks
whose size follows from the budget, so that a pool larger than memory is processed in bounded
memory. `auto` is a third of what this process may use (the machine's memory, or its cgroup's
limit when lower): 8 GiB on a 24 GiB machine, leaving room for the page cache that serves the
parts and for other processes.
"""

from __future__ import annotations

import os
from pathlib import Path

from lvd.common.errors import InputFormatError, MemoryBudgetError

GIB = 1 << 30
#: share of the machine's (or cgroup's) memory that `memory_gb: auto` takes
AUTO_SHARE = 1 / 3


def machine_memory_bytes() -> int:
    """Physical memory this process may use: the machine's, or its cgroup's limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return int(total)


def memory_budget(value="auto") -> int:
    """`memory_gb` (auto or GiB, int or float) as bytes."""
    if value is None or str(value).strip().lower() == "auto":
        return int(machine_memory_bytes() * AUTO_SHARE)
    try:
        gib = float(value)
    except (TypeError, ValueError):
        raise InputFormatError(f"memory_gb must be auto or a number of GiB, got {value!r}") from None
    if not gib > 0:
        raise InputFormatError(f"memory_gb must be positive, got {value!r}")
    return int(gib * GIB)


def rows_per_block(budget: int, bytes_per_row: int, *, share: float = 0.125, lo: int = 1024, hi: int = 1 << 20) -> int:
    """Rows of a working block that take `share` of the budget (at least `lo`, at most `hi`)."""
    return int(min(hi, max(lo, budget * share // max(1, bytes_per_row))))


def check_fits(what: str, nbytes: int, budget: int) -> None:
    """A clear error, before the work, when state that must stay in memory exceeds the budget."""
    if nbytes > budget:
        raise MemoryBudgetError(
            f"{what} needs {nbytes / GIB:.2f} GiB, more than memory_gb ({budget / GIB:.2f} GiB); "
            f"raise memory_gb or run on a machine with more memory"
        )
