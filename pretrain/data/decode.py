"""Image bytes -> RGB, robustly, for every stage that reads pixels.

Every mode Pillow opens is brought to 8-bit RGB the same way everywhere: EXIF orientation
applied, embedded ICC profiles converted to sRGB, alpha composited on a fixed background,
16-bit and float data rescaled rather than clipped, the first frame of an animation. A file
that cannot be decoded raises `DecodeError` with a reason; callers quarantine it.

When the caller wants a small image (embedding at 224 px of a 2 Mpx photo), JPEGs are decoded
at a reduced DCT scale (Pillow's draft mode): the decoder skips work it would throw away.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from lvd.common.errors import InputFormatError

# EXIF orientations that swap width and height.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112


class DecodeError(InputFormatError):
    """Bytes that are not a usable image; the message is the quarantine reason."""


@dataclass(frozen=True)
class ImageInfo:
    """What the header says, before any pixel is decoded."""

    width: int  # after EXIF orientation
    height: int
    format: str
    mode: str
    frames: int


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block is not a broken image
        return 1


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    if not data:
        raise DecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise DecodeError("not an image (unrecognised format)") from None
    except Exception as exc:
        raise DecodeError(f"cannot open image: {type(exc).__name__}: {exc}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise DecodeError(f"invalid image size {w}x{h}")
    if max_pixels is not None and w * h > max_pixels:
        raise DecodeError(f"decompression bomb: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    return img


def probe(data: bytes, max_pixels: int | None = None) -> ImageInfo:
    """Read the header only: size after EXIF orientation, format, mode, frame count."""
    img = _open(data, max_pixels)
    w, h = img.size
    if _orientation(img) in _TRANSPOSING_ORIENTATIONS:
        w, h = h, w
    return ImageInfo(w, h, img.format or "unknown", img.mode, int(getattr(img, "n_frames", 1) or 1))


def _rescale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """16-bit, 32-bit integer and float pixel data to 0..255 without wrapping."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        finite = arr[np.isfinite(arr)]
        top = float(finite.max()) if finite.size else 1.0
        scale = 255.0 if top <= 1.0 else 1.0  # [0, 1] floats vs already-8-bit floats
        return np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8)
    if arr.dtype.kind in "iu":  # Pillow's I and I;16 modes carry 16-bit samples
        return np.clip(arr.astype(np.float64) * (255.0 / 65535.0), 0, 255).round().astype(np.uint8)
    raise DecodeError(f"unsupported pixel type {arr.dtype}")


def _composite(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _icc_to_srgb(img: Image.Image) -> Image.Image | None:
    """Convert with the embedded ICC profile, when there is one that littlecms accepts."""
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "CMYK", "L"):
        return None
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        dst = ImageCms.createProfile("sRGB")
        return ImageCms.profileToProfile(img, src, dst, outputMode="RGB")
    except Exception:  # an unusable profile falls back to the plain conversion
        return None


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any decoded Pillow image as 8-bit RGB (no EXIF handling here)."""
    mode = img.mode
    if mode == "RGB":
        return _icc_to_srgb(img) or img
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return _composite(img, background)
    if mode == "P":
        if "transparency" in img.info:
            return _composite(img, background)
        return img.convert("RGB")
    if mode == "CMYK":
        return _icc_to_srgb(img) or img.convert("RGB")
    if mode in ("L", "1"):
        return (_icc_to_srgb(img) if mode == "L" else None) or img.convert("RGB")
    if mode in ("I", "F") or mode.startswith("I;16"):
        arr = _rescale_to_uint8(np.asarray(img))
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        return Image.fromarray(np.ascontiguousarray(arr[:, :, :3]), "RGB")
    try:
        return img.convert("RGB")  # YCbCr, LAB, HSV, ...
    except Exception as exc:
        raise DecodeError(f"cannot convert mode {mode} to RGB: {exc}") from None


def _decode_opened(
    img: Image.Image,
    min_size: tuple[int, int] | None,
    background: tuple[int, int, int],
) -> Image.Image:
    orientation = _orientation(img)
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
        if min_size is not None and img.format == "JPEG":
            tw, th = min_size
            img.draft("RGB", (th, tw) if orientation in _TRANSPOSING_ORIENTATIONS else (tw, th))
        img.load()
    except Exception as exc:
        raise DecodeError(f"corrupt or truncated image data: {type(exc).__name__}: {exc}") from None
    if orientation != 1:
        try:
            img = ImageOps.exif_transpose(img)
        except Exception as exc:
            raise DecodeError(f"cannot apply EXIF orientation: {exc}") from None
    return to_rgb(img, background)


def decode(
    data: bytes,
    *,
    min_size: tuple[int, int] | None = None,
    max_pixels: int | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Decode bytes to an upright 8-bit RGB image.

    `min_size=(w, h)` (upright): the caller will shrink the image to at least this size, so a
    JPEG may be decoded at a reduced DCT scale as long as the result stays at least this large.
    """
    return _decode_opened(_open(data, max_pixels), min_size, background)


def resize_shorter(img: Image.Image, size: int, resample=Image.Resampling.BICUBIC) -> Image.Image:
    """Resize so that the shorter side is `size`, keeping the aspect ratio."""
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return img.resize(new, resample, reducing_gap=None)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """The central size x size square (the image must be at least that large)."""
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_resized(
    data: bytes,
    size: int,
    *,
    crop: bool = True,
    max_pixels: int | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
    resample=Image.Resampling.BICUBIC,
) -> Image.Image:
    """Decode for a model input: shorter side to `size`, then (optionally) a central square.

    JPEG draft mode is asked for the smallest scale whose shorter side is still >= `size`.
    """
    img = _open(data, max_pixels)
    w, h = img.size
    if _orientation(img) in _TRANSPOSING_ORIENTATIONS:
        w, h = h, w
    scale = size / min(w, h)
    need = (max(1, int(np.ceil(w * scale))), max(1, int(np.ceil(h * scale))))
    img = _decode_opened(img, need, background)
    img = resize_shorter(img, size, resample)
    return center_crop(img, size) if crop else img
