"""Contrastive image-text pairs (CLIP, SigLIP, SigLIP2) read from local weights and run by transformers.

A text query can only search an index whose image vectors came from the image half of the
same pair. transformers' `CLIPModel`, `SiglipModel` and `Siglip2Model` are the reference
implementations of these towers (every Hugging Face checkpoint is written for them), so lvd runs
them as they are rather than keeping copies; what lvd adds is reading the weights the field
distributes, strictly, from local files only:

- a Hugging Face folder (`config.json` with model_type clip, siglip or siglip2,
  `model.safetensors`, tokenizer files, `preprocessor_config.json`);
- OpenAI's CLIP release (a TorchScript archive) or an open_clip CLIP (`open_clip_config.json`
  with `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`), whose state dict is mapped
  to the `CLIPModel` layout (`weights/openai_clip.py`). Their text needs Hugging Face tokenizer
  files (`tokenizer.json`, or `vocab.json` + `merges.txt`) in the same folder.

Preprocessing comes from the folder's `preprocessor_config.json` (resolution, resize, mean,
std); lvd feeds every model the centre square of the image, so SigLIP, whose processor squashes
the whole image to a square, sees the centre crop instead, and SigLIP2's variable-resolution
(NaFlex) models see a square of as many patches as `max_num_patches` allows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lvd.pretrain.models.weights.openai_clip import OPENAI_MEAN, OPENAI_STD, clip_config, is_openai_clip
from lvd.pretrain.models.weights.openai_clip import openai_clip_to_hf as _openai_to_hf
from lvd.pretrain.models.weights.resolve import resolve_weights
from lvd.pretrain.models.weights.strict import WeightsError, load_strict

log = logging.getLogger(__name__)

# config.json model_type -> the transformers class that runs both towers
FAMILIES = {"clip": "CLIPModel", "siglip": "SiglipModel", "siglip2": "Siglip2Model"}
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model")
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class Preprocessing:
    """What the image tower expects: a resolution-side square (shorter side resized to
    resolution x resize_ratio, centre crop), standardised by mean and std."""

    resolution: int
    resize_ratio: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# --------------------------------------------------------------------------- what a weights path holds


def pair_layout(weights: str | os.PathLike) -> str | None:
    """huggingface, open_clip or openai when `weights` holds a contrastive pair lvd reads, else None.

    Cheap: a folder answers from its file names and config, a file from its header or the key
    names in its pickle, without reading tensors (TorchScript archives excepted).
    """
    try:
        path = resolve_weights(weights)
    except (OSError, ValueError):
        return None
    if path.is_dir():
        if _hf_family(path) is not None:
            return "huggingface"
        if (path / OPEN_CLIP_CONFIG).is_file() and any((path / n).is_file() for n in OPEN_CLIP_WEIGHTS):
            return "open_clip"
        return None
    if not is_openai_clip(_key_names(path)):
        return None
    return "open_clip" if (path.parent / OPEN_CLIP_CONFIG).is_file() else "openai"


def _hf_family(folder: Path) -> str | None:
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if model_type in FAMILIES else None


def _key_names(path: Path) -> list[str]:
    """The state-dict key names a file holds, read cheaply; [] when it is no state dict."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return list(f.keys())
        except Exception:
            return []
    if not zipfile.is_zipfile(path):
        return []
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        if any("/code/" in n for n in names):  # TorchScript: OpenAI's release format
            return list(_torchscript_state(path))
        pickled = next((n for n in names if n.endswith("/data.pkl")), None)
        blob = z.read(pickled) if pickled else b""
    # the pickle names its keys; decoding it would run the unpickler, which reading the file does safely later
    return [k for k in ("token_embedding.weight", "visual.conv1.weight") if k.encode() in blob]


def _torchscript_state(path: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():  # deprecated in torch >= 2.9, yet the format OpenAI released CLIP in
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except Exception as exc:
            raise WeightsError(f"{path} is not a readable TorchScript archive ({type(exc).__name__})") from exc


# --------------------------------------------------------------------------- loading


@dataclass
class ContrastivePair:
    """Both towers of one model, its tokenizer's folder and its image preprocessing."""

    family: str  # clip | siglip | siglip2
    layout: str  # huggingface | open_clip | openai
    model: nn.Module
    tokenizer_dir: Path | None
    preprocessing: Preprocessing

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim if self.family == "clip" else self._vision.hidden_size)

    @property
    def patch_size(self) -> int:
        return int(self._vision.patch_size)

    @property
    def _vision(self):
        return self.model.config.vision_config

    @property
    def context_length(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)


def load_pair(weights: str | os.PathLike) -> ContrastivePair:
    """Read a contrastive pair (see the module's docstring for the layouts); strict: every tensor
    of the file must fit the model and every tensor of the model must be in the file."""
    path = resolve_weights(weights)
    layout = pair_layout(path)
    if layout == "huggingface":
        return _hf_pair(path)
    if layout in ("open_clip", "openai"):
        return _openai_pair(path, layout)
    raise WeightsError(
        f"{path} holds no CLIP or SigLIP model lvd reads (a Hugging Face folder whose config.json has model_type "
        "clip, siglip or siglip2; an open_clip folder with open_clip_config.json; or OpenAI's CLIP release)"
    )


def _model_class(family: str):
    import transformers

    return getattr(transformers, FAMILIES[family])


def _hf_pair(folder: Path) -> ContrastivePair:
    from transformers import AutoConfig

    family = _hf_family(folder)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder}: a Hugging Face folder needs model.safetensors (pickled .bin files are not read)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(_read_safetensors(file))
    model = _strict_model(family, config, state, folder)
    return ContrastivePair(family, "huggingface", model, _tokenizer_dir(folder), _preprocessing(folder, family, model))


def _openai_pair(path: Path, layout: str) -> ContrastivePair:
    from transformers import CLIPConfig

    folder = path if path.is_dir() else path.parent
    model_cfg = None
    if layout == "open_clip":
        model_cfg = json.loads((folder / OPEN_CLIP_CONFIG).read_text()).get("model_cfg") or {}
    if path.is_dir():
        path = next(folder / n for n in OPEN_CLIP_WEIGHTS if (folder / n).is_file())
    state = _read_openai_state(path)
    config = CLIPConfig.from_dict(clip_config(state, model_cfg))
    model = _strict_model("clip", config, _openai_to_hf(state), path)
    pre = _preprocessing(
        folder, "clip", model, open_clip_cfg=folder / OPEN_CLIP_CONFIG if model_cfg is not None else None
    )
    return ContrastivePair("clip", layout, model, _tokenizer_dir(folder), pre)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error type for a damaged header
        raise WeightsError(f"{path} is not a readable safetensors file ({type(exc).__name__})") from exc


def _read_openai_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path)
    with zipfile.ZipFile(path) as z:
        scripted = any("/code/" in n for n in z.namelist())
    if scripted:
        return _torchscript_state(path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path} is not a readable weights file ({type(exc).__name__})") from exc
    obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: not a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _strict_model(family: str, config, state: dict, source: Path) -> nn.Module:
    # position_ids are buffers older transformers saved and newer ones recompute
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    model = _model_class(family)(config)
    load_strict(model, state, source=f"{FAMILIES[family]} weights {source}")
    return model.float().eval()


def _tokenizer_dir(folder: Path) -> Path | None:
    return folder if any((folder / n).is_file() for n in TOKENIZER_FILES) else None


def _side(value) -> int | None:
    """A processor's size setting as one side: an int, {shortest_edge}, or a square {height, width}."""
    if value is None or isinstance(value, int):
        return value
    if "shortest_edge" in value:
        return int(value["shortest_edge"])
    if value.get("height") != value.get("width"):
        raise WeightsError(f"preprocessor size {value} is not square; lvd embeds square crops")
    return int(value["height"])


def _preprocessing(folder: Path, family: str, model: nn.Module, open_clip_cfg: Path | None = None) -> Preprocessing:
    """The folder's preprocessor_config.json (else open_clip's preprocess_cfg, else the family's
    published defaults) as lvd's square preprocessing."""
    vision = model.config.vision_config
    default_mean, default_std = (OPENAI_MEAN, OPENAI_STD) if family == "clip" else (SIGLIP_MEAN, SIGLIP_STD)
    pp_path = folder / "preprocessor_config.json"
    pp = json.loads(pp_path.read_text()) if pp_path.is_file() else {}
    if not pp and open_clip_cfg is not None:
        cfg = json.loads(open_clip_cfg.read_text()).get("preprocess_cfg") or {}
        pp = {"image_mean": cfg.get("mean"), "image_std": cfg.get("std")}
    mean = tuple(float(v) for v in (pp.get("image_mean") or default_mean))
    std = tuple(float(v) for v in (pp.get("image_std") or default_std))
    if pp.get("do_normalize") is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    ratio = 1.0
    if family == "siglip2":
        patches = int(pp.get("max_num_patches") or vision.num_patches)
        side = math.isqrt(patches) * int(pp.get("patch_size") or vision.patch_size)
    elif family == "clip" and pp.get("do_center_crop", bool(pp)):
        side = _side(pp.get("crop_size")) or int(vision.image_size)
        ratio = (_side(pp.get("size")) or side) / side
    else:
        side = _side(pp.get("size")) or int(vision.image_size)
    return Preprocessing(int(side), float(ratio), mean, std)


# --------------------------------------------------------------------------- running the towers


def _pooled(out) -> torch.Tensor:
    """transformers >= 5 returns the projected embedding as `pooler_output`, earlier versions as a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def image_features(pair: ContrastivePair, pixels: torch.Tensor) -> torch.Tensor:
    """Standardised B x 3 x S x S pixels -> B x dim image embeddings (not normalised)."""
    if pair.family == "siglip2":
        patches, mask, shapes = patchify(pixels, pair.patch_size, int(pair._vision.num_patches))
        return _pooled(
            pair.model.get_image_features(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)
        )
    native = int(pair._vision.image_size)
    extra = {"interpolate_pos_encoding": True} if pixels.shape[-1] != native else {}
    return _pooled(pair.model.get_image_features(pixel_values=pixels, **extra))


def patchify(pixels: torch.Tensor, patch: int, max_patches: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SigLIP2's NaFlex input: each image's patches (row-major, each patch row-major with the
    channels last), padded to `max_patches`, with the mask of real patches and the grid shape."""
    b, c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    if gh * gw > max_patches or h % patch or w % patch:
        raise WeightsError(f"a {h} x {w} image does not fit SigLIP2's {max_patches} patches of {patch} pixels")
    x = pixels.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch * patch * c)
    mask = torch.zeros(b, max_patches, dtype=torch.int32, device=pixels.device)
    mask[:, : gh * gw] = 1
    x = torch.nn.functional.pad(x, (0, 0, 0, max_patches - gh * gw))
    shapes = torch.tensor([[gh, gw]] * b, dtype=torch.long, device=pixels.device)
    return x, mask, shapes


class TextTower:
    """Texts -> embeddings of the pair's text half, tokenized as its family was trained."""

    def __init__(self, pair: ContrastivePair, device: torch.device):
        if pair.tokenizer_dir is None:
            raise WeightsError(
                "the text tower needs the model's tokenizer files (tokenizer.json, or vocab.json + merges.txt, or "
                "spiece.model) beside its weights"
            )
        from transformers import AutoTokenizer

        self.pair, self.device = pair, device
        self.tokenizer = AutoTokenizer.from_pretrained(str(pair.tokenizer_dir), local_files_only=True)
        # SigLIP2 (Gemma tokenizer) was trained on lowercased text; SigLIP's own tokenizer lowercases itself
        self.lowercase = pair.family == "siglip2" or type(self.tokenizer).__name__.startswith("Gemma")

    def features(self, texts: list[str]) -> torch.Tensor:
        texts = [t.lower() for t in texts] if self.lowercase else list(texts)
        # SigLIP was trained on texts padded to its full length and pools the last token; CLIP pools
        # its end-of-text token, so its padding does not matter
        padding = "max_length" if self.pair.family != "clip" else True
        enc = self.tokenizer(
            texts, padding=padding, max_length=self.pair.context_length, truncation=True, return_tensors="pt"
        )
        kwargs = {"input_ids": enc["input_ids"].to(self.device)}
        if self.pair.family == "clip" and "attention_mask" in enc:
            kwargs["attention_mask"] = enc["attention_mask"].to(self.device)
        return _pooled(self.pair.model.get_text_features(**kwargs))
