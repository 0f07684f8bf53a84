"""The embed stage: every usable image (pool, seed and eval sets) -> an L2-normalised vector.

reader : the manifest's ok rows, in manifest order, cut into parts of `embed.part_size` rows;
         DataLoader workers read the bytes (`curate.sources.iter_bytes`) and decode each image
         to a uint8 square (shorter side resized, centre cropped) — one batch per work item,
         so a batch never spans two parts;
mapper : the backbone embeds each batch under the configured precision, and the copy-detection
         model (SSCD as ONNX through onnxruntime, or TorchScript) embeds its own squares;
writer : a finished part is written atomically as part-NNNNN.npy (float16 rows), then
         ids-NNNNN.npy (int64 manifest ids), then done-NNNNN.json (its fingerprint and the rows
         that failed to decode); copy-detection rows go to copy/ under the same names, with a
         copy/_SUCCESS.json that describes their model (so `lvd index build RUN/embed/copy`
         works). A rerun skips parts whose fingerprint matches, so a killed run resumes where
         it stopped.

Under `torchrun` the ranks split the parts round-robin (gloo on CPU, NCCL on GPUs); rank 0
writes `_SUCCESS.json` once every rank has finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lvd.curate.config import ConfigError, save_config
from lvd.curate.manifest import read_manifest
from lvd.curate.ranks import Ranks, join_ranks, rank_device, torchrun_main
from lvd.curate.runio import (
    atomic_path,
    atomic_write_json,
    clear_success,
    is_done,
    read_success,
    remove_stale_temps,
    write_success,
)
from lvd.curate.sources import iter_bytes
from lvd.curate.stage import STAGED, commit_staged_parts
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
    rows: pd.DataFrame  # manifest rows: id, kind, source, key, set

    @property
    def name(self) -> str:
        return f"{self.index:05d}"

    def fingerprint(self, settings: str) -> str:
        ids = np.ascontiguousarray(self.rows["id"].to_numpy(dtype=np.int64))
        return hashlib.sha1(settings.encode() + ids.tobytes()).hexdigest()


def plan_parts(frame: pd.DataFrame, part_size: int) -> list[Part]:
    """Consecutive slices of the manifest's ok rows; stable as long as the manifest is."""
    if part_size <= 0:
        raise ValueError(f"embed.part_size must be positive, got {part_size}")
    cols = ["id", "kind", "source", "key", "set"]
    return [
        Part(i, frame.iloc[start : start + part_size][cols].reset_index(drop=True))
        for i, start in enumerate(range(0, len(frame), part_size))
    ]


def _file_identity(path: Path, hashes: dict[str, str]) -> list:
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
        "weights_files": _file_identity(resolve_weights(weights_spec), hashes) if weights_spec else None,
        "copy_files": _file_identity(resolve_weights(copy_spec), hashes) if copy_spec else None,
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
    return [
        (part.index, part.rows.iloc[start : start + batch_size])
        for part in parts
        for start in range(0, len(part.rows), batch_size)
    ]


# -- writer ----------------------------------------------------------------------------------


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def write_part(folder: Path, name: str, ids: np.ndarray, vectors: np.ndarray) -> None:
    """Vectors first, ids second: readers pair files by number and check the row counts."""
    _save_npy(folder / f"part-{name}.npy", vectors.astype(np.float16))
    _save_npy(folder / f"ids-{name}.npy", ids.astype(np.int64))


def part_done(out: Path, part: Part, fingerprint: str, with_copy: bool) -> bool:
    marker = out / f"done-{part.name}.json"
    if not marker.is_file():
        return False
    try:
        if json.loads(marker.read_text()).get("fingerprint") != fingerprint:
            return False
    except (OSError, ValueError):
        return False
    folders = [out, out / COPY] if with_copy else [out]
    return all((f / f"part-{part.name}.npy").is_file() and (f / f"ids-{part.name}.npy").is_file() for f in folders)


def staged_part_files(names: list[str], with_copy: bool) -> list[str]:
    """Each part's files in commit order: vectors and ids first (copy space too), its done marker last."""
    folders = ["", f"{COPY}/"] if with_copy else [""]
    return [f"{folder}{kind}-{name}.npy" for name in names for folder in folders for kind in ("part", "ids")] + [
        f"done-{name}.json" for name in names
    ]


def remove_parts_beyond(out: Path, n_parts: int) -> int:
    """Delete part files numbered n_parts and above (the manifest shrank)."""
    removed = 0
    for folder in (out, out / COPY):
        for path in list(folder.glob("*-[0-9][0-9][0-9][0-9][0-9]*")):
            stem = path.name.split("-", 1)[1].split(".", 1)[0]
            if stem.isdigit() and int(stem) >= n_parts and path.name.startswith(("part-", "ids-", "done-")):
                path.unlink()
                removed += 1
    return removed


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
            raise ValueError(f"embed.resolution must be null, auto or a number of pixels, got {value!r}") from None
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
            raise ValueError(f"embed.threads must be auto or a positive number, got {setting!r}") from None
        if threads <= 0:
            raise ValueError(f"embed.threads must be auto or a positive number, got {setting!r}")
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world)))


def _build_embedders(cfg, device: torch.device, resolution: int | None, threads: int):
    e = cfg.embed
    if e.weights is None and not e.allow_random:
        raise ValueError(
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


def _embed_parts(parts: list[Part], cfg, main: Embedder, copy, out: Path, fingerprints: dict, ranks: Ranks) -> int:
    """Run this rank's parts; returns the number of images embedded."""
    batches = make_batches(parts, int(cfg.embed.batch_size))
    squares = [Square(main.resolution, main.resize_ratio)]
    if copy is not None:
        squares.append(Square(copy.resolution, copy.resize_ratio))
    workers = resolve_workers(cfg.workers)
    if workers:  # ranks on one host share its cores
        workers = max(1, workers // int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world)))
    remaining = {p.index: -(-len(p.rows) // int(cfg.embed.batch_size)) for p in parts}
    pending: dict[int, dict] = {p.index: {"ids": [], "main": [], "copy": [], "failed": []} for p in parts}
    names = {p.index: p.name for p in parts}
    done = 0
    total = sum(len(p.rows) for p in parts)
    bar = tqdm(
        total=total,
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
                _finish_part(
                    out, names[item["part"]], pending.pop(item["part"]), main, copy, fingerprints[item["part"]]
                )
    return done


def _finish_part(out: Path, name: str, acc: dict, main, copy, fingerprint: str) -> None:
    ids = np.concatenate(acc["ids"]) if acc["ids"] else np.zeros(0, dtype=np.int64)
    write_part(out, name, ids, np.concatenate(acc["main"]) if acc["main"] else np.zeros((0, main.dim), np.float32))
    if copy is not None:
        vectors = np.concatenate(acc["copy"]) if acc["copy"] else np.zeros((0, copy.dim), np.float32)
        write_part(out / COPY, name, ids, vectors)
    for image_id, reason in acc["failed"]:
        log.warning("embed: image id %d could not be decoded, left out: %s", image_id, reason)
    failed = [{"id": int(i), "error": reason} for i, reason in acc["failed"]]
    atomic_write_json(out / f"done-{name}.json", {"fingerprint": fingerprint, "rows": int(len(ids)), "failed": failed})


def _summary(out: Path, parts: list[Part], frame: pd.DataFrame) -> dict:
    failed = []
    for part in parts:
        failed += json.loads((out / f"done-{part.name}.json").read_text())["failed"]
    failed_ids = {f["id"] for f in failed}
    embedded = frame[~frame["id"].isin(failed_ids)]
    return {
        "rows": int(len(embedded)),
        "failed": len(failed),
        "failed_examples": failed[:20],
        "counts": {str(k): int(v) for k, v in embedded.groupby("set").size().items()},
    }


def run_embed(cfg) -> Path:
    """Embed the manifest's ok rows into RUN/embed (and RUN/embed/copy); returns the folder."""
    started = time.time()
    run_dir = Path(cfg.run_dir)
    out = run_dir / STAGE
    ranks = join_ranks(cfg.embed.device)
    try:
        device = rank_device(cfg.embed.device, ranks)
        threads = model_threads(cfg.embed.threads, ranks)
        if device.type == "cpu" and (ranks.world > 1 or str(cfg.embed.threads) != "auto"):
            torch.set_num_threads(threads)  # ranks on one host share its cores
        frame = read_manifest(run_dir, status="ok")
        main, copy, choice = _build_embedders(cfg, device, embed_resolution(cfg.embed, frame), threads)
        info = main.info()
        info["weights"] = weights_record(cfg.embed.weights)
        copy_info = None
        if copy is not None:
            copy_info = {
                **copy.info(),
                "weights": weights_record(choice.weights),
                "name": choice.name,
                "space": choice.space,
            }
        hashes = dict((read_success(out) or {}).get("weights_sha1") or {})
        settings = settings_fingerprint(info, copy_info, cfg.embed.weights, choice.weights if choice else None, hashes)

        parts = plan_parts(frame, int(cfg.embed.part_size))
        fingerprints = {p.index: p.fingerprint(settings) for p in parts}
        overwrite = bool(cfg.get("overwrite", False))
        # New parts wait in STAGED until every rank has finished; then rank 0 moves them into place
        # together, so a failed or interrupted run leaves the last finished embeddings as they were
        # (and a rerun with the same settings resumes from the parts it staged).
        staging = out / STAGED
        with_copy = copy is not None
        fresh = [p for p in parts if overwrite or not part_done(out, p, fingerprints[p.index], with_copy)]
        staged = [p for p in fresh if not overwrite and part_done(staging, p, fingerprints[p.index], with_copy)]
        todo = [p for p in fresh if p not in staged]
        stale = any(
            int(f.stem.split("-", 1)[1]) >= len(parts)
            for f in out.glob("done-*.json")
            if f.stem.split("-", 1)[1].isdigit()
        )
        if not fresh and not stale and is_done(out) and (copy is None or is_done(out / COPY)):
            log.info("embed: %d parts up to date, nothing to do", len(parts))
            return out
        if ranks.rank == 0:
            for folder in (out, out / COPY, staging, staging / COPY) if with_copy else (out, staging):
                folder.mkdir(parents=True, exist_ok=True)
                remove_stale_temps(folder)
            save_config(cfg, run_dir)
        ranks.barrier()
        mine = todo[ranks.rank :: ranks.world]
        log.info(
            "embed: %d parts, %d to (re)do, %d on rank %d/%d; %s on %s, %s, %d px",
            len(parts),
            len(todo),
            len(mine),
            ranks.rank,
            ranks.world,
            info["model"],
            device,
            info["dtype"],
            info["resolution"],
        )
        embedded = _embed_parts(mine, cfg, main, copy, staging, fingerprints, ranks)
        ranks.barrier()
        if ranks.rank == 0:  # every rank's parts are staged: commit them together
            clear_success(out / COPY)
            commit_staged_parts(out, staged_part_files([p.name for p in fresh], with_copy))
            remove_parts_beyond(out, len(parts))
            seconds = time.time() - started
            summary = _summary(out, parts, frame)
            if copy_info is not None:  # the copy space on its own, for readers of embed/copy alone
                write_success(out / COPY, **copy_info, settings_fingerprint=settings, parts=len(parts), **summary)
            write_success(
                out,
                **info,
                copy_detection=copy_info,
                settings_fingerprint=settings,
                weights_sha1=hashes,
                parts=len(parts),
                parts_written=len(fresh),
                world_size=ranks.world,
                embedded_this_run_rank0=embedded,
                seconds=round(seconds, 3),
                **summary,
            )
            log.info(
                "embed: %d parts written in %.1f s (rank 0: %.1f img/s)",
                len(fresh),
                seconds,
                embedded / max(seconds, 1e-9),
            )
        ranks.barrier()
        return out
    finally:
        if ranks.owns_group:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """`python -m lvd.curate.embed CONFIG [key=value ...]`: the entry point for torchrun."""
    return torchrun_main(run_embed, "lvd.curate.embed", argv)


if __name__ == "__main__":
    sys.exit(main())
