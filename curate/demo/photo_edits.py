"""Real photos shipped by installed packages, cut into tiles, and the edits a web crawl makes to them.

The copy-detection benchmark, the demo's photo part and the tests draw on the same pieces:
`package_photos` (scikit-image and scikit-learn sample photos, no download), `photo_tiles`
(non-overlapping tiles: distinct images that share a photo's textures, i.e. hard negatives),
and `EDITS` (resize, crop, border, text overlay, greyscale, JPEG q30, small rotation), which
`apply_edits` applies alone or combined (`edit_menu`).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from lvd.common.errors import UserError

# scikit-image photos that ship inside its wheel (the others download and fail offline).
SKIMAGE_PHOTOS = (
    "astronaut",
    "camera",
    "cat",
    "coffee",
    "rocket",
    "retina",
    "hubble_deep_field",
    "moon",
    "coins",
    "brick",
    "grass",
    "gravel",
    "immunohistochemistry",
    "clock",
    "page",
)


class MissingPhotosError(UserError, ImportError):
    """Offline photos are not installed: the Debian packages of the demo, or scikit-image for the tests' tiles."""


def package_photos() -> dict[str, Image.Image]:
    """Name -> RGB photo, from scikit-image and scikit-learn (both optional dependencies)."""
    try:
        import skimage.data as data
    except ImportError as exc:
        raise MissingPhotosError("the photo part needs scikit-image (pip install scikit-image)") from exc
    photos = {name: getattr(data, name)() for name in SKIMAGE_PHOTOS}
    photos["motorcycle"] = data.stereo_motorcycle()[0]  # one view only: the other is a near-copy
    try:
        from sklearn.datasets import load_sample_images

        sample = load_sample_images()
        for path, array in zip(sample.filenames, sample.images):
            photos[path.rsplit("/", 1)[-1].split(".")[0]] = array
    except ImportError:
        pass
    return {name: Image.fromarray(np.asarray(a)).convert("RGB") for name, a in sorted(photos.items())}


def photo_tiles(photo: Image.Image, side: int = 160, min_std: float = 12.0) -> list[tuple[int, int, Image.Image]]:
    """Non-overlapping side x side tiles (row, column, tile), leaving out near-uniform ones.

    A flat tile (the black surround of the retina photo) is the same image wherever it is cut,
    so such tiles would be true copies of each other; `min_std` (grey-level standard deviation)
    keeps only tiles with content.
    """
    w, h = photo.size
    out = []
    for r in range(h // side):
        for c in range(w // side):
            tile = photo.crop((c * side, r * side, (c + 1) * side, (r + 1) * side))
            if float(np.asarray(tile.convert("L"), np.float32).std()) >= min_std:
                out.append((r, c, tile))
    return out


# ---------------------------------------------------------------- edits (PIL in, PIL out)


def resize_half(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return img.resize((max(1, img.width // 2), max(1, img.height // 2)), Image.Resampling.BILINEAR)


def crop_70(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A 70 % x 70 % window at a random position."""
    w, h = int(round(img.width * 0.7)), int(round(img.height * 0.7))
    x, y = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
    return img.crop((x, y, x + w, y + h))


def border(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A solid frame of 8 % of the shorter side, in a random colour."""
    pad = max(2, int(0.08 * min(img.size)))
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    return ImageOps.expand(img, border=pad, fill=colour)


def text_overlay(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A caption in a band across the lower part, as memes and watermarks put it."""
    out = img.copy()
    draw = ImageDraw.Draw(out)
    size = max(10, img.height // 8)
    font = ImageFont.load_default(size=size)
    y = int(img.height * rng.uniform(0.6, 0.8))
    draw.text(
        (int(img.width * 0.05), y),
        "lvd copy " + str(int(rng.integers(100, 999))),
        fill=(255, 255, 255),
        font=font,
        stroke_width=max(1, size // 10),
        stroke_fill=(0, 0, 0),
    )
    return out


def greyscale(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return img.convert("L").convert("RGB")


def jpeg_30(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=30)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def rotate_small(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """3 to 8 degrees either way, cropped back to the largest upright window without corners."""
    angle = float(rng.uniform(3, 8)) * (1 if rng.random() < 0.5 else -1)
    out = img.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False)
    t = np.tan(np.radians(abs(angle)))
    m = int(np.ceil(max(img.size) * t / (1 + t)))
    return out.crop((m, m, img.width - m, img.height - m))


EDITS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "resize50": resize_half,
    "crop70": crop_70,
    "border": border,
    "text": text_overlay,
    "grey": greyscale,
    "jpeg30": jpeg_30,
    "rotate": rotate_small,
}
# Combinations as they occur together on the web (a re-post is often cropped, captioned and recompressed).
COMBINATIONS = (
    ("crop70", "jpeg30"),
    ("resize50", "text"),
    ("border", "grey"),
    ("rotate", "crop70", "jpeg30"),
    ("text", "border", "resize50"),
)


def apply_edits(img: Image.Image, names, rng: np.random.Generator) -> Image.Image:
    for name in names:
        img = EDITS[name](img, rng)
    return img


def edit_menu() -> list[tuple[str, ...]]:
    """Every single edit, then the combinations (the benchmark's queries)."""
    return [(name,) for name in EDITS] + list(COMBINATIONS)


def encode(img: Image.Image, fmt: str = "PNG", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()
