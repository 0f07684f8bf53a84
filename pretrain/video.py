"""Attention videos: a ViT's CLS attention drawn on every frame of a video, as DINO's
`video_generation.py` does at the end of the DINO README.

reader (a video file decoded by FFmpeg through PyAV, or a folder of frames) -> mapper (resize,
last-block CLS attention, drawing) -> writer (H.264 through PyAV at the source's frame rate,
optionally every frame as a PNG). Frames go through in batches of a few, so memory stays the
same whatever the length of the video.

What a frame shows (`style`):
- `overlay` (the default): the fewest patches that hold `mass` of the CLS attention, blended in
  colour over the frame (`heads`: one mask from the head-averaged attention, or every head's
  own mask in its own colour). DINO's script computes this very mask (its `--threshold`, 0.6)
  but saves something else; drawing it over the frame shows what the model attends to while
  the scene stays visible. This drawing is lvd's, not DINO's.
- `heatmap`: what DINO's script writes: the head-averaged attention, rescaled to [0, 1] per
  frame, colour-mapped (lvd's viridis-like map; DINO uses matplotlib's inferno), no frame.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from lvd.common.atomic import atomic_path, atomic_write_bytes
from lvd.common.devices import autocast, resolve_dtype
from lvd.common.errors import InputFormatError, MissingInputError, UserError
from lvd.common.media import is_image_name
from lvd.pretrain.data.decode import resize_shorter
from lvd.pretrain.eval.features import Preprocessing, images_to_tensor
from lvd.pretrain.viz import attention_mass_mask, cls_attention, colormap, minmax, upsample

log = logging.getLogger(__name__)

DINO_MASS = 0.6  # DINO's --threshold: the share of attention the drawn patches hold
STYLES = ("overlay", "heatmap")
HEADS = ("mean", "heads")
BATCH = 8  # frames per forward pass
# One colour per head (cycled): saturated hues that stand out over natural images.
PALETTE = np.array(
    [
        [255, 48, 48],
        [48, 160, 255],
        [255, 214, 0],
        [0, 220, 120],
        [255, 96, 255],
        [0, 230, 230],
        [255, 140, 0],
        [160, 100, 255],
    ],
    dtype=np.float64,
)


def _av():
    try:
        import av
    except ImportError:
        raise UserError("viz.videos needs PyAV, FFmpeg's Python binding: pip install 'lvd[video]'") from None
    return av


@dataclass
class FrameSource:
    """The frames of one input, decoded one at a time."""

    name: str
    fps: Fraction
    n_frames: int | None  # as the container says (None: unknown)
    frames: Iterator[np.ndarray]  # H x W x 3 uint8 RGB


@contextmanager
def open_frames(path: str | os.PathLike, folder_fps: float = 30.0) -> Iterator[FrameSource]:
    """A video file (any container and codec FFmpeg decodes) or a folder of image files (sorted).

    Errors a user can fix (missing, not a video, no frames, damaged) are `UserError`s naming the
    input; a folder's frames play at `folder_fps`.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and is_image_name(f.name))
        if not files:
            raise MissingInputError(f"viz.videos: folder {p} holds no image files to use as frames")
        yield FrameSource(p.name, Fraction(folder_fps).limit_denominator(1001), len(files), _folder_frames(files))
        return
    if not p.is_file():
        raise MissingInputError(f"viz.videos: {p} is neither a video file nor a folder of frames")
    av = _av()
    try:
        container = av.open(str(p))
    except av.error.FFmpegError as exc:
        raise InputFormatError(f"viz.videos: {p} is not a video FFmpeg can read ({_reason(exc)})") from None
    try:
        if not container.streams.video:
            raise InputFormatError(f"viz.videos: {p} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or Fraction(folder_fps)
        yield FrameSource(p.stem, Fraction(rate), int(stream.frames) or None, _decoded(container, stream, p))
    finally:
        container.close()


def _decoded(container, stream, path: Path) -> Iterator[np.ndarray]:
    av = _av()
    n = 0
    try:
        for frame in container.decode(stream):
            n += 1
            yield frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as exc:
        raise InputFormatError(
            f"viz.videos: {path} is damaged: decoding stopped after {n} frames ({_reason(exc)})"
        ) from None


def _folder_frames(files: list[Path]) -> Iterator[np.ndarray]:
    for f in files:
        try:
            with Image.open(f) as img:
                yield np.asarray(img.convert("RGB"))
        except OSError as exc:
            raise InputFormatError(f"viz.videos: frame {f} cannot be decoded ({exc})") from None


def _reason(exc: Exception) -> str:
    return " ".join(str(getattr(exc, "strerror", None) or exc).split())


class FrameShaper:
    """Every frame to the first frame's model input: shorter side `resolution`, then the central
    crop whose sides are multiples of the patch size (and even, as H.264's 4:2:0 needs)."""

    def __init__(self, first: np.ndarray, resolution: int, patch: int):
        img = resize_shorter(Image.fromarray(first), resolution)
        self.scaled = img.size  # (w, h)
        w = _even_multiple(img.size[0], patch)
        h = _even_multiple(img.size[1], patch)
        left, top = (img.size[0] - w) // 2, (img.size[1] - h) // 2
        self.box = (left, top, left + w, top + h)
        self.size = (w, h)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        img = Image.fromarray(frame)
        if img.size != self.scaled:
            img = img.resize(self.scaled, Image.Resampling.BICUBIC, reducing_gap=None)
        return np.asarray(img.crop(self.box))


def _even_multiple(side: int, patch: int) -> int:
    out = (side // patch) * patch
    while out % 2:
        out -= patch
    if out <= 0:
        raise InputFormatError(f"viz.videos: frames {side} px wide or high are too small for patch size {patch}")
    return out


def draw_overlay(frame: np.ndarray, masks: np.ndarray, patch: int, alpha: float) -> np.ndarray:
    """Blend masks (k x h x w bool, one colour each, PALETTE cycled) over an H x W x 3 frame:
    pixel <- (1 - alpha) pixel + alpha colour where a mask covers it (overlapping masks mix)."""
    m = upsample(np.moveaxis(masks, 0, -1).astype(np.float64), patch)  # H x W x k
    colours = PALETTE[np.arange(masks.shape[0]) % len(PALETTE)]
    cover = m.sum(-1, keepdims=True)
    colour = (m @ colours) / np.maximum(cover, 1.0)
    weight = alpha * (cover > 0)
    return np.round(frame * (1.0 - weight) + colour * weight).astype(np.uint8)


def draw_frame(frame: np.ndarray, attention: np.ndarray, patch: int, style: str, heads: str, mass: float, alpha: float):
    """One output frame from a frame and its CLS attention (heads x h x w)."""
    if style == "heatmap":
        return colormap(upsample(minmax(attention.mean(axis=0)), patch))
    maps = attention.mean(axis=0, keepdims=True) if heads == "mean" else attention
    masks = np.stack([attention_mass_mask(a, mass) for a in maps])
    return draw_overlay(frame, masks, patch, alpha)


def attention_frames(
    model: torch.nn.Module,
    frames: Iterator[np.ndarray],
    prep: Preprocessing,
    device: torch.device,
    *,
    dtype: str = "float32",
    style: str = "overlay",
    heads: str = "mean",
    mass: float = DINO_MASS,
    alpha: float = 0.5,
) -> Iterator[np.ndarray]:
    """Drawn frames, one per input frame, computed a few frames at a time."""
    if style not in STYLES or heads not in HEADS:
        raise InputFormatError(f"viz.video_style must be one of {STYLES} and viz.video_heads one of {HEADS}")
    patch = int(model.patch_size)
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        return
    shaper = FrameShaper(first, prep.resolution, patch)
    amp = resolve_dtype(dtype, device)
    stream = (shaper(f) for f in _chain(first, frames))
    while batch := list(islice(stream, BATCH)):
        x = images_to_tensor(batch, prep, device)
        with torch.no_grad(), autocast(device, amp):
            attn = cls_attention(model, x)
        for frame, a in zip(batch, attn):
            yield draw_frame(frame, a, patch, style, heads, mass, alpha)


def _chain(first, rest):
    yield first
    yield from rest


class H264Writer:
    """Frames (H x W x 3 uint8) to an H.264 mp4 at `fps`, through PyAV."""

    def __init__(self, path: Path, fps: Fraction, size: tuple[int, int]):
        av = _av()
        self.container = av.open(str(path), mode="w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.width, self.stream.height = size
        self.stream.pix_fmt = "yuv420p"
        self.stream.codec_context.time_base = 1 / Fraction(fps)
        self.count = 0
        self._frame = av.VideoFrame

    def write(self, frame: np.ndarray) -> None:
        out = self._frame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        out.pts = self.count
        self.container.mux(self.stream.encode(out))
        self.count += 1

    def close(self) -> None:
        self.container.mux(self.stream.encode(None))  # flush the encoder
        self.container.close()


def _png(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def attention_video(
    model: torch.nn.Module,
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    prep: Preprocessing,
    device: torch.device,
    *,
    folder_fps: float = 30.0,
    max_frames: int | None = None,
    write_frames: bool = False,
    progress: bool = False,
    **drawing,
) -> Path:
    """Write out_dir/NAME.mp4 (and with `write_frames` out_dir/NAME_frames/frame-*.png) for one
    input; `drawing` goes to `attention_frames` (dtype, style, heads, mass, alpha)."""
    out_dir = Path(out_dir)
    with open_frames(source, folder_fps) as src:
        out = out_dir / f"{src.name}.mp4"
        frames = src.frames if max_frames is None else islice(src.frames, int(max_frames))
        total = min(src.n_frames, max_frames) if src.n_frames and max_frames else (src.n_frames or max_frames)
        bar = tqdm(total=total, desc=src.name, unit="frame", disable=not progress)
        writer = None
        with atomic_path(out) as tmp:
            try:
                for i, drawn in enumerate(attention_frames(model, frames, prep, device, **drawing)):
                    if writer is None:
                        writer = H264Writer(tmp, src.fps, (drawn.shape[1], drawn.shape[0]))
                    writer.write(drawn)
                    if write_frames:
                        atomic_write_bytes(out_dir / f"{src.name}_frames" / f"frame-{i:06d}.png", _png(drawn))
                    bar.update(1)
            finally:
                bar.close()
                if writer is not None:
                    writer.close()
            if writer is None:
                raise InputFormatError(f"viz.videos: {source} has no frames")
    log.info("%s: %d frames at %s fps, %dx%d", out, writer.count, float(src.fps), drawn.shape[1], drawn.shape[0])
    return out
