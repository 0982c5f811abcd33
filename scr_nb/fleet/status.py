"""Where a fleet stands (SPEC 12): every practice's counters and latest job, read from one
PostgreSQL store (``--store URL``) or a folder of SQLite stores (``--stores DIR``), alongside the
jobs that are writing to them.

A practice here says what ``scr-nb status`` says of it: each SQLite store is read with its own
read-only ``Store`` and its ``status()``; a PostgreSQL store is read whole, a statement per figure
for every practice (``store.fleet_queries``), instead of a connection per practice. A practice
whose store cannot be read is listed with an ``error``, never left out: an operator watching
hundreds of practices must see the one that is broken. Its ``status`` is a word an operator
expects (``running``, ``paused``, ``interrupted``, ...), not the job table's raw value.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from scr_nb.errors import StoreError
from scr_nb.store import fleet_queries, queries
from scr_nb.store.database import (DatabaseError, Location, is_database_url, practice_lock_key,
                                   practice_url, redact)
from scr_nb.store.lock import gone_from_this_host
from scr_nb.store.practice_store import Job, Store
from scr_nb.store.schema import open_database
from scr_nb.store.states import JobStatus, PatientState, counters

SQLITE_SUFFIX = ".sqlite"   # a practice's store in --stores DIR is DIR/<ODS>.sqlite
READERS = 8                 # stores read at once: each read mostly waits on its database

# A practice's status in an operator's words: the job statuses as they are, and the fleet's own.
RUNNING = JobStatus.RUNNING.value
PAUSED = JobStatus.PAUSED.value
STOPPED = JobStatus.STOPPED.value
CANCELLED = JobStatus.CANCELLED.value
COMPLETED = JobStatus.COMPLETED.value
NOT_STARTED = "not started"     # no job has run on the practice's store yet
STARTING = "starting"           # a job holds the store's lock but has not recorded itself yet
INTERRUPTED = "interrupted"     # the job says running, but its process is gone: Resume continues it
UNREADABLE = "unreadable"       # the store could not be read: see the practice's ``error``
STATUSES = (RUNNING, STARTING, PAUSED, INTERRUPTED, STOPPED, CANCELLED, COMPLETED, NOT_STARTED,
            UNREADABLE)
COUNTERS = ("unprocessed", "sending", "sent", "failed", "not_required")   # Vision's five, SPEC 8


@dataclass(frozen=True)
class PracticeReading:
    """One practice's store as read at ``read_at``. ``counters``, ``latest_job`` and
    ``failed_by_code`` are ``Store.status()``'s. When the details were asked for, ``eligible``
    counts the patients eligible by the extract (those the Spine already held included) and
    ``latest_job_counts`` the latest job's own messages (transmitted, acknowledged, failed). A
    store that could not be read has ``error`` set and nothing else."""

    ods_code: str
    status: str
    read_at: datetime
    counters: dict[str, int] | None = None
    latest_job: dict | None = None
    failed_by_code: dict[str, int] = field(default_factory=dict)
    running: dict | None = None          # the lock's holder: user, host, pid, since
    eligible: int | None = None
    latest_job_counts: dict[str, int] | None = None
    error: str | None = None

    def to_json(self) -> dict:
        """The practice as ``scr-nb fleet status --json`` prints it (SPEC 12)."""
        shown = {"ods_code": self.ods_code, "status": self.status, "counters": self.counters,
                 "latest_job": self.latest_job}
        if self.error is not None:
            shown["error"] = self.error
        return shown


def fleet_status(store: str | None = None, stores_dir: str | os.PathLike | None = None) -> dict:
    """``scr-nb fleet status --json``: ``{"practices": [{"ods_code", "status", "counters",
    "latest_job"}, ...], "totals": {five counters}}``, practices in ODS code order. A practice
    whose store cannot be read has ``"counters": null``, its ``error`` and status
    ``unreadable``; the totals add up the practices that could be read.

    Example: ``fleet_status(stores_dir="stores/")`` or
    ``fleet_status(store="postgresql://scr@db/fleet")``."""
    readings = read_fleet(store, stores_dir)
    return {"practices": [reading.to_json() for reading in readings],
            "totals": totals(readings)}


def totals(readings: list[PracticeReading]) -> dict[str, int]:
    """Vision's five counters summed over the practices that could be read."""
    summed = dict.fromkeys(COUNTERS, 0)
    for reading in readings:
        for name in COUNTERS:
            summed[name] += int((reading.counters or {}).get(name, 0))
    return summed


def read_fleet(store: str | None = None, stores_dir: str | os.PathLike | None = None, *,
               details: bool = False,
               now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
               ) -> list[PracticeReading]:
    """Every practice of the fleet, read once, in ODS code order. ``details`` also reads what the
    fleet monitor shows beyond ``fleet status``: the eligible patients and the latest job's own
    messages of each practice. Raises ValueError unless exactly one of ``store`` and
    ``stores_dir`` is given, and StoreError when the fleet itself (the database, the folder)
    cannot be read."""
    stores = practice_stores(store, stores_dir)
    host = socket.gethostname()
    if store:
        return read_database(store, sorted(stores), details=details, now=now, host=host)

    def read(item: tuple[str, str]) -> PracticeReading:
        return read_practice(item[0], item[1], details=details, now=now, host=host)

    with ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="scr-nb-fleet-read") as pool:
        return list(pool.map(read, sorted(stores.items())))


def practice_stores(store: str | None = None,
                    stores_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """ODS code -> the one string naming that practice's store (an SQLite file, or the
    PostgreSQL URL with ``?ods=CODE``). A URL that names a practice itself is that practice
    alone."""
    store = store or None
    stores_dir = stores_dir or None
    if (store is None) == (stores_dir is None):
        raise ValueError("give exactly one of store (the fleet's postgresql:// URL) and "
                         "stores_dir (the folder of <ODS>.sqlite stores)"
                         + (", not both" if store is not None else ""))
    if stores_dir is not None:
        folder = Path(stores_dir)
        if not folder.is_dir():
            raise StoreError(f"{folder}: no such folder of practice stores (--stores DIR holds "
                             f"one <ODS>{SQLITE_SUFFIX} a practice)")
        return {path.stem.upper(): str(path) for path in folder.glob(f"*{SQLITE_SUFFIX}")
                if path.is_file()}
    if not is_database_url(store):
        raise ValueError(f"store is the fleet's postgresql:// URL, not {store!r}; a folder of "
                         "SQLite stores is stores_dir")
    try:
        named = Location.of(store).ods
    except StoreError:   # no practice named: the whole fleet
        named = None
    codes = [named] if named else Store.practices(store)
    return {code: practice_url(store, code) for code in codes}


def read_practice(ods_code: str, store: str, *, details: bool = False,
                  now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                  host: str | None = None) -> PracticeReading:
    """One practice's store, read-only; what cannot be read comes back as the reading's error."""
    read_at = now()
    try:
        opened = Store(store, readonly=True)
    except Exception as err:   # noqa: BLE001 - any store that cannot be read is shown, not raised
        return PracticeReading(ods_code, UNREADABLE, read_at, error=_why(err))
    try:
        status = opened.status()
        eligible = counts = None
        if details:
            eligible = int(queries.eligible_count(opened))
            if status["latest_job"] is not None:
                counts = queries.live_job_counts(opened).get(status["latest_job"]["id"], {})
    except Exception as err:   # noqa: BLE001
        return PracticeReading(ods_code, UNREADABLE, read_at, error=_why(err))
    finally:
        opened.close()
    return PracticeReading(
        ods_code, practice_status(status["latest_job"], status["running"], host), read_at,
        counters=status["counters"], latest_job=status["latest_job"],
        failed_by_code=status["failed_by_code"], running=status["running"], eligible=eligible,
        latest_job_counts=counts)


def read_database(url: str, codes: list[str], *, details: bool = False,
                  now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                  host: str | None = None) -> list[PracticeReading]:
    """The practices ``codes`` of the PostgreSQL store at ``url``, from one snapshot of it."""
    location = Location.of(url, codes[0] if codes else "-")
    db = open_database(location, readonly=True)
    try:
        figures = fleet_queries.read_figures(db, details=details)
    except DatabaseError as err:
        raise StoreError(f"{redact(url)}: the fleet could not be read "
                         f"({_database_words(err)})") from None
    finally:
        db.close()
    read_at = now()
    readings = []
    for ods in codes:
        states = {state.value: 0 for state in PatientState}
        states.update(figures.states.get(ods, {}))
        row = figures.latest_jobs.get(ods)
        latest = None if row is None else Job.from_row(row).to_json()
        holder = figures.lock_rows.get(ods)
        if practice_lock_key(ods) not in figures.advisory_locks:
            holder = None   # the row of a job whose connection is gone: its lock went with it
        readings.append(PracticeReading(
            ods, practice_status(latest, holder, host), read_at, counters=counters(states),
            latest_job=latest, failed_by_code=figures.failed_by_code.get(ods, {}),
            running=holder, eligible=figures.eligible.get(ods, 0) if details else None,
            latest_job_counts=(figures.latest_job_counts.get(ods, {})
                               if details and latest is not None else None)))
    return readings


def practice_status(latest_job: dict | None, holder: dict | None,
                    host: str | None = None) -> str:
    """The practice's status in an operator's words, from its latest job and the lock's holder.
    A job the store says is running whose lock nobody holds (or whose process on this host is
    gone) crashed: ``interrupted``. A paused job without a holder was stopped by its user (Resume
    continues it); with a holder that is gone, its process died waiting to resume: interrupted."""
    job = latest_job["status"] if latest_job else None
    alive = holder is not None and holder_alive(holder, host)
    if job == RUNNING:
        return RUNNING if alive else INTERRUPTED
    if job == PAUSED:
        return INTERRUPTED if holder is not None and not alive else PAUSED
    if alive:
        return STARTING
    return NOT_STARTED if job is None else job


def holder_alive(holder: dict, host: str | None = None) -> bool:
    """Whether the lock's holder may still be running: on this host, its process (by pid and
    start time) must exist; on another host this cannot be seen from here, and the lock's
    heartbeat rules (SPEC 8)."""
    if holder.get("host") != (host or socket.gethostname()) or not holder.get("pid"):
        return True
    return gone_from_this_host(holder) is not True


def _why(err: Exception) -> str:
    """Plain words for a store that could not be read (never a password: the store's label is
    used in the kit's own messages, and a database's error is cut to its first line)."""
    if isinstance(err, StoreError):
        return str(err)
    if isinstance(err, DatabaseError):
        return f"the store could not be read: {_database_words(err)}"
    return f"the store could not be read: {type(err).__name__}: {err}"


def _database_words(err: Exception) -> str:
    """The database's own words, its first line only (no statement, no parameters)."""
    words = str(getattr(err, "orig", None) or err).strip().splitlines()
    return words[0] if words else type(err).__name__


__all__ = ["COUNTERS", "STATUSES", "PracticeReading", "fleet_status", "holder_alive",
           "practice_status", "practice_stores", "read_database", "read_fleet", "read_practice",
           "totals"]
