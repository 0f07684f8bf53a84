"""Grounding DINO detection: the model module and the detect stage against transformers' own pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from grounding_support import save_tiny_grounding
from PIL import Image

from lvd.common.errors import InputFormatError, MissingInputError
from lvd.curate.cli import main
from lvd.curate.config import load_config
from lvd.curate.detect import SCHEMA, read_detections, run_detect
from lvd.curate.manifest import read_manifest, run_manifest
from lvd.pretrain.models.grounding import GroundingDino, normalise_prompt
from lvd.pretrain.models.weights.strict import WeightsError

PROMPT = "a cat . a red square ."


@pytest.fixture(scope="session")
def tiny_grounding(tmp_path_factory) -> Path:
    return save_tiny_grounding(tmp_path_factory.mktemp("grounding") / "tiny-grounding-dino")


def _image(seed: int, size=(64, 48)) -> Image.Image:
    """Noise with a planted square (the random model finds boxes anyway; the shapes vary the pixels)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    x, y = rng.integers(0, min(size) // 2, size=2)
    pixels[y : y + 16, x : x + 16] = (220, 20, 20)
    return Image.fromarray(pixels)


def _reference(folder: Path, images, prompt: str, box_threshold: float, text_threshold: float):
    """transformers' own pipeline: processor, model, post-processing; boxes clipped to the image."""
    from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

    processor = GroundingDinoProcessor.from_pretrained(str(folder))
    model = GroundingDinoForObjectDetection.from_pretrained(str(folder)).float().eval()
    inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    results = processor.post_process_grounded_object_detection(
        outputs,
        inputs["input_ids"],
        threshold=box_threshold,
        text_threshold=text_threshold,
        target_sizes=[(im.height, im.width) for im in images],
    )
    out = []
    for result, im in zip(results, images):
        boxes = np.clip(result["boxes"].numpy(), 0, [im.width, im.height, im.width, im.height])
        out.append((boxes, result["scores"].numpy(), list(result["text_labels"])))
    return out


def _assert_same(found, reference, atol=1e-3):
    boxes, scores, phrases = reference
    assert len(found) == len(scores)
    np.testing.assert_allclose(found.scores, scores, atol=1e-4)
    np.testing.assert_allclose(found.boxes, boxes, atol=atol)
    assert found.phrases == phrases


@pytest.mark.slow
def test_batched_detections_match_transformers_pipeline(tiny_grounding):
    # images of different sizes in one batch: padded and masked as the processor does
    images = [_image(0, (64, 48)), _image(1, (40, 72)), _image(2, (90, 30))]
    model = GroundingDino(tiny_grounding, device="cpu")
    found = model.detect(images, PROMPT, box_threshold=0.35, text_threshold=0.25)
    reference = _reference(tiny_grounding, images, PROMPT, 0.35, 0.25)
    assert [len(f) for f in found] == [len(r[1]) for r in reference] and sum(len(f) for f in found) > 0
    for f, r, im in zip(found, reference, images):
        _assert_same(f, r)
        assert f.boxes.dtype == np.float32 and f.boxes.shape == (len(f), 4)
        assert (f.boxes[:, 2] <= im.width).all() and (f.boxes[:, 3] <= im.height).all() and (f.boxes >= 0).all()
    # thresholds: every score clears the box threshold; a higher one keeps a strict subset
    assert all((f.scores > 0.35).all() for f in found)
    strict = model.detect(images, PROMPT, box_threshold=0.9, text_threshold=0.25)
    for f, s in zip(found, strict):
        assert len(s) < len(f) and (s.scores > 0.9).all() and set(s.scores.tolist()) <= set(f.scores.tolist())
    # a higher text threshold keeps the boxes and shortens (never lengthens) their phrases
    terse = model.detect(images, PROMPT, box_threshold=0.35, text_threshold=0.9)
    for f, t in zip(found, terse):
        np.testing.assert_array_equal(t.scores, f.scores)
        assert all(len(a.split()) <= len(b.split()) for a, b in zip(t.phrases, f.phrases))
        assert any(a != b for a, b in zip(t.phrases, f.phrases)) or not len(f)


def test_prompt_is_normalised_as_the_reference_feeds_it():
    assert normalise_prompt("A Cat .  a DOG") == "a cat . a dog ."
    assert normalise_prompt("a cat . a dog .") == "a cat . a dog ."
    with pytest.raises(InputFormatError, match="prompt is empty"):
        normalise_prompt(" . ")


def test_missing_or_foreign_weights_folder_is_one_user_error(tmp_path):
    with pytest.raises(MissingInputError, match="weights not found"):
        GroundingDino(tmp_path / "absent")
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(WeightsError, match="'vit' model, not Grounding DINO"):
        GroundingDino(tmp_path / "vit")
    with pytest.raises(WeightsError, match="not a Hugging Face Grounding DINO folder"):
        GroundingDino(tmp_path)


def test_truncated_weights_are_a_weights_error(tiny_grounding, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_grounding.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)
    with pytest.raises(WeightsError, match="cannot load Grounding DINO"):
        GroundingDino(broken)


# --------------------------------------------------------------------------- the stage


def _write_pool(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"img{i:02d}.png")
        _image(10 + i).save(paths[-1])  # one size: batches need no padding, so any batching gives the same boxes
    (folder / "broken.png").write_bytes(b"not an image")
    return paths


def _cfg(tmp_path: Path, weights: Path, *extra: str):
    seeds = tmp_path / "seeds"
    if not seeds.exists():
        _write_pool(seeds, 2)
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        f'sources.pool=["{tmp_path / "pool"}"]',
        f"sources.seeds.fav={seeds}",
        "progress=false",
        "workers=0",
        f"detect.weights={weights}",
        f"detect.prompt='{PROMPT}'",
        "detect.batch_size=2",
        "detect.part_size=3",
        "detect.device=cpu",
    ]
    return load_config(None, overrides + list(extra))


@pytest.mark.slow
def test_detect_stage_matches_transformers_and_resumes(tmp_path, tiny_grounding, monkeypatch):
    paths = _write_pool(tmp_path / "pool", 5)
    cfg = _cfg(tmp_path, tiny_grounding)
    run_manifest(cfg)
    folder = run_detect(cfg)
    assert sorted(p.name for p in folder.glob("part-*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    assert pq.read_schema(folder / "part-00000.parquet").remove_metadata() == SCHEMA
    success = json.loads((folder / "_SUCCESS.json").read_text())
    assert success["images"] == 5 and success["failed"] == 0 and success["prompt"] == PROMPT

    frame = read_detections(cfg.run_dir)
    manifest = read_manifest(cfg.run_dir)
    pool = manifest[(manifest["set"] == "pool") & (manifest["status"] == "ok")]
    assert set(frame["id"]) <= set(pool["id"])  # the pool only: seed and broken images are not detected
    reference = _reference(tiny_grounding, [Image.open(p).convert("RGB") for p in paths], PROMPT, 0.35, 0.25)
    by_key = dict(zip(pool["key"], pool["id"]))
    for path, (boxes, scores, phrases) in zip(paths, reference):
        rows = frame[frame["id"] == by_key[path.name]]
        assert len(rows) == len(scores)
        np.testing.assert_allclose(np.stack(rows["box"].to_numpy()), boxes, atol=1e-3)
        np.testing.assert_allclose(rows["score"].to_numpy(), scores, atol=1e-4)
        assert rows["phrase"].tolist() == phrases
        assert (rows["width"] == 64).all() and (rows["height"] == 48).all()

    # a rerun recomputes nothing: the model is never even built
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    monkeypatch.setattr("lvd.curate.detect.GroundingDino", _refuse)
    assert run_detect(cfg) == folder
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before

    # an invocation that fails part-way (a changed threshold, the model breaking on the second batch)
    # leaves the finished outputs exactly as they were; the next one finishes the work
    monkeypatch.setattr("lvd.curate.detect.GroundingDino", _BreaksOnSecondBatch)
    stricter = _cfg(tmp_path, tiny_grounding, "detect.box_threshold=0.9")
    with pytest.raises(RuntimeError, match="second batch"):
        run_detect(stricter)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    monkeypatch.undo()
    run_detect(stricter)
    strict = read_detections(cfg.run_dir)
    assert (strict["score"] > 0.9).all() and 0 < len(strict) < len(frame)


def _refuse(*args, **kwargs):
    raise AssertionError("an up-to-date stage built the model")


class _BreaksOnSecondBatch(GroundingDino):
    calls = 0

    def detect_prepared(self, *args, **kwargs):
        type(self).calls += 1
        if type(self).calls == 2:
            raise RuntimeError("model broke on the second batch")
        return super().detect_prepared(*args, **kwargs)


def test_detect_stage_refuses_missing_settings_before_any_work(tmp_path, tiny_grounding):
    from lvd.curate.config import ConfigError

    _write_pool(tmp_path / "pool", 1)
    with pytest.raises(ConfigError, match="detect.weights is null"):
        run_detect(_cfg(tmp_path, tiny_grounding, "detect.weights=null"))
    with pytest.raises(ConfigError, match="detect.prompt is null"):
        run_detect(_cfg(tmp_path, tiny_grounding, "detect.prompt=null"))
    assert not (tmp_path / "run" / "detect").exists()


# --------------------------------------------------------------------------- one image from the CLI


@pytest.mark.slow
def test_cli_one_image_writes_png_and_json(tmp_path, tiny_grounding, capsys):
    image = _image(5, (80, 60))
    image.save(tmp_path / "x.png")
    out, boxes = tmp_path / "boxes.png", tmp_path / "boxes.json"
    argv = ["detect", "--image", str(tmp_path / "x.png"), "--prompt", PROMPT, "--weights", str(tiny_grounding)]
    argv += ["--box-threshold", "0.5", "--text-threshold", "0.3", "--out", str(out), "--json", str(boxes)]
    assert main([*argv, "--device", "cpu"]) == 0
    listed = json.loads(boxes.read_text())
    ((ref_boxes, ref_scores, ref_phrases),) = _reference(tiny_grounding, [image], PROMPT, 0.5, 0.3)
    assert len(listed) == len(ref_scores) > 0
    assert [b["phrase"] for b in listed] == ref_phrases
    np.testing.assert_allclose([b["box"] for b in listed], ref_boxes, atol=0.01)
    np.testing.assert_allclose([b["score"] for b in listed], ref_scores, atol=1e-4)
    drawn = np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)
    assert drawn.shape == (60, 80, 3)
    changed = np.abs(drawn - np.asarray(image, dtype=np.int16)).sum(-1) > 0
    x0, y0, x1, y1 = (int(round(v)) for v in listed[0]["box"])
    assert changed.any() and changed[np.clip(y1, 0, 59), np.clip(x0, 0, 79) : np.clip(x1, 0, 79) + 1].any()
    # user mistakes are one line and exit status 2
    assert main(["detect", "--image", str(tmp_path / "x.png"), "--prompt", PROMPT, "--out", str(out)]) == 2
    assert "also needs --weights" in capsys.readouterr().err
    assert main([*argv[:5], "--weights", str(tmp_path / "absent"), "--out", str(out)]) == 2
    assert "weights not found" in capsys.readouterr().err
    assert main(["detect", "default", "--prompt", PROMPT]) == 2
    assert "--prompt go with --image" in capsys.readouterr().err
    assert main(["detect"]) == 2
    assert "needs a CONFIG" in capsys.readouterr().err


def test_batches_group_images_of_like_shape():
    import pandas as pd

    from lvd.curate.detect import make_batches

    rows = pd.DataFrame({"id": [5, 1, 2, 3, 4, 0], "width": [640, 480, 640, 480, 800, 480],
                         "height": [480, 640, 480, 640, 800, 640]})  # fmt: skip
    batches = make_batches("00000", rows, 2)
    assert [b["id"].tolist() for _, b in batches] == [[0, 1], [3, 4], [2, 5]]  # by aspect ratio, then id
    assert {name for name, _ in batches} == {"00000"} and sum(len(b) for _, b in batches) == len(rows)


@pytest.mark.slow
def test_two_torchrun_ranks_find_the_same_boxes_as_one(tmp_path, tiny_grounding):
    import os
    import subprocess
    import sys

    from omegaconf import OmegaConf

    _write_pool(tmp_path / "pool", 5)
    one, two = (
        _cfg(tmp_path / name, tiny_grounding, f'sources.pool=["{tmp_path / "pool"}"]', "detect.part_size=2")
        for name in ("one", "two")
    )
    for cfg in (one, two):
        run_manifest(cfg)
    run_detect(one)
    OmegaConf.save(two, tmp_path / "two.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "lvd.curate.detect", str(tmp_path / "two.yaml")]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    success = json.loads((Path(two.run_dir) / "detect" / "_SUCCESS.json").read_text())
    assert success["world_size"] == 2 and success["images"] == 5 and success["parts"] == 3
    a, b = (read_detections(cfg.run_dir).sort_values(["id", "score"], kind="stable") for cfg in (one, two))
    assert (
        len(a) == len(b) > 0 and a["id"].tolist() == b["id"].tolist() and a["phrase"].tolist() == b["phrase"].tolist()
    )
    np.testing.assert_allclose(np.stack(a["box"]), np.stack(b["box"]), atol=1e-3)
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-5)
