"""Labelled evaluation sources: class folders and WebDataset shards written by upstream webdataset."""

import io

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from lvd.pretrain.data.labelled import encode_labels, iter_labelled, label_vocabulary


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 5, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_class_folder_yields_every_image_with_its_folder_label(tmp_path):
    for cls, n in [("cat", 2), ("dog", 3)]:
        (tmp_path / cls / "nested").mkdir(parents=True)
        for i in range(n):
            (tmp_path / cls / ("nested" if i == 2 else "") / f"{i}.png").write_bytes(_png(10 * i))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    samples = list(iter_labelled(tmp_path))
    assert [(s.label, s.key) for s in samples] == [
        ("cat", "cat/0.png"),
        ("cat", "cat/1.png"),
        ("dog", "dog/0.png"),
        ("dog", "dog/1.png"),
        ("dog", "dog/nested/2.png"),
    ]
    assert samples[1].data == (tmp_path / "cat" / "1.png").read_bytes()
    assert len(list(iter_labelled(tmp_path, limit=3))) == 3


def _write_shard(path, items):
    with wds.TarWriter(str(path)) as sink:
        for sample in items:
            sink.write(sample)


def test_shards_with_cls_yield_image_bytes_and_labels_in_order(tmp_path):
    _write_shard(
        tmp_path / "eval-000000.tar",
        [
            {"__key__": "a", "png": _png(1), "cls": b"3"},
            {"__key__": "b", "jpg": _png(2), "cls": b"10", "json": b"{}"},
        ],
    )
    _write_shard(tmp_path / "eval-000001.tar", [{"__key__": "c", "webp": _png(3), "cls": b"3\n"}])
    for pattern in (str(tmp_path / "eval-{000000..000001}.tar"), str(tmp_path / "eval-*.tar")):
        samples = list(iter_labelled(pattern))
        assert [(s.key, s.label) for s in samples] == [("a", "3"), ("b", "10"), ("c", "3")]
        assert samples[1].data == _png(2)
    both = list(iter_labelled([str(tmp_path / "eval-000001.tar"), str(tmp_path / "eval-000000.tar")]))
    assert [s.key for s in both] == ["c", "a", "b"]


def test_shard_sample_without_label_is_an_error(tmp_path):
    _write_shard(tmp_path / "x.tar", [{"__key__": "a", "png": _png(1)}])
    with pytest.raises(ValueError, match="no .cls label"):
        list(iter_labelled(str(tmp_path / "x.tar")))


def test_vocabulary_sorts_integer_labels_numerically_and_encodes_both_sides():
    vocab = label_vocabulary(["10", "2"], ["3", "2"])
    assert vocab == ["2", "3", "10"]
    np.testing.assert_array_equal(encode_labels(["10", "3", "2"], vocab), [2, 1, 0])
    assert label_vocabulary(["dog"], ["cat", "b2"]) == ["b2", "cat", "dog"]
