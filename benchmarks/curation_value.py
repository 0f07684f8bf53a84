"""Does curation pay? On a long-tailed, duplicated pool, with three seeds per arm.

1. A long-tailed Fashion-MNIST pool (`curate.demo.longtail`: class shares falling 0.6x per rank,
   2 % of the images repeated 10-50 times) is curated by `lvd run` twice over one run folder:
   seedless (dedup, hierarchical k-means with resampling, balanced sample: Vo et al. 2024) and
   with seed sets (40 labelled images of each of trouser, sandal and bag: DINOv2's retrieval);
2. three arms, each written as shards: (a) a uniform random sample of the raw pool, (b) lvd's
   balanced sample, of the same size, (c) the retrieval around the seed classes;
3. the same tiny ViT (patch 4, 32 px) is pretrained on each arm with the same budget
   (iterations x batch) and recipe (benchmarks/pretrain_learns.py's), once per training seed;
4. every teacher is evaluated by weighted k-NN (k = 20) on the balanced Fashion-MNIST test set,
   bank = 1,000 train images per class: all classes, and per class.

Prints mean +- std over the seeds, so a difference can be told from noise.

`--settings` instead measures what the hierarchical k-means settings do to the balanced draw,
without pretraining: the long-tailed pool is embedded and deduplicated once (configs/
demo_longtail.yaml), then for each setting (resampling steps, resample size, iterations per level)
and each of `--settings-seeds` seeds, levels `--levels` are clustered and `--draw` images drawn
with equal shares per cluster; the figure is the share of the gap between the deduplicated pool's
class entropy and a uniform one that the draw closes (`curate.demo.longtail.entropy_gap_closed`).

Usage: python benchmarks/curation_value.py [--distinct 4000] [--iters 150] [--seeds 0 1 2] [--work DIR]
       python benchmarks/curation_value.py --settings [--levels 60 12] [--draw 600] [--settings-seeds 10]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from pretrain_learns import ARCH, OVERRIDES, features, train_config

from lvd.curate.cli import STAGES, run_stage
from lvd.curate.config import load_config
from lvd.curate.demo.fashion_mnist import CLASSES, SEED_CLASSES, load_fashion_mnist
from lvd.curate.demo.longtail import class_histogram, entropy_gap_closed, prepare_longtail_pool
from lvd.curate.manifest import read_manifest
from lvd.curate.sources import iter_bytes
from lvd.pretrain.eval.knn import knn_scores
from lvd.pretrain.models import build_backbone
from lvd.pretrain.train import run_pretrain

K = 20


def write_seeds(folder: Path, fm: dict, exclude: set[int], per_class: int = 40, seed: int = 0) -> Path:
    """40 labelled train images per seed class, none of them in the pool."""
    rng = np.random.default_rng(seed)
    for cls in SEED_CLASSES:
        members = [
            i for i in rng.permutation(len(fm["train_y"])) if CLASSES[fm["train_y"][i]] == cls and i not in exclude
        ]
        for i in members[:per_class]:
            path = folder / cls / f"train-{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(fm["train_x"][i]).save(path)
    return folder


def curate(work: Path, distinct: int, balanced: int, n: int, fm: dict) -> dict[str, list[str]]:
    """Run the pipeline over the long-tailed pool; return the shard files of each curated arm."""
    run = work / "run"
    data = prepare_longtail_pool(run, distinct=distinct, seed=0)
    pool_index = set(json.loads((data / "truth.json").read_text())["train_index"])
    seeds = write_seeds(run / "data" / "seeds" / "fashion", fm, pool_index)
    common = [
        f"run_dir={run}",
        "progress=false",
        f"cluster.balanced_sample={balanced}",
        f"retrieve.n={n}",
        f"sources.seeds.fashion={seeds}",
    ]
    arms = {}
    for select in ("retrieve", "balanced"):
        cfg = load_config("demo_longtail", [*common, f"shards.select={select}"])
        for stage in STAGES:
            if stage != "report":
                run_stage(stage, cfg)
        folder = work / f"shards-{select}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(run / "shards", folder)
        arms[select] = sorted(str(p) for p in folder.glob("*.tar"))
    return arms


def random_arm(run: Path, count: int, out: Path, seed: int = 0) -> list[str]:
    """`count` images drawn uniformly from the raw pool (duplicates and all), as one tar."""
    pool = read_manifest(run, sets=["pool"])
    pick = pool.iloc[np.sort(np.random.default_rng(seed).choice(len(pool), size=count, replace=False))]
    out.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(out / "random-000000.tar")) as sink:
        for id_, data in iter_bytes(pick):
            sink.write({"__key__": f"{id_:019d}", "png": data})
    return [str(out / "random-000000.tar")]


def arm_classes(run: Path, shards: list[str]) -> dict[str, int]:
    """Class histogram of an arm, from the pool's source labels (for the table; training never sees them)."""
    labels = read_manifest(run, sets=["pool"]).set_index("id")["label"]
    keys = [int(s["__key__"]) for s in wds.WebDataset(shards, shardshuffle=False, empty_check=False)]
    return class_histogram(labels.reindex(keys).dropna())


def pretrain(run_dir: Path, shards: list[str], iters: int, seed: int) -> torch.nn.Module:
    shutil.rmtree(run_dir, ignore_errors=True)
    folders = {str(Path(s).parent) for s in shards}
    assert len(folders) == 1, "an arm's shards share one folder"
    cfg = train_config(run_dir, f"{folders.pop()}/*.tar", iters)
    cfg.data.batch_size_per_rank = 64
    cfg.seed = seed
    cfg.train.dtype = "float32"
    run_pretrain(cfg)
    return build_backbone(ARCH, weights=str(run_dir / "pretrain" / "teacher_backbone.pth"), **OVERRIDES)


def evaluate(model, bank_x, bank_y, test_x, test_y) -> dict:
    fb, ft = features(model, bank_x)["CLS"], features(model, test_x)["CLS"]
    pred = knn_scores(fb, bank_y, ft, ks=(K,), n_classes=len(CLASSES))[K].argmax(1)
    per_class = {CLASSES[c]: float((pred[test_y == c] == c).mean()) for c in range(len(CLASSES))}
    return {"all": float((pred == test_y).mean()), "per_class": per_class}


def hierarchical_settings(args) -> None:
    """The balanced draw's class-entropy gap closed, per hierarchical k-means setting (see the docstring)."""
    from lvd.curate.cluster import read_pool
    from lvd.index.hierarchical import balanced_sample, hierarchical_kmeans

    run = Path(args.work) / "settings"
    prepare_longtail_pool(run, distinct=args.distinct, seed=0)
    cfg = load_config("demo_longtail", [f"run_dir={run}", "progress=false"])
    for stage in ("manifest", "embed", "dedup"):
        run_stage(stage, cfg)
    _, ids, view = read_pool(run)
    x = np.asarray(view, np.float32)
    labels = read_manifest(run, sets=["pool"]).set_index("id")["label"].reindex(ids).to_numpy()
    ks = list(args.levels)
    inputs = [len(x), *ks[:-1]]
    mean = [n // k for n, k in zip(inputs, ks)]
    half = [max(1, m // 2) for m in mean]
    settings = {
        "no resampling, 20 iterations": (0, mean, 20),
        "no resampling, 50 iterations": (0, mean, 50),
        "10 steps of the mean size, 20 it.": (10, mean, 20),
        "10 steps of the mean size, 50 it.": (10, mean, 50),
        "10 steps of half the mean, 20 it.": (10, half, 20),
        "10 steps of half the mean, 50 it. (paper)": (10, half, 50),
        "configs/demo_longtail.yaml": (cfg.cluster.resample_steps, cfg.cluster.resample_size, cfg.cluster.niter),
    }
    print(
        f"deduplicated pool: {len(x)} images, class entropy gap to uniform closed by a balanced draw of "
        f"{args.draw}, levels {ks} (mean cluster sizes {mean}), spherical {cfg.cluster.spherical}, "
        f"seeds 0..{args.settings_seeds - 1}"
    )
    print(f"{'setting':44s} {'gap closed (%)':>16s} {'seconds':>8s}")
    for name, (steps, size, niter) in settings.items():
        t0, gaps = time.time(), []
        for seed in range(args.settings_seeds):
            hierarchy = hierarchical_kmeans(
                x,
                ks,
                niter=int(niter),
                resampling_steps=steps,
                sample_size=size,
                seed=seed,
                spherical=bool(cfg.cluster.spherical),
            )
            picked = balanced_sample(hierarchy, args.draw, seed=seed)
            gaps.append(entropy_gap_closed(labels, labels[picked]))
        spread = np.std(gaps, ddof=1) if len(gaps) > 1 else 0.0
        cell = f"{100 * np.mean(gaps):5.1f} ± {100 * spread:4.1f}"
        print(f"{name:44s} {cell:>16s} {(time.time() - t0) / len(gaps):8.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--distinct", type=int, default=4000, help="distinct Fashion-MNIST images in the long-tailed pool")
    ap.add_argument("--balanced", type=int, default=1500, help="size of the balanced sample and of the random arm")
    ap.add_argument("--n", type=int, default=16, help="neighbours retrieved per seed image")
    ap.add_argument("--iters", type=int, default=150, help="pretraining iterations (batch 64) for each model")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", default="/tmp/lvd-bench-curation-value")
    ap.add_argument("--settings", action="store_true", help="compare hierarchical k-means settings (no pretraining)")
    ap.add_argument("--levels", type=int, nargs="+", default=[60, 12], help="--settings: clusters per level")
    ap.add_argument("--draw", type=int, default=600, help="--settings: images drawn")
    ap.add_argument("--settings-seeds", type=int, default=10)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.settings:
        hierarchical_settings(args)
        return
    work = Path(args.work)
    started = time.time()
    fm = load_fashion_mnist()
    arms = curate(work, args.distinct, args.balanced, args.n, fm)
    arms = {
        "(a) random sample": random_arm(work / "run", args.balanced, work / "shards-random"),
        "(b) balanced (seedless)": arms["balanced"],
        "(c) retrieval (3 seed classes)": arms["retrieve"],
    }
    print(f"curation: {time.time() - started:.0f} s")
    pool_hist = class_histogram(read_manifest(work / "run", sets=["pool"])["label"])
    order = sorted(CLASSES, key=lambda c: -pool_hist[c])
    print("class shares (%) of the pool and of each arm, largest pool class first:")
    print(f"{'':32s} {'images':>6s} " + " ".join(f"{c[:7]:>7s}" for c in order))
    for name, hist in [("raw pool", pool_hist)] + [(n, arm_classes(work / "run", s)) for n, s in arms.items()]:
        total = sum(hist.values())
        print(f"{name:32s} {total:6d} " + " ".join(f"{100 * hist[c] / total:7.1f}" for c in order))

    rng = np.random.default_rng(0)
    bank = np.concatenate(
        [rng.choice(np.flatnonzero(fm["train_y"] == c), 1000, replace=False) for c in range(len(CLASSES))]
    )
    bank_x, bank_y = fm["train_x"][bank], fm["train_y"][bank]
    test_x, test_y = fm["test_x"], fm["test_y"]
    results: dict[str, list[dict]] = {}
    t0 = time.time()
    for seed in args.seeds:
        torch.manual_seed(seed)
        results.setdefault("random init", []).append(
            evaluate(build_backbone(ARCH, **OVERRIDES), bank_x, bank_y, test_x, test_y)
        )
        for name, shards in arms.items():
            model = pretrain(work / f"train-{name[1]}-{seed}", shards, args.iters, seed)
            results.setdefault(name, []).append(evaluate(model, bank_x, bank_y, test_x, test_y))
            print(f"seed {seed} {name}: {100 * results[name][-1]['all']:.2f} % ({time.time() - t0:.0f} s)", flush=True)

    def cell(values):
        v = 100 * np.asarray(values)
        return f"{v.mean():5.1f}±{v.std(ddof=1) if len(v) > 1 else 0.0:4.1f}"

    rare = order[-3:]
    print(
        f"\nweighted {K}-NN top-1 (%) on the 10,000 balanced test images, mean ± std over seeds {args.seeds}; "
        f"{args.iters} iterations x 64 images each; rare = the 3 smallest pool classes ({', '.join(rare)})"
    )
    print(f"{'model':32s} {'all':>10s} {'rare':>10s} " + " ".join(f"{c[:9]:>10s}" for c in order))
    for name, runs in results.items():
        rare_acc = [np.mean([r["per_class"][c] for c in rare]) for r in runs]
        print(
            f"{name:32s} {cell([r['all'] for r in runs]):>10s} {cell(rare_acc):>10s} "
            + " ".join(f"{cell([r['per_class'][c] for r in runs]):>10s}" for c in order)
        )
    (work / "result.json").write_text(
        json.dumps({"args": vars(args), "results": results, "pool_classes": pool_hist}, indent=2)
    )
    print(f"total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
