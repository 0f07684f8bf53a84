"""Which pool images go on to embed, decided from the detect stage's boxes (`filter.require` / `filter.exclude`).

Users keep only images that show what they train for and drop images that show what they must
not ship (faces, watermarks, text). A box matches a rule when its phrase contains one of the
rule's phrases as whole words (Grounding DINO's phrases are runs of prompt tokens, so a prompt
"a dog . a cat ." gives phrases such as "dog" or "a dog"), its score is at least `min_score` and
its area is at least `min_area` of its image. `require` keeps the images with a matching box,
`exclude` drops those with one; an empty phrase list turns a rule off.

`kept_ids` is the rule on plain arrays (tested against planted boxes); `filter_pool` applies it
to the manifest rows the embed stage is about to embed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from lvd.common.errors import MissingInputError

log = logging.getLogger(__name__)

_WORDS = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Rule:
    phrases: tuple[str, ...]
    min_score: float = 0.0
    min_area: float = 0.0

    @classmethod
    def from_config(cls, node) -> Rule | None:
        """The rule of `filter.require` or `filter.exclude`; None when its phrase list is empty."""
        phrases = tuple(str(p) for p in (node.phrases or []))
        return cls(phrases, float(node.min_score), float(node.min_area)) if phrases else None


def words(text: str) -> tuple[str, ...]:
    return tuple(_WORDS.findall(str(text).lower()))


def phrase_matches(phrase: str, wanted: str) -> bool:
    """`wanted`'s words appear, in order and adjacent, among `phrase`'s words."""
    have, want = words(phrase), words(wanted)
    if not want:
        return False
    return any(have[i : i + len(want)] == want for i in range(len(have) - len(want) + 1))


def box_area_fraction(boxes: np.ndarray, widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """Area of each [x0, y0, x1, y1] box over the area of its image."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    return area / np.maximum(np.asarray(widths, np.float64) * np.asarray(heights, np.float64), 1.0)


def matching_ids(detections: pd.DataFrame, rule: Rule) -> np.ndarray:
    """Sorted unique ids of the images with at least one box matching `rule`.

    `detections`: one row per box with id, box (4 numbers), score, phrase, width, height.
    """
    if detections.empty:
        return np.zeros(0, dtype=np.int64)
    phrases = detections["phrase"].astype(str).to_numpy()
    unique = pd.unique(phrases)
    hits = {p for p in unique if any(phrase_matches(p, w) for w in rule.phrases)}
    by_phrase = np.isin(phrases, list(hits))
    boxes = np.stack([np.asarray(b, dtype=np.float64) for b in detections["box"]])
    area = box_area_fraction(boxes, detections["width"].to_numpy(), detections["height"].to_numpy())
    match = by_phrase & (detections["score"].to_numpy(np.float64) >= rule.min_score) & (area >= rule.min_area)
    return np.unique(detections["id"].to_numpy(np.int64)[match])


def kept_ids(pool_ids, detections: pd.DataFrame, require: Rule | None, exclude: Rule | None) -> np.ndarray:
    """The pool ids that pass both rules, in the order given."""
    pool_ids = np.asarray(pool_ids, dtype=np.int64)
    keep = np.ones(len(pool_ids), dtype=bool)
    if require is not None:
        keep &= np.isin(pool_ids, matching_ids(detections, require))
    if exclude is not None:
        keep &= ~np.isin(pool_ids, matching_ids(detections, exclude))
    return pool_ids[keep]


def filter_rules(cfg) -> tuple[Rule | None, Rule | None]:
    return Rule.from_config(cfg.filter.require), Rule.from_config(cfg.filter.exclude)


def filter_active(cfg) -> bool:
    return any(rule is not None for rule in filter_rules(cfg))


def filter_pool(cfg, run_dir, frame: pd.DataFrame, manifest_content: str | None) -> pd.DataFrame:
    """The manifest rows `frame` without the pool images the rules drop (other sets untouched).

    The detections must come from this manifest (`manifest_content`, the embed stage's view of
    it): boxes found for another manifest would silently drop new images."""
    from lvd.common.run_folder import read_success, stage_dir
    from lvd.curate.detect import POOL, STAGE, read_detections

    require, exclude = filter_rules(cfg)
    record = read_success(stage_dir(run_dir, STAGE)) or {}
    if record.get("manifest_content") != manifest_content:
        raise MissingInputError(
            f"the detections in {stage_dir(run_dir, STAGE)} were made for another manifest: run `lvd detect` again "
            "before embedding with filter.require / filter.exclude"
        )
    pool = frame["set"].to_numpy() == POOL
    kept = kept_ids(frame["id"].to_numpy(np.int64)[pool], read_detections(run_dir), require, exclude)
    keep = ~pool | np.isin(frame["id"].to_numpy(np.int64), kept)
    log.info("filter: %d of %d pool images go on to embed", len(kept), int(pool.sum()))
    return frame[keep].reset_index(drop=True)


__all__ = ["Rule", "box_area_fraction", "filter_active", "filter_pool", "kept_ids", "matching_ids", "phrase_matches"]
