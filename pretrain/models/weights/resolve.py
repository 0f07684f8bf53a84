"""Weight specs -> local paths. Only local files: nothing is ever downloaded."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lvd.common.errors import InputFormatError, MissingInputError

PKG_SCHEME = "pkg://"


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (its imports may be heavy)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingInputError(f"package {package!r} is not installed (needed to resolve a pkg:// weights path)")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_weights(spec: str | os.PathLike) -> Path:
    """`pkg://PACKAGE/relative/path` or a filesystem path -> an existing local path."""
    text = os.fspath(spec)
    if text.startswith(PKG_SCHEME):
        package, _, relative = text[len(PKG_SCHEME) :].partition("/")
        if not package or not relative:
            raise InputFormatError(f"malformed weights spec {text!r}; expected pkg://PACKAGE/relative/path")
        path = package_dir(package) / relative
    else:
        path = Path(text).expanduser()
    if not path.exists():
        raise MissingInputError(f"weights not found: {path}" + (f" (from {text})" if str(path) != text else ""))
    return path.resolve()
