"""The detect stage: boxes and phrases of `detect.prompt` in every pool image (Grounding DINO).

reader : the manifest's ok pool rows (the images the filters decide on), in manifest order, cut
         into parts of `detect.part_size` rows; DataLoader workers read the bytes, decode each
         image upright in RGB (`pretrain.data.decode`) and prepare the batch's pixels as the
         Grounding DINO processor does (resize, pad, mask);
mapper : `pretrain.models.grounding.GroundingDino` on `detect.device`, on batches of images of
         like aspect ratio (little padding), one prompt for the whole run, transformers'
         post-processing with `box_threshold` and `text_threshold`;
writer : part-NNNNN.parquet, one row per kept box (id, box [x0, y0, x1, y1] in pixels of the
         upright image, score, phrase, and the image's width and height for area fractions),
         then the part's marker with how many images it saw and which failed to decode. An image
         without a box has no row; the marker's `images` counts it.

Parts are the stage runner's (`curate.stage`): a rerun skips finished parts, torchrun ranks
split the parts, and nothing replaces finished outputs before the commit. `_SUCCESS.json`
records the manifest's content fingerprint, so the embed stage's filters can refuse
detections made for another manifest.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lvd.common.ranks import rank_device
from lvd.common.row_bytes import iter_bytes
from lvd.common.run_folder import read_manifest, read_success
from lvd.curate.config import ConfigError
from lvd.curate.embed import file_identity
from lvd.curate.stage import Parts, open_stage, torchrun_main, write_frame
from lvd.curate.workers import resolve_workers, show_progress
from lvd.pretrain.data.decode import DecodeError, decode
from lvd.pretrain.models.grounding import GroundingDino, PixelPreparer, normalise_prompt
from lvd.pretrain.models.weights.resolve import resolve_weights

log = logging.getLogger(__name__)

STAGE = "detect"
#: The manifest set whose images are detected (and filtered before embedding).
POOL = "pool"
SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("box", pa.list_(pa.float32(), 4)),
        ("score", pa.float32()),
        ("phrase", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)


def part_file(name: str) -> str:
    return f"part-{name}.parquet"


@dataclass(frozen=True)
class DetectSettings:
    """What changes the boxes (the device does not)."""

    weights: str
    prompt: str
    box_threshold: float
    text_threshold: float
    size: int | None

    @classmethod
    def from_config(cls, cfg) -> DetectSettings:
        d = cfg.detect
        if d.weights is None:
            raise ConfigError(
                "detect.weights is null: point it at a local Hugging Face Grounding DINO folder "
                "(e.g. a download of IDEA-Research/grounding-dino-tiny)"
            )
        if d.prompt is None:
            raise ConfigError("detect.prompt is null: give the phrases to find, e.g. detect.prompt='a cat . a dog .'")
        return cls(
            str(d.weights),
            normalise_prompt(d.prompt),
            float(d.box_threshold),
            float(d.text_threshold),
            None if d.size is None else int(d.size),
        )

    def record(self, hashes: dict[str, str]) -> dict:
        """The settings with the weights by content (a moved folder is the same model), for fingerprints."""
        files = file_identity(resolve_weights(self.weights), hashes)
        return {"prompt": self.prompt, "thresholds": [self.box_threshold, self.text_threshold], "size": self.size,
                "weights_files": files}  # fmt: skip


# -- reader ----------------------------------------------------------------------------------


class BatchDataset(Dataset):
    """Item i = batch i of a part: prepared pixels, ids, (width, height) of each image, failures."""

    def __init__(self, batches: list[tuple[str, pd.DataFrame]], preparer: PixelPreparer, decode_kwargs: dict):
        self.batches, self.preparer, self.decode_kwargs = batches, preparer, decode_kwargs

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        part, rows = self.batches[i]
        ids, images, failed = [], [], []
        for image_id, data in iter_bytes(rows):
            try:
                images.append(decode(data, **self.decode_kwargs))
            except DecodeError as exc:
                failed.append((image_id, str(exc)))
                continue
            ids.append(image_id)
        pixels = self.preparer(images) if images else None
        sizes = [im.size for im in images]
        return {"part": part, "ids": ids, "sizes": sizes, "pixels": pixels, "failed": failed}


def plan_parts(frame: pd.DataFrame, part_size: int) -> dict[str, pd.DataFrame]:
    """Consecutive slices of the pool's ok rows, by part name; stable as long as the manifest is."""
    cols = ["id", "kind", "source", "key", "sha1", "width", "height"]
    return {
        f"{i:05d}": frame.iloc[start : start + part_size][cols].reset_index(drop=True)
        for i, start in enumerate(range(0, len(frame), part_size))
    }


def _loader(batches, preparer: PixelPreparer, cfg) -> DataLoader:
    decode_kwargs = {
        "max_pixels": int(cfg.decode.max_pixels) if cfg.decode.max_pixels else None,
        "background": tuple(int(c) for c in cfg.decode.background),
    }
    workers = resolve_workers(cfg.workers)
    return DataLoader(
        BatchDataset(batches, preparer, decode_kwargs),
        batch_size=None,  # items are already batches
        num_workers=workers,
        prefetch_factor=2 if workers else None,
    )


# -- mapper and writer -----------------------------------------------------------------------


def detection_rows(ids, sizes, detections) -> pd.DataFrame:
    """One row per box of each image, in the SCHEMA's columns."""
    rows = {"id": [], "box": [], "score": [], "phrase": [], "width": [], "height": []}
    for image_id, (w, h), found in zip(ids, sizes, detections):
        for box, score, phrase in zip(found.boxes, found.scores, found.phrases):
            rows["id"].append(int(image_id))
            rows["box"].append([float(v) for v in box])
            rows["score"].append(float(score))
            rows["phrase"].append(phrase)
            rows["width"].append(int(w))
            rows["height"].append(int(h))
    return pd.DataFrame(rows)


def make_batches(name: str, rows: pd.DataFrame, size: int) -> list[tuple[str, pd.DataFrame]]:
    """A part's rows in batches of images of like shape (sorted by aspect ratio, then id).

    The processor pads a batch to its widest and tallest image, and the model computes on the
    padding: a portrait photo beside a landscape one would cost each a square."""
    width, height = (rows[c].astype("float64").fillna(1.0).to_numpy() for c in ("width", "height"))
    aspect = width / np.maximum(height, 1.0)
    ordered = rows.iloc[np.lexsort((rows["id"].to_numpy(), aspect))]
    return [(name, ordered.iloc[i : i + size]) for i in range(0, len(ordered), size)]


def _detect_parts(todo: dict[str, pd.DataFrame], cfg, model: GroundingDino, s: DetectSettings, parts: Parts) -> int:
    """Run this rank's parts, staging each as soon as its last batch is in; returns the images seen."""
    size = int(cfg.detect.batch_size)
    batches = [batch for name, rows in todo.items() for batch in make_batches(name, rows, size)]
    remaining = {name: -(-len(rows) // size) for name, rows in todo.items()}
    pending = {name: {"frames": [], "images": 0, "failed": []} for name in todo}
    seen = 0
    bar = tqdm(total=sum(len(r) for r in todo.values()), unit="img", desc="detect",
               disable=not show_progress(cfg.progress) or parts.stage.ranks.rank != 0)  # fmt: skip
    with bar:
        for item in _loader(batches, model.preparer, cfg):
            acc = pending[item["part"]]
            if item["ids"]:
                found = model.detect_prepared(
                    item["pixels"], item["sizes"], s.prompt, s.box_threshold, s.text_threshold
                )
                acc["frames"].append(detection_rows(item["ids"], item["sizes"], found))
            acc["images"] += len(item["ids"])
            acc["failed"] += [{"id": int(i), "error": reason} for i, reason in item["failed"]]
            seen += len(item["ids"]) + len(item["failed"])
            bar.update(len(item["ids"]) + len(item["failed"]))
            remaining[item["part"]] -= 1
            if remaining[item["part"]] == 0:
                _stage_part(parts, item["part"], pending.pop(item["part"]))
    return seen


def _stage_part(parts: Parts, name: str, acc: dict) -> None:
    frame = pd.concat(acc["frames"], ignore_index=True) if acc["frames"] else detection_rows([], [], [])
    write_frame(parts.path(name, part_file(name)), frame, SCHEMA)
    for failure in acc["failed"]:
        log.warning("detect: image id %d could not be decoded, left out: %s", failure["id"], failure["error"])
    parts.done(name, rows=int(len(frame)), images=acc["images"], failed=acc["failed"])


# -- stage -----------------------------------------------------------------------------------


def run_detect(cfg) -> Path:
    """Detect `detect.prompt` in the manifest's ok pool rows into RUN/detect; returns the folder."""
    settings = DetectSettings.from_config(cfg)
    with open_stage(cfg, STAGE, inputs=("manifest",), device=cfg.detect.device) as stage:
        frame = read_manifest(stage.run_dir, status="ok", sets=[POOL])
        hashes = dict((read_success(stage.folder) or {}).get("weights_sha1") or {})
        record = settings.record(hashes)
        size = int(cfg.detect.part_size)
        planned = plan_parts(frame, size)
        plan = {
            name: (stage.fingerprint_of(record, rows["id"].to_numpy(np.int64), rows["sha1"].astype(str).tolist()),
                   [part_file(name)])
            for name, rows in planned.items()
        }  # fmt: skip
        parts = stage.parts(plan)
        if stage.up_to_date:
            log.info("detect: %d parts up to date, nothing to do", len(planned))
            return stage.folder
        mine = {name: planned[name] for name in parts.mine}
        started, seen = time.perf_counter(), 0
        if mine:
            model = GroundingDino(
                settings.weights, device=rank_device(cfg.detect.device, stage.ranks), size=settings.size
            )
            log.info("detect: %d parts, %d to (re)do, %d on this rank, on %s", len(planned), len(parts.todo), len(mine),
                     model.device)  # fmt: skip
            started = time.perf_counter()  # images per second of detection, not of loading the model
            seen = _detect_parts(mine, cfg, model, settings, parts)
        seconds = time.perf_counter() - started
        if seen:
            log.info("detect: %d images in %.1f s (%.2f images/s on this rank)", seen, seconds, seen / seconds)
        if stage.ranks.rank != 0:
            return stage.commit()
        infos = [parts.info(name) for name in plan]
        failed = [f for info in infos for f in info["failed"]]
        return stage.commit(
            prompt=settings.prompt,
            box_threshold=settings.box_threshold,
            text_threshold=settings.text_threshold,
            size=settings.size,
            weights=str(resolve_weights(settings.weights)),
            weights_sha1=hashes,
            manifest_content=stage.inputs["manifest"],
            images=sum(int(info["images"]) for info in infos),
            boxes=sum(int(info["rows"]) for info in infos),
            failed=len(failed),
            failed_examples=failed[:20],
            parts=len(plan),
            parts_written=len(parts.fresh),
            images_per_second_rank0=round(seen / seconds, 3) if seen else None,
        )


def read_detections(run_dir, columns=None) -> pd.DataFrame:
    """Every box of RUN/detect (empty with the schema's columns when no box was kept)."""
    from lvd.common.run_folder import finished, stage_dir

    folder = stage_dir(run_dir, STAGE)
    finished(folder, needed_by=None)
    files = sorted(folder.glob("part-*.parquet"))
    if not files:
        return SCHEMA.empty_table().to_pandas()
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files]).to_pandas()


def main(argv: list[str] | None = None) -> int:
    """`python -m lvd.curate.detect CONFIG [key=value ...]`: the entry point for torchrun."""
    return torchrun_main(run_detect, "lvd.curate.detect", argv)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["SCHEMA", "STAGE", "DetectSettings", "detection_rows", "make_batches", "read_detections", "run_detect"]
