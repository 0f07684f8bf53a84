"""Sources: folder listing, shard patterns, path lists, and reading bytes back by manifest row."""

import io
import tarfile

import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

from lvd.curate import sources as src


def _png(v):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (v, v, v)).save(buf, "PNG")
    return buf.getvalue()


def test_classify():
    assert src.classify("shards/x-{000..009}.tar") == src.TAR
    assert src.classify("pipe:cat a.tar") == src.TAR
    assert src.classify("list.parquet") == src.LIST
    assert src.classify("list.CSV") == src.LIST
    with pytest.raises(src.SourceError, match="not found"):
        src.classify("/no/such/folder")


def test_folder_listing_is_recursive_sorted_and_case_insensitive(tmp_path):
    for name in (
        "b/B.JPG",
        "a.Png",
        "c/d/e.webp",
        "x.tif",
        "y.TIFF",
        "z.bmp",
        "g.gif",
        "skip.txt",
        ".hidden.jpg",
        ".git/h.jpg",
        "j.jpeg",
    ):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert src.list_folder(str(tmp_path)) == sorted(
        ["a.Png", "b/B.JPG", "c/d/e.webp", "g.gif", "j.jpeg", "x.tif", "y.TIFF", "z.bmp"]
    )


def test_class_layout_detection(tmp_path):
    (tmp_path / "cls" / "cat").mkdir(parents=True)
    (tmp_path / "cls" / "cat" / "1.png").write_bytes(b"x")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "1.png").write_bytes(b"x")
    (tmp_path / "flat" / "sub").mkdir()
    assert src.has_class_layout(str(tmp_path / "cls"))
    assert not src.has_class_layout(str(tmp_path / "flat"))
    assert src.class_label("cat/1.png", True) == "cat"
    assert src.class_label("cat/1.png", False) is None


def test_brace_and_glob_expansion(tmp_path):
    for i in range(3):
        (tmp_path / f"s-{i:06d}.tar").write_bytes(b"")
    pattern = str(tmp_path / "s-{000000..000002}.tar")
    assert src.expand_shards(pattern) == [str(tmp_path / f"s-{i:06d}.tar") for i in range(3)]
    assert src.expand_shards(str(tmp_path / "s-*.tar")) == [str(tmp_path / f"s-{i:06d}.tar") for i in range(3)]
    with pytest.raises(src.SourceError, match="not found"):
        src.expand_shards(str(tmp_path / "s-{000000..000005}.tar"))


def test_path_list_needs_a_path_column(tmp_path):
    pd.DataFrame({"file": ["a.png"]}).to_csv(tmp_path / "l.csv", index=False)
    with pytest.raises(src.SourceError, match="'path'"):
        src.read_path_list(str(tmp_path / "l.csv"))
    (tmp_path / "l.parquet").write_bytes(b"not parquet")
    with pytest.raises(src.SourceError, match="not a readable"):  # one line, not pyarrow's own error
        src.read_path_list(str(tmp_path / "l.parquet"))


def test_iter_bytes_reads_back_what_the_upstream_writer_stored(tmp_path):
    tar_path = tmp_path / "t.tar"
    with wds.TarWriter(str(tar_path)) as sink:
        for i in range(5):
            sink.write({"__key__": f"k{i}", "png": _png(i * 10), "cls": str(i).encode()})
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "a.png").write_bytes(_png(99))
    rows = pd.DataFrame(
        [
            {"id": 1, "kind": "tar", "source": str(tar_path), "key": "k3.png"},
            {"id": 2, "kind": "tar", "source": str(tar_path), "key": "k0.png"},
            {"id": 3, "kind": "folder", "source": str(tmp_path / "f"), "key": "a.png"},
            {"id": 4, "kind": "tar", "source": str(tar_path), "key": "k4.png"},
        ]
    )
    got = dict(src.iter_bytes(rows))
    with tarfile.open(tar_path) as tar:  # the standard library as the independent reader
        expected = {
            1: tar.extractfile("k3.png").read(),
            2: tar.extractfile("k0.png").read(),
            4: tar.extractfile("k4.png").read(),
        }
    assert got[1] == expected[1] and got[2] == expected[2] and got[4] == expected[4]
    assert got[3] == _png(99)
    assert [i for i, _ in src.iter_bytes(rows)] == [1, 2, 3, 4]


def test_tar_members_streamed_with_webdataset_keep_sample_keys(tmp_path):
    tar_path = tmp_path / "t.tar"
    with wds.TarWriter(str(tar_path)) as sink:
        sink.write({"__key__": "dir/a.b", "jpg": b"J", "json": b"{}"})
    members = list(src.iter_tar_members(str(tar_path)))
    assert [(m.name, m.sample_key, m.data) for m in members] == [
        ("dir/a.b.jpg", "dir/a", b"J"),
        ("dir/a.b.json", "dir/a", None),
    ]


def test_followed_folder_links_stay_inside_the_source_and_never_loop(tmp_path):
    import os

    root = tmp_path / "pool"
    (root / "a" / "b").mkdir(parents=True)
    (root / "other").mkdir()
    Image.new("RGB", (4, 4)).save(root / "a" / "b" / "x.png")
    Image.new("RGB", (4, 4)).save(root / "other" / "y.png")
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (4, 4)).save(outside / "z.png")
    os.symlink(root / "a", root / "a" / "b" / "loop")  # a loop back up the tree
    os.symlink("/", root / "everything")  # the whole filesystem
    os.symlink(outside, root / "elsewhere")  # a folder outside the source
    os.symlink(root / "other", root / "alias")  # a link inside the source: walked once
    listed = src.list_folder(str(root), follow_symlinks=True)
    assert listed == ["a/b/x.png", "alias/y.png"] or listed == ["a/b/x.png", "other/y.png"]
    assert src.list_folder(str(root), follow_symlinks=False) == ["a/b/x.png", "other/y.png"]


def test_row_reader_seeks_to_members_and_walks_each_shard_once(tmp_path, monkeypatch):
    import gzip
    import os
    import tarfile as stdlib_tarfile

    from lvd.common import row_bytes

    tar_path = tmp_path / "t.tar"
    with wds.TarWriter(str(tar_path)) as sink:
        for i in range(6):
            sink.write({"__key__": f"d/k{i}", "png": _png(i * 10), "cls": str(i).encode()})
    gz_path = tmp_path / "t.tar.gz"
    gz_path.write_bytes(gzip.compress(tar_path.read_bytes()))
    with stdlib_tarfile.open(tar_path) as tar:  # the standard library as the independent reader
        expected = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    opened = []
    plain_open = stdlib_tarfile.open
    monkeypatch.setattr(row_bytes.tarfile, "open", lambda *a, **k: opened.append(a[:1]) or plain_open(*a, **k))
    reader = row_bytes.RowReader()
    for name in ["d/k4.png", "d/k0.cls", "d/k5.png", "d/k4.png"]:
        assert reader.read("tar", str(tar_path), name) == expected[name]
    assert opened == [(str(tar_path),)]  # one walk over the headers for four reads
    assert reader.read("tar", str(gz_path), "d/k2.png") == expected["d/k2.png"]  # compressed: streamed instead
    with pytest.raises(KeyError):
        reader.read("tar", str(tar_path), "d/k9.png")
    with pytest.raises(OSError, match="over the limit"):
        reader.read("tar", str(tar_path), "d/k1.png", max_bytes=10)
    with wds.TarWriter(str(tar_path)) as sink:  # the shard is rewritten in place: the reader sees it
        sink.write({"__key__": "d/k4", "png": _png(200)})
    os.utime(tar_path, ns=(1, 1))
    assert reader.read("tar", str(tar_path), "d/k4.png") == _png(200)
