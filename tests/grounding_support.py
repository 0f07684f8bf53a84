"""A tiny random-weight Grounding DINO saved as a Hugging Face folder (tiny Swin + BERT), offline."""

from __future__ import annotations

from pathlib import Path

import torch

#: The tiny BERT vocabulary: the special tokens, the prompts' words and the '.' separator.
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "cat", "dog", "red", "square", "blue", "circle"]


def save_tiny_grounding(folder: Path, seed: int = 0, size: int = 64) -> Path:
    """Random weights in transformers' layout with the processor's files; images resized to `size`."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
        SwinConfig,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    backbone = SwinConfig(
        embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=7, out_indices=[2, 3, 4]
    )
    text = BertConfig(
        vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64,
    )  # fmt: skip
    config = GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1, decoder_layers=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        num_queries=20, max_text_len=32, encoder_n_points=2, decoder_n_points=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    images = GroundingDinoImageProcessorPil(size={"shortest_edge": size, "longest_edge": round(size * 1333 / 800)})
    model.save_pretrained(folder)
    GroundingDinoProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder
