"""What of an index may leave the server: its layout on disk stays inside unless the operator allows it.

Absolute paths tell a visitor how the server's disk is laid out (user names, mount points,
where the weights live). Responses therefore carry paths relative to an image's source, file
names instead of absolute paths, and error messages with absolute paths cut to their last part;
`--expose-paths` lifts this for a trusted network.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

# an absolute POSIX path of two or more parts inside a message: "/srv/data/x.jpg"
_ABSOLUTE = re.compile(r"(?<![\w.~/-])/(?:[^\s'\"/:]+/)+([^\s'\"/:]*)")


def scrub(message: str) -> str:
    """A message with every absolute path replaced by `…/NAME`."""
    return _ABSOLUTE.sub(lambda m: "…/" + m.group(1), message)


def public_key(key: str | None) -> str | None:
    """An image's key as a visitor may see it: relative keys as they are, absolute ones by file name."""
    if key is None:
        return None
    path = PurePosixPath(key)
    return path.name if path.is_absolute() or ".." in path.parts else key


def public_info(info: dict) -> dict:
    """info.json without the folders it was built from and with the weights' file name only."""
    out = {k: v for k, v in info.items() if k != "sources"}
    out["sources"] = [{"parts": len(s.get("parts", []))} for s in info.get("sources", [])]
    embedder = dict(info.get("embedder") or {})
    weights = embedder.get("weights")
    if isinstance(weights, str) and "://" not in weights:
        embedder["weights"] = PurePosixPath(weights).name
    out["embedder"] = embedder
    return out
