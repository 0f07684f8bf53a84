"""The keep rule: which copy of a near-duplicate group survives, against a plain-Python reference."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from lvd.index.components import keep_one
from lvd.index.keep_rule import keep_priority, keep_reasons, quality_keys

LOSSLESS = {"PNG", "BMP", "TIFF"}


def _reference_keep(rows: list[dict], rule: str) -> set[int]:
    """The documented order, written as a sort key per group."""

    def key(r):
        pixels = r["w"] * r["h"]
        if rule == "pixels":
            return (pixels, -r["id"])
        return (pixels, r["format"] in LOSSLESS, r["bytes"] / max(pixels, 1), -r["id"])

    kept = {}
    for r in rows:
        best = kept.get(r["group"])
        if best is None or key(r) > key(best):
            kept[r["group"]] = r
    return {r["id"] for r in kept.values()}


@pytest.mark.parametrize("rule", ["quality", "pixels"])
def test_keep_rule_matches_the_documented_order(rule):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(400):  # few distinct values, so every criterion is reached through ties
        w = int(rng.choice([50, 100]))
        rows.append(
            {
                "id": i,
                "group": int(rng.integers(60)),
                "w": w,
                "h": 100,
                "format": str(rng.choice(["PNG", "JPEG", "WEBP", "BMP"])),
                "bytes": int(rng.choice([1000, 2000, 4000])) * (w // 50),
            }
        )
    frame = pd.DataFrame(rows)
    keys = quality_keys(frame["w"] * frame["h"], frame["format"], frame["bytes"])
    keep = keep_one(frame["group"].to_numpy(), keep_priority(keys, rule))
    assert set(frame.loc[keep, "id"]) == _reference_keep(rows, rule)
    reasons = keep_reasons(frame["group"].to_numpy(), keep, keys, rule)
    sizes = frame.groupby("group")["id"].transform("size").to_numpy()
    assert all(reasons[i] is None for i in np.flatnonzero(~keep | (sizes < 2)))
    allowed = (
        {"most pixels", "lowest id"}
        if rule == "pixels"
        else {"most pixels", "lossless format", "least compressed", "lowest id"}
    )
    assert set(reasons[keep & (sizes > 1)]) == allowed  # each criterion decided somewhere


def test_keep_reasons_on_hand_made_rows():
    # group 0: a half-size copy loses on pixels; group 1: a JPEG of the same size loses to the PNG;
    # group 2: two JPEGs, the less compressed wins; group 3: identical files, lowest id wins
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    pixels = np.array([400, 100, 400, 400, 400, 400, 400, 400])
    formats = ["JPEG", "JPEG", "JPEG", "PNG", "JPEG", "JPEG", "PNG", "PNG"]
    nbytes = np.array([50, 90, 900, 100, 80, 120, 300, 300])
    keys = quality_keys(pixels, formats, nbytes)
    keep = keep_one(groups, keep_priority(keys))
    np.testing.assert_array_equal(np.flatnonzero(keep), [0, 3, 5, 6])
    assert keep_reasons(groups, keep, keys)[keep].tolist() == [
        "most pixels",
        "lossless format",
        "least compressed",
        "lowest id",
    ]
    with pytest.raises(ValueError, match="dedup.keep"):
        keep_priority(keys, "biggest")


@pytest.mark.needs("sscd")
@pytest.mark.slow
def test_dedup_stage_keeps_the_original_png_over_its_degraded_copies(tmp_path):
    """Real photos in SSCD's space: the PNG original, a JPEG q40, a brightened re-save, a half-size copy."""
    from conftest import save_tiny_weights

    from lvd.curate.config import load_config
    from lvd.curate.dedup import run_dedup
    from lvd.curate.demo.photo_edits import encode, package_photos
    from lvd.curate.embed import run_embed
    from lvd.curate.manifest import read_manifest, run_manifest

    photos = package_photos()
    pool = tmp_path / "pool"
    pool.mkdir()
    for name in ("astronaut", "coffee", "rocket"):
        img = photos[name]
        img.save(pool / f"{name}.png")
        (pool / f"{name}_q40.jpg").write_bytes(encode(img.convert("RGB"), "JPEG", quality=40))
        (pool / f"{name}_bright.jpg").write_bytes(
            encode(ImageEnhance.Brightness(img).enhance(1.3).convert("RGB"), "JPEG", quality=90)
        )
        img.resize((img.width // 2, img.height // 2), Image.Resampling.BICUBIC).save(pool / f"{name}_half.png")
    weights = save_tiny_weights("vit_tiny_p4", tmp_path / "tiny.pth")
    cfg = load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            f"sources.pool=[{pool}]",
            "progress=false",
            "workers=0",
            "embed.model=vit_tiny_p4",
            f"embed.weights={weights}",
            "embed.resolution=16",
            "embed.dtype=float32",
        ],
    )
    run_manifest(cfg)
    run_embed(cfg)
    near = pd.read_parquet(run_dedup(cfg) / "near.parquet")
    keys = read_manifest(cfg.run_dir).set_index("id")["key"]
    near["key"] = keys.reindex(near["id"]).to_numpy()
    groups = near.groupby("component")["key"].apply(sorted)
    assert sorted(groups) == [
        sorted(f"{n}{s}" for s in (".png", "_q40.jpg", "_bright.jpg", "_half.png"))
        for n in ("astronaut", "coffee", "rocket")
    ]
    kept = near[near["keep"]]
    assert sorted(kept["key"]) == ["astronaut.png", "coffee.png", "rocket.png"]
    assert set(kept["reason"]) == {"lossless format"}  # the q40 and bright copies have as many pixels
