"""Concurrent single-query searches of one index, run as one Faiss call.

A search of one query reads every vector (Flat) or every probed list (IVF) for one row of
results; a search of B queries reads them once for B rows, with BLAS doing the arithmetic.
Under load, requests arrive while a search runs, so the thread that finds the index idle
takes every waiting query with the same k and searches them together; the others wait for
their rows. An idle server adds no delay (a lone query is searched at once), and results are
those of searching each query alone: queries are only batched with others of the same k.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np


@dataclass
class _Pending:
    xq: np.ndarray  # (1, d)
    k: int
    scores: np.ndarray | None = None
    rows: np.ndarray | None = None
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.rows is not None or self.error is not None


class SearchBatcher:
    """Wraps `search(xq, k) -> (scores, rows)` so that concurrent callers share Faiss calls."""

    def __init__(self, search, max_batch: int = 256):
        self._search, self.max_batch = search, max_batch
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._busy = False
        self.calls = 0  # Faiss calls made (for tests and metrics)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of one query (1, d), exactly as `search(xq, k)` would give them."""
        me = _Pending(np.asarray(xq, np.float32).reshape(1, -1), int(k))
        with self._cond:
            self._pending.append(me)
            while True:
                while not me.done and self._busy:
                    self._cond.wait()
                if me.done:
                    break
                batch = self._take()
                self._run(batch)  # releases the lock while Faiss runs
        if me.error is not None:
            raise me.error
        return me.scores, me.rows

    def _take(self) -> list[_Pending]:
        """The oldest waiting query and every other waiting one with its k (lock held)."""
        k = self._pending[0].k
        batch = [p for p in self._pending if p.k == k][: self.max_batch]
        taken = set(map(id, batch))
        self._pending = [p for p in self._pending if id(p) not in taken]
        self._busy = True
        return batch

    def _run(self, batch: list[_Pending]) -> None:
        self._cond.release()
        try:
            scores, rows = self._search(np.concatenate([p.xq for p in batch]), batch[0].k)
            for j, p in enumerate(batch):
                p.scores, p.rows = scores[j : j + 1], rows[j : j + 1]
        except BaseException as exc:  # every waiter learns of it, not only this thread
            for p in batch:
                p.error = exc
        finally:
            self._cond.acquire()
            self.calls += 1
            self._busy = False
            self._cond.notify_all()
