"""Files that hold patient data or credentials are the owner's alone (SPEC 9): mode 0600 from the
first byte, never written world-readable and narrowed afterwards."""

from __future__ import annotations

import os
from pathlib import Path


def create_private(path: str | Path) -> Path:
    """Create ``path`` (and its folder) empty and readable by its owner only, or narrow an existing
    one to that; a writer that opens it afterwards keeps the mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    return path


def write_private(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path``, mode 0600 from the first byte."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(data.encode("utf-8") if isinstance(data, str) else data)
    return path


__all__ = ["create_private", "write_private"]
