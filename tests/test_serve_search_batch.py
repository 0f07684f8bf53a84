"""Concurrent searches sharing Faiss calls: each caller still gets exactly its own neighbours."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest

from lvd.serve.search_batch import SearchBatcher


def test_concurrent_queries_are_batched_and_answered_as_if_alone():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 24)).astype(np.float32)
    index = faiss.IndexFlatIP(24)
    index.add(x)
    sizes = []

    def slow_search(xq, k):  # slow enough that callers pile up behind it
        sizes.append(len(xq))
        time.sleep(0.02)
        return index.search(xq, k)

    batcher = SearchBatcher(slow_search)
    queries = rng.standard_normal((60, 24)).astype(np.float32)
    ks = [3 if i % 3 else 7 for i in range(60)]
    start = threading.Barrier(60)

    def one(i):
        start.wait()
        return batcher.search(queries[i : i + 1], ks[i])

    with ThreadPoolExecutor(60) as pool:
        answers = list(pool.map(one, range(60)))
    for i, (scores, rows) in enumerate(answers):
        want = np.argsort(-(x.astype(np.float64) @ queries[i].astype(np.float64)), kind="stable")[: ks[i]]
        assert rows.shape == (1, ks[i]) and rows[0].tolist() == want.tolist()
        np.testing.assert_allclose(scores[0], x[want] @ queries[i], rtol=1e-5, atol=1e-5)
    assert sum(sizes) == 60 and batcher.calls == len(sizes) < 30 and max(sizes) > 1


def test_an_error_reaches_every_caller_of_its_batch_and_the_batcher_recovers():
    calls = []

    def flaky(xq, k):
        calls.append(len(xq))
        time.sleep(0.05)
        if len(calls) == 1:
            raise ValueError("boom")
        return np.zeros((len(xq), k), np.float32), np.zeros((len(xq), k), np.int64)

    batcher = SearchBatcher(flaky)
    start = threading.Barrier(8)

    def one(_):
        start.wait()
        try:
            batcher.search(np.ones((1, 4), np.float32), 2)
            return "ok"
        except ValueError as exc:
            return str(exc)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert results.count("boom") == calls[0] >= 1 and results.count("ok") == 8 - calls[0]
    scores, rows = batcher.search(np.ones((1, 4), np.float32), 3)
    assert rows.shape == (1, 3)


@pytest.mark.parametrize("k", [1, 5])
def test_a_lone_query_is_searched_at_once(k):
    index = faiss.IndexFlatIP(4)
    index.add(np.eye(4, dtype=np.float32))
    batcher = SearchBatcher(index.search)
    scores, rows = batcher.search(np.array([[0, 0, 1, 0]], np.float32), min(k, 4))
    assert rows[0, 0] == 2 and scores[0, 0] == 1 and batcher.calls == 1
