"""Query arithmetic: a weighted sum of image, text, embedding and indexed-id parts, normalised.

rclip-style queries ("+image -text": this photo, without people) and clip-retrieval's
embedding arithmetic both add unit vectors of one space: each part is embedded (an image or a
text by the index's own model, an embedding as given, an indexed id by its stored vector), made
unit length, weighted, summed, and the sum made unit length again before the search. A sum
that cancels out is refused rather than searched.

On the command line a query is written as terms `[+|-][WEIGHT] KIND:VALUE`, e.g.
`"+0.7 image:a.jpg +0.3 text:snow -0.2 text:people"`: every term after the first starts with
its sign, and a value runs until the next term (so texts may hold spaces). In the HTTP API it is
a JSON list of `{"weight": W, KIND: VALUE}` objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from lvd.common.errors import InputFormatError

KINDS = ("image", "text", "embedding", "id")
# the shell's spellings: `vector:` names an .npy file holding an embedding
_TERM = re.compile(
    r"(?:^|\s+)([+\-\u2212]?)\s*(\d+(?:\.\d*)?|\.\d+)?\s*(image|text|embedding|vector|id):", re.IGNORECASE
)
MAX_PARTS = 16


@dataclass(frozen=True)
class QueryPart:
    """One term of a query: its weight, its kind (image, text, embedding, id) and its value
    (image bytes or a file path, text, a vector, an id)."""

    weight: float
    kind: str
    value: object


def parse_query(text: str) -> list[QueryPart]:
    """`+0.7 image:a.jpg +0.3 text:snow -0.2 text:people` -> parts (values as written)."""
    text = text.strip()
    terms = [m for m in _TERM.finditer(text) if m.start() == 0 or m.group(1)]
    if not terms or terms[0].start() != 0:
        raise InputFormatError(
            f"cannot read the query {text!r}: write terms like '+0.7 image:a.jpg +0.3 text:snow -0.2 text:people'"
        )
    parts = []
    for term, following in zip(terms, terms[1:] + [None]):
        sign, number, kind = term.groups()
        value = text[term.end() : following.start() if following else len(text)].strip()
        if not value:
            raise InputFormatError(f"the query term {term.group(0).strip()!r} has no value")
        weight = (-1.0 if sign in ("-", "\u2212") else 1.0) * (float(number) if number else 1.0)
        kind = "embedding" if kind.lower() == "vector" else kind.lower()
        parts.append(QueryPart(weight, kind, int(value) if kind == "id" and _is_int(value) else value))
    return check_parts(parts)


def _is_int(value: str) -> bool:
    return bool(re.fullmatch(r"-?\d+", value))


def check_parts(parts: list[QueryPart]) -> list[QueryPart]:
    """At least one part and at most MAX_PARTS, finite weights, not all zero."""
    if not parts:
        raise InputFormatError("the query has no parts")
    if len(parts) > MAX_PARTS:
        raise InputFormatError(f"a query may have at most {MAX_PARTS} parts, got {len(parts)}")
    weights = np.array([p.weight for p in parts], np.float64)
    if not np.isfinite(weights).all() or not weights.any():
        raise InputFormatError("query weights must be finite numbers, not all zero")
    for p in parts:
        if p.kind not in KINDS:
            raise InputFormatError(f"unknown query part {p.kind!r}; parts are {', '.join(KINDS)}")
        if p.kind == "id" and not isinstance(p.value, int):
            raise InputFormatError(f"an id part needs an integer id, got {p.value!r}")
    return parts


def combine(vectors: np.ndarray, weights) -> np.ndarray:
    """Unit rows weighted and summed, the sum made unit: a 1 x d float32 query.

    Rows are normalised first (an embedding part may have any length); a sum of (nearly) zero
    length, as `+text:a -text:a` gives, is an `InputFormatError`.
    """
    x = np.asarray(vectors, np.float64)
    w = np.asarray(weights, np.float64).reshape(-1, 1)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if x.ndim != 2 or len(x) != len(w) or not np.all(norms > 0):
        raise InputFormatError("every query part needs a non-zero vector")
    total = (w * (x / norms)).sum(axis=0)
    length = np.linalg.norm(total)
    if not length > 1e-6 * np.abs(w).sum():
        raise InputFormatError("the weighted parts of the query cancel out: nothing is left to search for")
    return (total / length).astype(np.float32)[None]
