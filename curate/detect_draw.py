"""Boxes drawn on an image with their phrase and score (the one-image `lvd detect` and the report)."""

from __future__ import annotations

from PIL import Image, ImageDraw

#: Distinct colours, one per phrase in the order phrases first appear.
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))  # fmt: skip


def draw_boxes(image: Image.Image, boxes, scores, phrases, width: int | None = None) -> Image.Image:
    """A copy of `image` (RGB) with each [x0, y0, x1, y1] box outlined and labelled 'phrase 0.87'."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    line = width or max(1, round(min(out.size) / 200))
    colours: dict[str, tuple[int, int, int]] = {}
    for box, score, phrase in zip(boxes, scores, phrases):
        colour = colours.setdefault(str(phrase), PALETTE[len(colours) % len(PALETTE)])
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=colour, width=line)
        label = f"{phrase} {float(score):.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), label)
        y = y0 - (bottom - top) - 2 if y0 >= bottom - top + 2 else y0
        draw.rectangle((x0, y, x0 + right - left + 2, y + bottom - top + 2), fill=colour)
        draw.text((x0 + 1, y), label, fill=(255, 255, 255))
    return out
