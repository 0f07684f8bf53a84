"""The ConvNet backbones against transformers: DINOv3's ConvNeXt (`DINOv3ConvNextModel`) and
DINO's ResNet-50 (`ResNetModel`, the same network as torchvision's `resnet50`), each with
random weights written into the released files' layout by the tests' own key maps."""

from __future__ import annotations

import pytest
import torch
import transformers
from parity_support import TOL, convnext_hf_to_meta, pixels, randomise, rel_diff, resnet_hf_to_torchvision

from lvd.pretrain.models import build_backbone, get_spec


def _hf_convnext(seed=0, scale=0.2, **cfg):
    cfg = {"depths": [1, 1, 2, 1], "hidden_sizes": [16, 32, 48, 64], **cfg}
    torch.manual_seed(seed)
    return randomise(transformers.DINOv3ConvNextModel(transformers.DINOv3ConvNextConfig(**cfg)), seed, scale)


def _hf_resnet(seed=0, scale=0.2, **cfg):
    cfg = {"embedding_size": 8, "hidden_sizes": [32, 64, 128, 256], "depths": [2, 1, 1, 2], **cfg}
    torch.manual_seed(seed)
    return randomise(transformers.ResNetModel(transformers.ResNetConfig(**cfg)), seed, scale)


def _compare_convnext(ours, hf, x) -> float:
    with torch.no_grad():
        ref = hf(pixel_values=x)
        got = ours.forward_features(x)
    diffs = [
        rel_diff(got["x_norm_clstoken"], ref.pooler_output),
        rel_diff(got["x_norm_clstoken"], ref.last_hidden_state[:, 0]),
        rel_diff(got["x_norm_patchtokens"], ref.last_hidden_state[:, 1:]),
    ]
    assert max(diffs) <= TOL, diffs
    assert got["x_storage_tokens"].shape == (len(x), 0, ours.embed_dim)
    return max(diffs)


def _compare_resnet(ours, hf, x) -> float:
    with torch.no_grad():
        ref = hf(pixel_values=x)
        got = ours.forward_features(x)
    fmap = ref.last_hidden_state  # B x C x h x w
    diffs = [
        rel_diff(got["x_norm_clstoken"], ref.pooler_output.flatten(1)),
        rel_diff(got["x_norm_patchtokens"], fmap.flatten(2).transpose(1, 2)),
    ]
    assert max(diffs) <= TOL, diffs
    return max(diffs)


@pytest.mark.slow
def test_convnext_matches_transformers():
    hf = _hf_convnext()
    ours = build_backbone("dinov3_convnext_mini").eval()
    ours.load_state_dict(convnext_hf_to_meta(hf), strict=True)
    _compare_convnext(ours, hf, pixels(64, 64))
    _compare_convnext(ours, hf, pixels(96, 160))  # non-square
    _compare_convnext(ours, hf, pixels(100, 130))  # floored at every stride: 3 x 4 cells
    with torch.no_grad():
        assert ours.forward_features(pixels(100, 130))["x_norm_patchtokens"].shape == (2, 12, 64)


def test_convnext_intermediate_layers_pool_and_norm_like_meta():
    hf = _hf_convnext()
    ours = build_backbone("dinov3_convnext_mini").eval()
    ours.load_state_dict(convnext_hf_to_meta(hf), strict=True)
    x = pixels(64, 96)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True)
        layers = ours.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
    (maps2, pool2), (maps3, pool3) = layers
    stage2 = ref.hidden_states[-2]  # after stage 2 (no norm: Meta's norms[2] is the identity)
    assert rel_diff(maps2, stage2) <= TOL and rel_diff(pool2, stage2.mean(dim=(-2, -1))) <= TOL
    assert rel_diff(pool3, ref.pooler_output) <= TOL
    assert maps3.shape == (2, 64, 2, 3)


def test_resnet_matches_transformers_resnet():
    hf = _hf_resnet()
    ours = build_backbone("dino_resnet_mini", layers=(2, 1, 1, 2)).eval()
    ours.load_state_dict(resnet_hf_to_torchvision(hf), strict=True)
    _compare_resnet(ours, hf, pixels(64, 64))
    _compare_resnet(ours, hf, pixels(64, 96))
    _compare_resnet(ours, hf, pixels(70, 101))  # the padded convolutions round up: 3 x 4 cells
    with torch.no_grad():
        assert ours(pixels(70, 101)).shape == (2, 256)
        assert ours.forward_features(pixels(70, 101))["x_norm_patchtokens"].shape == (2, 12, 256)


def _convnext_keys(depths) -> set[str]:
    """The tensors of dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth (182 for depths 3, 3, 9, 3)."""
    keys = {"downsample_layers.0.0.weight", "downsample_layers.0.0.bias"}
    keys |= {"downsample_layers.0.1.weight", "downsample_layers.0.1.bias"}
    for i in (1, 2, 3):
        keys |= {f"downsample_layers.{i}.{j}.{k}" for j in (0, 1) for k in ("weight", "bias")}
    per_block = ["gamma", "dwconv.weight", "dwconv.bias", "norm.weight", "norm.bias"]
    per_block += ["pwconv1.weight", "pwconv1.bias", "pwconv2.weight", "pwconv2.bias"]
    for i, depth in enumerate(depths):
        keys |= {f"stages.{i}.{j}.{k}" for j in range(depth) for k in per_block}
    return keys | {"norm.weight", "norm.bias", "norms.3.weight", "norms.3.bias"}


@pytest.mark.parametrize(
    "size, n_keys, params",
    [("tiny", 182, 27_820_128), ("small", 344, 49_454_688), ("base", 344, 87_566_464), ("large", 344, 196_230_336)],
)
def test_hub_key_layout_of_the_convnexts(size, n_keys, params):
    name = f"dinov3_convnext_{size}"
    spec = get_spec(name)
    with torch.device("meta"):
        model = build_backbone(name)
    sd = model.state_dict()
    assert set(sd) == _convnext_keys(spec.arch["depths"]) and len(sd) == n_keys
    assert sum(p.numel() for p in model.parameters()) == params
    dims = spec.arch["dims"]
    assert sd["stages.2.0.dwconv.weight"].shape == (dims[2], 1, 7, 7)
    assert sd["downsample_layers.3.1.weight"].shape == (dims[3], dims[2], 2, 2)
    assert (spec.embed_dim, spec.patch_size, spec.resolution, spec.kind) == (dims[3], 32, 224, "convnext")


def _resnet50_keys() -> set[str]:
    """The tensors of dino_resnet50_pretrain.pth: torchvision's resnet50 without fc (318)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight"} | {f"bn1.{k}" for k in bn}
    for layer, blocks in enumerate((3, 4, 6, 3), start=1):
        for b in range(blocks):
            prefix = f"layer{layer}.{b}."
            keys |= {prefix + f"conv{c}.weight" for c in (1, 2, 3)}
            keys |= {prefix + f"bn{c}.{k}" for c in (1, 2, 3) for k in bn}
        keys |= {f"layer{layer}.0.downsample.0.weight"} | {f"layer{layer}.0.downsample.1.{k}" for k in bn}
    return keys


def test_hub_key_layout_of_the_dino_resnet50():
    with torch.device("meta"):
        model = build_backbone("dino_resnet50")
    sd = model.state_dict()
    assert set(sd) == _resnet50_keys() and len(sd) == 318
    assert sum(p.numel() for p in model.parameters()) == 23_508_032
    assert sd["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert sd["layer2.0.downsample.0.weight"].shape == (512, 256, 1, 1)
    spec = get_spec("dino_resnet50")
    assert (spec.embed_dim, spec.patch_size, spec.family, spec.weights_file) == (
        2048,
        32,
        "dino",
        "dino_resnet50_pretrain.pth",
    )


@pytest.mark.slow
def test_full_size_convnext_tiny_and_resnet50_match_transformers():
    hf = _hf_convnext(depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768], scale=0.05)
    ours = build_backbone("dinov3_convnext_tiny").eval()
    ours.load_state_dict(convnext_hf_to_meta(hf), strict=True)
    _compare_convnext(ours, hf, pixels(224, 224, n=1))
    _compare_convnext(ours, hf, pixels(160, 320, n=1))
    hf = _hf_resnet(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3], scale=0.05)
    ours = build_backbone("dino_resnet50").eval()
    ours.load_state_dict(resnet_hf_to_torchvision(hf), strict=True)
    _compare_resnet(ours, hf, pixels(224, 224, n=1))
    _compare_resnet(ours, hf, pixels(160, 320, n=1))
