"""filter.require / filter.exclude: planted boxes given to the rule, and the rule inside the embed stage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import save_tiny_weights
from grounding_support import save_tiny_grounding

from lvd.common.errors import MissingInputError
from lvd.common.run_folder import embedding_ids
from lvd.curate.config import load_config
from lvd.curate.detect import read_detections, run_detect
from lvd.curate.detect_filter import Rule, box_area_fraction, kept_ids, matching_ids, phrase_matches
from lvd.curate.embed import run_embed
from lvd.curate.manifest import read_manifest, run_manifest


def _run_overrides(tmp_path, grounding, vit, prompt: str) -> list[str]:
    """A run over tmp_path/pool that detects `prompt` with the tiny Grounding DINO and embeds with the tiny ViT."""
    return [
        f"run_dir={tmp_path / 'run'}",
        f'sources.pool=["{tmp_path / "pool"}"]',
        "progress=false",
        "workers=0",
        f"detect.weights={grounding}",
        f"detect.prompt='{prompt}'",
        "detect.device=cpu",
        f"embed.weights={vit}",
        "embed.model=vit_tiny_p4",
        "embed.resolution=32",
        "embed.copy_detection.weights=null",
        "embed.device=cpu",
    ]


def _box(id_, phrase, score, area, w=100, h=50):
    """A box covering `area` of a w x h image (a full-height strip)."""
    return {"id": id_, "box": [10.0, 0.0, 10.0 + area * w, float(h)], "score": score, "phrase": phrase, "width": w,
            "height": h}  # fmt: skip


# Planted truth. require: dog, score >= 0.5, area >= 0.1; exclude: cat or watermark, score >= 0.5.
PLANTED = pd.DataFrame(
    [
        _box(0, "dog", 0.9, 0.5),  # kept
        _box(1, "a dog", 0.3, 0.5),  # score below require.min_score
        _box(2, "dog", 0.9, 0.01),  # box below require.min_area
        _box(3, "hotdog", 0.9, 0.5),  # 'dog' is not a whole word of 'hotdog'
        _box(4, "A Dog", 0.8, 0.6),  # matches (any case) ...
        _box(4, "cat", 0.7, 0.2),  # ... but shows a cat
        # 5: no box at all
        _box(6, "dog", 0.9, 0.3),  # kept: its watermark scores too low to exclude
        _box(6, "watermark", 0.2, 0.9),
        _box(7, "dog", 0.9, 0.3),  # a tiny watermark still excludes (exclude.min_area 0)
        _box(7, "a watermark [SEP]", 0.9, 0.001),
        _box(99, "dog", 0.9, 0.9),  # not in the pool: never returned
    ]
)
POOL = np.array([7, 6, 5, 4, 3, 2, 1, 0], dtype=np.int64)
REQUIRE = Rule(("dog",), min_score=0.5, min_area=0.1)
EXCLUDE = Rule(("cat", "watermark"), min_score=0.5)


def test_filter_rules_on_planted_boxes():
    assert kept_ids(POOL, PLANTED, REQUIRE, EXCLUDE).tolist() == [6, 0]  # pool order kept
    assert kept_ids(POOL, PLANTED, REQUIRE, None).tolist() == [7, 6, 4, 0]
    assert kept_ids(POOL, PLANTED, None, EXCLUDE).tolist() == [6, 5, 3, 2, 1, 0]
    assert kept_ids(POOL, PLANTED, None, None).tolist() == POOL.tolist()
    assert matching_ids(PLANTED, Rule(("dog",))).tolist() == [0, 1, 2, 4, 6, 7, 99]
    assert matching_ids(PLANTED, Rule(("a dog",))).tolist() == [1, 4]  # several words: in order, adjacent
    assert matching_ids(PLANTED, Rule(("dog",), min_area=0.55)).tolist() == [4, 99]
    # the score bound is inclusive: a box at exactly min_score matches
    assert matching_ids(PLANTED, Rule(("dog",), min_score=0.9)).tolist() == [0, 2, 6, 7, 99]
    assert kept_ids(POOL, PLANTED.iloc[:0], REQUIRE, EXCLUDE).tolist() == []  # no boxes: nothing is required-in


def test_phrase_match_and_area_against_hand_values():
    assert phrase_matches("a red dog .", "dog") and phrase_matches("a red dog", "red dog")
    assert not phrase_matches("a dog red", "red dog") and not phrase_matches("dogs", "dog")
    assert not phrase_matches("dog", "") and phrase_matches("[SEP] Watermark", "watermark")
    boxes = np.array([[0, 0, 50, 25], [10, 10, 10, 40], [0, 0, 100, 50], [5, 5, 2, 2]], dtype=np.float32)
    np.testing.assert_allclose(box_area_fraction(boxes, [100] * 4, [50] * 4), [0.25, 0.0, 1.0, 0.0])


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return save_tiny_grounding(folder / "grounding"), save_tiny_weights("vit_tiny_p4", folder / "vit.pth")


@pytest.mark.slow
def test_embed_takes_only_the_pool_images_the_filters_keep(tmp_path, tiny_models):
    from PIL import Image

    grounding, vit = tiny_models
    rng = np.random.default_rng(0)
    for folder, n in (("pool", 6), ("seeds", 2)):
        (tmp_path / folder).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / folder / f"{i}.png")
    base = [
        *_run_overrides(tmp_path, grounding, vit, "a cat . a red square ."),
        f"sources.seeds.fav={tmp_path / 'seeds'}",
    ]
    cfg = load_config(None, [*base, "filter.require.phrases=[cat]"])
    run_manifest(cfg)
    with pytest.raises(MissingInputError, match="run `lvd detect` first"):
        run_embed(cfg)
    run_detect(cfg)
    # random weights find cats and squares everywhere: the rules' areas are set from the boxes so
    # that they cut the pool (about half required in, the image with the largest square out)
    boxes = read_detections(cfg.run_dir)
    area = box_area_fraction(np.stack(boxes["box"].to_numpy()), boxes["width"], boxes["height"])
    cat = boxes["phrase"].str.contains(r"\bcat\b").to_numpy() & (boxes["score"] >= 0.6).to_numpy()
    square = boxes["phrase"].str.contains(r"\bsquare\b").to_numpy() & (boxes["score"] >= 0.8).to_numpy()
    largest_cat = pd.Series(area[cat]).groupby(boxes["id"].to_numpy()[cat]).max()
    require_area = float(np.median(largest_cat))
    exclude_area = float(area[square].max())
    rules = ["filter.require.phrases=[cat]", "filter.require.min_score=0.6", f"filter.require.min_area={require_area}",
             "filter.exclude.phrases=[square]", "filter.exclude.min_score=0.8",
             f"filter.exclude.min_area={exclude_area}"]  # fmt: skip
    cfg = load_config(None, base + rules)
    run_embed(cfg)
    # the reference: the rule written out with pandas over the stage's boxes
    ids = boxes["id"].to_numpy()
    manifest = read_manifest(cfg.run_dir)
    pool = set(manifest[manifest["set"] == "pool"]["id"])
    expected = (pool & set(ids[cat & (area >= require_area)])) - set(ids[square & (area >= exclude_area)])
    seeds = set(manifest[manifest["set"] != "pool"]["id"])
    assert 0 < len(expected) < len(pool)  # the settings cut the pool without emptying it
    assert set(embedding_ids(tmp_path / "run" / "embed").tolist()) == expected | seeds

    # without rules every image is embedded again (and detections do not matter)
    run_embed(load_config(None, base))
    assert set(embedding_ids(tmp_path / "run" / "embed").tolist()) == pool | seeds

    # detections made for another manifest are refused
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "pool" / "new.png")
    run_manifest(cfg)
    with pytest.raises(MissingInputError, match="made for another manifest"):
        run_embed(cfg)


@pytest.mark.slow
def test_lvd_run_detects_before_embedding_when_weights_are_set(tmp_path, tiny_models, capsys):
    from PIL import Image

    from lvd.curate.cli import main

    grounding, vit = tiny_models
    (tmp_path / "pool").mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "pool" / f"{i}.png")
    overrides = _run_overrides(tmp_path, grounding, vit, "a cat .")
    assert main(["run", "default", *overrides, "--until", "embed"]) == 0
    printed = capsys.readouterr().out
    assert printed.index("detect:") < printed.index("embed:")
    pool = set(read_manifest(tmp_path / "run")["id"])
    assert set(embedding_ids(tmp_path / "run" / "embed").tolist()) == pool  # no rule: every image
    # a rule whose score bound splits the pool (random weights see cats everywhere)
    boxes = read_detections(tmp_path / "run")
    cat = boxes[boxes["phrase"].str.contains(r"\bcat\b")]
    best = cat.groupby("id")["score"].max().sort_values()
    assert len(best) == len(pool) and best.iloc[0] < best.iloc[-1]
    bound = float(best.iloc[-1])  # the image(s) with the best cat box go; the others stay
    rule = ["filter.exclude.phrases=[cat]", f"filter.exclude.min_score={bound}"]
    assert main(["run", "default", *overrides, *rule, "--until", "embed"]) == 0
    excluded = set(cat[cat["score"] >= bound]["id"])
    assert 0 < len(excluded) < len(pool)
    assert set(embedding_ids(tmp_path / "run" / "embed").tolist()) == pool - excluded
