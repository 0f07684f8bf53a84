"""Which file names are images, and how a shard pattern becomes shard names."""

from __future__ import annotations

import os

from lvd.common.errors import MissingInputError

# File name extensions read as images (lower case, no dot), everywhere lvd looks for images.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
# WebDataset members that hold a sample's class label.
LABEL_EXTENSIONS = ("cls", "label", "class")


def is_image_name(name: str, extensions=IMAGE_EXTENSIONS) -> bool:
    """True for `photo.JPG` and the like (the extension in any letter case)."""
    return "." in name and name.rsplit(".", 1)[1].lower() in extensions


def expand_braces(spec: str) -> list[str]:
    """`shard-{000..009}.tar` -> the ten names (WebDataset's brace notation), in order."""
    from braceexpand import braceexpand  # a dependency of webdataset

    return list(braceexpand(spec))


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shards(spec, sort: bool = False) -> list[str]:
    """Brace patterns and local globs -> shard names, each once (first occurrence; `sort`: sorted).

    `spec` is one pattern or a list of them. Remote URLs and `pipe:` commands are kept as they
    are; a local name that does not exist, or a pattern that matches nothing, is an error.
    """
    import glob

    specs = [spec] if isinstance(spec, str) else [str(s) for s in spec]
    urls: list[str] = []
    for s in specs:
        for url in expand_braces(s):
            if _is_remote(url) or not any(c in url for c in "*?["):
                urls.append(url)
            else:
                urls.extend(sorted(glob.glob(url)))
    urls = sorted(set(urls)) if sort else list(dict.fromkeys(urls))
    if not urls:
        raise MissingInputError(f"no tar shards match {spec!r}")
    missing = [u for u in urls if not _is_remote(u) and not os.path.exists(u)]
    if missing:
        raise MissingInputError(f"tar shards not found: {', '.join(missing[:5])}")
    return urls
