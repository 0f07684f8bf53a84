"""Reading embedding parts written as the embed stage writes them."""

import numpy as np
import pytest

from lvd.common.run_folder import embedding_ids, iter_embeddings, load_embeddings, vector_files
from lvd.index import io
from lvd.index.io import EmbeddingRows, IdRows


def write_part(folder, number, ids, vectors):
    np.save(folder / f"part-{number:05d}.npy", vectors.astype(np.float16))
    np.save(folder / f"ids-{number:05d}.npy", np.asarray(ids, np.int64))


def test_parts_concatenate_in_part_order(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((2, 4))
    write_part(tmp_path, 1, [7, 8], b)
    write_part(tmp_path, 0, [10, 2, 5], a)
    (tmp_path / "_SUCCESS.json").write_text("{}")
    ids, x = load_embeddings(tmp_path)
    assert ids.dtype == np.int64 and x.dtype == np.float32
    np.testing.assert_array_equal(ids, [10, 2, 5, 7, 8])
    np.testing.assert_array_equal(x, np.concatenate([a, b]).astype(np.float16).astype(np.float32))
    assert [len(i) for i, _ in iter_embeddings(tmp_path)] == [3, 2]


def test_mismatches_are_errors(tmp_path):
    write_part(tmp_path, 0, [1, 2], np.zeros((3, 4)))
    with pytest.raises(ValueError, match="ids"):
        load_embeddings(tmp_path)
    (tmp_path / "ids-00000.npy").unlink()
    with pytest.raises(FileNotFoundError):
        load_embeddings(tmp_path)


def test_repeated_ids_are_errors(tmp_path):
    write_part(tmp_path, 0, [1, 2], np.zeros((2, 4)))
    write_part(tmp_path, 1, [2], np.zeros((1, 4)))
    with pytest.raises(ValueError, match="repeated"):
        load_embeddings(tmp_path)


def test_empty_folder(tmp_path):
    ids, x = load_embeddings(tmp_path)
    assert ids.shape == (0,) and x.shape == (0, 0)


def test_embedding_rows_read_chosen_rows_across_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "HELD_STAGE_ROWS", 2)  # a held view's rows gathered two at a time
    rng = np.random.default_rng(1)
    parts = [rng.normal(size=(n, 6)).astype(np.float16) for n in (5, 1, 7)]
    for number, part in enumerate(parts):
        write_part(tmp_path, number, list(range(100 * number, 100 * number + len(part))), part)
    whole = np.concatenate(parts).astype(np.float32)  # rows in part order
    rows = np.array([12, 0, 5, 7, 5, 4])  # across all three parts, unsorted, one repeated
    view = EmbeddingRows(vector_files(tmp_path), rows)
    assert len(view) == 6 and view.dim == 6
    np.testing.assert_array_equal(view[np.array([3, 0])], whole[[7, 12]])
    np.testing.assert_array_equal(view[1:4], whole[[0, 5, 7]])
    np.testing.assert_array_equal(np.asarray(view), whole[rows])
    assert view[np.array([0])].dtype == np.float32
    held = view.held()  # the same rows, read into memory once
    for path in vector_files(tmp_path):
        path.unlink()
    np.testing.assert_array_equal(held[np.array([3, 0])], whole[[7, 12]])
    np.testing.assert_array_equal(held[1:4], whole[[0, 5, 7]])
    np.testing.assert_array_equal(np.asarray(held), whole[rows])
    assert held[np.array([0])].dtype == np.float32 and held.itemsize == 2
    out = np.full((9, 6), np.nan, np.float32)
    assert held.read(np.array([5, 4, 0]), out=out[:3]) is not None
    np.testing.assert_array_equal(out[:3], whole[[4, 5, 12]])
    assert np.isnan(out[3:]).all()
    for number, part in enumerate(parts):
        write_part(tmp_path, number, list(range(100 * number, 100 * number + len(part))), part)
    np.testing.assert_array_equal(embedding_ids(tmp_path), load_embeddings(tmp_path)[0])
    with pytest.raises(IndexError):
        EmbeddingRows(vector_files(tmp_path), np.array([13]))


def test_rows_by_id_match_a_linear_search():
    rng = np.random.default_rng(2)
    ids = rng.choice(10**12, size=500, replace=False).astype(np.int64)
    wanted = np.concatenate([rng.choice(ids, 40), [-5, 10**13]])  # some absent
    expected = [next((r for r, i in enumerate(ids) if i == w), -1) for w in wanted]
    lookup = IdRows(ids)
    np.testing.assert_array_equal(lookup.rows(wanted), expected)
    assert lookup.row(int(ids[17])) == 17
    with pytest.raises(KeyError):
        lookup.row(-5)
    with pytest.raises(ValueError, match="repeat"):
        IdRows(np.array([1, 2, 1]))
