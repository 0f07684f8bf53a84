"""The image field of a multipart/form-data upload, found within fixed limits.

An upload to the lookup service carries one file. The standard library's email parser takes
seconds and hundreds of megabytes on a part header holding 100,000 parameters, and keeps an
object per part for a body of 100,000 tiny parts; a server that parses that on its event
loop stops answering everyone. The body is already in memory (the upload limit bounds it), so
this scans it with `bytes.find`, linear in its size, and gives up with a `MultipartError` as
soon as a limit is passed: at most MAX_PARTS parts, part headers of at most MAX_HEADER_BYTES,
at most MAX_PARAMS parameters in a Content-Disposition. The app runs it in a worker thread.
"""

from __future__ import annotations

import re

MAX_PARTS = 16
MAX_HEADER_BYTES = 8192
MAX_PARAMS = 16
_BOUNDARY = re.compile(r'(?:^|;)\s*boundary\s*=\s*(?:"([^"]{1,200})"|([^\s;"]{1,200}))', re.IGNORECASE)
_PARAM = re.compile(rb';\s*([^=;\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


class MultipartError(ValueError):
    """A multipart body that is malformed or exceeds a limit; the message says which."""


def is_multipart(content_type: str) -> bool:
    return content_type.lower().lstrip().startswith("multipart/form-data")


def field(body: bytes, content_type: str, name: str = "image") -> bytes:
    """The content of the part named `name` (its Content-Disposition's name parameter)."""
    match = _BOUNDARY.search(content_type[:1024])
    if match is None:
        raise MultipartError("the multipart Content-Type has no boundary")
    delimiter = b"--" + (match.group(1) or match.group(2)).encode("latin-1", "replace")
    pos = body.find(delimiter)
    if pos < 0:
        raise MultipartError("the multipart body does not contain its boundary")
    pos += len(delimiter)
    for _ in range(MAX_PARTS):
        if body.startswith(b"--", pos):
            break  # the closing delimiter
        if not body.startswith(b"\r\n", pos):
            raise MultipartError("malformed multipart body: a boundary is not followed by a line break")
        pos += 2
        head_end = body.find(b"\r\n\r\n", pos, pos + MAX_HEADER_BYTES + 4)
        if head_end < 0:
            raise MultipartError(f"a multipart part header is unterminated or longer than {MAX_HEADER_BYTES} bytes")
        end = body.find(b"\r\n" + delimiter, head_end + 4)
        if end < 0:
            raise MultipartError("the multipart body ends inside a part")
        if _disposition_name(body[pos:head_end]) == name.encode():
            return body[head_end + 4 : end]
        pos = end + 2 + len(delimiter)
    else:
        raise MultipartError(f'the multipart body has more than {MAX_PARTS} parts before a field named "{name}"')
    raise MultipartError(f'the multipart body has no field named "{name}"')


def _disposition_name(headers: bytes) -> bytes | None:
    for line in headers.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() != b"content-disposition":
            continue
        params = _PARAM.finditer(b";" + value.partition(b";")[2])
        found = None
        for count, param in enumerate(params, start=1):
            if count > MAX_PARAMS:
                raise MultipartError(f"a multipart Content-Disposition has more than {MAX_PARAMS} parameters")
            if param.group(1).lower() == b"name" and found is None:
                found = param.group(2).strip().strip(b'"')
        return found
    return None
