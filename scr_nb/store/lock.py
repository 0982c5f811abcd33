"""One job per practice store (SPEC 8): a lock row in the store, kept alive by a heartbeat.

A second start is refused naming who holds the store. A holder that died is replaced safely: at
once when it was a process on this host that no longer exists (kill -9), otherwise when its
heartbeat has lapsed.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from scr_nb.errors import RefusedError
from scr_nb.store.practice_store import Store

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
    """The lock of one job. Its heartbeat runs on a thread of its own with its own connection, from
    the moment the lock is taken, so a long extract load or a busy event loop never lets it lapse."""

    def __init__(self, store: Store, user_id: str, user_name: str, now: callable,
                 lapse: float = LAPSE_SECONDS):
        self.store, self.user_id, self.user_name = store, user_id, user_name
        self.now, self.lapse = now, lapse
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.token = uuid.uuid4().hex   # tells two jobs of one process apart
        self.lost = False               # set when another job took the lock from under us
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None

    def _dead(self, holder: Holder, stamp: float) -> bool:
        """A holder on this host is dead when its process is; a live local process is never
        taken over. On another host only a lapsed heartbeat tells."""
        if holder.host == self.host and holder.pid != self.pid:
            return not _alive(holder.pid)
        return stamp - holder.heartbeat > self.lapse

    def acquire(self) -> Holder | None:
        """Take the lock and start the heartbeat; returns the holder taken over from (a crashed
        job), or None. Raises RefusedError when another live job holds the store."""
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
        self._beater = threading.Thread(target=self._beat_until_released, daemon=True,
                                        name="scr-nb-heartbeat")
        self._beater.start()
        return previous

    def _beat_until_released(self) -> None:
        db = sqlite3.connect(self.store.path, timeout=30, isolation_level=None)
        try:
            while not self._stop.wait(HEARTBEAT_SECONDS):
                changed = db.execute("UPDATE job_lock SET heartbeat = ? WHERE token = ?",
                                     (self.now().timestamp(), self.token)).rowcount
                if not changed:
                    self.lost = True
                    return
        finally:
            db.close()

    def release(self) -> None:
        self._stop.set()
        if self._beater is not None:
            self._beater.join(timeout=HEARTBEAT_SECONDS + 5)
        with self.store.transaction() as db:
            db.execute("DELETE FROM job_lock WHERE token = ?", (self.token,))
