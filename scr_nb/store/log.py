"""The practice log (SPEC 8): append-only, one JSON object an event, no clinical content. Beside an
SQLite store it is a file of JSON lines (``<store>.log.jsonl``); in a PostgreSQL store it is the
practice's rows of ``practice_log``.

Each line is one event (job start and end, refusal, ...) with the time and the user, so an auditor
can see who started what, when, and how it ended.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from scr_nb.store.database import Database, Location
from scr_nb.store.schema import open_database

INSERT_TRIES = 5   # two processes logging one practice at once may take the same number


def log_path(store_path: str | Path) -> Path:
    return Path(str(store_path) + ".log.jsonl")


class PracticeLog:
    """The log of the practice of ``store`` (a Store, a Location, a path or a URL with ``ods``)."""

    def __init__(self, store: object, ods: str | None = None):
        location = getattr(store, "location", store)
        self.location = Location.of(location, ods or getattr(store, "ods", None) or None)
        self.path = log_path(self.location.path) if self.location.path is not None else None

    def write(self, event: str, **fields: object) -> dict:
        record = {"at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                  "event": event, **fields}
        line = json.dumps(record, default=str, ensure_ascii=False)
        if self.path is None:
            self._insert(record["at"], event, line)
            return record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (line + "\n").encode("utf-8"))
        finally:
            os.close(fd)
        return record

    def _insert(self, at: str, event: str, line: str) -> None:
        """One row, on a connection of its own: the log is written between a job's transactions
        and by processes that hold no job (a refusal, a broken lock)."""
        db = open_database(self.location)
        try:
            for tries in range(INSERT_TRIES):
                db.begin()
                try:
                    db.execute("INSERT INTO practice_log (ods, id, at, event, record) "
                               "SELECT ?1, COALESCE(MAX(id), 0) + 1, CAST(?2 AS TEXT), "
                               "CAST(?3 AS TEXT), CAST(?4 AS TEXT) FROM practice_log "
                               "WHERE ods = ?1", (self.location.ods, at, event, line))
                    db.commit()
                    return
                except Exception:
                    db.rollback()
                    if tries == INSERT_TRIES - 1:
                        raise
        finally:
            db.close()

    def read(self) -> Iterator[dict]:
        if self.path is None:
            db = Database(self.location, readonly=True)
            try:
                rows = db.rows("SELECT record FROM practice_log WHERE ods = ? ORDER BY id",
                               (self.location.ods,))
            finally:
                db.close()
            for (line,) in rows:
                yield json.loads(line)
            return
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    yield json.loads(line)
