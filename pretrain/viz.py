"""Pictures of what a backbone sees: CLS self-attention per head, and patch-feature PCA in colour.

Two views, both written as PNG files (a ConvNet has no attention: it gets the PCA view and a
NO_ATTENTION.txt that says so):
- the last block's attention from the CLS token to every patch, one map per head (the figure
  of the DINO paper, made by its `visualize_attention.py`): heads of a self-supervised ViT
  attend to object parts without having been told what an object is;
- the two-step PCA of the DINOv2 blog: the first principal component of the patch features
  of all given images separates foreground from background (thresholded here with Otsu's
  method); a second PCA over the foreground patches alone gives three components shown as RGB,
  so that matching parts get matching colours across images.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lvd.common.devices import autocast, resolve_device, resolve_dtype
from lvd.common.errors import InputFormatError, MissingInputError
from lvd.common.media import is_image_name
from lvd.pretrain.data.decode import DecodeError, load_resized
from lvd.pretrain.eval.features import Preprocessing, images_to_tensor

log = logging.getLogger(__name__)

# Anchor colours of the viridis colour map (dark purple -> yellow), interpolated linearly.
_VIRIDIS_ANCHORS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) to uint8 RGB (shape + (3,)) on a viridis-like scale."""
    v = np.clip(np.nan_to_num(values), 0.0, 1.0)
    stops = np.linspace(0.0, 1.0, len(_VIRIDIS_ANCHORS))
    rgb = np.stack([np.interp(v, stops, _VIRIDIS_ANCHORS[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def minmax(x: np.ndarray, axis=None) -> np.ndarray:
    """Rescale to [0, 1] over `axis`; a constant input maps to 0."""
    lo = x.min(axis=axis, keepdims=True)
    span = x.max(axis=axis, keepdims=True) - lo
    return (x - lo) / np.where(span > 0, span, 1.0)


def upsample(grid: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upsampling of the first two axes: one patch -> factor × factor pixels."""
    return np.repeat(np.repeat(grid, factor, axis=0), factor, axis=1)


@torch.no_grad()
def cls_attention(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Last-block attention of CLS to each patch: B × heads × h × w (registers left out)."""
    attn = model.get_last_selfattention(x).float()
    h, w = x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size
    first_patch = 1 + int(getattr(model, "num_register_tokens", 0))
    cls_to_patches = attn[:, :, 0, first_patch:]
    if cls_to_patches.shape[-1] != h * w:
        raise ValueError(f"attention has {cls_to_patches.shape[-1]} patch columns, expected {h}×{w}")
    return cls_to_patches.reshape(len(x), -1, h, w).cpu().numpy()


def attention_mass_mask(attention: np.ndarray, mass: float) -> np.ndarray:
    """The highest-attention patches that together hold `mass` of the map's total (bool, same shape).

    The fewest patches whose attention adds up to at least `mass` of the total, as the DINO
    figures show heads (mass 0.6): a map of where a head looks that does not depend on how
    peaked its softmax is.
    """
    flat = attention.ravel().astype(np.float64)
    order = np.argsort(-flat, kind="stable")
    cumulative = np.cumsum(flat[order]) / flat.sum()
    n_keep = int(np.searchsorted(cumulative, mass - 1e-12)) + 1  # first index reaching the mass
    keep = np.zeros(flat.shape, dtype=bool)
    keep[order[:n_keep]] = True
    return keep.reshape(attention.shape)


def principal_components(x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the rows of x on its first n principal components, and those components."""
    centred = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    comps = vt[:n]
    return centred @ comps.T, comps


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold that maximises the between-class variance of a 1-D sample (Otsu's method)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[1:][np.argmax(between[:-1])])  # split after bin i; the last bin splits nothing


def border_mask(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = True
    return m


@dataclass
class PatchPCA:
    """Per image: foreground mask (h × w bool) and RGB in [0, 1] (h × w × 3, black background)."""

    masks: list[np.ndarray]
    colours: list[np.ndarray]
    threshold: float


def patch_pca(patch_features: Sequence[np.ndarray], threshold: float | str = "otsu") -> PatchPCA:
    """The DINOv2 blog's two-step PCA over the patch grids (h × w × D each) of several images.

    The first component's sign is arbitrary; it is oriented so that patches on the image
    borders score low (objects are mostly inside the frame, background reaches the edges),
    then rescaled to [0, 1] and thresholded (`otsu` or a number in [0, 1]).
    """
    shapes = [f.shape[:2] for f in patch_features]
    flat = np.concatenate([f.reshape(-1, f.shape[-1]) for f in patch_features]).astype(np.float64)
    first = principal_components(flat, 1)[0][:, 0]
    border = np.concatenate([border_mask(h, w).ravel() for h, w in shapes])
    if border.any() and (~border).any() and first[border].mean() > first[~border].mean():
        first = -first
    first = minmax(first)
    t = otsu_threshold(first) if threshold == "otsu" else float(threshold)
    fg = first > t
    rgb = np.zeros((len(flat), 3))
    if fg.sum() >= 3:
        scores = principal_components(flat[fg], 3)[0]
        rgb[fg] = minmax(scores, axis=0)
    masks, colours, start = [], [], 0
    for h, w in shapes:
        stop = start + h * w
        masks.append(fg[start:stop].reshape(h, w))
        colours.append(rgb[start:stop].reshape(h, w, 3))
        start = stop
    return PatchPCA(masks, colours, t)


def has_attention(model: torch.nn.Module) -> bool:
    """Whether the backbone is a ViT with attention maps to draw (a ConvNet has none)."""
    return callable(getattr(model, "get_last_selfattention", None))


def _note_no_attention(model: torch.nn.Module, out_dir: Path) -> Path:
    """Say, in the log and in NO_ATTENTION.txt beside the pictures, why there are no attention maps."""
    from lvd.pretrain.eval.stage import atomic_write_bytes

    name = getattr(model, "arch_name", type(model).__name__)
    text = (
        f"{name} is a ConvNet: it has no self-attention, so there are no attention maps to show. "
        "The patch-feature PCA (NAME_pca.png, NAME_pca_mask.png) uses the cells of its last feature map "
        f"({model.patch_size} x {model.patch_size} pixels each).\n"
    )
    log.warning(text.strip())
    path = out_dir / "NO_ATTENTION.txt"
    atomic_write_bytes(path, text.encode())
    return path


def _patch_aligned(img: np.ndarray, patch: int) -> np.ndarray:
    """Crop an H × W × 3 image (centred) to multiples of the patch size."""
    h, w = (img.shape[0] // patch) * patch, (img.shape[1] // patch) * patch
    top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    return img[top : top + h, left : left + w]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def visualise(
    model: torch.nn.Module,
    images: dict[str, np.ndarray],
    prep: Preprocessing,
    out_dir: Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    threshold: float | str = "otsu",
    attention_mass: float | None = None,
) -> list[Path]:
    """Write NAME_input.png, NAME_attn_head{i}.png, NAME_attn_mean.png, NAME_pca.png, NAME_pca_mask.png,
    and with `attention_mass`, NAME_attn_head{i}_mass.png (white: the patches holding that mass).
    The attention maps are those of a ViT's CLS token to its patches (register and storage tokens
    left out); a ConvNet gets NO_ATTENTION.txt instead.

    `images` maps a name to an H × W × 3 uint8 array whose sides are multiples of the patch
    size. Every PNG has the input's size: maps are upsampled patch by patch (nearest).
    """
    from lvd.pretrain.eval.stage import atomic_write_bytes

    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    model.eval()
    patch = int(model.patch_size)
    written: list[Path] = []
    grids = []
    if not has_attention(model):
        written.append(_note_no_attention(model, out_dir))
    for name, img in images.items():
        x = images_to_tensor([img], prep, device)
        with torch.no_grad(), autocast(device, resolve_dtype(dtype, device)):
            attn = cls_attention(model, x)[0] if has_attention(model) else np.zeros((0, 1, 1))
            tokens = model.forward_features(x)["x_norm_patchtokens"][0].float().cpu().numpy()
        h, w = img.shape[0] // patch, img.shape[1] // patch
        grids.append(tokens.reshape(h, w, -1))
        files = {f"{name}_input.png": img}
        for i, head in enumerate(attn):
            files[f"{name}_attn_head{i}.png"] = colormap(upsample(minmax(head), patch))
            if attention_mass is not None:
                keep = attention_mass_mask(head, attention_mass)
                files[f"{name}_attn_head{i}_mass.png"] = upsample(keep.astype(np.uint8) * 255, patch)
        if len(attn):
            files[f"{name}_attn_mean.png"] = colormap(upsample(minmax(attn.mean(axis=0)), patch))
        for fname, arr in files.items():
            atomic_write_bytes(out_dir / fname, _png(np.ascontiguousarray(arr)))
            written.append(out_dir / fname)
    pca = patch_pca(grids, threshold)
    for name, mask, rgb in zip(images, pca.masks, pca.colours):
        for fname, arr in {
            f"{name}_pca.png": (upsample(rgb, patch) * 255).round().astype(np.uint8),
            f"{name}_pca_mask.png": upsample(mask.astype(np.uint8) * 255, patch),
        }.items():
            atomic_write_bytes(out_dir / fname, _png(np.ascontiguousarray(arr)))
            written.append(out_dir / fname)
    log.info("foreground threshold %.3f on the first component; %d files in %s", pca.threshold, len(written), out_dir)
    return written


def image_files(specs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in named folders."""
    files: list[Path] = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if is_image_name(f.name)))
        elif p.is_file():
            files.append(p)
        else:
            raise MissingInputError(f"viz.images: {spec} is neither an image file nor a folder")
    return files


def run_viz(cfg) -> Path:
    """`lvd viz CONFIG`: attention and PCA pictures of `viz.images` and attention videos of
    `viz.videos`, into `viz.output_dir`."""
    from lvd.pretrain.eval.stage import load_model, plain

    c = cfg.viz
    files = image_files(list(c.images))
    videos = [str(v) for v in c.get("videos") or []]
    if not files and not videos:
        raise MissingInputError("viz.images and viz.videos name nothing to draw")
    device = resolve_device(str(c.device))
    torch.manual_seed(int(c.seed))
    model, prep = load_model(c.model, c.weights, c.resolution, device, plain(c.get("overrides")))
    out_dir = Path(c.output_dir)
    if files:
        _images(c, model, prep, files, out_dir, device)
    if videos:
        show = sys.stderr.isatty() if cfg.get("progress", "auto") == "auto" else bool(cfg.get("progress"))
        _videos(c, model, prep, videos, out_dir, device, show)
    return out_dir


def _videos(c, model, prep, videos: list[str], out_dir: Path, device, progress: bool) -> list[Path]:
    from lvd.pretrain.video import DINO_MASS, attention_video

    if not has_attention(model):
        raise InputFormatError(f"viz.videos draws attention, and {getattr(model, 'arch_name', 'this model')} has none")
    names = [Path(v).stem if not Path(v).is_dir() else Path(v).name for v in videos]
    if len(set(names)) < len(names):
        raise InputFormatError(f"viz.videos: two inputs would write the same output name ({sorted(names)})")
    mass = c.get("attention_mass")
    return [
        attention_video(
            model,
            v,
            out_dir,
            prep,
            device,
            folder_fps=float(c.fps),
            max_frames=c.max_frames,
            write_frames=bool(c.video_frames),
            progress=progress,
            dtype=str(c.dtype),
            style=str(c.video_style),
            heads=str(c.video_heads),
            mass=DINO_MASS if mass is None else float(mass),
            alpha=float(c.video_alpha),
        )
        for v in videos
    ]


def _images(c, model, prep, files: list[Path], out_dir: Path, device) -> list[Path]:
    images = {}
    for i, f in enumerate(files):
        try:
            img = np.asarray(load_resized(f.read_bytes(), prep.resolution, crop=bool(c.crop)))
        except DecodeError as exc:
            log.warning("skipping %s: %s", f, exc)
            continue
        images[f"{i:03d}_{f.stem}"] = _patch_aligned(img, int(model.patch_size))
    if not images:
        raise InputFormatError("viz.images: no image could be decoded")
    mass = c.get("attention_mass")
    return visualise(
        model,
        images,
        prep,
        out_dir,
        device=device,
        dtype=str(c.dtype),
        threshold=c.threshold,
        attention_mass=None if mass is None else float(mass),
    )
