"""The manifest's mapper: one input (a file, or a tar shard's members) -> manifest rows.

Kept apart from the stage so that worker processes import only what decoding needs
(Pillow, numpy), not pandas, pyarrow or the config system: worker start-up stays cheap.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from lvd.curate import sources as src

OK, QUARANTINED = "ok", "quarantined"


@dataclass(frozen=True)
class DecodeSettings:
    max_pixels: int | None
    max_bytes: int | None
    extensions: tuple[str, ...]


def stable_id(set_name: str, source: str, key: str) -> int:
    """A 63-bit id from what the input is, not where it falls in a listing."""
    digest = hashlib.blake2b(f"{set_name}\0{source}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF


def inspect_bytes(data: bytes, settings: DecodeSettings) -> dict:
    """sha1, size and a full decode of one file's bytes; a failure becomes a quarantine reason."""
    from lvd.pretrain.data.decode import DecodeError, decode, probe

    row = {"bytes": len(data), "sha1": hashlib.sha1(data).hexdigest()}
    try:
        info = probe(data, settings.max_pixels)
        row.update(width=info.width, height=info.height, format=info.format, mode=info.mode, frames=info.frames)
        # Decoding at reduced DCT scale still reads every coefficient, so truncation shows.
        decode(data, min_size=(64, 64), max_pixels=settings.max_pixels)
        row.update(status=OK, error=None)
    except DecodeError as exc:
        row.update(status=QUARANTINED, error=str(exc))
    except Exception as exc:  # a decoder bug must not stop the run: quarantine with the reason
        row.update(status=QUARANTINED, error=f"unexpected decoder error: {type(exc).__name__}: {exc}")
    return row


def _base_row(set_name: str, kind: str, source: str, key: str, label: str | None) -> dict:
    return {
        "id": stable_id(set_name, source, key),
        "set": set_name,
        "source": source,
        "kind": kind,
        "key": key,
        "label": label,
    }


def _file_rows(set_name, kind, source, keys, labels, settings) -> list[dict]:
    rows = []
    for key, label in zip(keys, labels):
        row = _base_row(set_name, kind, source, key, label)
        try:
            data = src.read_file_bytes(src.row_path(kind, source, key), settings.max_bytes)
        except OSError as exc:
            row.update(status=QUARANTINED, error=f"cannot read file: {exc}")
        else:
            row.update(inspect_bytes(data, settings))
        rows.append(row)
    return rows


def _sample_rows(set_name: str, url: str, members: list[src.Member], settings: DecodeSettings) -> list[dict]:
    """The rows of one WebDataset sample: each image member, or one quarantined row when it has none."""
    label = None
    for m in members:
        if m.name.rsplit(".", 1)[-1].lower() in src.LABEL_EXTENSIONS and m.data is not None:
            label = m.data.decode("utf-8", "replace").strip()
    images = [m for m in members if m.data is not None and m.name.rsplit(".", 1)[-1].lower() in settings.extensions]
    rows = []
    for m in images:
        row = _base_row(set_name, src.TAR, url, m.name, label)
        if settings.max_bytes is not None and len(m.data) > settings.max_bytes:
            error = f"member of {len(m.data)} bytes exceeds the limit of {settings.max_bytes}"
            row.update(bytes=len(m.data), status=QUARANTINED, error=error)
        else:
            row.update(inspect_bytes(m.data, settings))
        rows.append(row)
    if not images:
        members_named = ", ".join(m.name for m in members)
        error = f"sample has no image member ({members_named})"
        rows.append(
            {**_base_row(set_name, src.TAR, url, members[0].sample_key, label), "status": QUARANTINED, "error": error}
        )
    return rows


def _tar_rows(set_name: str, url: str, settings: DecodeSettings) -> list[dict]:
    """Every image member of a shard is a row; samples without an image and tar errors too."""
    rows: list[dict] = []
    pending: list[src.Member] = []
    count = 0
    try:
        for member in src.iter_tar_members(url, settings.extensions):
            count += 1
            if pending and member.sample_key != pending[0].sample_key:
                rows += _sample_rows(set_name, url, pending, settings)
                pending = []
            pending.append(member)
        if pending:
            rows += _sample_rows(set_name, url, pending, settings)
            pending = []
        if src.is_local(url) and url.endswith(".tar") and not src.tar_has_end_marker(url):
            raise OSError("the tar has no end-of-archive marker: it was cut short after its last whole member")
        if src.is_local(url):
            for name, target in src.tar_link_members(url):
                error = f"link member (to {target!r}): links in shards are not followed"
                rows.append({**_base_row(set_name, src.TAR, url, name, None), "status": QUARANTINED, "error": error})
    except Exception as exc:
        if pending:
            rows += _sample_rows(set_name, url, pending, settings)
        key = f"#tar-error-after-{count}-members"
        error = f"tar stream error: {type(exc).__name__}: {exc}"
        rows.append({**_base_row(set_name, src.TAR, url, key, None), "status": QUARANTINED, "error": error})
    return rows


def process_unit(unit: tuple) -> tuple[int, int, list[dict]]:
    """Worker entry point: (task index, unit number, rows)."""
    task_index, unit_no, set_name, kind, source, keys, labels, settings = unit
    if kind == src.TAR:
        return task_index, unit_no, _tar_rows(set_name, source, settings)
    return task_index, unit_no, _file_rows(set_name, kind, source, keys, labels, settings)
