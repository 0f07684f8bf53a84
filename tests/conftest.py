"""Fixtures and helpers shared by several test files."""

from pathlib import Path

import pytest
import torch

from lvd.pretrain.models import build_backbone


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
