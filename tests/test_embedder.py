"""The Embedder API used outside the stage (lookup service, tests): PIL and bytes in, unit rows out."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import save_tiny_weights
from PIL import Image

from lvd.common.devices import resolve_dtype
from lvd.pretrain.models.embedder import Embedder


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_weights("vit_tiny_p14", tmp_path_factory.mktemp("w") / "tiny14.pth")


def _photos(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(40 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


def test_pil_and_png_bytes_give_the_same_unit_vectors(weights):
    embedder = Embedder("vit_tiny_p14", weights, resolution=42, dtype="float32")
    photos = _photos()
    blobs = []
    for img in photos:
        buf = io.BytesIO()
        img.save(buf, "PNG")
        blobs.append(buf.getvalue())
    a, b = embedder.embed_pil(photos, batch_size=2), embedder.embed_bytes(blobs)
    assert a.shape == (3, 32) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    info = embedder.info()
    assert (info["model"], info["resolution"], info["dim"], info["dtype"]) == ("vit_tiny_p14", 42, 32, "float32")
    assert embedder.embed_pil([]).shape == (0, 32)


def test_resolution_must_be_a_multiple_of_the_patch(weights):
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        Embedder("vit_tiny_p14", weights, resolution=40)


def test_bf16_autocast_stays_close_to_float32(weights):
    fp32 = Embedder("vit_tiny_p14", weights, dtype="float32").embed_pil(_photos())
    bf16 = Embedder("vit_tiny_p14", weights, dtype="bfloat16").embed_pil(_photos())
    assert (fp32 * bf16).sum(1).min() > 0.99


def test_dtype_policy(monkeypatch):
    from lvd.common import devices as precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("float32", cuda) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", cpu) == torch.float32  # emulated bf16 is far slower than fp32
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", cpu)


@pytest.mark.parametrize(
    "env, expected_capped",
    [
        ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, True),
        ({"ONEDNN_MAX_CPU_ISA": "avx512_core_vnni"}, True),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, False),
        ({"ONEDNN_MAX_CPU_ISA": "ALL"}, False),
    ],
)
def test_onednn_isa_cap_turns_native_bf16_off(monkeypatch, env, expected_capped):
    """A cap below bf16 instructions makes bf16 matmuls emulated, so `auto` must not pick bf16."""
    from lvd.common import devices

    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(devices.torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert devices._isa_capped_below_bf16() is expected_capped
    if expected_capped:
        assert devices.cpu_has_native_bf16() is False
        assert devices.resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_aten_avx2_capability_turns_native_bf16_off(monkeypatch):
    from lvd.common import devices

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(devices.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(devices.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert devices.cpu_has_native_bf16() is False
