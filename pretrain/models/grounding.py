"""Grounding DINO (IDEA-Research's open-set detector) from a local Hugging Face folder, run by transformers.

Grounding DINO finds the boxes of an image that match the phrases of a text prompt
("a dog . a bicycle ."). transformers' `GroundingDinoForObjectDetection` and
`GroundingDinoProcessor` are the reference implementation every Hugging Face checkpoint
(IDEA-Research/grounding-dino-tiny, -base) is written for, so lvd runs them as they are and
keeps no copy of the detector; what lvd adds is strict loading from local files only, a
`device` argument, batches whose images are prepared apart from the model (in DataLoader
workers), and detections as plain arrays in image pixels.

Post-processing is transformers' own `post_process_grounded_object_detection`: a query is kept
when its best token probability exceeds `box_threshold`, and its phrase is the prompt tokens
whose probability exceeds `text_threshold`, as in the reference. lvd then clips each box to
its image.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lvd.common.devices import resolve_device
from lvd.common.errors import InputFormatError
from lvd.pretrain.models.weights.resolve import resolve_weights
from lvd.pretrain.models.weights.strict import WeightsError

log = logging.getLogger(__name__)

MODEL_TYPE = "grounding-dino"
#: The processor's own ratio of longest to shortest edge (800 / 1333), kept when `size` is set.
LONGEST_PER_SHORTEST = 1333 / 800


@dataclass(frozen=True)
class Detections:
    """One image's boxes: `boxes` (n, 4) float32 [x0, y0, x1, y1] in pixels, `scores` (n,), `phrases`."""

    boxes: np.ndarray
    scores: np.ndarray
    phrases: list[str]

    def __len__(self) -> int:
        return len(self.scores)


def normalise_prompt(prompt) -> str:
    """A prompt as the reference feeds it: phrases separated by ' . ', lower case, ending with '.'."""
    text = " ".join(str(prompt or "").split()).lower()
    if not text.strip(" ."):
        raise InputFormatError(
            "the detection prompt is empty: give the phrases to find, separated by ' . ', e.g. 'a cat . a dog .'"
        )
    return text if text.endswith(".") else text + " ."


def _check_folder(weights) -> Path:
    path = resolve_weights(weights)  # MissingInputError when the path is not there
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        raise WeightsError(
            f"{path} is not a Hugging Face Grounding DINO folder (config.json, model.safetensors, tokenizer and "
            "preprocessor files, as IDEA-Research/grounding-dino-tiny on the hub)"
        )
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError):
        raise WeightsError(f"{config} is not readable JSON") from None
    if model_type != MODEL_TYPE:
        raise WeightsError(f"{config} describes a {model_type!r} model, not Grounding DINO ({MODEL_TYPE!r})")
    return path


class PixelPreparer:
    """Pixels of a batch of RGB images (PIL), resized and padded as the processor does, on the CPU;
    `size`: the shorter side to resize to (None: the folder's preprocessor setting, 800 in the reference)."""

    def __init__(self, image_processor, size: int | None = None):
        self.image_processor, self.size = image_processor, size

    def __call__(self, images) -> dict:
        kwargs = {}
        if self.size is not None:
            kwargs["size"] = {"shortest_edge": self.size, "longest_edge": round(self.size * LONGEST_PER_SHORTEST)}
        out = self.image_processor(list(images), return_tensors="pt", **kwargs)
        return {"pixel_values": out["pixel_values"], "pixel_mask": out["pixel_mask"]}


class GroundingDino:
    """A Grounding DINO model and its processor, on one device, in float32."""

    def __init__(self, weights: str | os.PathLike, device="cpu", size: int | None = None):
        from safetensors import SafetensorError
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

        self.folder = _check_folder(weights)
        self.device = resolve_device(device)
        try:
            model, loading = GroundingDinoForObjectDetection.from_pretrained(
                str(self.folder), local_files_only=True, output_loading_info=True
            )
            self.processor = GroundingDinoProcessor.from_pretrained(str(self.folder), local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError, SafetensorError) as exc:  # a damaged or partial folder
            raise WeightsError(
                f"{self.folder}: cannot load Grounding DINO ({' '.join(str(exc).split())[:300]})"
            ) from None
        problems = {k: sorted(loading.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {k: v for k, v in problems.items() if v}
        if problems:
            listed = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:10]))}" for k, v in problems.items())
            raise WeightsError(f"Grounding DINO weights in {self.folder} do not fit its config — {listed}")
        self.model = model.float().eval().to(self.device)
        self.size = None if size is None else int(size)
        self._prompts: dict[str, dict] = {}

    def info(self) -> dict:
        """What changes the detections, for a stage's records (the weights by content elsewhere)."""
        return {"model": MODEL_TYPE, "weights": str(self.folder), "size": self.size, "dtype": "float32"}

    @property
    def preparer(self) -> PixelPreparer:
        """The image half of the processor alone (small and picklable, for DataLoader workers)."""
        return PixelPreparer(self.processor.image_processor, self.size)

    def prepare(self, images) -> dict:
        return self.preparer(images)

    def _text(self, prompt: str) -> dict:
        if prompt not in self._prompts:
            tokens = self.processor(text=prompt, return_tensors="pt")
            self._prompts[prompt] = {k: v.to(self.device) for k, v in tokens.items()}
        return self._prompts[prompt]

    @torch.no_grad()
    def forward(self, pixels: dict, prompt: str):
        """The model's raw outputs for prepared pixels and one prompt (the same for every image)."""
        prompt = normalise_prompt(prompt)
        n = len(pixels["pixel_values"])
        text = {k: v.expand(n, -1) for k, v in self._text(prompt).items()}
        inputs = {k: v.to(self.device) for k, v in pixels.items()}
        return self.model(**inputs, **text), text["input_ids"]

    def detect_prepared(
        self, pixels: dict, sizes, prompt: str, box_threshold: float, text_threshold: float
    ) -> list[Detections]:
        """Detections for prepared pixels; `sizes`: each image's (width, height) in pixels."""
        if len(sizes) == 0:
            return []
        outputs, input_ids = self.forward(pixels, prompt)
        return grounded_detections(self.processor, outputs, input_ids, box_threshold, text_threshold, sizes)

    def detect(self, images, prompt: str, box_threshold: float = 0.35, text_threshold: float = 0.25):
        """Detections for a list of RGB images (PIL)."""
        images = list(images)
        if not images:
            return []
        sizes = [im.size for im in images]
        return self.detect_prepared(self.prepare(images), sizes, prompt, box_threshold, text_threshold)


def grounded_detections(processor, outputs, input_ids, box_threshold: float, text_threshold: float, sizes):
    """transformers' post-processing (boxes scaled to each (width, height) in `sizes`), clipped
    to the image and as arrays. Positional arguments: the box threshold is `box_threshold` in
    transformers 4.x and `threshold` in 5.x."""
    heights_widths = [(int(h), int(w)) for w, h in sizes]
    results = processor.post_process_grounded_object_detection(
        outputs, input_ids, float(box_threshold), float(text_threshold), heights_widths
    )
    out = []
    for result, (w, h) in zip(results, sizes):
        boxes = result["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
        boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
        phrases = result["text_labels"] if "text_labels" in result else result["labels"]
        out.append(Detections(boxes, result["scores"].detach().float().cpu().numpy(), [str(p) for p in phrases]))
    return out


__all__ = ["Detections", "GroundingDino", "PixelPreparer", "grounded_detections", "normalise_prompt"]
