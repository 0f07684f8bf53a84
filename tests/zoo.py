"""A zoo of odd and broken image files, made on the spot, with what lvd should make of each.

Each entry is (relative file name, bytes, expectation). Expectations are written from the
file's construction (numpy arithmetic on the pixels we put in), never from lvd's output.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageCms

BACKGROUND = (255, 255, 255)


@dataclass
class Case:
    name: str
    data: bytes
    ok: bool
    size: tuple[int, int] | None = None  # upright (width, height) for ok files
    error_has: str | None = None  # a fragment of the quarantine reason
    # expected upright RGB pixels at given (x, y) positions, with a tolerance
    pixels: dict = field(default_factory=dict)
    tol: int = 2


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb_jpeg(w=64, h=48, color=(200, 30, 60), quality=95) -> bytes:
    return _save(Image.new("RGB", (w, h), color), "JPEG", quality=quality)


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header claims a huge size (a decompression bomb)."""

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
    """Stored 40x20, left half red, right half blue; EXIF orientation 6 (rotate 90° clockwise)."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(img, "JPEG", quality=100, exif=exif.tobytes())


def cmyk_jpeg() -> bytes:
    # C=0, M=255, Y=255, K=0 is pure red in RGB.
    return _save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=100)


def sixteen_bit_png() -> tuple[bytes, np.ndarray]:
    values = np.linspace(0, 65535, 32 * 8, dtype=np.float64).reshape(8, 32).round().astype(np.uint16)
    img = Image.fromarray(values)  # uint16 -> mode I;16
    return _save(img, "PNG"), values


def palette_png_with_transparency() -> bytes:
    img = Image.new("P", (16, 16), 0)
    img.putpalette([10, 20, 30] + [200, 100, 50] + [0, 0, 0] * 254)
    px = img.load()
    for x in range(8, 16):
        for y in range(16):
            px[x, y] = 1
    return _save(img, "PNG", transparency=0)  # index 0 (left half) transparent


def rgba_png(alpha: int = 128, color=(0, 100, 200)) -> bytes:
    return _save(Image.new("RGBA", (10, 10), color + (alpha,)), "PNG")


def la_png(alpha: int = 64, grey: int = 40) -> bytes:
    return _save(Image.new("LA", (10, 10), (grey, alpha)), "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (12, 12), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def srgb_icc_jpeg() -> bytes:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return _save(Image.new("RGB", (16, 16), (90, 160, 30)), "JPEG", quality=100, icc_profile=icc)


def composite(color, alpha: int, background=BACKGROUND):
    a = alpha / 255.0
    return tuple(int(round(a * c + (1 - a) * b)) for c, b in zip(color, background))


def zoo_cases() -> list[Case]:
    sixteen, values = sixteen_bit_png()
    truncated = rgb_jpeg(300, 200, quality=90)
    noisy_jpeg = _save(noise_image(120, 90, seed=3), "JPEG", quality=90)
    cases = [
        Case("plain.jpg", rgb_jpeg(), True, (64, 48), pixels={(5, 5): (200, 30, 60)}, tol=4),
        Case("upper/CASE.JPG", rgb_jpeg(20, 10), True, (20, 10)),
        Case("cmyk.jpg", cmyk_jpeg(), True, (32, 32), pixels={(16, 16): (255, 0, 0)}, tol=6),
        Case(
            "sixteen_bit.png",
            sixteen,
            True,
            (32, 8),
            pixels={(x, y): (round(values[y, x] / 257),) * 3 for x, y in ((0, 0), (31, 7), (15, 3))},
            tol=1,
        ),
        Case(
            "palette_transparent.png",
            palette_png_with_transparency(),
            True,
            (16, 16),
            pixels={(2, 2): BACKGROUND, (12, 2): (200, 100, 50)},
            tol=0,
        ),
        Case("rgba_half.png", rgba_png(128), True, (10, 10), pixels={(5, 5): composite((0, 100, 200), 128)}, tol=1),
        Case("la.png", la_png(64, 40), True, (10, 10), pixels={(5, 5): composite((40, 40, 40), 64)}, tol=1),
        # Displayed upright it is 20 wide and 40 tall, red on top (the stored left half).
        Case(
            "exif_rotated.jpg",
            exif_rotated_jpeg(),
            True,
            (20, 40),
            pixels={(10, 5): (255, 0, 0), (10, 35): (0, 0, 255)},
            tol=12,
        ),
        Case("animated.gif", animated_gif(), True, (12, 12), pixels={(6, 6): (255, 0, 0)}, tol=0),
        Case("icc_srgb.jpg", srgb_icc_jpeg(), True, (16, 16), pixels={(8, 8): (90, 160, 30)}, tol=4),
        Case(
            "tiny_1x1.png",
            _save(Image.new("RGB", (1, 1), (7, 8, 9)), "PNG"),
            True,
            (1, 1),
            pixels={(0, 0): (7, 8, 9)},
            tol=0,
        ),
        Case(
            "wide_20000x20.png",
            _save(Image.new("L", (20000, 20), 77), "PNG"),
            True,
            (20000, 20),
            pixels={(19999, 19): (77, 77, 77)},
            tol=0,
        ),
        Case(
            "bilevel.bmp",
            _save(Image.new("1", (9, 9), 1), "BMP"),
            True,
            (9, 9),
            pixels={(4, 4): (255, 255, 255)},
            tol=0,
        ),
        Case("photo.webp", _save(noise_image(30, 20), "WEBP", quality=90), True, (30, 20)),
        Case(
            "float.tiff",
            _save(Image.fromarray(np.full((6, 5), 0.5, np.float32)), "TIFF"),
            True,
            (5, 6),
            pixels={(2, 2): (128, 128, 128)},
            tol=1,
        ),
        Case("noisy.jpeg", noisy_jpeg, True, (120, 90)),
        Case("truncated.jpg", truncated[: len(truncated) // 2], False, error_has="truncated"),
        Case("empty.png", b"", False, error_has="empty"),
        Case(
            "not_an_image.gif",
            b"GIF? no: this is plain text pretending to be a gif\n" * 4,
            False,
            error_has="not an image",
        ),
        Case(
            "html_page.jpg",
            b"<!DOCTYPE html><html><head><title>404</title></head><body>Not found</body></html>",
            False,
            error_has="not an image",
        ),
        Case("bomb.png", png_with_header_size(100_000, 100_000), False, error_has="decompression bomb"),
    ]
    return cases


def write_zoo(root) -> list[Case]:
    cases = zoo_cases()
    for case in cases:
        path = root / case.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(case.data)
    # Files that are not images by name are not inputs at all.
    (root / "notes.txt").write_text("not an image extension, never listed")
    (root / ".hidden.jpg").write_bytes(rgb_jpeg())
    return cases
