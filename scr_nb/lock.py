"""One job per practice store (SPEC 8): a lock row in the store, kept alive by a heartbeat.

A second start is refused naming who holds the store. A holder that died is replaced safely: at
once when it was a process on this host that no longer exists (kill -9), otherwise when its
heartbeat has lapsed.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from .errors import RefusedError
from .store import Store

HEARTBEAT_SECONDS = 5.0
LAPSE_SECONDS = 30.0


@dataclass(frozen=True)
class Holder:
    user_id: str
    user_name: str
    host: str
    pid: int
    since: str
    heartbeat: float

    def describe(self) -> str:
        return (f"{self.user_name} ({self.user_id}) on {self.host}, process {self.pid}, "
                f"since {self.since}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    def __init__(self, store: Store, user_id: str, user_name: str, now: callable,
                 lapse: float = LAPSE_SECONDS):
        self.store, self.user_id, self.user_name = store, user_id, user_name
        self.now, self.lapse = now, lapse
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.token = uuid.uuid4().hex   # tells two jobs of one process apart

    def holder(self) -> Holder | None:
        row = self.store.db.execute("SELECT user_id, user_name, host, pid, since, heartbeat "
                                    "FROM job_lock WHERE id = 1").fetchone()
        return Holder(*row) if row else None

    def _dead(self, holder: Holder, stamp: float) -> bool:
        if holder.host == self.host and holder.pid != self.pid and not _alive(holder.pid):
            return True
        return stamp - holder.heartbeat > self.lapse

    def acquire(self) -> Holder | None:
        """Take the lock; returns the holder taken over from (a crashed job), or None.

        Raises RefusedError when another live job holds the store."""
        stamp = self.now().timestamp()
        with self.store.transaction() as db:
            row = db.execute("SELECT user_id, user_name, host, pid, since, heartbeat, token "
                             "FROM job_lock WHERE id = 1").fetchone()
            previous = Holder(*row[:6]) if row else None
            if previous is not None and row[6] != self.token and not self._dead(previous, stamp):
                raise RefusedError(f"another upload is running on this store: "
                                   f"{previous.describe()}. Wait for it to end, or stop it; "
                                   "nothing was sent.")
            since = datetime.fromtimestamp(stamp, timezone.utc).isoformat(timespec="seconds")
            db.execute("INSERT OR REPLACE INTO job_lock VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
                       (self.user_id, self.user_name, self.host, self.pid, since, stamp,
                        self.token))
        return previous

    def beat(self) -> None:
        with self.store.transaction() as db:
            db.execute("UPDATE job_lock SET heartbeat = ? WHERE token = ?",
                       (self.now().timestamp(), self.token))

    def release(self) -> None:
        with self.store.transaction() as db:
            db.execute("DELETE FROM job_lock WHERE token = ?", (self.token,))
