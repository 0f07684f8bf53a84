"""The demo's photo pool from Debian's opencv-doc and scratch, and the figures measured against its truth."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from PIL import Image
from scipy.stats import entropy

import lvd.curate.demo.quality as quality
from lvd.curate.demo.fashion_mnist import CLASSES
from lvd.curate.demo.longtail import entropy_gap_closed

PAIRED = ["opencv-aloeL", "opencv-aloeR", "opencv-leuvenA", "opencv-leuvenB"]
SINGLE = ["opencv-baboon", "opencv-fruits", "opencv-messi5", "scratch-Nature-beach-malibu", "scratch-Indoors-kitchen"]


@pytest.mark.needs("debian_photos")
def test_the_photo_pool_holds_the_package_files_and_their_planted_copies(tmp_path):
    from lvd.curate.demo.photos import EVAL_SET, package_photo_files, prepare_photo_demo

    files = package_photo_files()
    assert sum(n.startswith("opencv-") for n in files) == 91 and sum(n.startswith("scratch-") for n in files) == 74
    data = prepare_photo_demo(tmp_path, seed=1, eval_photos=2, photos=PAIRED + SINGLE)
    truth = json.loads((data / "truth.json").read_text())
    evals = sorted(p.name for p in (data / "eval" / EVAL_SET).iterdir())
    assert len(evals) == 2 and not {e.rsplit(".", 1)[0] for e in evals} & set(PAIRED)  # never half of a pair
    originals = {f"{n}{files[n].suffix.lower()}": files[n] for n in PAIRED + SINGLE}
    for name, path in originals.items():
        where = data / "eval" / EVAL_SET / name if name in evals else data / "pool" / name
        assert where.read_bytes() == path.read_bytes()  # the package's own bytes
    assert sorted(map(sorted, truth["package_pairs"])) == [
        ["opencv-aloeL.jpg", "opencv-aloeR.jpg"],
        ["opencv-leuvenA.jpg", "opencv-leuvenB.jpg"],
    ]
    assert len(truth["near_dup_of"]) == 2 * 7 and len(truth["eval_copy_of"]) == 2 * 2
    for copy, original in {**truth["near_dup_of"], **truth["eval_copy_of"]}.items():
        assert copy.endswith(f"-of-{original.rsplit('.', 1)[0]}.jpg")
        with Image.open(data / "pool" / copy) as img:
            assert img.format == "JPEG" and min(img.size) > 50
    assert len(list((data / "pool").iterdir())) == 7 + 14 + 4


def test_pairs_the_data_held_count_as_near_duplicates(monkeypatch):
    """Originals a, b (a pair the packages hold) and c; a copy of a and one of c. dedup joins a, b and
    the copy of a (keeps a), and c with its copy and with an unrelated d (keeps c)."""
    truth = {
        "pool": {k: "photo" for k in ("a.png", "b.png", "c.png", "d.png", "copy-a.jpg", "copy-c.jpg")},
        "near_dup_of": {"copy-a.jpg": "a.png", "copy-c.jpg": "c.png"},
        "eval_copy_of": {},
        "package_pairs": [["a.png", "b.png"]],
    }
    ids = {("pool", key): i for i, key in enumerate(sorted(truth["pool"]))}
    near = pd.DataFrame(
        [
            (key, comp, keep)
            for key, comp, keep in [
                ("a.png", 0, True),
                ("b.png", 0, False),
                ("copy-a.jpg", 0, False),
                ("c.png", 1, True),
                ("copy-c.jpg", 1, False),
                ("d.png", 1, False),
            ]
        ],
        columns=["key", "component", "keep"],
    )
    near["id"] = [ids[("pool", k)] for k in near["key"]]
    monkeypatch.setattr(quality, "dedup_frame", lambda run_dir, name: near.drop(columns="key"))
    got = quality.near_duplicate_quality(None, truth, ids)
    assert (got["pairs_found"], got["recall"], got["removed"]) == (2, 1.0, 4)
    assert got["precision"] == 3 / 4  # b (its pair a), copy-a, copy-c; d is a false positive
    assert (got["data_pairs"], got["data_pairs_found"]) == (1, 1)
    assert got["originals_joined"] == [["a.png", "b.png"], ["c.png", "d.png"]]


def test_entropy_gap_closed():
    pool = ["t-shirt"] * 80 + ["trouser"] * 15 + ["bag"] * 5
    assert entropy_gap_closed(pool, pool) == pytest.approx(0.0)
    assert entropy_gap_closed(pool, CLASSES * 3) == pytest.approx(1.0)
    drawn = ["t-shirt"] * 40 + ["trouser"] * 35 + ["bag"] * 25
    h_pool, h_drawn = entropy([80, 15, 5]), entropy([40, 35, 25])
    assert entropy_gap_closed(pool, drawn) == pytest.approx((h_drawn - h_pool) / (math.log(10) - h_pool))
