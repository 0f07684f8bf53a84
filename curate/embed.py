"""The embed stage: every usable image (pool, seed and eval sets) -> an L2-normalised vector.

reader : the manifest's ok rows, in manifest order (less the pool images that filter.require /
         filter.exclude drop, from the detect stage's boxes: `curate.detect_filter`), cut into
         parts of `embed.part_size` rows; inside a part, byte-identical rows (same sha1) are
         read and embedded once, and the copies get those vectors;
         DataLoader workers read the bytes (`curate.sources.iter_bytes`) and decode each image
         to a uint8 square (shorter side resized, centre cropped) — one batch per work item,
         so a batch never spans two parts;
mapper : the backbone embeds each batch under the configured precision, and the copy-detection
         model (SSCD as ONNX through onnxruntime, or TorchScript) embeds its own squares;
writer : a finished part is staged as part-NNNNN.npy (float16 rows) and ids-NNNNN.npy (int64
         manifest ids), its copy-detection rows under copy/ with the same names, then its
         marker _done-NNNNN.json (its fingerprint and the rows that failed to decode); the
         commit adds copy/_SUCCESS.json, which describes the copy-detection model (so
         `lvd index build RUN/embed/copy` works). Parts are the stage runner's
         (`curate.stage`): a rerun skips parts whose fingerprint matches, so a killed run
         resumes where it stopped.

Under `torchrun` the ranks split the parts round-robin (gloo on CPU, NCCL on GPUs); rank 0
commits once every rank has staged its parts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lvd.common.atomic import atomic_save_npy, atomic_write_json
from lvd.common.ranks import Ranks, rank_device
from lvd.common.row_bytes import iter_bytes
from lvd.common.run_folder import fingerprint, read_manifest, read_success
from lvd.curate.config import ConfigError
from lvd.curate.detect_filter import filter_active, filter_pool
from lvd.curate.stage import Parts, Stage, open_stage, success_record, torchrun_main
from lvd.curate.workers import resolve_workers, show_progress
from lvd.pretrain.data.decode import DecodeError
from lvd.pretrain.models.build import model_name
from lvd.pretrain.models.copy_detection import build_copy_detector, resolve_copy_detector
from lvd.pretrain.models.embedder import Embedder
from lvd.pretrain.models.preprocess import auto_resolution, bytes_to_square
from lvd.pretrain.models.registry import get_spec
from lvd.pretrain.models.weights import resolve_weights

log = logging.getLogger(__name__)

STAGE = "embed"
COPY = "copy"


# -- plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    index: int
    rows: pd.DataFrame  # manifest rows: id, kind, source, key, set, sha1

    @property
    def name(self) -> str:
        return f"{self.index:05d}"

    @property
    def to_read(self) -> pd.DataFrame:
        """The rows whose bytes are read and embedded: the first of each run of byte-identical rows
        (same sha1) in the part. Web pools repeat popular files many times; the copies get the first
        one's vectors (`spread_to_copies`), which are what embedding their identical bytes would give."""
        return self.rows[~first_of_same_bytes(self.rows).duplicated()]

    def files(self, with_copy: bool) -> list[str]:
        """Vectors and ids, in the main space and (with a copy-detection model) in copy/."""
        folders = ["", f"{COPY}/"] if with_copy else [""]
        return [f"{folder}{kind}-{self.name}.npy" for folder in folders for kind in ("part", "ids")]


def plan_parts(frame: pd.DataFrame, part_size: int) -> list[Part]:
    """Consecutive slices of the manifest's ok rows; stable as long as the manifest is."""
    if part_size <= 0:
        raise ConfigError(f"embed.part_size must be positive, got {part_size}")
    cols = ["id", "kind", "source", "key", "set", "sha1"]
    return [
        Part(i, frame.iloc[start : start + part_size][cols].reset_index(drop=True))
        for i, start in enumerate(range(0, len(frame), part_size))
    ]


def file_identity(path: Path, hashes: dict[str, str]) -> list:
    """[name, bytes, sha1] of a weights file (or of every file of a weights folder), by content.

    Not the path or the modification time: a run folder and its weights copied to another
    machine are still the same embeddings. `hashes` maps "path size mtime_ns" to sha1: entries
    from the last run (its _SUCCESS.json) spare reading unchanged files again (~0.5 s per GB);
    new ones are added, for the next run.
    """
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out = []
    for f in files:
        stat = f.stat()
        key = f"{f.resolve()} {stat.st_size} {stat.st_mtime_ns}"
        if key not in hashes:
            digest = hashlib.sha1()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(8 << 20), b""):
                    digest.update(chunk)
            hashes[key] = digest.hexdigest()
        out.append([f.relative_to(path).as_posix() if path.is_dir() else "", stat.st_size, hashes[key]])
    return out


def weights_record(spec) -> str | None:
    """How _SUCCESS.json names the weights: the pkg:// spec as given, else an absolute path."""
    if spec is None:
        return None
    spec = str(spec)
    return spec if spec.startswith("pkg://") else str(Path(spec).expanduser().resolve())


def settings_fingerprint(
    info: dict, copy_info: dict | None, weights_spec, copy_spec, hashes: dict[str, str] | None = None
) -> str:
    """Everything that changes the numbers in a part (the device does not, the dtype does)."""
    hashes = {} if hashes is None else hashes
    where = ("weights",)  # where the weights lie is not what they are: their content is below
    record = {
        "embed": {k: v for k, v in info.items() if k not in where},
        "copy": {k: v for k, v in copy_info.items() if k not in where} if copy_info else None,
        "weights_files": file_identity(resolve_weights(weights_spec), hashes) if weights_spec else None,
        "copy_files": file_identity(resolve_weights(copy_spec), hashes) if copy_spec else None,
    }
    return hashlib.sha1(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


# -- reader ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Square:
    resolution: int
    resize_ratio: float


class BatchDataset(Dataset):
    """Item i = batch i: decoded uint8 squares (one array per requested size), ids, failures."""

    def __init__(self, batches: list[tuple[int, pd.DataFrame]], squares: list[Square], decode_kwargs: dict):
        self.batches = batches
        self.squares = squares
        self.decode_kwargs = decode_kwargs

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        part, rows = self.batches[i]
        ids, images, failed = [], [[] for _ in self.squares], []
        for image_id, data in iter_bytes(rows):
            try:
                arrays = [
                    bytes_to_square(data, s.resolution, s.resize_ratio, **self.decode_kwargs) for s in self.squares
                ]
            except DecodeError as exc:
                failed.append((image_id, str(exc)))
                continue
            ids.append(image_id)
            for slot, array in zip(images, arrays):
                slot.append(array)
        tensors = [
            torch.from_numpy(np.stack(slot))
            if slot
            else torch.zeros((0, s.resolution, s.resolution, 3), dtype=torch.uint8)
            for slot, s in zip(images, self.squares)
        ]
        return {"part": part, "ids": np.asarray(ids, dtype=np.int64), "images": tensors, "failed": failed}


def make_batches(parts: list[Part], batch_size: int) -> list[tuple[int, pd.DataFrame]]:
    batches = []
    for part in parts:
        rows = part.to_read
        batches += [(part.index, rows.iloc[start : start + batch_size]) for start in range(0, len(rows), batch_size)]
    return batches


def first_of_same_bytes(rows: pd.DataFrame) -> pd.Series:
    """Each row's representative: the id of the first row with the same sha1 (a row without a sha1 is its own)."""
    content = rows["sha1"].where(rows["sha1"].notna(), "id:" + rows["id"].astype(str))
    return rows["id"].groupby(content.to_numpy(), sort=False).transform("first")


def spread_to_copies(
    rows: pd.DataFrame, ids: np.ndarray, vectors: list[np.ndarray], failed: list[tuple[int, str]]
) -> tuple[np.ndarray, list[np.ndarray], list[tuple[int, str]]]:
    """The part's rows in manifest order, each byte-identical copy given its representative's vectors
    (or, when that one failed to decode, the same failure)."""
    every, first = rows["id"].to_numpy(np.int64), first_of_same_bytes(rows).to_numpy(np.int64)
    at = pd.Index(ids).get_indexer(first)
    kept = at >= 0
    reasons = dict(failed)
    failed = [(int(i), reasons[int(f)]) for i, f in zip(every[~kept], first[~kept])]
    return every[kept], [v[at[kept]] for v in vectors], failed


# -- writer ----------------------------------------------------------------------------------


def stage_part(parts: Parts, part: Part, acc: dict, main, copy) -> None:
    """A finished part's files (vectors before ids: readers pair files by number and check the
    row counts), then its marker with the rows that failed to decode."""
    ids = np.concatenate(acc["ids"]) if acc["ids"] else np.zeros(0, dtype=np.int64)
    spaces = [("", main, acc["main"])] + ([(f"{COPY}/", copy, acc["copy"])] if copy is not None else [])
    read = [np.concatenate(chunks) if chunks else np.zeros((0, model.dim), np.float32) for _, model, chunks in spaces]
    ids, spread, acc_failed = spread_to_copies(part.rows, ids, read, acc["failed"])
    name = part.name
    for (folder, _, _), vectors in zip(spaces, spread):
        atomic_save_npy(parts.path(name, f"{folder}part-{name}.npy"), vectors.astype(np.float16))
        atomic_save_npy(parts.path(name, f"{folder}ids-{name}.npy"), ids.astype(np.int64))
    for image_id, reason in acc_failed:
        log.warning("embed: image id %d could not be decoded, left out: %s", image_id, reason)
    failed = [{"id": int(i), "error": reason} for i, reason in acc_failed]
    # the fingerprint names the content: the same settings and images give the same vectors
    parts.done(name, content=parts.plan[name][0], rows=int(len(ids)), failed=failed)


# -- stage -----------------------------------------------------------------------------------


def embed_resolution(settings, frame: pd.DataFrame) -> int | None:
    """`embed.resolution` as pixels: null stays the model's own, `auto` is chosen from the images.

    `auto` looks at every ok row (pool, seeds and eval share one embedding space), so every rank
    and every rerun on the same manifest gets the same answer.
    """
    value = settings.resolution
    if value is None:
        return None
    if str(value) != "auto":
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"embed.resolution must be null, auto or a number of pixels, got {value!r}") from None
    spec = get_spec(model_name(str(settings.model), settings.weights))
    shorter = np.minimum(frame["width"].to_numpy(dtype=np.float64), frame["height"].to_numpy(dtype=np.float64))
    side = auto_resolution(shorter, spec.patch_size, spec.resolution, float(settings.max_upscale))
    log.info(
        "embed.resolution=auto: median shorter side %s px, at most %gx upscaled -> %d px (model's own %d)",
        f"{np.median(shorter):.0f}" if shorter.size else "-",
        float(settings.max_upscale),
        side,
        spec.resolution,
    )
    return side


def model_threads(setting, ranks: Ranks) -> int:
    """`embed.threads`: a number, or auto = the cores this process may use, shared by the host's ranks."""
    if str(setting) != "auto":
        try:
            threads = int(setting)
        except (TypeError, ValueError):
            raise ConfigError(f"embed.threads must be auto or a positive number, got {setting!r}") from None
        if threads <= 0:
            raise ConfigError(f"embed.threads must be auto or a positive number, got {setting!r}")
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world)))


def _build_embedders(cfg, device: torch.device, resolution: int | None, threads: int):
    e = cfg.embed
    if e.weights is None and not e.allow_random:
        raise ConfigError(
            "embed.weights is null: random weights give meaningless embeddings. Point embed.weights at a "
            "weights file (hub .pth, Hugging Face folder, lvd checkpoint, .onnx export), or set "
            "embed.allow_random=true for tests"
        )
    main = Embedder(
        str(e.model),
        e.weights,
        resolution=resolution,
        device=device,
        dtype=str(e.dtype),
        cls_and_mean_patch=bool(e.cls_and_mean_patch),
        resize_ratio=float(e.resize_ratio),
    )
    try:
        choice = resolve_copy_detector(e.copy_detection.weights, e.copy_detection.space)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"embed.copy_detection: {exc}") from None
    if choice is None:
        log.info("embed: no copy-detection model (embed.copy_detection.weights=%s)", e.copy_detection.weights)
        return main, None, None
    copy = build_copy_detector(
        choice.weights,
        resolution=int(e.copy_detection.resolution),
        device=device,
        dtype=str(e.dtype),
        threads=threads,
        mean=tuple(e.copy_detection.mean),
        std=tuple(e.copy_detection.std),
    )
    log.info(
        "embed: copy detection with %s (%s, %d px, space %s)",
        choice.describe(),
        copy.info()["kind"],
        copy.resolution,
        choice.space or "unknown",
    )
    return main, copy, choice


def _loader(batches, squares, cfg, workers: int) -> DataLoader:
    decode_kwargs = {
        "max_pixels": int(cfg.decode.max_pixels) if cfg.decode.max_pixels else None,
        "background": tuple(int(c) for c in cfg.decode.background),
    }
    return DataLoader(
        BatchDataset(batches, squares, decode_kwargs),
        batch_size=None,  # items are already batches
        shuffle=False,
        num_workers=workers,
        pin_memory=False,
        prefetch_factor=4 if workers else None,
    )


def _embed_parts(parts: list[Part], cfg, main: Embedder, copy, staged: Parts, ranks: Ranks) -> int:
    """Run this rank's parts, staging each as soon as its last batch is in; returns the number of images embedded."""
    batches = make_batches(parts, int(cfg.embed.batch_size))
    squares = [Square(main.resolution, main.resize_ratio)]
    if copy is not None:
        squares.append(Square(copy.resolution, copy.resize_ratio))
    workers = resolve_workers(cfg.workers)
    if workers:  # ranks on one host share its cores
        workers = max(1, workers // int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world)))
    copies = sum(len(p.rows) for p in parts) - sum(len(rows) for _, rows in batches)
    if copies:
        log.info("embed: %d byte-identical copies (same sha1) take their first file's vectors", copies)
    remaining = Counter(index for index, _ in batches)
    pending: dict[int, dict] = {p.index: {"ids": [], "main": [], "copy": [], "failed": []} for p in parts}
    by_index = {p.index: p for p in parts}
    done = 0
    bar = tqdm(
        total=sum(len(rows) for _, rows in batches),
        unit="img",
        desc=f"embed[{ranks.rank}]" if ranks.world > 1 else "embed",
        disable=not show_progress(cfg.progress) or ranks.rank != 0,
        smoothing=0.1,
    )
    with bar:
        for item in _loader(batches, squares, cfg, workers):
            acc = pending[item["part"]]
            if len(item["ids"]):
                acc["ids"].append(item["ids"])
                acc["main"].append(main.embed_uint8(item["images"][0]))
                if copy is not None:
                    acc["copy"].append(copy.embed_uint8(item["images"][1]))
            acc["failed"] += item["failed"]
            done += len(item["ids"])
            bar.update(len(item["ids"]) + len(item["failed"]))
            remaining[item["part"]] -= 1
            if remaining[item["part"]] == 0:
                stage_part(staged, by_index[item["part"]], pending.pop(item["part"]), main, copy)
    return done


def _summary(parts: Parts, frame: pd.DataFrame) -> dict:
    failed = [f for name in parts.plan for f in parts.info(name)["failed"]]
    embedded = frame[~frame["id"].isin({f["id"] for f in failed})]
    return {
        "rows": int(len(embedded)),
        "failed": len(failed),
        "failed_examples": failed[:20],
        "counts": {str(k): int(v) for k, v in embedded.groupby("set").size().items()},
    }


@dataclass
class Models:
    """The embedders of a run and how _SUCCESS.json describes them."""

    main: Embedder
    copy: object | None
    info: dict
    copy_info: dict | None
    settings: str  # the fingerprint of everything that changes the vectors
    weights_sha1: dict


def build_models(cfg, stage: Stage, frame: pd.DataFrame) -> Models:
    ranks = stage.ranks
    device = rank_device(cfg.embed.device, ranks)
    threads = model_threads(cfg.embed.threads, ranks)
    if device.type == "cpu" and (ranks.world > 1 or str(cfg.embed.threads) != "auto"):
        torch.set_num_threads(threads)  # ranks on one host share its cores
    main, copy, choice = _build_embedders(cfg, device, embed_resolution(cfg.embed, frame), threads)
    info = {**main.info(), "weights": weights_record(cfg.embed.weights)}
    copy_info = None
    if copy is not None:
        copy_info = {
            **copy.info(),
            "weights": weights_record(choice.weights),
            "name": choice.name,
            "space": choice.space,
        }
    hashes = dict((read_success(stage.folder) or {}).get("weights_sha1") or {})
    copy_spec = choice.weights if choice else None
    settings = settings_fingerprint(info, copy_info, cfg.embed.weights, copy_spec, hashes)
    log.info("embed: %s on %s, %s, %d px", info["model"], device, info["dtype"], info["resolution"])
    return Models(main, copy, info, copy_info, settings, hashes)


def run_embed(cfg) -> Path:
    """Embed the manifest's ok rows into RUN/embed (and RUN/embed/copy); returns the folder."""
    filtered = filter_active(cfg)  # filter.require / filter.exclude: the detect stage decides which pool rows
    with open_stage(
        cfg, STAGE, inputs=("detect",) if filtered else (), optional=("manifest",), device=cfg.embed.device
    ) as stage:
        frame = read_manifest(stage.run_dir, status="ok")
        if filtered:
            frame = filter_pool(cfg, stage.run_dir, frame, stage.inputs["manifest"])
        models = build_models(cfg, stage, frame)
        planned = plan_parts(frame, int(cfg.embed.part_size))
        with_copy = models.copy is not None
        plan = {}
        for part in planned:
            ids, sha1 = part.rows["id"].to_numpy(np.int64), part.rows["sha1"].astype(str).tolist()
            plan[part.name] = (stage.fingerprint_of(models.settings, ids, sha1), part.files(with_copy))
        parts = stage.parts(plan)
        if stage.up_to_date:
            log.info("embed: %d parts up to date, nothing to do", len(planned))
            return stage.folder
        mine = set(parts.mine)
        log.info(
            "embed: %d parts, %d to (re)do, %d on rank %d/%d",
            len(planned),
            len(parts.todo),
            len(mine),
            stage.ranks.rank,
            stage.ranks.world,
        )
        embedded = _embed_parts(
            [p for p in planned if p.name in mine], cfg, models.main, models.copy, parts, stage.ranks
        )
        if stage.ranks.rank != 0:
            return stage.commit()
        return commit_embeddings(stage, parts, models, frame, embedded)


def commit_embeddings(stage: Stage, parts: Parts, models: Models, frame: pd.DataFrame, embedded: int) -> Path:
    """Every rank's parts are staged: rank 0 commits them with copy/_SUCCESS.json and _SUCCESS.json."""
    summary = _summary(parts, frame)
    if models.copy_info is not None:  # the copy space on its own, for readers of embed/copy alone
        record = success_record(
            **models.copy_info,
            stage=STAGE,
            settings_fingerprint=models.settings,
            parts=len(parts.plan),
            content=fingerprint(sorted((name, fp) for name, (fp, _) in parts.plan.items())),
            **summary,
        )
        atomic_write_json(stage.path(f"{COPY}/_SUCCESS.json"), record)
    stage.commit(
        **models.info,
        copy_detection=models.copy_info,
        settings_fingerprint=models.settings,
        weights_sha1=models.weights_sha1,
        parts=len(parts.plan),
        parts_written=len(parts.fresh),
        embedded_this_run_rank0=embedded,
        **summary,
    )
    log.info("embed: %d parts written (rank 0 embedded %d images)", len(parts.fresh), embedded)
    return stage.folder


def main(argv: list[str] | None = None) -> int:
    """`python -m lvd.curate.embed CONFIG [key=value ...]`: the entry point for torchrun."""
    return torchrun_main(run_embed, "lvd.curate.embed", argv)


if __name__ == "__main__":
    sys.exit(main())
