"""Tiny CLIP / SigLIP / SigLIP2 models saved the ways the field distributes them, for the text tests.

Not a test module. Every folder is written by transformers itself (`save_pretrained`) with a real
tokenizer class (CLIP's byte-level BPE, SigLIP's sentencepiece) and a preprocessor_config.json
as Hugging Face writes them; `to_openai_layout` writes a CLIPModel's weights under OpenAI's
`clip.model.CLIP` names, from OpenAI's architecture as published (fused attention input
projection, transposed output projections), independently of lvd's own mapping.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CAPTION_WORDS = ("a", "photo", "of", "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker")
CAPTION_WORDS += ("bag", "ankle", "boot", "the", "snow", "people")


def clip_tokenizer(folder: Path, words=CAPTION_WORDS):
    """CLIP's tokenizer class over a byte-level vocabulary, with merges that make whole tokens of `words`."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    merges = list(dict.fromkeys(merges))
    vocab += [a + b for a, b in merges if a + b not in vocab]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(dict.fromkeys(vocab))}, merges=merges)
    tok.save_pretrained(folder)
    return tok


def sentencepiece_tokenizer(folder: Path):
    """SigLIP's tokenizer class over a sentencepiece model trained on a few captions."""
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(f"a photo of a {w}" for w in CAPTION_WORDS for _ in range(3)))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "spiece"),
        vocab_size=32,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    corpus.unlink()
    tok = SiglipTokenizer(vocab_file=str(folder / "spiece.model"))
    tok.save_pretrained(folder)
    (folder / "spiece.vocab").unlink(missing_ok=True)
    return tok


def gemma_style_tokenizer(folder: Path):
    """SigLIP2's tokenizer class (Gemma's, lowercasing) over a vocabulary of characters."""
    import string

    from transformers import Siglip2Tokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for c in "\u2581" + string.ascii_lowercase + string.digits + ",.-":
        vocab.setdefault(c, len(vocab))
    tok = Siglip2Tokenizer(vocab=vocab, merges=[])
    tok.save_pretrained(folder)
    return tok


def tiny_config(family: str, vocab: int, width: int = 64, heads: int = 2, image: int = 32, patch: int = 8, **text):
    from transformers import CLIPConfig, Siglip2Config, SiglipConfig

    tower = {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 2, "num_attention_heads": heads}
    text_cfg = {**tower, "vocab_size": vocab, "max_position_embeddings": 24, **text}
    if family == "clip":
        text_cfg.update(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
        return CLIPConfig(
            text_config=text_cfg, vision_config={**tower, "image_size": image, "patch_size": patch}, projection_dim=32
        )
    text_cfg.update(pad_token_id=0, eos_token_id=1)
    if family == "siglip":
        return SiglipConfig(text_config=text_cfg, vision_config={**tower, "image_size": image, "patch_size": patch})
    num_patches = (image // patch) ** 2
    return Siglip2Config(text_config=text_cfg, vision_config={**tower, "num_patches": num_patches, "patch_size": patch})


def random_model(config, seed: int = 0):
    """A model of `config` with every weight random (so that no output is a constant)."""
    import transformers

    cls = {"clip": transformers.CLIPModel, "siglip": transformers.SiglipModel, "siglip2": transformers.Siglip2Model}
    torch.manual_seed(seed)
    model = cls[config.model_type](config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


CLIP_PREPROCESSOR = {
    "image_processor_type": "CLIPImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 40},
    "do_center_crop": True,
    "crop_size": {"height": 32, "width": 32},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    # not CLIP's own statistics: the test sees whether the folder's are used
    "image_mean": [0.3, 0.5, 0.7],
    "image_std": [0.2, 0.25, 0.3],
    "resample": 3,
}


def clip_folder(folder: Path, seed: int = 0, preprocessor: dict | None = None, **config):
    """A Hugging Face CLIP folder: config.json, model.safetensors, tokenizer, preprocessor_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = clip_tokenizer(folder)
    model = random_model(tiny_config("clip", len(tok), **config), seed)
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor or CLIP_PREPROCESSOR))
    return model, tok


def siglip_folder(folder: Path, family: str = "siglip", seed: int = 0):
    """A Hugging Face SigLIP (sentencepiece tokenizer) or SigLIP2 NaFlex (Gemma-style tokenizer) folder."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = sentencepiece_tokenizer(folder) if family == "siglip" else gemma_style_tokenizer(folder)
    model = random_model(tiny_config(family, len(tok)), seed)
    model.save_pretrained(folder)
    pre = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "rescale_factor": 1 / 255, "do_normalize": True}
    if family == "siglip":
        pre.update(image_processor_type="SiglipImageProcessor", do_resize=True, size={"height": 32, "width": 32})
    else:
        pre.update(image_processor_type="Siglip2ImageProcessor", do_resize=True, max_num_patches=16, patch_size=8)
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    return model, tok


def to_openai_layout(model) -> dict[str, torch.Tensor]:
    """A CLIPModel's weights under the names and shapes of OpenAI's `clip.model.CLIP`."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {
        "logit_scale": sd["logit_scale"],
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        # OpenAI multiplies by its projections from the right: x @ proj
        "visual.proj": sd["visual_projection.weight"].t().contiguous(),
        "text_projection": sd["text_projection.weight"].t().contiguous(),
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
    }
    for ours, theirs in (
        ("vision_model.pre_layrnorm", "visual.ln_pre"),
        ("vision_model.post_layernorm", "visual.ln_post"),
        ("text_model.final_layer_norm", "ln_final"),
    ):
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = sd[f"{ours}.{p}"]
    for tower, prefix in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        i = 0
        while f"{tower}.encoder.layers.{i}.layer_norm1.weight" in sd:
            hf, oa = f"{tower}.encoder.layers.{i}.", f"{prefix}.resblocks.{i}."
            # nn.MultiheadAttention keeps query, key and value in one in_proj, in that order
            out[oa + "attn.in_proj_weight"] = torch.cat([sd[hf + f"self_attn.{x}_proj.weight"] for x in "qkv"])
            out[oa + "attn.in_proj_bias"] = torch.cat([sd[hf + f"self_attn.{x}_proj.bias"] for x in "qkv"])
            for src, dst in (
                ("self_attn.out_proj", "attn.out_proj"),
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ):
                for p in ("weight", "bias"):
                    out[f"{oa}{dst}.{p}"] = sd[f"{hf}{src}.{p}"]
            i += 1
    return out
