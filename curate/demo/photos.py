"""The demo's photo part: real photos with planted web-style copies, curated in SSCD's space.

Fashion-MNIST at 28 px is outside what a copy-detection model was trained on (distinct items
sit at SSCD cosine 0.75-0.92), so the demo shows copy detection on the photos that installed
packages ship instead: some photos form an eval set, the others the pool, and the pool gets
edited copies of both (resize, crop, border, caption, greyscale, JPEG q30, rotation, and
pairs of them). The planted truth is written in the same form as the Fashion-MNIST part's, so
`curate.demo.quality` measures both the same way.

Whole photos, not tiles: tiles of one photo share its textures and, below SSCD's 288 px, lose
the detail copy detection needs (measured on 192 px tiles: JPEG q30 copies at 0.6 fell from
0.94 to 0.86 recall); `benchmarks/copy_detection.py` measures those hard negatives.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lvd.common.atomic import atomic_write_bytes, atomic_write_json
from lvd.curate.demo.photo_edits import COMBINATIONS, EDITS, apply_edits, encode, package_photos

EVAL_SET = "photo_test"
# The edits planted in the demo: each alone, and the pairs (the benchmark adds the triples).
DEMO_EDITS = tuple((name,) for name in EDITS) + tuple(c for c in COMBINATIONS if len(c) == 2)


def prepare_photo_demo(out: str | os.PathLike, seed: int = 0, eval_photos: int = 5, copies_per_photo: int = 2) -> Path:
    """Write OUT/data/{pool,eval/photo_test} and OUT/data/truth.json; returns the data folder."""
    data_dir = Path(out) / "data"
    truth_path = data_dir / "truth.json"
    params = dict(
        part="photos",
        seed=seed,
        eval_photos=eval_photos,
        copies_per_photo=copies_per_photo,
        edits=["+".join(e) for e in DEMO_EDITS],
    )
    if truth_path.is_file() and json.loads(truth_path.read_text()).get("params") == params:
        return data_dir
    photos = package_photos()
    rng = np.random.default_rng(seed)
    names = sorted(photos)
    order = [names[i] for i in rng.permutation(len(names))]
    eval_names, pool_names = sorted(order[:eval_photos]), sorted(order[eval_photos:])
    truth = {"params": params, "pool": {}, "near_dup_of": {}, "eval_copy_of": {}, "edits": {}}

    def plant(name: str, kind: str) -> list[str]:
        picks = rng.choice(len(DEMO_EDITS), size=copies_per_photo, replace=False)
        written = []
        for j, pick in enumerate(sorted(picks)):
            edits = DEMO_EDITS[int(pick)]
            copy = apply_edits(photos[name], edits, rng)
            file = f"{kind}-{j}-{'+'.join(edits)}-of-{name}.jpg"
            atomic_write_bytes(data_dir / "pool" / file, encode(copy.convert("RGB"), "JPEG", quality=90))
            truth["pool"][file] = "photo"
            truth["edits"][file] = "+".join(edits)
            written.append(file)
        return written

    for name in pool_names:
        atomic_write_bytes(data_dir / "pool" / f"{name}.png", encode(photos[name]))
        truth["pool"][f"{name}.png"] = "photo"
        for file in plant(name, "copy"):
            truth["near_dup_of"][file] = f"{name}.png"
    for name in eval_names:
        atomic_write_bytes(data_dir / "eval" / EVAL_SET / f"{name}.png", encode(photos[name]))
        for file in plant(name, "evalcopy"):
            truth["eval_copy_of"][file] = f"{name}.png"
    atomic_write_json(truth_path, truth)
    return data_dir
