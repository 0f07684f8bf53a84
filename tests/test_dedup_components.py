"""Thresholded similarity graphs, connected components and the keep-one rule, against brute force."""

import numpy as np
import pytest

from lvd.index.components import (
    connected_components,
    duplicate_groups,
    group_duplicates,
    keep_one,
    knn_edges,
    pairs_above,
    star_groups,
)


def union_find_labels(n, rows, cols):
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(rows, cols):
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)])


def same_partition(a, b):
    """Two labelings describe the same partition (labels may differ)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_connected_components_match_union_find(seed):
    rng = np.random.default_rng(seed)
    n = 300
    rows = rng.integers(0, n, size=200)
    cols = rng.integers(0, n, size=200)
    labels = connected_components(n, rows, cols)
    assert same_partition(labels, union_find_labels(n, rows, cols))
    # numbering: component c is the c-th to appear in node order
    _, first = np.unique(labels, return_index=True)
    assert (np.diff(labels[np.sort(first)]) == 1).all() and labels[0] == 0


def test_keep_one_brute_force():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 40, size=500)
    priority = rng.integers(0, 5, size=500)  # many ties
    keep = keep_one(labels, priority)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        best = members[priority[members] == priority[members].max()].min()
        assert keep[members].sum() == 1 and keep[best]
    # without priority, the lowest row of each component is kept
    keep = keep_one(labels)
    assert set(np.flatnonzero(keep)) == {np.flatnonzero(labels == c).min() for c in np.unique(labels)}


@pytest.mark.parametrize("exclude_self", [False, True])
def test_pairs_above_brute_force(exclude_self):
    rng = np.random.default_rng(4)
    xb = rng.normal(size=(120, 8)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb if exclude_self else rng.normal(size=(77, 8)).astype(np.float32)
    q, b, s = pairs_above(xq, xb, 0.5, exclude_self=exclude_self, block_entries=1000)  # many blocks
    sims = xq @ xb.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    eq, eb = np.nonzero(sims >= 0.5)
    np.testing.assert_array_equal(q, eq)
    np.testing.assert_array_equal(b, eb)
    np.testing.assert_allclose(s, sims[eq, eb], rtol=1e-5)


def test_duplicate_groups_from_knn_graph():
    rng = np.random.default_rng(5)
    base = rng.normal(size=(30, 16))
    # each base vector gets 0-3 noisy copies
    copies = [base[i] + rng.normal(scale=0.05, size=16) for i in range(30) for _ in range(i % 4)]
    x = np.concatenate([base, np.array(copies)]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    truth = np.concatenate([np.arange(30), np.array([i for i in range(30) for _ in range(i % 4)])])
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    neighbors = np.argsort(-sims, axis=1)[:, :5]
    D = np.take_along_axis(sims, neighbors, axis=1)
    neighbors[0, -1] = -1  # a missing neighbour is ignored
    labels, keep = duplicate_groups(D, neighbors, 0.9)
    assert same_partition(labels, truth)
    assert keep.sum() == 30
    rows, cols = knn_edges(D, neighbors, 0.9)
    assert (cols >= 0).all() and (D[rows, np.argmax(neighbors[rows] == cols[:, None], axis=1)] >= 0.9).all()


def greedy_independent_set(n, rows, cols, priority):
    """By definition: in keep order, a node is kept unless an already kept node is its neighbour;
    a removed node belongs to the first kept neighbour in that order."""
    adjacent = [set() for _ in range(n)]
    for a, b in zip(rows.tolist(), cols.tolist()):
        if a != b:
            adjacent[a].add(b)
            adjacent[b].add(a)
    order = sorted(range(n), key=lambda i: (-priority[i], i))
    rank = {node: r for r, node in enumerate(order)}
    kept = set()
    for node in order:
        if not adjacent[node] & kept:
            kept.add(node)
    owner = [node if node in kept else min(adjacent[node] & kept, key=rank.get) for node in range(n)]
    return kept, np.array(owner)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_star_groups_are_the_greedy_maximal_independent_set(seed):
    rng = np.random.default_rng(seed)
    n = 200
    rows, cols = rng.integers(0, n, size=300), rng.integers(0, n, size=300)
    priority = rng.integers(0, 4, size=n)  # ties resolved by index
    labels, keep = star_groups(n, rows, cols, priority)
    kept, owner = greedy_independent_set(n, rows, cols, priority)
    assert set(np.flatnonzero(keep)) == kept
    assert same_partition(labels, owner)
    assert keep.sum() == len(np.unique(labels))  # one kept node per group
    edges = set(zip(rows.tolist(), cols.tolist())) | set(zip(cols.tolist(), rows.tolist()))
    keeper = {int(labels[k]): int(k) for k in np.flatnonzero(keep)}
    assert all((int(node), keeper[int(labels[node])]) in edges for node in np.flatnonzero(~keep))  # direct copies only
    _, first = np.unique(labels, return_index=True)  # numbered like connected_components
    assert (np.diff(labels[np.sort(first)]) == 1).all() and labels[0] == 0


def test_star_groups_do_not_chain_where_components_do():
    # 0 ~ 1 ~ 2 ~ 3 (a chain of look-alikes; 0 and 3 are not close), 4 alone
    rows, cols = np.array([0, 1, 2]), np.array([1, 2, 3])
    labels, keep = group_duplicates(5, rows, cols, grouping="components")
    assert keep.tolist() == [True, False, False, False, True]
    labels, keep = group_duplicates(5, rows, cols, grouping="star")
    assert keep.tolist() == [True, False, True, False, True] and labels.tolist() == [0, 0, 1, 1, 2]
    # priority (pixels) picks the kept copy: node 1 first, it takes 0 and 2; 3 stays
    _, keep = group_duplicates(5, rows, cols, np.array([1, 9, 1, 1, 1]), grouping="star")
    assert keep.tolist() == [False, True, False, True, True]
    with pytest.raises(ValueError, match="grouping"):
        group_duplicates(5, rows, cols, grouping="stars")
