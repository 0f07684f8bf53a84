"""Exact top-k over a pool in blocks and the merge of best lists, against one sort in plain Python."""

import numpy as np

from lvd.index.pool_search import best_columns


def test_best_columns_merges_candidate_lists_like_one_sort():
    rng = np.random.default_rng(3)
    sims = rng.choice([0.1, 0.5, 0.5, 0.9], size=(6, 12)).astype(np.float32)  # many ties
    idx = np.stack([rng.permutation(40)[:12] for _ in range(6)]).astype(np.int64)
    idx[0, :3] = -1  # empty slots (a short slice) sort last whatever their similarity
    got_s, got_i = best_columns(sims, idx, 5)
    for r in range(6):
        cand = sorted((-float(s), int(i)) for s, i in zip(sims[r], idx[r]) if i >= 0)[:5]
        assert got_i[r].tolist() == [i for _, i in cand]
        np.testing.assert_array_equal(got_s[r], np.array([-s for s, _ in cand], np.float32))
    short_s, short_i = best_columns(sims[:1, :4], idx[:1, :4], 3)  # 3 empties and one row: one found, two empty
    assert short_i.tolist() == [[int(idx[0, 3]), -1, -1]] and np.isneginf(short_s[0, 1:]).all()
