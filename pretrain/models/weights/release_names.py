"""Meta's release file names -> registry names, so that `model: auto` works on a hub `.pth`.

The file names are in the registry (`ModelSpec.weights_file`); a copy may have lost its hash
suffix (`-8aa4cbdd`) or be DINO's full training checkpoint (`_full_checkpoint`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_HASH = re.compile(r"-[0-9a-f]{8}$")


def _stem(filename: str) -> str:
    stem = Path(filename).name.lower()
    stem = stem[: -len(".pth")] if stem.endswith(".pth") else stem
    stem = _HASH.sub("", stem)
    return stem[: -len("_full_checkpoint")] if stem.endswith("_full_checkpoint") else stem


def name_from_release_file(path: str | os.PathLike) -> str | None:
    """The registry name of a file named as Meta released it, or None."""
    from lvd.pretrain.models.registry import all_specs

    stem = _stem(os.fspath(path))
    for spec in all_specs():
        if spec.weights_file and _stem(spec.weights_file) == stem:
            return spec.name
    return None
