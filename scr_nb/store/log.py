"""The practice log (SPEC 8): append-only JSON lines beside the store, no clinical content.

Each line is one event (job start and end, refusal, ...) with the time and the user, so an auditor
can see who started what, when, and how it ended.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path


def log_path(store_path: str | Path) -> Path:
    return Path(str(store_path) + ".log.jsonl")


class PracticeLog:
    def __init__(self, store_path: str | Path):
        self.path = log_path(store_path)

    def write(self, event: str, **fields: object) -> dict:
        record = {"at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                  "event": event, **fields}
        line = json.dumps(record, default=str, ensure_ascii=False) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
        return record

    def read(self) -> Iterator[dict]:
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    yield json.loads(line)
