"""Logging for lvd's commands: one format, one level setting, and no loader chatter.

Faiss's loader logs at INFO every SIMD variant it tries and fails to import (for example
`No module named 'faiss.swigfaiss_avx512'` on an AVX2 machine); that is normal operation, so lvd
shows it only at DEBUG.
"""

from __future__ import annotations

import logging

#: Loggers of other libraries that speak at INFO about normal operation.
_QUIET = ("faiss.loader",)


def setup_logging(level: str | int = "INFO") -> None:
    """Log to stderr with time, level and logger name at `level` (a name such as INFO, or a number)."""
    value = level if isinstance(level, int) else getattr(logging, str(level).upper(), logging.INFO)
    logging.basicConfig(level=value, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(value, logging.WARNING))
