"""Curation quality of a demo run, measured against the truth planted in its data.

near-duplicates : a planted pair (augmented copy, original) is found when both land in one
                  component of dedup/near.parquet; a removed image is a true positive when its
                  component holds another image of the same origin (its original, or another
                  copy of that original or of the same eval image, or the other half of a pair
                  the data held already: `package_pairs` of the photo part), and every other
                  removal counts as a false positive (a lower bound: Fashion-MNIST has real
                  look-alikes too); the components that join originals (not planted copies) are
                  listed, found pairs the data held or not;
decontamination : a planted copy of an eval image is found when decontam.parquet pairs it with
                  that eval image; precision is over all removed pool images;
retrieval       : per seed class, the share of retrieved images (credited to their most similar
                  seed) whose true class is the seed's class.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from lvd.common.run_folder import dedup_frame, read_manifest, read_neighbors


def _ids(manifest: pd.DataFrame) -> dict[tuple[str, str], int]:
    return {(s, k): int(i) for s, k, i in zip(manifest["set"], manifest["key"], manifest["id"])}


def near_duplicate_quality(run_dir: Path, truth: dict, ids: dict) -> dict:
    near = dedup_frame(run_dir, "near")
    component = dict(zip(near["id"].astype(int), near["component"].astype(int)))

    def together(a_key: str, b_key: str) -> bool:
        a, b = ids.get(("pool", a_key)), ids.get(("pool", b_key))
        return a is not None and b is not None and a in component and component.get(a) == component.get(b)

    found = sum(together(copy, original) for copy, original in truth["near_dup_of"].items())
    pairs = truth.get("package_pairs", [])
    origin = {key: key for key in truth["pool"]}
    origin.update({b: a for a, b in pairs})  # a pair the data held is one origin
    origin.update({copy: origin.get(original, original) for copy, original in truth["near_dup_of"].items()})
    origin.update({copy: f"eval:{original}" for copy, original in truth["eval_copy_of"].items()})
    key_of = {i: key for (set_name, key), i in ids.items() if set_name == "pool"}
    near["key"] = [key_of.get(int(i)) for i in near["id"]]
    near["origin"] = [origin.get(key, f"unknown:{i}") for key, i in zip(near["key"], near["id"])]
    shared = near.groupby(["component", "origin"])["id"].transform("size") > 1
    removed = ~near["keep"]
    planted = len(truth["near_dup_of"])
    copies = set(truth["near_dup_of"]) | set(truth["eval_copy_of"])
    originals = near[near["key"].notna() & ~near["key"].isin(copies)]
    joined = [sorted(group) for _, group in originals.groupby("component")["key"] if len(group) > 1]
    return {
        "planted_pairs": planted,
        "pairs_found": found,
        "recall": found / planted if planted else None,
        "removed": int(removed.sum()),
        "precision": float((removed & shared).sum() / removed.sum()) if removed.any() else None,
        "data_pairs": len(pairs),
        "data_pairs_found": sum(together(a, b) for a, b in pairs),
        "originals_joined": sorted(joined),
    }


def decontamination_quality(run_dir: Path, truth: dict, ids: dict, eval_set: str) -> dict:
    pairs = dedup_frame(run_dir, "decontam")
    found_pairs = set(zip(pairs["id"].astype(int), pairs["eval_id"].astype(int)))
    hits, planted_ids = 0, set()
    for copy, original in truth["eval_copy_of"].items():
        a, b = ids.get(("pool", copy)), ids.get((f"eval:{eval_set}", original))
        planted_ids.add(a)
        hits += (a, b) in found_pairs
    removed = set(pairs["id"].astype(int))
    planted = len(truth["eval_copy_of"])
    return {
        "planted_copies": planted,
        "found": hits,
        "recall": hits / planted if planted else None,
        "removed": len(removed),
        "precision": len(removed & planted_ids) / len(removed) if removed else None,
    }


def retrieval_quality(run_dir: Path, truth: dict, manifest: pd.DataFrame) -> dict:
    neighbors = read_neighbors(run_dir)
    neighbors = neighbors[neighbors["mode"] != "seed"]
    by_id = manifest.set_index("id")
    best = neighbors.sort_values("similarity", ascending=False, kind="stable").drop_duplicates("id")
    out = {}
    for row in best.itertuples():
        seed_class = by_id.at[row.seed_id, "label"]
        true_class = truth["pool"].get(by_id.at[row.id, "key"])
        stats = out.setdefault(seed_class, {"retrieved": 0, "correct": 0})
        stats["retrieved"] += 1
        stats["correct"] += int(true_class == seed_class)
    for stats in out.values():
        stats["precision"] = stats["correct"] / stats["retrieved"] if stats["retrieved"] else None
    return dict(sorted(out.items()))


def measure(run_dir: str | Path, eval_set: str = "fmnist_test") -> dict:
    """Every figure that the finished stages of a demo run allow."""
    run_dir = Path(run_dir)
    truth = json.loads((run_dir / "data" / "truth.json").read_text())
    manifest = read_manifest(run_dir, status=None)
    ids = _ids(manifest)
    result = {}
    if (run_dir / "dedup" / "near.parquet").is_file():
        result["near_duplicates"] = near_duplicate_quality(run_dir, truth, ids)
        result["decontamination"] = decontamination_quality(run_dir, truth, ids, eval_set)
    if (run_dir / "retrieve" / "neighbors.parquet").is_file():
        result["retrieval_by_class"] = retrieval_quality(run_dir, truth, manifest)
    return result
