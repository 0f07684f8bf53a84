"""shards.crops: each kept box of the detect stage as a sample, read back with the upstream webdataset reader."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from grounding_support import save_tiny_grounding
from PIL import Image

from lvd.curate.config import load_config
from lvd.curate.crops import pixel_box
from lvd.curate.detect import read_detections, run_detect
from lvd.curate.manifest import read_manifest, run_manifest
from lvd.curate.report import run_report
from lvd.curate.shards import run_shards


def test_pixel_box_rounds_outwards_inside_the_image():
    assert pixel_box([1.2, 2.8, 10.1, 11.0], 64, 48) == (1, 2, 11, 11)
    assert pixel_box([-3.0, -1.0, 70.0, 50.0], 64, 48) == (0, 0, 64, 48)
    assert pixel_box([5.0, 5.0, 5.0, 9.0], 64, 48) is None  # no width: no crop


@pytest.mark.slow
def test_shards_add_each_kept_box_as_a_sample(tmp_path):
    weights = save_tiny_grounding(tmp_path / "grounding")
    pool = tmp_path / "pool"
    pool.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))  # smooth: JPEG keeps it close
        coarse.resize((64, 48), Image.Resampling.BICUBIC).save(pool / f"{i}.png")
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        f'sources.pool=["{pool}"]',
        "workers=0",
        "progress=false",
        f"detect.weights={weights}",
        "detect.prompt='a cat . a red square .'",
        "detect.device=cpu",
        "filter.require.phrases=[cat]",
        "filter.require.min_score=0.9",
        "shards.crops=true",
        "shards.shuffle=false",
        "shards.select=retrieve",
        "shards.quality=95",
    ]
    cfg = load_config(None, overrides)
    run_manifest(cfg)
    run_detect(cfg)
    manifest = read_manifest(cfg.run_dir).set_index("id")
    curated = manifest.index.to_numpy()[:3]  # the retrieve stage's output, planted: three of the four images
    neighbors = pd.DataFrame({"seed_set": "s", "seed_id": 0, "id": curated, "rank": 1, "similarity": 0.9,
                              "mode": "sample", "cluster": 0, "floor": None})  # fmt: skip
    (Path(cfg.run_dir) / "retrieve").mkdir()
    neighbors.to_parquet(Path(cfg.run_dir) / "retrieve" / "neighbors.parquet", index=False)
    folder = run_shards(cfg)

    # the reference: filter.require's boxes written out with pandas, best score first
    boxes = read_detections(cfg.run_dir)
    boxes = boxes[boxes["phrase"].str.contains(r"\bcat\b") & (boxes["score"] >= 0.9) & boxes["id"].isin(curated)]
    boxes = boxes.assign(order=np.arange(len(boxes))).sort_values(["id", "score", "order"], ascending=[1, 0, 1])
    assert 0 < len(boxes) < len(read_detections(cfg.run_dir))

    samples = list(wds.WebDataset(str(folder / "curated-000000.tar"), shardshuffle=False))
    crops = [s for s in samples if "_c" in s["__key__"]]
    assert len(samples) == len(curated) + len(crops) and len(crops) == len(boxes)
    for sample, want in zip(crops, boxes.itertuples(index=False)):
        meta = json.loads(sample["json"])
        source = manifest.loc[want.id]
        assert meta["crop_of"]["id"] == want.id and meta["crop_of"]["source_key"] == source["key"]
        assert sample["__key__"].startswith(f"{want.id:019d}_c")
        assert meta["phrase"] == want.phrase and abs(meta["score"] - want.score) < 1e-5
        np.testing.assert_allclose(meta["box"], want.box, atol=0.01)
        x0, y0, x1, y1 = meta["pixels"]
        assert (x0, y0) == (int(np.floor(want.box[0])), int(np.floor(want.box[1])))
        assert (x1, y1) == (min(64, int(np.ceil(want.box[2]))), min(48, int(np.ceil(want.box[3]))))
        original = np.asarray(Image.open(Path(source["source"]) / source["key"]).convert("RGB"), np.float32)
        crop = np.asarray(Image.open(io.BytesIO(sample["jpg"])), np.float32)
        assert crop.shape == (y1 - y0, x1 - x0, 3)
        buf = io.BytesIO()  # plain Pillow: the region cut from the source file, JPEG at the same quality
        Image.open(Path(source["source"]) / source["key"]).convert("RGB").crop((x0, y0, x1, y1)).save(
            buf, "JPEG", quality=95
        )
        np.testing.assert_array_equal(crop, np.asarray(Image.open(buf), np.float32))
        error = np.abs(crop - original[y0:y1, x0:x1]).mean()
        assert error < 12 and error < np.abs(crop - original[::-1, ::-1][y0:y1, x0:x1]).mean()
    index = pq.read_table(folder / "curated-000000.parquet").to_pandas()
    assert index["__key__"].tolist() == [s["__key__"] for s in samples]
    assert (index[index["selected_by"] == "crop"]["__key__"] == [s["__key__"] for s in crops]).all()

    # the report draws the boxes: every pool image is shown (kept by the filter or dropped by it)
    page = run_report(cfg)
    html = page.read_text()
    assert "a cat . a red square ." in html and "kept by the filters" in html and "dropped by the filters" in html
    pictures = {int(p.name.split("-")[0]): p for p in (page.parent / "det").glob("*.jpg")}
    assert set(pictures) == set(manifest.index)
    everything = read_detections(cfg.run_dir)
    for id_, path in pictures.items():
        source = manifest.loc[id_]
        original = np.asarray(Image.open(Path(source["source"]) / source["key"]).convert("RGB"), np.float32)
        drawn = np.asarray(Image.open(path), np.float32)  # 64 x 48 is under the picture size: not resized
        changed = np.abs(drawn - original).sum(-1) > 60
        outline = np.zeros(changed.shape, bool)
        for box in everything[everything["id"] == id_]["box"]:
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            outline[np.clip([y0, y1], 0, 47), max(x0, 0) : min(x1, 63) + 1] = True
        assert changed[outline].mean() > 0.5 and changed.mean() > 0.05
