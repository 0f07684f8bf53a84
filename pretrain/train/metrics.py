"""JSON-lines metrics that survive resume: rows past the resumed iteration are dropped."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lvd.common.atomic import atomic_write_text


class MetricsLog:
    """Append-only `metrics.jsonl`, one object per logged iteration."""

    def __init__(self, path: str | os.PathLike, resume_from: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate(resume_from)

    def _truncate(self, resume_from: int) -> None:
        """Keep only rows of iterations before `resume_from` (a killed run may have logged past
        its last checkpoint; the resumed run logs those iterations again)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if row.get("iteration", -1) < resume_from:
                kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
