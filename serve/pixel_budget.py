"""Decoded pixels admitted under a memory budget, not by count.

A PNG of 291 KB can decode to 400 MB of pixels: the upload limit bounds what arrives, not what
it becomes. Each decode (a query image, a thumbnail) first reads the image's header, estimates
the bytes its decoding will hold at once, and waits until that fits the budget beside the
decodes in progress; an image that alone exceeds the budget is refused (413). Small images
decode concurrently, large ones take turns, and the server's peak memory for pixels stays
under the budget whatever the mix (the `memory_gb` idea of the pipeline's vector stages).

Taking turns is not enough by itself: glibc's malloc gives each thread its own arena and keeps
what a thread freed there, so eight threads decoding large images one after the other would
still leave eight images' worth of memory resident. After a large decode the freed memory is
handed back to the system (`malloc_trim`), so what stays resident is bounded too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import io
import threading
import time
import warnings

from PIL import Image

# bytes per pixel as Pillow holds each mode in memory (RGB is padded to 4 bytes)
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "LA": 4, "PA": 4, "I": 4, "F": 4}
_RGB_BYTES = 4  # the RGB copy every decode makes
JPEG_SCALES = (8, 4, 2, 1)
# decodes at least this large hand their memory back to the system when they finish
TRIM_BYTES = 32 * 2**20


def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def decode_cost(data: bytes, side: int | None = None, max_pixels: int | None = None) -> int:
    """Bytes a decode of `data` holds at its peak: the decoded image, its RGB copy, and the alpha
    composite where there is alpha. With `side` (decode for a side-pixel model input), a JPEG is
    counted at the reduced DCT scale its decoder uses.

    Only the header is read (not EXIF, which Pillow finds in a PNG by decoding it all: the
    orientation does not change the pixel count). Bytes that are no image, or exceed
    `max_pixels`, cost 0: the decoder refuses them, with its reason, before decoding anything.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        width, height, mode, fmt = *img.size, img.mode, img.format
    except Exception:  # Pillow raises many kinds for bytes that are no image
        return 0
    pixels = width * height
    if max_pixels is not None and pixels > max_pixels:
        return 0
    if side and fmt == "JPEG":
        scale = next((s for s in JPEG_SCALES if min(width, height) // s >= side), 1)
        pixels //= scale * scale
    alpha = _RGB_BYTES if mode in ("RGBA", "RGBa", "LA", "PA", "P") else 0  # a palette may be transparent
    return pixels * (_MODE_BYTES.get(mode, 4) + _RGB_BYTES + alpha)


class BudgetExceeded(Exception):
    """One image needs more than the whole budget."""


class BudgetBusy(Exception):
    """The budget stayed full for longer than the caller would wait."""


class PixelBudget:
    """A weighted semaphore over bytes: `with budget.admit(n):` waits until n more bytes fit."""

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError("the decode budget must be positive")
        self.max_bytes = int(max_bytes)
        self._cond = threading.Condition()
        self.in_use = 0
        self.high_water = 0  # the most bytes admitted at once (for tests and metrics)
        self.waited = 0  # admissions that had to wait for others to finish
        self._trim = _malloc_trim()

    def acquire(self, nbytes: int, timeout: float = 60.0) -> None:
        """Wait until `nbytes` more fit, then hold them (release them with `release`)."""
        nbytes = max(0, int(nbytes))
        if nbytes > self.max_bytes:
            raise BudgetExceeded(
                f"decoding this image needs about {nbytes / 2**20:.0f} MiB, more than the server's decode budget "
                f"of {self.max_bytes / 2**20:.0f} MiB"
            )
        deadline = time.monotonic() + timeout
        with self._cond:
            if self.in_use + nbytes > self.max_bytes:
                self.waited += 1
            while self.in_use + nbytes > self.max_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BudgetBusy("the server is busy decoding other images; try again")
                self._cond.wait(left)
            self.in_use += nbytes
            self.high_water = max(self.high_water, self.in_use)

    def release(self, nbytes: int) -> None:
        if nbytes >= TRIM_BYTES and self._trim is not None:
            self._trim(0)  # before the next decode is admitted: what it frees is off the books
        with self._cond:
            self.in_use -= max(0, int(nbytes))
            self._cond.notify_all()

    @contextlib.contextmanager
    def admit(self, nbytes: int, timeout: float = 60.0):
        self.acquire(nbytes, timeout)
        try:
            yield
        finally:
            self.release(nbytes)
