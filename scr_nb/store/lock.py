"""One job per practice (SPEC 8): a lock row in the store naming its holder, and, in a PostgreSQL
store, an advisory lock held on the job's own connection.

A second start is refused naming who holds the practice. In PostgreSQL the advisory lock decides:
it goes with its holder's connection, however the holder died, on whichever machine. In an SQLite
file the row is kept alive by a heartbeat, and a holder that died is replaced safely:
- on this host, at once when its process is gone, found by pid and process start time, so a pid
  the system has given to another process since does not keep a dead job's lock for ever;
- from another host (or another job of this very process), when its heartbeat stops. The heartbeat
  is a counter the holder bumps every few seconds, watched with the taker's own monotonic clock: no
  two machines' wall clocks are ever compared, so clock skew cannot take a live job's lock.
``break_lock`` removes the lock of a holder that is gone, for the ``scr-nb break-lock`` command.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from scr_nb.errors import RefusedError, StoreError
from scr_nb.store.database import Database, DatabaseError, practice_lock_key
from scr_nb.store.practice_store import Store

HEARTBEAT_SECONDS = 2.0     # how often a holder bumps its beat
LAPSE_SECONDS = 30.0        # a beat unchanged this long (by the watcher's clock): the holder is gone
WATCH_SECONDS = 0.25        # how often a watcher reads the beat


@dataclass(frozen=True)
class Holder:
    user_id: str
    user_name: str
    host: str
    pid: int
    since: str
    started: str | None      # "<boot id>:<process start>" of its process, where the system says
    beat: int
    token: str

    def describe(self) -> str:
        return (f"{self.user_name} ({self.user_id}) on {self.host}, process {self.pid}, "
                f"since {self.since}")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str | None:
    """This boot's id and the process's start time in clock ticks (Linux ``/proc``): together they
    name one process for good, where a pid alone is reused. None where the system does not say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()   # the command name may hold spaces and parentheses
    return f"{_boot_id()}:{fields[19]}" if len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_COLUMNS = "user_id, user_name, host, pid, since, started, beat, token"


def gone_from_this_host(holder: Holder | dict) -> bool | None:
    """Whether a lock's holder is gone, as this host sees at once: True when it ran here and its
    process is gone (by pid and process start time, so a reused pid does not keep it alive);
    False when it lives; None when it ran on another host, where only its heartbeat tells."""
    if isinstance(holder, dict):
        holder = Holder(holder.get("user_id", ""), holder.get("user_name", ""),
                        holder.get("host", ""), holder.get("pid", 0), holder.get("since", ""),
                        holder.get("started"), 0, "")
    return _Judge(None, 0.0).gone_from_this_host(holder)


def read_holder(db: Database, ods: str) -> Holder | None:
    row = db.execute(f"SELECT {_COLUMNS} FROM job_lock WHERE ods = ?", (ods,)).first()
    return Holder(*row) if row else None


class _Judge:
    """Whether a holder is gone, as seen from this process."""

    def __init__(self, store: Store, lapse: float,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.store, self.lapse, self.monotonic, self.sleep = store, lapse, monotonic, sleep
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.started = process_start(self.pid)

    def gone_from_this_host(self, holder: Holder) -> bool | None:
        """True: its process is gone; False: it lives; None: this host cannot tell (another host,
        or a job of this very process): its heartbeat must."""
        if holder.host != self.host:
            return None
        if holder.pid == self.pid and holder.started == self.started:
            return None
        if holder.started and self.started and \
                holder.started.split(":")[0] != self.started.split(":")[0]:
            return True   # the machine has restarted since: no process of before lives
        if self.started is None or holder.started is None:
            return not _pid_alive(holder.pid)   # a system that does not say when processes start
        return process_start(holder.pid) != holder.started

    def beating(self, holder: Holder) -> bool:
        """Watch the holder's beat for up to the lapse: True as soon as it moves (or the lock
        changes hands), False when it stood still the whole time."""
        deadline = self.monotonic() + self.lapse
        while self.monotonic() < deadline:
            self.sleep(WATCH_SECONDS)
            now = read_holder(self.store.db, self.store.ods)
            if now is None or now.token != holder.token or now.beat != holder.beat:
                return True
        return False

    def gone(self, holder: Holder) -> bool:
        if self.store.location.is_postgres:
            return not self.store.lock_taken()   # the advisory lock lives with its holder
        verdict = self.gone_from_this_host(holder)
        return verdict if verdict is not None else not self.beating(holder)


class StoreLock:
    """The lock of one job. In SQLite its heartbeat runs on a thread of its own with its own
    connection, from the moment the lock is taken, so a long extract load or a busy event loop
    never lets it lapse. In PostgreSQL the job's own connection holds the advisory lock."""

    def __init__(self, store: Store, user_id: str, user_name: str, now: Callable[[], datetime],
                 lapse: float | None = None):
        self.store, self.user_id, self.user_name = store, user_id, user_name
        self.now = now
        self.judge = _Judge(store, LAPSE_SECONDS if lapse is None else lapse)
        self.token = uuid.uuid4().hex   # tells two jobs of one process apart
        self.lost = False               # set when another job took the lock from under us
        self._stop = threading.Event()
        self._beater: threading.Thread | None = None
        self._advisory: int | None = None   # the PostgreSQL advisory lock held, by key

    def acquire(self) -> Holder | None:
        """Take the lock and start the heartbeat; returns the holder taken over from (a crashed
        job), or None. Raises RefusedError when another live job holds the store."""
        if self.store.location.is_postgres:
            return self._acquire_advisory()
        while True:
            holder = read_holder(self.store.db, self.store.ods)
            if holder is not None and holder.token != self.token and not self.judge.gone(holder):
                raise _refusal(holder)
            if self._take(holder):
                break
        self._beater = threading.Thread(target=self._beat_until_released, daemon=True,
                                        name="scr-nb-heartbeat")
        self._beater.start()
        return holder if holder is not None and holder.token != self.token else None

    def _acquire_advisory(self) -> Holder | None:
        """PostgreSQL: the practice's advisory lock, taken on the job's own connection without
        waiting; then our row, replacing the row of a holder whose connection is gone."""
        key = practice_lock_key(self.store.ods)
        if not self.store.db.scalar("SELECT pg_try_advisory_lock(?)", (key,)):
            holder = read_holder(self.store.db, self.store.ods)
            raise _refusal(holder) if holder is not None else RefusedError(
                f"another upload is starting on practice {self.store.ods}; nothing was sent.")
        self._advisory = key
        while True:   # ours alone now: only a break-lock of the old row can come between
            previous = read_holder(self.store.db, self.store.ods)
            if self._take(previous):
                return previous

    def _take(self, judged: Holder | None) -> bool:
        """Write our row if the lock is still as it was judged (else judge again)."""
        stamp = self.now()
        since = stamp.astimezone(timezone.utc).isoformat(timespec="seconds")
        with self.store.transaction() as db:
            if read_holder(db, self.store.ods) != judged:
                return False
            db.execute("DELETE FROM job_lock WHERE ods = ?", (self.store.ods,))
            db.execute("INSERT INTO job_lock (ods, user_id, user_name, host, pid, since, "
                       "heartbeat, token, started, beat) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
                       (self.store.ods, self.user_id, self.user_name, self.judge.host,
                        self.judge.pid, since, stamp.timestamp(), self.token, self.judge.started))
        return True

    def _beat_until_released(self) -> None:
        if self.store.location.is_postgres:
            return   # the advisory lock needs no heartbeat: it lives as long as its connection
        db = Database(self.store.location)
        try:
            while not self._stop.wait(HEARTBEAT_SECONDS):
                # by token alone: the job may name the store's practice meanwhile (claim)
                changed = db.execute("UPDATE job_lock SET beat = beat + 1, heartbeat = ? "
                                     "WHERE token = ?",
                                     (self.now().timestamp(), self.token)).rowcount
                if not changed:
                    self.lost = True
                    return
        finally:
            db.close()

    def release(self) -> None:
        """Let the lock go. A store that cannot be written now (its connection gone) keeps our
        row, which the next taker judges gone; the job's own outcome is never hidden by it."""
        self._stop.set()
        if self._beater is not None:
            self._beater.join(timeout=HEARTBEAT_SECONDS + 5)
        try:
            with self.store.transaction() as db:
                db.execute("DELETE FROM job_lock WHERE ods = ? AND token = ?",
                           (self.store.ods, self.token))
        except (StoreError, DatabaseError):
            pass
        finally:
            if self._advisory is not None:
                key, self._advisory = self._advisory, None
                try:
                    self.store.db.scalar("SELECT pg_advisory_unlock(?)", (key,))
                except DatabaseError:
                    pass   # the connection is gone, and the advisory lock went with it


def break_lock(store: Store, lapse: float | None = None) -> Holder:
    """Remove the lock of a holder that is gone, and return it. Refused (RefusedError) while the
    holder lives, and when nobody holds the store."""
    judge = _Judge(store, LAPSE_SECONDS if lapse is None else lapse)
    holder = read_holder(store.db, store.ods)
    if holder is None:
        raise RefusedError("nobody holds this store's lock: there is nothing to break.")
    if not judge.gone(holder):
        raise RefusedError(f"the lock's holder is alive: {holder.describe()}. Stop its job "
                           "instead (scr-nb stop), or wait for it to end.")
    with store.transaction() as db:
        db.execute("DELETE FROM job_lock WHERE ods = ? AND token = ?", (store.ods, holder.token))
    return holder


def _refusal(holder: Holder) -> RefusedError:
    return RefusedError(f"another upload is running on this store: {holder.describe()}. Wait "
                        "for it to end, or stop it; nothing was sent.")


__all__ = ["HEARTBEAT_SECONDS", "LAPSE_SECONDS", "Holder", "StoreLock", "break_lock",
           "gone_from_this_host",
           "process_start", "read_holder"]
