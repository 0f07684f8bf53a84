"""The demo's photo part: real photos from Debian packages, with planted web-style copies, curated in SSCD's space.

Fashion-MNIST at 28 px is outside what a copy-detection model was trained on (distinct items
sit at SSCD cosine 0.75-0.92), so the demo shows copy detection on photos that Debian ships:
`opencv-doc`'s example images (Apache 2.0 / BSD: 91 files, photos, renderings, scans and logos,
among them stereo pairs, video frames and edited copies that OpenCV's samples use) and `scratch`'s
stage backgrounds (CC BY-SA: 74 photos and drawings). `make demo` and `make system-deps`
install both (`apt-get install --no-install-recommends opencv-doc scratch`).

Some photos form an eval set, the others the pool, each with its files' own bytes, and the pool
gets edited copies of both (resize, crop, border, caption, greyscale, JPEG q30, rotation, and
pairs of them). The planted truth is written in the same form as the Fashion-MNIST part's, so
`curate.demo.quality` measures both the same way, plus the pairs the packages hold already
(`PACKAGE_PAIRS`: the same scene or the same picture twice), which count as true
near-duplicates; eval photos are drawn from photos outside those pairs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from lvd.common.atomic import atomic_write_bytes, atomic_write_json
from lvd.curate.demo.photo_edits import COMBINATIONS, EDITS, MissingPhotosError, apply_edits, encode

EVAL_SET = "photo_test"
# The edits planted in the demo: each alone, and the pairs (the benchmark adds the triples).
DEMO_EDITS = tuple((name,) for name in EDITS) + tuple(c for c in COMBINATIONS if len(c) == 2)
# Debian package -> (folder of its photos, searched recursively?)
PHOTO_PACKAGES = {
    "opencv-doc": ("/usr/share/doc/opencv-doc/examples/data", False),
    "scratch": ("/usr/share/scratch/Media/Backgrounds", True),
}
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif")
# Pairs the packages hold themselves, by demo name: stereo views, consecutive video frames, two
# exposures or viewpoints of one scene, an edited copy, a logo in two colours.
PACKAGE_PAIRS = (
    *((f"opencv-left{i:02d}", f"opencv-right{i:02d}") for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14)),
    ("opencv-left", "opencv-right"),
    ("opencv-aloeL", "opencv-aloeR"),
    ("opencv-basketball1", "opencv-basketball2"),
    ("opencv-rubberwhale1", "opencv-rubberwhale2"),
    ("opencv-Blender_Suzanne1", "opencv-Blender_Suzanne2"),
    ("opencv-aero1", "opencv-aero3"),
    ("opencv-graf1", "opencv-graf3"),
    ("opencv-leuvenA", "opencv-leuvenB"),
    ("opencv-ela_original", "opencv-ela_modified"),
    ("opencv-imageTextN", "opencv-imageTextR"),
    ("opencv-opencv-logo", "opencv-opencv-logo-white"),
    ("scratch-Sports-basketball-court1-a", "scratch-Sports-basketball-court1-b"),
    ("scratch-Outdoors-night-city", "scratch-Outdoors-night-city-with-street"),
    ("scratch-Outdoors-city-with-water", "scratch-Outdoors-city-with-water2"),
)


def package_photo_files() -> dict[str, Path]:
    """Demo name (package, sub-folder, file stem) -> photo file of the installed Debian packages."""
    files: dict[str, Path] = {}
    missing = []
    for package, (folder, recursive) in PHOTO_PACKAGES.items():
        root = Path(folder)
        if not root.is_dir():
            missing.append(package)
            continue
        found = root.rglob("*") if recursive else root.glob("*")
        for path in sorted(p for p in found if p.is_file() and p.suffix.lower() in PHOTO_EXTENSIONS):
            parts = [package.split("-")[0], *path.relative_to(root).with_suffix("").parts]
            files["-".join(parts)] = path
    if missing:
        raise MissingPhotosError(
            f"the photo part needs the Debian packages {' and '.join(missing)} "
            f"(`apt-get install --no-install-recommends {' '.join(missing)}`, or `make system-deps` as root)"
        )
    return files


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        img.seek(0)  # an animation's first frame, as the manifest takes it
        return img.convert("RGBA").convert("RGB") if img.mode in ("P", "LA", "RGBA") else img.convert("RGB")


def prepare_photo_demo(
    out: str | os.PathLike,
    seed: int = 0,
    eval_photos: int = 5,
    copies_per_photo: int = 2,
    photos: list[str] | None = None,
) -> Path:
    """Write OUT/data/{pool,eval/photo_test} and OUT/data/truth.json; returns the data folder.
    `photos` names the package photos to use (default: all of them)."""
    data_dir = Path(out) / "data"
    truth_path = data_dir / "truth.json"
    files = package_photo_files()
    names = sorted(files if photos is None else photos)
    params = dict(
        part="photos",
        photos=names,
        seed=seed,
        eval_photos=eval_photos,
        copies_per_photo=copies_per_photo,
        edits=["+".join(e) for e in DEMO_EDITS],
    )
    if truth_path.is_file() and json.loads(truth_path.read_text()).get("params") == params:
        return data_dir
    for folder in ("pool", "eval"):  # another selection's files must not stay in the pool
        shutil.rmtree(data_dir / folder, ignore_errors=True)
    rng = np.random.default_rng(seed)
    paired = {name for pair in PACKAGE_PAIRS for name in pair}
    candidates = [n for n in names if n not in paired]
    eval_names = sorted(candidates[i] for i in rng.permutation(len(candidates))[:eval_photos])
    pool_names = [n for n in names if n not in eval_names]
    file_of = {name: f"{name}{files[name].suffix.lower()}" for name in names}
    truth = {
        "params": params,
        "pool": {},
        "near_dup_of": {},
        "eval_copy_of": {},
        "edits": {},
        "package_pairs": [[file_of[a], file_of[b]] for a, b in PACKAGE_PAIRS if a in pool_names and b in pool_names],
    }

    def plant(name: str, kind: str) -> list[str]:
        picks = rng.choice(len(DEMO_EDITS), size=copies_per_photo, replace=False)
        photo = _rgb(files[name])
        written = []
        for j, pick in enumerate(sorted(picks)):
            edits = DEMO_EDITS[int(pick)]
            file = f"{kind}-{j}-{'+'.join(edits)}-of-{name}.jpg"
            atomic_write_bytes(data_dir / "pool" / file, encode(apply_edits(photo, edits, rng), "JPEG", quality=90))
            truth["pool"][file] = "photo"
            truth["edits"][file] = "+".join(edits)
            written.append(file)
        return written

    for name in pool_names:
        atomic_write_bytes(data_dir / "pool" / file_of[name], files[name].read_bytes())
        truth["pool"][file_of[name]] = "photo"
        for file in plant(name, "copy"):
            truth["near_dup_of"][file] = file_of[name]
    for name in eval_names:
        atomic_write_bytes(data_dir / "eval" / EVAL_SET / file_of[name], files[name].read_bytes())
        for file in plant(name, "evalcopy"):
            truth["eval_copy_of"][file] = file_of[name]
    atomic_write_json(truth_path, truth)
    return data_dir
