"""CLIP / SigLIP / SigLIP2 towers read by lvd equal transformers' models with the same random weights.

Hugging Face folders are read into transformers' own classes, so their towers are transformers';
what is checked there is everything lvd decides: the folder's preprocessing (against
transformers' image processors), the tokenization (padding, lowercasing) against the models'
documented use, and strict loading. OpenAI's and open_clip's layouts are mapped by lvd: a random
CLIPModel is written under OpenAI's names by the test's own conversion and read back.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from text_support import clip_folder, random_model, siglip_folder, tiny_config, to_openai_layout

from lvd.pretrain.models.embedder import Embedder, embedder_from_info
from lvd.pretrain.models.preprocess import normalise
from lvd.pretrain.models.weights import WeightsError

TEXTS = ["a photo of a sandal", "A photo of the Ankle Boot", "snow", "people in the snow, a coat and a bag"]
ATOL = 1e-4


def _unit(x: torch.Tensor) -> np.ndarray:
    return F.normalize(x.detach().float(), dim=-1).numpy()


def _pooled(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _photos(n=3, size=(120, 80), seed=0):
    """Images whose resized sides land on whole pixels, so any resize rule gives the same crop."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 3, 4, 3), dtype=np.uint8)
    return [Image.fromarray(b).resize(size, Image.Resampling.BILINEAR) for b in base]


def _squares(n, side, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip") / "clip-tiny"
    model, tok = clip_folder(folder)
    return folder, model, tok


def test_hf_clip_folder_equals_transformers_with_its_own_preprocessing(hf_clip):
    from transformers import AutoImageProcessor

    folder, model, tok = hf_clip
    emb = Embedder("auto", folder, dtype="float32")
    info = emb.info()
    assert info["kind"] == "contrastive" and info["model"] == "CLIPModel" and info["text_tower"] is True
    assert (emb.resolution, emb.resize_ratio, emb.mean) == (32, 1.25, (0.3, 0.5, 0.7))
    images = _photos()
    pixels = AutoImageProcessor.from_pretrained(str(folder))(images=images, return_tensors="pt")["pixel_values"]
    ours_pixels = normalise(torch.as_tensor(np.stack([emb.prepare_pil(i) for i in images])), emb.mean, emb.std, "cpu")
    np.testing.assert_allclose(ours_pixels.numpy(), pixels.numpy(), atol=1e-5)  # resize 40, crop 32, its statistics
    with torch.no_grad():
        want = _unit(_pooled(model.get_image_features(pixel_values=pixels)))
        enc = tok(TEXTS, padding=True, return_tensors="pt")
        want_text = _unit(_pooled(model.get_text_features(**enc)))
    np.testing.assert_allclose(emb.embed_pil(images), want, atol=ATOL)
    np.testing.assert_allclose(emb.embed_text(TEXTS), want_text, atol=ATOL)
    assert np.abs(want_text[0] - want_text[2]).max() > 0.05  # the texts really differ
    # rebuilt from its record, as the lookup service does
    again = embedder_from_info(info, dtype="float32")
    np.testing.assert_allclose(again.embed_text(TEXTS[:1]), want_text[:1], atol=ATOL)


def test_openai_layout_file_equals_the_hf_model(tmp_path, hf_clip):
    """OpenAI's layout (heads from the width, QuickGELU) in a plain .pt state dict and in a TorchScript archive."""
    from transformers import AutoTokenizer

    tok_folder = hf_clip[0]
    model = random_model(tiny_config("clip", len(hf_clip[2]), width=128, heads=2), seed=3)
    state = to_openai_layout(model)
    folder = tmp_path / "openai"
    folder.mkdir()
    AutoTokenizer.from_pretrained(str(tok_folder)).save_pretrained(folder)
    torch.save(state, folder / "ViT-tiny.pt")
    emb = Embedder("auto", folder / "ViT-tiny.pt", dtype="float32")
    assert emb.info()["weights_layout"] == "openai" and emb.mean[0] == pytest.approx(0.48145466)
    squares = _squares(3, 32)
    pixels = normalise(torch.as_tensor(squares), emb.mean, emb.std, "cpu")
    tok = AutoTokenizer.from_pretrained(str(folder))
    with torch.no_grad():
        want = _unit(_pooled(model.get_image_features(pixel_values=pixels)))
        want_text = _unit(_pooled(model.get_text_features(**tok(TEXTS, padding=True, return_tensors="pt"))))
    np.testing.assert_allclose(emb.embed_uint8(squares), want, atol=ATOL)
    np.testing.assert_allclose(emb.embed_text(TEXTS), want_text, atol=ATOL)

    # OpenAI's release format: a TorchScript archive whose state dict has those names
    with warnings.catch_warnings():  # deprecated in torch >= 2.9, yet the format OpenAI released CLIP in
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(_module_tree(state))
    scripted.save(str(folder / "ViT-tiny-jit.pt"))
    jit = Embedder("auto", folder / "ViT-tiny-jit.pt", dtype="float32")
    np.testing.assert_allclose(jit.embed_uint8(squares), want, atol=ATOL)


class _Holder(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _module_tree(state: dict) -> torch.nn.Module:
    """A module whose state dict is `state` (parameters at their dotted names)."""
    root = _Holder()
    for key, value in state.items():
        *path, leaf = key.split(".")
        node = root
        for name in path:
            if not hasattr(node, name):
                node.add_module(name, _Holder())
            node = getattr(node, name)
        node.register_parameter(leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
    return root


def test_open_clip_folder_with_gelu_and_its_own_head_count(tmp_path, hf_clip):
    """open_clip's config decides what shapes cannot: 4 heads of 16 and exact GELU."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    config = tiny_config("clip", len(hf_clip[2]), width=64, heads=4, hidden_act="gelu")
    config.vision_config.hidden_act = "gelu"
    model = random_model(config, seed=5)
    folder = tmp_path / "open_clip"
    folder.mkdir()
    save_file(to_openai_layout(model), str(folder / "open_clip_model.safetensors"))
    model_cfg = {
        "embed_dim": 32,
        "quick_gelu": False,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 24, "vocab_size": len(hf_clip[2]), "width": 64, "heads": 4, "layers": 2},
    }
    preprocess = {"mean": [0.1, 0.2, 0.3], "std": [0.3, 0.3, 0.3]}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}))
    AutoTokenizer.from_pretrained(str(hf_clip[0])).save_pretrained(folder)
    emb = Embedder("auto", folder, dtype="float32")
    assert emb.info()["weights_layout"] == "open_clip" and emb.mean == (0.1, 0.2, 0.3)
    squares = _squares(2, 32)
    pixels = normalise(torch.as_tensor(squares), emb.mean, emb.std, "cpu")
    tok = AutoTokenizer.from_pretrained(str(folder))
    with torch.no_grad():
        want = _unit(_pooled(model.get_image_features(pixel_values=pixels)))
        want_text = _unit(_pooled(model.get_text_features(**tok(TEXTS, padding=True, return_tensors="pt"))))
    np.testing.assert_allclose(emb.embed_uint8(squares), want, atol=ATOL)
    np.testing.assert_allclose(emb.embed_text(TEXTS), want_text, atol=ATOL)
    # what CLIPModel cannot compute is refused by name
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": {**model_cfg, "vision_cfg": {"timm_model_name": "vit_base_patch16_siglip_224"}}})
    )
    with pytest.raises(WeightsError, match="timm_model_name"):
        Embedder("auto", folder)


def test_siglip_folder_equals_transformers(tmp_path):
    """SigLIP pools the last token of texts padded to full length, without a mask, as it was trained."""
    from transformers import AutoImageProcessor

    folder = tmp_path / "siglip"
    model, tok = siglip_folder(folder, "siglip")
    emb = Embedder("auto", folder, dtype="float32")
    assert emb.info()["model"] == "SiglipModel" and (emb.resolution, emb.mean) == (32, (0.5, 0.5, 0.5))
    squares = _squares(3, 32)
    images = [Image.fromarray(s) for s in squares]
    pixels = AutoImageProcessor.from_pretrained(str(folder))(images=images, return_tensors="pt")["pixel_values"]
    ids = tok(TEXTS, padding="max_length", max_length=24, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = _unit(_pooled(model.get_image_features(pixel_values=pixels)))
        want_text = _unit(_pooled(model.get_text_features(input_ids=ids)))
    np.testing.assert_allclose(emb.embed_pil(images), want, atol=ATOL)
    np.testing.assert_allclose(emb.embed_text(TEXTS), want_text, atol=ATOL)


def test_siglip2_naflex_folder_equals_transformers(tmp_path):
    """SigLIP2's variable-resolution input: lvd's square, cut into patches as its image processor cuts them."""
    from transformers import AutoImageProcessor

    folder = tmp_path / "siglip2"
    model, tok = siglip_folder(folder, "siglip2")
    emb = Embedder("auto", folder, dtype="float32")
    assert emb.info()["model"] == "Siglip2Model" and emb.resolution == 32
    images = [Image.fromarray(s) for s in _squares(3, 32)]
    inputs = AutoImageProcessor.from_pretrained(str(folder))(images=images, return_tensors="pt")
    lowered = [t.lower() for t in TEXTS]  # SigLIP2 was trained on lowercased text
    ids = tok(lowered, padding="max_length", max_length=24, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = _unit(_pooled(model.get_image_features(**inputs)))
        want_text = _unit(_pooled(model.get_text_features(input_ids=ids)))
    np.testing.assert_allclose(emb.embed_pil(images), want, atol=ATOL)
    np.testing.assert_allclose(emb.embed_text(TEXTS), want_text, atol=ATOL)


def test_loading_is_strict_and_errors_are_clear(tmp_path, hf_clip):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    model, _ = clip_folder(folder, seed=1)
    state = load_file(str(folder / "model.safetensors"))
    state.pop("text_projection.weight")
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"missing keys: text_projection.weight.*unexpected keys: extra.weight"):
        Embedder("auto", folder)
    with pytest.raises(WeightsError, match="cls_and_mean_patch"):
        Embedder("auto", hf_clip[0], cls_and_mean_patch=True)
    no_tokenizer = tmp_path / "no-tok"
    clip_folder(no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    emb = Embedder("auto", no_tokenizer, dtype="float32")
    assert emb.info()["text_tower"] is False  # the image tower works; text says what is missing
    with pytest.raises(WeightsError, match="tokenizer files"):
        emb.embed_text(["a coat"])


def test_auto_resolution_names_the_setting_for_a_contrastive_folder(hf_clip):
    from lvd.pretrain.models.build import model_name

    with pytest.raises(WeightsError, match="preprocessor_config.json"):
        model_name("auto", hf_clip[0])
