"""The report's detection section: the prompt, counts, and pool images with their boxes drawn.

With filter.require / filter.exclude on, it shows images the rules kept beside images they
dropped, so a person can see whether the prompt and thresholds do what was meant. Pictures are
drawn at PICTURE px (boxes scaled with the image) under report/det/, named by the image's sha1
and the detections' content, and staged and committed with the page.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from lvd.common.atomic import atomic_path
from lvd.common.row_bytes import RowReader
from lvd.common.run_folder import read_manifest, read_success, stage_dir
from lvd.curate.detect import POOL, STAGE, read_detections
from lvd.curate.detect_draw import draw_boxes
from lvd.curate.detect_filter import filter_active, filter_rules, kept_ids
from lvd.curate.stage import Stage

log = logging.getLogger(__name__)

PICTURE = 256
PER_GROUP = 12


def _picture(
    stage: Stage, reader: RowReader, row, boxes: pd.DataFrame, content: str, max_pixels: int | None
) -> str | None:
    from lvd.pretrain.data.decode import decode

    name = f"det/{int(row.id)}-{str(row.sha1)[:12]}-{content[:10]}.jpg"
    try:
        image = decode(reader.read(row.kind, row.source, row.key), max_pixels=max_pixels)
    except Exception as exc:  # a vanished source file must not stop the report
        log.warning("report: no detection picture for %s: %s", row.id, exc)
        return None
    scale = min(1.0, PICTURE / max(image.size))
    small = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    scaled = [np.asarray(b, np.float64) * scale for b in boxes["box"]]
    with atomic_path(stage.path(name)) as tmp:
        draw_boxes(small, scaled, boxes["score"], boxes["phrase"], width=2).save(tmp, "JPEG", quality=90)
    return name


def _figures(stage, reader: RowReader, ids, manifest, boxes, content, max_pixels, cls: str) -> list[dict]:
    out = []
    for row in manifest.loc[manifest["id"].isin(ids)].head(PER_GROUP).itertuples(index=False):
        mine = boxes[boxes["id"] == row.id].sort_values("score", ascending=False)
        top = ", ".join(dict.fromkeys(mine["phrase"].astype(str).head(3)))
        caption = [f"{len(mine)} boxes" + (f": {top}" if top else ""), str(row.key).rsplit("/", 1)[-1]]
        src = _picture(stage, reader, row, mine, content, max_pixels)
        out.append({"id": int(row.id), "src": src, "caption": caption, "cls": cls})
    return out


def read_detection_section(cfg, stage: Stage, max_pixels: int | None, reader: RowReader) -> dict | None:
    """The section's values, or None when the detect stage has not finished; `reader` is the report's."""
    record = read_success(stage_dir(stage.run_dir, STAGE))
    if record is None:
        return None
    boxes = read_detections(stage.run_dir)
    manifest = read_manifest(stage.run_dir, status="ok", sets=[POOL], columns=["id", "kind", "source", "key", "sha1"])
    content = str(record.get("content") or "")
    with_boxes = np.unique(boxes["id"].to_numpy(np.int64))
    out = {
        "prompt": record.get("prompt"),
        "box_threshold": record.get("box_threshold"),
        "text_threshold": record.get("text_threshold"),
        "images": int(record.get("images", 0)),
        "boxes": int(len(boxes)),
        "with_boxes": int(len(with_boxes)),
        "filter": "",
        "groups": [],
    }
    if filter_active(cfg):
        require, exclude = filter_rules(cfg)
        pool = manifest["id"].to_numpy(np.int64)
        kept = kept_ids(pool, boxes, require, exclude)
        dropped = np.setdiff1d(pool, kept)
        out["filter"] = f"The filters keep {len(kept)} of {len(pool)} pool images for embedding."
        for title, ids, cls in (("kept by the filters", kept, ""), ("dropped by the filters", dropped, "removed")):
            figures = _figures(stage, reader, ids, manifest, boxes, content, max_pixels, cls)
            out["groups"].append({"title": f"{title} ({len(figures)} of {len(ids)})", "figures": figures})
    else:
        figures = _figures(stage, reader, with_boxes, manifest, boxes, content, max_pixels, "")
        out["groups"].append({"title": f"images with boxes ({len(figures)} of {len(with_boxes)})", "figures": figures})
    return out
