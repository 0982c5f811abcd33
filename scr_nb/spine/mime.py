"""MIME multipart/related, as the Spine's ebXML messages use it.

Small on purpose: ebXML parts are plain 8-bit text with a few headers, and the acks in
``reference/spine/`` are stored without the outer Content-Type, so the boundary is read from the
body's first delimiter line when no Content-Type header gives it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_BOUNDARY_PARAM = re.compile(r'boundary\s*=\s*"?([^";]+)"?', re.IGNORECASE)


@dataclass(frozen=True)
class Part:
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased names
    body: bytes = b""

    @property
    def content_id(self) -> str:
        return self.headers.get("content-id", "").strip().strip("<>")


def build_related(parts: list[tuple[dict[str, str], bytes]], boundary: str,
                  start: str | None = None) -> tuple[str, bytes]:
    """Join ``parts`` into a multipart/related body; returns (Content-Type header, body)."""
    chunks: list[bytes] = []
    delimiter = b"--" + boundary.encode("ascii")
    for headers, body in parts:
        chunks.append(delimiter + b"\r\n")
        for name, value in headers.items():
            chunks.append(f"{name}: {value}\r\n".encode("ascii"))
        chunks.append(b"\r\n")
        chunks.append(body)
        chunks.append(b"\r\n")
    chunks.append(delimiter + b"--\r\n")
    content_type = f'multipart/related; boundary="{boundary}"; type="text/xml"'
    if start:
        content_type += f'; start="<{start}>"'
    return content_type, b"".join(chunks)


def boundary_of(content_type: str | None, body: bytes) -> str | None:
    if content_type:
        found = _BOUNDARY_PARAM.search(content_type)
        if found:
            return found.group(1).strip()
    for line in body.lstrip().splitlines()[:1]:
        if line.startswith(b"--"):
            return line[2:].strip().decode("ascii", "replace")
    return None


def parse_related(body: bytes, content_type: str | None = None) -> list[Part]:
    """Split a multipart body into parts. A body with no boundary is returned as one part."""
    boundary = boundary_of(content_type, body)
    if not boundary:
        return [Part({}, body)]
    delimiter = b"--" + boundary.encode("ascii")
    pieces = body.split(delimiter)
    parts: list[Part] = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break
        piece = piece[2:] if piece.startswith(b"\r\n") else piece.lstrip(b"\n")
        head, sep, rest = _split_headers(piece)
        if not sep:
            continue
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").splitlines():
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        if rest.endswith(b"\r\n"):
            rest = rest[:-2]
        elif rest.endswith(b"\n"):
            rest = rest[:-1]
        parts.append(Part(headers, rest))
    return parts


def _split_headers(piece: bytes) -> tuple[bytes, bytes, bytes]:
    crlf = piece.find(b"\r\n\r\n")
    lf = piece.find(b"\n\n")
    if crlf != -1 and (lf == -1 or crlf < lf):
        return piece[:crlf], b"\r\n\r\n", piece[crlf + 4:]
    if lf != -1:
        return piece[:lf], b"\n\n", piece[lf + 2:]
    return piece, b"", b""
