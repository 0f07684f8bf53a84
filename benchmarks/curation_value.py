"""Does curation pay? The DINOv2 paper's claim in miniature, on Fashion-MNIST.

1. `lvd run configs/demo.yaml` curates a Fashion-MNIST pool for three seed classes (trouser,
   sandal, bag: 40 labelled seed images each) and writes the retrieved images as shards;
2. a random sample of the same uncurated pool, of the same size, is written as shards too;
3. the same tiny ViT (patch 4, 32 px) is pretrained on each for the same number of
   iterations with the same recipe (benchmarks/pretrain_learns.py's);
4. both teachers (and the random-init model) are evaluated by weighted k-NN on those three
   classes: bank = their Fashion-MNIST train images, queries = their test images.

Usage: python benchmarks/curation_value.py [--pool 6000] [--iters 120] [--work DIR]
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

from lvd.curate.cli import STAGES, run_stage
from lvd.curate.config import load_config
from lvd.curate.demo_data import CLASSES, SEED_CLASSES, load_fashion_mnist, prepare_demo_data
from lvd.curate.manifest import read_manifest
from lvd.curate.sources import iter_bytes
from lvd.pretrain.models import build_backbone
from lvd.pretrain.train import run_pretrain
from pretrain_learns import ARCH, OVERRIDES, features, knn_table, train_config


def curated_run(work: Path, pool: int, n: int) -> tuple[Path, int]:
    run = work / "curated"
    prepare_demo_data(run, pool_size=pool, eval_size=1000, seed=0)
    cfg = load_config("demo", [f"run_dir={run}", f"retrieve.n={n}", "progress=false"])
    for stage in STAGES:
        if stage != "report":
            run_stage(stage, cfg)
    samples = sum(1 for _ in wds.WebDataset(sorted(str(p) for p in (run / "shards").glob("*.tar")), shardshuffle=False, empty_check=False))
    return run, samples


def random_shards(curated: Path, count: int, out: Path, seed: int = 0) -> str:
    """The same number of images drawn uniformly from the uncurated pool, as one tar."""
    pool = read_manifest(curated, sets=["pool"])
    pick = pool.iloc[np.sort(np.random.default_rng(seed).choice(len(pool), size=count, replace=False))]
    out.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(out / "random-000000.tar")) as sink:
        for id_, data in iter_bytes(pick):
            sink.write({"__key__": f"{id_:019d}", "png": data})
    return str(out / "random-000000.tar")


def pretrain(run_dir: Path, shards: str, iters: int) -> torch.nn.Module:
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = train_config(run_dir, shards, iters)
    cfg.data.batch_size_per_rank = 64
    run_pretrain(cfg)
    return build_backbone(ARCH, weights=str(run_dir / "pretrain" / "teacher_backbone.pth"), **OVERRIDES)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pool", type=int, default=6000, help="Fashion-MNIST train images in the pool")
    ap.add_argument("--n", type=int, default=12, help="neighbours retrieved per seed image")
    ap.add_argument("--iters", type=int, default=120, help="pretraining iterations (batch 64) for each model")
    ap.add_argument("--work", default="/tmp/lvd-bench-curation-value")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    work = Path(args.work)
    started = time.time()
    curated, count = curated_run(work, args.pool, args.n)
    print(f"curated: {count} images retrieved for {', '.join(SEED_CLASSES)} ({time.time() - started:.0f} s)")
    rand = random_shards(curated, count, work / "random-shards")

    fm = load_fashion_mnist()
    wanted = [CLASSES.index(c) for c in SEED_CLASSES]
    tr = np.isin(fm["train_y"], wanted)
    te = np.isin(fm["test_y"], wanted)
    bank_x, bank_y = fm["train_x"][tr][:6000], fm["train_y"][tr][:6000]
    test_x, test_y = fm["test_x"][te], fm["test_y"][te]

    torch.manual_seed(0)
    models = {"random init": build_backbone(ARCH, **OVERRIDES)}
    t0 = time.time()
    n_tars = len(list((curated / "shards").glob("curated-*.tar")))
    curated_shards = str(curated / "shards") + "/curated-{000000..%06d}.tar" % (n_tars - 1)
    models["pretrained on curated shards"] = pretrain(work / "run-curated", curated_shards, args.iters)
    models["pretrained on a random pool sample"] = pretrain(work / "run-random", rand, args.iters)
    print(f"pretraining: 2 x {args.iters} iterations of 64 images in {time.time() - t0:.0f} s")

    results = {}
    print(f"weighted k-NN top-1 on the {len(test_x)} test images of {', '.join(SEED_CLASSES)} (bank: {len(bank_x)} train images)")
    print(f"{'model':38s} {'feature':10s} " + " ".join(f"k={k:<5d}" for k in (10, 20, 100, 200)))
    for name, model in models.items():
        feats_bank, feats_test = features(model, bank_x), features(model, test_x)
        for feat in ("CLS", "mean patch"):
            table = knn_table(feats_bank[feat], bank_y, feats_test[feat], test_y)
            results[f"{name} / {feat}"] = table
            print(f"{name:38s} {feat:10s} " + " ".join(f"{100 * table[k]:6.2f}" for k in (10, 20, 100, 200)))
    (work / "result.json").write_text(json.dumps({"curated_images": count, "iters": args.iters, "results": {k: {str(kk): v for kk, v in t.items()} for k, t in results.items()}}, indent=2))


if __name__ == "__main__":
    main()
