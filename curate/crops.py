"""Object crops as extra shard samples (`shards.crops: true`), from the detect stage's boxes.

Each curated image's kept boxes become samples of their own, written right after the image in
the same tar: `KEY_cNN.jpg` (the box cut from the upright decoded image, JPEG at
`shards.quality`) and `KEY_cNN.json` with where it came from (source id and key, box in the
source's pixels, phrase, score). The kept boxes are those matching `filter.require` when that
rule is on (the objects the curation asked for), otherwise every box the detect stage kept;
best score first.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd

from lvd.curate.detect_filter import Rule, box_area_fraction, phrase_matches


def kept_boxes(detections: pd.DataFrame, ids, require: Rule | None) -> dict[int, list[dict]]:
    """{id: [{box, phrase, score}, ...]} of the images `ids`, best score first (ties: box order)."""
    rows = detections[detections["id"].isin(np.asarray(ids, np.int64))]
    if require is not None and len(rows):
        boxes = np.stack([np.asarray(b, np.float64) for b in rows["box"]])
        area = box_area_fraction(boxes, rows["width"].to_numpy(), rows["height"].to_numpy())
        phrase_ok = np.array([any(phrase_matches(p, w) for w in require.phrases) for p in rows["phrase"]], bool)
        rows = rows[phrase_ok & (rows["score"].to_numpy() >= require.min_score) & (area >= require.min_area)]
    out: dict[int, list[dict]] = {}
    rows = rows.assign(_order=np.arange(len(rows))).sort_values(
        ["id", "score", "_order"], ascending=[True, False, True]
    )
    for row in rows.itertuples(index=False):
        box = [round(float(v), 2) for v in row.box]
        out.setdefault(int(row.id), []).append({"box": box, "phrase": row.phrase, "score": round(float(row.score), 6)})
    return out


def pixel_box(box, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The whole pixels a box covers (rounded outwards, inside the image); None when it covers none."""
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def crop_samples(key: str, meta: dict, boxes: list[dict]) -> list[tuple[str, tuple, bytes]]:
    """(crop key, pixel box, provenance JSON) for each box of one sample that covers a pixel."""
    out = []
    for j, found in enumerate(boxes):
        pixels = pixel_box(found["box"], meta["width"], meta["height"])
        if pixels is None:
            continue
        record = {
            "crop_of": {"id": meta["id"], "key": key, "source": meta["source"], "source_key": meta["key"]},
            "box": found["box"],
            "pixels": list(pixels),
            "phrase": found["phrase"],
            "score": found["score"],
            "set": meta["set"],
        }
        out.append((f"{key}_c{j:02d}", pixels, json.dumps(record, sort_keys=True, separators=(",", ":")).encode()))
    return out


def crop_jpegs(image_bytes: bytes, boxes, quality: int) -> list[bytes]:
    """Each pixel box cut from the upright RGB image (decoded once), as JPEG."""
    from lvd.pretrain.data.decode import decode

    image, out = decode(image_bytes), []
    for pixels in boxes:
        buf = io.BytesIO()
        image.crop(tuple(pixels)).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


__all__ = ["crop_jpegs", "crop_samples", "kept_boxes", "pixel_box"]
