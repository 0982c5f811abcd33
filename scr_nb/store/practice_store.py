"""The store: all upload state of a practice (SPEC 8), in its own SQLite file or, for a fleet, in
a PostgreSQL database beside other practices' (SPEC 12), through one code path.

Every change of a patient's state is checked against the transition table in ``states``. A
message and its id are committed before the message is sent, so a crash at any moment leaves enough
to finish it with the same id; the moves after that are deferred and written a batch at a time.
Every statement names the practice (``ods = ?``), the first column of every key.
"""

from __future__ import annotations

import json
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from isal import isal_zlib

from scr_nb.constants import DUPLICATE_EVENT, EXISTING_SUMMARY_AT_SPINE
from scr_nb.errors import StoreError
from scr_nb.store.database import Database, DatabaseError, Location, practice_lock_key
from scr_nb.store.schema import open_database
from scr_nb.store.states import (
    IN_FLIGHT,
    NOT_REQUIRED_REASONS,
    PREDECESSORS,
    JobStatus,
    PatientState,
    check_job_transition,
    check_transition,
    counters,
)

NOT_IN_EXTRACT = "not_in_extract"   # a patient the store knows but the latest extract does not
_IN_FLIGHT_SQL = ", ".join(sorted(f"'{state.value}'" for state in IN_FLIGHT))
CONTROL_REQUESTS = ("stop", "close", "cancel")     # Stop, Stop and Close, Cancel
RUNNING_STATUSES = ("running", "paused")
SYNC_BATCH = 10_000                 # decisions written to the store at a time
MAX_DEFERRED = 500                  # deferred moves written once 500 messages have some
BACKLOG_LIMIT = 4 * MAX_DEFERRED    # ... and at once, whoever waits, once 2,000 have
_QUEUED_FROM = ", ".join(f"'{state}'" for state in PREDECESSORS[PatientState.QUEUED])
# Message states after which the kit moves that message no more (a requeue names its patient again)
_ENDS = frozenset({PatientState.ACKNOWLEDGED, PatientState.FAILED})
IN_LIMIT = 900                      # values bound to one IN (...) at most
_second: tuple[int, str] = (0, "")  # the latest whole second, formatted once


def now_iso() -> str:
    """Now in UTC with milliseconds (2026-11-23T19:00:00.123+00:00). A message sent takes several
    of these, so the date and time of the current second are formatted once, not every time."""
    global _second
    second, millis = divmod(time.time_ns() // 1_000_000, 1000)
    if second != _second[0]:
        stamp = datetime.fromtimestamp(second, timezone.utc).isoformat(timespec="seconds")
        _second = (second, stamp[:19])
    return f"{_second[1]}.{millis:03d}+00:00"


def compress(data: bytes) -> bytes:
    """Bodies are kept in the zlib format, which ``zlib.decompress`` reads, so stores written
    before read the same. ISA-L's fastest level takes a sixth of zlib level 1's CPU (about 25 us
    for a typical 12 KB summary) and still stores it about three times smaller."""
    return isal_zlib.compress(data, 0)


class _Moves:
    """The deferred moves of one message, collapsed into what they lead to: one row of messages
    and one of patients to write, however many moves. The chain of patient states is checked
    against the transition table as it grows; its first illegal step is kept and raised when it is
    written, only if the message is still the patient's current one (as a move at a time did)."""

    __slots__ = ("state", "fields", "first", "last", "patient_fields", "pkey", "illegal")

    def __init__(self, state: PatientState, fields: dict, patient_state: PatientState,
                 patient_fields: dict, pkey: str | None):
        self.state = state                      # the message's latest state
        self.fields = fields                    # its columns set, a later move's value winning
        self.first = self.last = patient_state  # the patient's first and latest state
        self.patient_fields = patient_fields
        self.pkey = pkey                        # its patient, when known without a read
        self.illegal: tuple[PatientState, PatientState] | None = None

    def then(self, later: _Moves) -> _Moves:
        """These moves followed by ``later``'s."""
        if self.illegal is None:
            if self.last.value not in PREDECESSORS[later.first]:
                self.illegal = (self.last, later.first)
            else:
                self.illegal = later.illegal
        self.state, self.last = later.state, later.last
        self.fields.update(later.fields)
        self.patient_fields.update(later.patient_fields)
        self.pkey = self.pkey or later.pkey
        return self


def _rows_in(db: Database, sql: str, ods: str, keys: list[str]) -> Iterator[tuple]:
    """The rows of ``sql``, a query of one practice (``ods = ?`` its first value) ending in
    ``IN ({})``, for ``keys``, read ``IN_LIMIT`` keys at a time (SQLite bounds the values bound
    to one statement)."""
    for start in range(0, len(keys), IN_LIMIT):
        chunk = keys[start:start + IN_LIMIT]
        yield from db.rows(sql.format(", ".join("?" * len(chunk))), (ods, *chunk))


@dataclass(frozen=True)
class Job:
    id: int
    chain_id: int
    mode: str           # run | resume | rerun | failed: what was asked
    chain_mode: str     # the mode of the job a resume continues (its work rule)
    group: str | None
    status: str
    reason: str | None
    user_id: str | None
    started_at: str
    ended_at: str | None
    settings: dict
    totals: dict

    @classmethod
    def from_row(cls, row: tuple) -> Job:
        """A job from a row of ``jobs``, read as ``Store._JOB_COLUMNS`` lists them."""
        (id_, chain, mode, chain_mode, group, status, reason, user_id, started, ended, settings,
         totals) = row
        return cls(id_, chain, mode, chain_mode, group, status, reason, user_id, started, ended,
                   json.loads(settings or "{}"), json.loads(totals or "{}"))

    def to_json(self) -> dict:
        return {"id": self.id, "mode": self.mode, "group": self.group, "status": self.status,
                "reason": self.reason, "started_at": self.started_at, "ended_at": self.ended_at,
                "resumes": self.chain_id if self.chain_id != self.id else None,
                "user_id": self.user_id, "settings": self.settings}


@dataclass(frozen=True)
class StoredMessage:
    message_id: str
    pkey: str
    event_id: str
    prior_event_id: str | None
    content_type: str
    body: bytes
    state: str
    poll_url: str | None
    failure_code: str | None


class Store:
    """One practice's store: ``store`` an SQLite file, or a PostgreSQL URL with the practice's
    ODS code (``ods``, or ``?ods=`` in the URL). ``readonly=True`` opens it for reading alongside
    a running job (status, the control panel, reports): no schema work, no writes, no waiting on
    the writer. An SQLite file holds one practice, named by the first job that knows it."""

    def __init__(self, store: str | Path | Location, ods: str | None = None,
                 readonly: bool = False):
        self.location = Location.of(store, ods)
        self.path = self.location.path
        self.label = self.location.label
        self.readonly = readonly
        self._attempts: list[tuple] = []
        self._attempt_id: int | None = None   # the last attempt's id, once read
        self._moves: dict[str, _Moves] = {}   # deferred, by message id
        # The deferred moves and attempts are noted on the event loop's thread and written on the
        # job's store thread: this guards the handing over.
        self._pending = threading.RLock()
        # Called, when set, instead of writing once MAX_DEFERRED messages have deferred moves: a
        # job's flusher then writes them on its own thread, off the event loop.
        self.on_backlog: Callable[[], None] | None = None
        # message id -> pkey of the messages queued here whose moves may still come, so deferred
        # moves know their patient without reading the store
        self._pkeys: dict[str, str] = {}
        self.db = open_database(self.location, readonly)
        try:
            self.ods = self._practice(self.location.ods)
        except BaseException:
            self.db.close()
            raise

    def _practice(self, asked: str | None) -> str:
        """The practice this store object reads and writes. In PostgreSQL the one asked for, made
        known to the fleet's listing (``practices``) when opened for writing; in an SQLite file
        the file's own ('' until the first job names it: ``claim``, under the job's lock)."""
        if self.location.is_postgres:
            if not self.readonly:
                self.db.execute("INSERT INTO practice_meta (ods, key, value) VALUES (?, 'practice', "
                                "?) ON CONFLICT (ods, key) DO NOTHING", (asked, now_iso()))
            return asked
        held = self.db.scalar("SELECT value FROM meta WHERE key = 'ods'") or ""
        if asked and held and asked != held:
            raise StoreError(f"{self.label}: this store holds practice {held}, not {asked}")
        return held

    def claim(self, ods: str) -> None:
        """Name the practice of an SQLite store that has none yet (a new one, or one of an older
        kit): its rows move under ``ods``, in one transaction. Only a job calls this, holding the
        store's lock, so no other job's rows move under it."""
        ods = ods.strip().upper()
        if self.location.is_postgres or self.ods or not ods:
            return
        with self.transaction() as db:
            for table in _PRACTICE_TABLES:
                db.execute(f"UPDATE {table} SET ods = ? WHERE ods = ''", (ods,))
            db.execute("INSERT INTO meta (key, value) VALUES ('ods', ?) ON CONFLICT (key) DO "
                       "UPDATE SET value = excluded.value", (ods,))
        self.ods = ods

    @staticmethod
    def practices(url: str) -> list[str]:
        """The ODS codes of the practices a PostgreSQL store holds."""
        db = open_database(Location.database(url), readonly=True)
        try:
            return [r[0] for r in db.rows("SELECT DISTINCT ods FROM practice_meta ORDER BY ods")]
        finally:
            db.close()

    def close(self) -> None:
        try:
            if not self.readonly:
                self.flush()
        finally:
            self.db.close()

    @contextmanager
    def transaction(self, deferred_first: bool = True) -> Iterator[Database]:
        """One durable transaction: the deferred moves and attempts first, then the caller's work.
        When anything fails, the COMMIT included, all of it is rolled back (the deferred items
        kept for the next transaction) and the error raised: a message whose id did not commit
        is never sent. ``deferred_first=False`` leaves the deferred items for a later
        transaction; only for work that no deferred move can meet, so the order does not
        matter, and the moves of one message, kept longer, collapse into fewer writes."""
        with self.db.lock:   # the connection is this thread's until the transaction ends
            yield from self._transaction(deferred_first)

    def _transaction(self, deferred_first: bool) -> Iterator[Database]:
        self.db.begin()
        attempts: list[tuple] = []
        moves: dict[str, _Moves] = {}
        if deferred_first:
            with self._pending:
                attempts, self._attempts = self._attempts, []
                moves, self._moves = self._moves, {}
        deferred_written = False
        try:
            last_attempt = self._attempt_id
            if attempts:
                self._write_attempts(attempts)
            if moves:
                self._write_moves(self.db, moves)
            deferred_written = True
            yield self.db
            self.db.commit()
        except BaseException as err:
            if self.db.in_transaction:
                self.db.rollback()
            if attempts:
                self._attempt_id = last_attempt
            if deferred_written or isinstance(err, DatabaseError):
                with self._pending:
                    self._attempts[:0] = attempts                # kept for the next one
                    if moves:
                        later, self._moves = self._moves, moves
                        for message_id, move in later.items():
                            self._defer(message_id, move)
            # else a deferred move broke the state table: it would break every later transaction,
            # so the deferred items go (Resume re-sends those ids; the Spine answers duplicates)
            if isinstance(err, DatabaseError):
                raise StoreError(f"{self.label}: the store could not write ({_words(err)}); "
                                 "nothing of this step was kept or sent. Resume continues the job "
                                 "once the store can be written again") from err
            raise

    def _write_attempts(self, attempts: list[tuple]) -> None:
        """The HTTP exchanges noted since the last transaction, numbered on from the practice's
        last (one job writes a practice's attempts: the lock sees to that)."""
        if self._attempt_id is None:
            self._attempt_id = self.db.scalar(
                "SELECT COALESCE(MAX(id), 0) FROM attempts WHERE ods = ?", (self.ods,))
        first = self._attempt_id + 1
        self._attempt_id += len(attempts)
        self.db.executemany(
            "INSERT INTO attempts (ods, id, message_id, at, kind, http_status, detail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            ((self.ods, first + i, *attempt) for i, attempt in enumerate(attempts)))

    # --- the practice: patients and groups ------------------------------------------------------

    def sync_patients(self, rows: Iterable[tuple[str, str, str, int, str | None, bool]],
                      extract: dict | None = None) -> None:
        """Bring the store in line with an extract's eligibility decisions.

        ``rows``: (pkey, patient_id, nhs_number, source_row, reason or None, dissent). A patient who
        is waiting to be sent or failed and is now not required becomes not required; a
        not-required patient who is now eligible becomes unprocessed. In-flight and acknowledged
        patients keep their state: their summaries are, or may be, on the Spine, and so does a
        patient the Spine said already holds a summary (``existing_summary_at_spine``).

        ``rows`` is read a batch at a time. ``extract`` (the fingerprint of the extract the rows
        came from) is kept with them, in the same transaction: ``extract_fingerprint``."""
        stamp = now_iso()
        rows = iter(rows)
        with self.transaction() as db:
            db.execute("CREATE TEMP TABLE IF NOT EXISTS extract_keys (pkey TEXT PRIMARY KEY)")
            db.execute("DELETE FROM extract_keys")
            while batch := list(islice(rows, SYNC_BATCH)):
                self._sync_batch(db, batch, stamp)
            # Patients gone from the extract are not sent: they get a reason, not silence.
            db.execute("UPDATE patients SET state = 'not_required', reason = ?, eligibility = ?, "
                       "updated_at = ? WHERE ods = ? "
                       "AND state IN ('unprocessed', 'failed', 'not_required') AND NOT EXISTS "
                       "(SELECT 1 FROM extract_keys AS k WHERE k.pkey = patients.pkey)",
                       (NOT_IN_EXTRACT, NOT_IN_EXTRACT, stamp, self.ods))
            db.execute("INSERT INTO practice_meta (ods, key, value) VALUES (?, 'extract', ?) "
                       "ON CONFLICT (ods, key) DO UPDATE SET value = excluded.value",
                       (self.ods, json.dumps(extract)))

    def extract_fingerprint(self) -> dict | None:
        """The fingerprint of the extract the patients were last brought in line with."""
        value = self.db.scalar("SELECT value FROM practice_meta WHERE ods = ? AND key = 'extract'",
                               (self.ods,))
        return json.loads(value) if value else None

    def _sync_batch(self, db: Database, batch: list[tuple], stamp: str) -> None:
        db.executemany(
            """INSERT INTO patients (ods, pkey, patient_id, nhs_number, source_row, eligibility,
                   dissent, state, reason, updated_at)
               VALUES (?8, ?1, ?2, ?3, ?4, ?5, ?6,
                       CASE WHEN CAST(?5 AS TEXT) IS NULL THEN 'unprocessed'
                            ELSE 'not_required' END, ?5, ?7)
               ON CONFLICT (ods, pkey) DO UPDATE SET
                   patient_id = excluded.patient_id, nhs_number = excluded.nhs_number,
                   source_row = excluded.source_row, eligibility = excluded.eligibility,
                   dissent = excluded.dissent,
                   state = CASE
                       WHEN patients.state IN ('unprocessed', 'failed', 'not_required')
                            AND excluded.eligibility IS NOT NULL THEN 'not_required'
                       WHEN patients.state = 'not_required' AND excluded.eligibility IS NULL
                            AND patients.reason IS DISTINCT FROM 'existing_summary_at_spine'
                            THEN 'unprocessed'
                       ELSE patients.state END,
                   reason = CASE
                       WHEN patients.state IN ('unprocessed', 'failed', 'not_required')
                            AND excluded.eligibility IS NOT NULL THEN excluded.eligibility
                       WHEN patients.state = 'not_required' AND excluded.eligibility IS NULL
                            AND patients.reason IS DISTINCT FROM 'existing_summary_at_spine'
                            THEN NULL
                       ELSE patients.reason END,
                   updated_at = CASE
                       WHEN patients.eligibility IS NOT DISTINCT FROM excluded.eligibility
                       THEN patients.updated_at ELSE excluded.updated_at END""",
            ((k, pid, nhs, row, reason, int(dissent), stamp, self.ods)
             for k, pid, nhs, row, reason, dissent in batch))
        db.executemany("INSERT INTO extract_keys (pkey) VALUES (?) ON CONFLICT DO NOTHING",
                       ((r[0],) for r in batch))

    def sync_extract_groups(self, groups: dict[str, list[str]]) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM groups WHERE ods = ? AND source = 'extract'", (self.ods,))
            db.executemany("INSERT INTO groups (ods, group_name, patient_id, source) "
                           "VALUES (?, ?, ?, 'extract') ON CONFLICT DO NOTHING",
                           ((self.ods, name, pid) for name, ids in groups.items() for pid in ids))

    def add_to_group(self, name: str, patient_ids: Iterable[str]) -> int:
        """Make or extend a group kept by the kit (e.g. patients whose errors support resolved)."""
        with self.transaction() as db:
            return db.executemany("INSERT INTO groups (ods, group_name, patient_id, source) "
                                  "VALUES (?, ?, ?, 'kit') ON CONFLICT DO NOTHING",
                                  ((self.ods, name, pid) for pid in patient_ids))

    def group_names(self) -> list[str]:
        return [r[0] for r in self.db.rows(
            "SELECT DISTINCT group_name FROM groups WHERE ods = ? ORDER BY group_name", (self.ods,))]

    def has_group(self, name: str) -> bool:
        return self.db.scalar("SELECT 1 FROM groups WHERE ods = ? AND group_name = ? LIMIT 1",
                              (self.ods, name)) is not None

    def _scope(self, group: str | None, alias: str = "") -> tuple[str, tuple]:
        """The practice's patients (in ``group``): a condition and its values."""
        if group is None:
            return f"{alias}ods = ?", (self.ods,)
        return (f"{alias}ods = ? AND {alias}patient_id IN (SELECT patient_id FROM groups "
                "WHERE ods = ? AND group_name = ?)", (self.ods, self.ods, group))

    # --- jobs ---------------------------------------------------------------------------------------

    def _job(self, row: tuple | None) -> Job | None:
        return None if row is None else Job.from_row(row)

    _JOB_COLUMNS = ("id, chain_id, mode, chain_mode, group_name, status, reason, user_id, "
                    "started_at, ended_at, settings, totals")

    def job(self, job_id: int) -> Job | None:
        return self._job(self.db.execute(
            f"SELECT {self._JOB_COLUMNS} FROM jobs WHERE ods = ? AND id = ?",
            (self.ods, job_id)).first())

    def latest_job(self, group: str | None = None, any_scope: bool = False) -> Job | None:
        if any_scope:
            row = self.db.execute(f"SELECT {self._JOB_COLUMNS} FROM jobs WHERE ods = ? "
                                  "ORDER BY id DESC LIMIT 1", (self.ods,))
        else:
            row = self.db.execute(f"SELECT {self._JOB_COLUMNS} FROM jobs WHERE ods = ? AND "
                                  "group_name IS NOT DISTINCT FROM CAST(? AS TEXT) "
                                  "ORDER BY id DESC LIMIT 1", (self.ods, group))
        return self._job(row.first())

    def latest_unfinished(self, group: str | None = None, any_scope: bool = True) -> Job | None:
        """The newest job that is the last of its chain and did not complete: what Resume
        continues. A completed Resume closes its chain, so earlier stops are not picked again."""
        scope = "" if any_scope else "AND group_name IS NOT DISTINCT FROM CAST(? AS TEXT)"
        args = (self.ods, self.ods) if any_scope else (self.ods, self.ods, group)
        return self._job(self.db.execute(
            f"SELECT {self._JOB_COLUMNS} FROM jobs AS j WHERE ods = ? AND status != 'completed' "
            "AND id = (SELECT MAX(id) FROM jobs WHERE ods = ? AND chain_id = j.chain_id) "
            f"{scope} ORDER BY id DESC LIMIT 1", args).first())

    def jobs(self) -> list[Job]:
        return [self._job(r) for r in self.db.rows(
            f"SELECT {self._JOB_COLUMNS} FROM jobs WHERE ods = ? ORDER BY id", (self.ods,))]

    def start_job(self, mode: str, chain_mode: str, group: str | None, chain_id: int | None,
                  user_id: str, user_name: str, settings: dict) -> Job:
        """Record a job, numbered on from the practice's last (one job starts at a time on a
        practice: the lock sees to that)."""
        with self.transaction() as db:
            job_id = db.scalar(
                "INSERT INTO jobs (ods, id, chain_id, mode, chain_mode, group_name, status, "
                "user_id, user_name, started_at, settings) "
                "SELECT ?1, COALESCE(MAX(id), 0) + 1, CAST(?2 AS INTEGER), CAST(?3 AS TEXT), "
                "CAST(?4 AS TEXT), CAST(?5 AS TEXT), 'running', CAST(?6 AS TEXT), "
                "CAST(?7 AS TEXT), CAST(?8 AS TEXT), CAST(?9 AS TEXT) FROM jobs WHERE ods = ?1 "
                "RETURNING id",
                (self.ods, chain_id, mode, chain_mode, group, user_id, user_name, now_iso(),
                 json.dumps(settings)))
            if chain_id is None:
                db.execute("UPDATE jobs SET chain_id = id WHERE ods = ? AND id = ?",
                           (self.ods, job_id))
        return self.job(job_id)

    def end_job(self, job_id: int, status: JobStatus, reason: str | None, totals: dict) -> Job:
        current = self.job(job_id)
        check_job_transition(current.status, status)
        ended = None if status == JobStatus.RUNNING else now_iso()
        with self.transaction() as db:
            db.execute("UPDATE jobs SET status = ?, reason = ?, ended_at = ?, totals = ? "
                       "WHERE ods = ? AND id = ?",
                       (status.value, reason, ended, json.dumps(totals), self.ods, job_id))
        return self.job(job_id)

    def mark_job(self, job_id: int, status: JobStatus, reason: str | None) -> None:
        """A change of a running job's status that does not end it (a scheduled pause)."""
        check_job_transition(self.job(job_id).status, status)
        with self.transaction() as db:
            db.execute("UPDATE jobs SET status = ?, reason = ? WHERE ods = ? AND id = ?",
                       (status.value, reason, self.ods, job_id))

    # --- work selection -------------------------------------------------------------------------

    def in_flight(self, group: str | None) -> list[tuple[str, str]]:
        """(pkey, message_id) of patients whose message may be on its way: finish these first."""
        self.flush()
        where, args = self._scope(group)
        return self.db.rows(
            f"SELECT pkey, message_id FROM patients WHERE state IN ({_IN_FLIGHT_SQL}) "
            f"AND {where} ORDER BY source_row", args)

    def _work(self, chain_mode: str, chain_id: int, group: str | None,
              skip_acknowledged: bool) -> tuple[str, tuple]:
        """The condition on patients a job of ``chain_mode`` still has to send, and its values."""
        where, args = self._scope(group)
        if chain_mode == "run":
            cond = "state = 'unprocessed'"
        elif chain_mode == "rerun":
            states = "('unprocessed', 'failed')" if skip_acknowledged else \
                "('unprocessed', 'failed', 'acknowledged')"
            cond = (f"state IN {states} AND eligibility IS NULL "
                    "AND chain_id IS DISTINCT FROM CAST(? AS INTEGER)")
            args = (chain_id, *args)
        elif chain_mode == "failed":
            cond = "state = 'failed' AND chain_id IS DISTINCT FROM CAST(? AS INTEGER)"
            args = (chain_id, *args)
        else:
            raise ValueError(f"no work rule for mode {chain_mode!r}")
        return f"{cond} AND {where}", args

    def select_work(self, chain_mode: str, chain_id: int, group: str | None,
                    skip_acknowledged: bool = False, after_row: int = -1,
                    limit: int = -1) -> list[tuple[str, int]]:
        """(pkey, row) of the patients a job of ``chain_mode`` still has to send, in extract
        order: at most ``limit`` (-1: all) after patients.csv's row ``after_row``."""
        self.flush()
        cond, args = self._work(chain_mode, chain_id, group, skip_acknowledged)
        return self.db.rows(
            f"SELECT pkey, source_row FROM patients WHERE source_row > ? AND {cond} "
            "ORDER BY source_row" + (" LIMIT ?" if limit >= 0 else ""),
            (after_row, *args, *((limit,) if limit >= 0 else ())))

    def count_work(self, chain_mode: str, chain_id: int, group: str | None,
                   skip_acknowledged: bool = False) -> int:
        self.flush()
        cond, args = self._work(chain_mode, chain_id, group, skip_acknowledged)
        return self.db.scalar(f"SELECT COUNT(*) FROM patients WHERE {cond}", args)

    def count_in_scope(self, group: str | None, state: PatientState) -> int:
        self.flush()
        where, args = self._scope(group)
        return self.db.scalar(f"SELECT COUNT(*) FROM patients WHERE state = ? AND {where}",
                              (state.value, *args))

    def scope_size(self, group: str | None) -> tuple[int, int]:
        """(patients, eligible patients) in scope."""
        self.flush()
        where, args = self._scope(group)
        count = f"SELECT COUNT(*) FROM patients WHERE {where}"
        return (self.db.scalar(count, args),
                self.db.scalar(count + " AND eligibility IS NULL", args))

    def to_build(self, pkeys: list[str]) -> dict[str, tuple[int, str | None, bool, str | None]]:
        """What building these patients' messages needs from the store: pkey -> (row in
        patients.csv, not-required reason or None, dissent, the summary the Spine holds)."""
        return {r[0]: r[1:] for r in _rows_in(
            self.db, "SELECT pkey, source_row, eligibility, dissent, ack_event_id FROM patients "
            "WHERE ods = ? AND pkey IN ({})", self.ods, pkeys)}

    def patient(self, pkey: str) -> dict | None:
        return self.db.record("SELECT * FROM patients WHERE ods = ? AND pkey = ?",
                              (self.ods, pkey))

    # --- per-patient transitions ----------------------------------------------------------------

    def _allowed(self, pkey: str, row: tuple[str, str | None] | None, new: PatientState,
                 only_if_message: str | None = None) -> bool:
        """Whether a patient whose (state, current message) is ``row`` moves to ``new``: not when
        ``only_if_message`` is no longer its current message; raises when there is no such patient
        or the transition table does not allow the move."""
        if row is None:
            raise StoreError(f"no patient {pkey!r} in {self.label}")
        if only_if_message is not None and row[1] != only_if_message:
            return False   # a newer message has taken over; this one's news is history
        if row[0] not in PREDECESSORS[new]:
            check_transition(row[0], new)   # raises: the table does not allow it
        return True

    def _move(self, db: Database, pkey: str, new: PatientState,
              only_if_message: str | None = None, **fields: object) -> bool:
        """Move one patient to ``new`` if the transition table allows it from its state (and, with
        ``only_if_message``, only while that message is still its current one)."""
        sources = PREDECESSORS[new]
        sets = "".join(f", {k} = ?" for k in fields)
        sql = (f"UPDATE patients SET state = ?, updated_at = ?{sets} WHERE ods = ? AND pkey = ? "
               f"AND state IN ({', '.join('?' * len(sources))})")
        args: list[object] = [new.value, now_iso(), *fields.values(), self.ods, pkey, *sources]
        if only_if_message is not None:
            sql += " AND message_id = ?"
            args.append(only_if_message)
        if db.execute(sql, args).rowcount:
            return True
        row = db.execute("SELECT state, message_id FROM patients WHERE ods = ? AND pkey = ?",
                         (self.ods, pkey)).first()
        self._allowed(pkey, row, new, only_if_message)
        return False

    def queue_messages(self, job_id: int, chain_id: int,
                       messages: list[tuple[str, str, str, str | None, str, bytes]]) -> None:
        """Store built messages and their ids, and put their patients on the outbound queue, in
        one transaction: committed before any of them is sent. Each item is (pkey, message id,
        event id, prior event id, content type, body). The bodies are compressed before the
        transaction, so the store is held for the writes alone. The deferred moves wait for a
        later transaction unless one of them may be a batch patient's (its patient unknown or in
        the batch): a patient's moves are always written in the order they were made."""
        stamp = now_iso()
        rows = [(message_id, pkey, job_id, event_id, prior_event_id, stamp, len(body),
                 content_type, compress(body), self.ods)
                for pkey, message_id, event_id, prior_event_id, content_type, body in messages]
        batch = {row[1] for row in rows}
        with self._pending:
            meets = any(move.pkey is None or move.pkey in batch for move in self._moves.values())
        with self.transaction(deferred_first=meets) as db:
            db.executemany(
                "INSERT INTO messages (message_id, pkey, job_id, event_id, prior_event_id, "
                "created_at, size, content_type, body, ods, state) VALUES (?, ?, ?, ?, ?, ?, ?, "
                "?, ?, ?, 'queued')", rows)
            queued = db.executemany(
                "UPDATE patients SET state = 'queued', updated_at = ?, reason = NULL, "
                f"message_id = ?, chain_id = ? WHERE ods = ? AND pkey = ? "
                f"AND state IN ({_QUEUED_FROM})",
                [(stamp, row[0], chain_id, self.ods, row[1]) for row in rows])
            if queued != len(rows):
                self._refuse_queue(db, rows)
        self._pkeys.update((row[0], row[1]) for row in rows)

    def _refuse_queue(self, db: Database, rows: list[tuple]) -> None:
        """Raise why some patients of ``queue_messages`` were not queued: each patient queued holds
        its (last) new message; any other one has no row or a state the table does not let it
        leave for queued."""
        newest = {row[1]: row[0] for row in rows}
        for pkey, message_id in newest.items():
            row = db.execute("SELECT state, message_id FROM patients WHERE ods = ? AND pkey = ?",
                             (self.ods, pkey)).first()
            if row is None or row[1] != message_id:
                self._allowed(pkey, row, PatientState.QUEUED)
        raise StoreError(f"{self.label}: fewer patients were queued than messages stored")

    def fail_unsent(self, pkey: str, job_id: int, chain_id: int, message_id: str, event_id: str,
                    size: int, code: str) -> None:
        """A message the kit will not send (e.g. over the size limit): the patient fails."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO messages (ods, message_id, pkey, job_id, event_id, created_at, size, "
                "state, failure_code) VALUES (?, ?, ?, ?, ?, ?, ?, 'failed', ?)",
                (self.ods, message_id, pkey, job_id, event_id, now_iso(), size, code))
            self._move(db, pkey, PatientState.FAILED, reason=code, message_id=message_id,
                       chain_id=chain_id)

    def requeue(self, pkey: str, message_id: str, job_id: int, chain_id: int) -> None:
        """Send a stored message again with its own id (Resume; Failed after an ack timeout)."""
        with self.transaction() as db:
            db.execute("UPDATE messages SET state = 'queued', job_id = ?, failure_code = NULL "
                       "WHERE ods = ? AND message_id = ?", (job_id, self.ods, message_id))
            self._move(db, pkey, PatientState.QUEUED, reason=None, message_id=message_id,
                       chain_id=chain_id)
        self._pkeys[message_id] = pkey

    def unsend(self, message_id: str) -> None:
        """A send that could not go ahead (the session ended): back on the queue, same id."""
        self._message_move(message_id, PatientState.QUEUED, {}, defer=False)

    def message(self, message_id: str) -> StoredMessage | None:
        row = self.db.execute(
            "SELECT message_id, pkey, event_id, prior_event_id, content_type, body, state, "
            "poll_url, failure_code FROM messages WHERE ods = ? AND message_id = ?",
            (self.ods, message_id)).first()
        if row is None:
            return None
        body = zlib.decompress(row[5]) if row[5] is not None else b""
        return StoredMessage(row[0], row[1], row[2], row[3], row[4] or "", body, row[6], row[7],
                             row[8])

    def _message_move(self, message_id: str, new: PatientState, message_fields: dict,
                      defer: bool = True, patient_state: PatientState | None = None,
                      **patient_fields: object) -> None:
        """Move a message and, if it is still the patient's current one, the patient.

        Moves after the message was stored are deferred, and a message's collapse into one write:
        written by the next transaction that may meet them, once ``MAX_DEFERRED`` messages have
        some, or when the engine flushes, a few times a second. Losing them in a crash only means
        Resume sends the same message id again, and the Spine's duplicate elimination answers
        with the first outcome."""
        pkey = self._pkeys.pop(message_id, None) if new in _ENDS else self._pkeys.get(message_id)
        self._defer(message_id, _Moves(new, message_fields, patient_state or new, patient_fields,
                                       pkey))
        waiting = len(self._moves)
        if not defer or waiting >= BACKLOG_LIMIT or \
                (waiting >= MAX_DEFERRED and self.on_backlog is None):
            self.flush()
        elif waiting >= MAX_DEFERRED:
            self.on_backlog()

    def _defer(self, message_id: str, move: _Moves) -> None:
        """Keep ``move`` to be written after the message's moves deferred before it."""
        with self._pending:
            earlier = self._moves.get(message_id)
            self._moves[message_id] = move if earlier is None else earlier.then(move)

    def _write_moves(self, db: Database, moves: dict[str, _Moves]) -> None:
        """Write the deferred moves, each message's collapsed into one row: the patients and their
        states read in one query, the chains checked here, then one ``executemany`` per shape of
        update (the columns set; the states the chain may start from). A patient moves only while
        the message is its current one, the same rule as a move at a time."""
        stamp = now_iso()
        pkeys = {message_id: move.pkey for message_id, move in moves.items() if move.pkey}
        pkeys.update(_rows_in(db, "SELECT message_id, pkey FROM messages WHERE ods = ? AND "
                              "message_id IN ({})", self.ods,
                              [message_id for message_id in moves if message_id not in pkeys]))
        patients = {r[0]: r[1:] for r in _rows_in(
            db, "SELECT pkey, state, message_id FROM patients WHERE ods = ? AND pkey IN ({})",
            self.ods, list(set(pkeys.values())))}
        message_rows: dict[tuple, list[tuple]] = {}
        patient_rows: dict[tuple, list[tuple]] = {}
        for message_id, move in moves.items():
            pkey = pkeys.get(message_id)
            if pkey is None:
                raise StoreError(f"no message {message_id} in {self.label}")
            message_rows.setdefault(tuple(move.fields), []).append(
                (move.state.value, *move.fields.values(), message_id))
            if not self._allowed(pkey, patients.get(pkey), move.first, message_id):
                continue
            if move.illegal is not None:
                check_transition(*move.illegal)   # raises: a step of the chain is not allowed
            patient_rows.setdefault((move.first, tuple(move.patient_fields)), []).append(
                (move.last.value, stamp, *move.patient_fields.values(), self.ods, pkey,
                 message_id))
        for columns, rows in message_rows.items():
            sets = "".join(f", {c} = ?" for c in columns)
            moved = db.executemany(f"UPDATE messages SET state = ?{sets} WHERE ods = ? "
                                   "AND message_id = ?",
                                   [(*row[:-1], self.ods, row[-1]) for row in rows])
            if moved != len(rows):
                raise StoreError(f"{self.label}: a message with deferred moves is gone")
        for (first, columns), rows in patient_rows.items():
            sets = "".join(f", {c} = ?" for c in columns)
            sources = ", ".join(f"'{state}'" for state in PREDECESSORS[first])
            moved = db.executemany(
                f"UPDATE patients SET state = ?, updated_at = ?{sets} WHERE ods = ? AND pkey = ? "
                f"AND message_id = ? AND state IN ({sources})", rows)
            if moved != len(rows):
                raise StoreError(f"{self.label}: patients changed while their moves were written")

    @property
    def pending(self) -> int:
        return len(self._moves) + len(self._attempts)

    def mark_sending(self, message_id: str) -> None:
        self._message_move(message_id, PatientState.SENDING, {})

    def mark_transmitted(self, message_id: str, poll_url: str, attempts: int) -> None:
        self._message_move(message_id, PatientState.TRANSMITTED,
                           {"poll_url": poll_url, "transmitted_at": now_iso(),
                            "post_attempts": attempts})

    def mark_acknowledged(self, message_id: str, event_id: str) -> None:
        """AA: the summary is on the Spine. The ack itself is not kept: every AA says the same."""
        self._message_move(message_id, PatientState.ACKNOWLEDGED,
                           {"acked_at": now_iso(), "ack_type": "AA", "ack_codes": ""},
                           reason=None, ack_event_id=event_id, ack_message_id=message_id)

    def mark_failed(self, message_id: str, code: str, ack_type: str | None = None,
                    ack_codes: tuple[str, ...] = (), ack_body: bytes | None = None) -> None:
        fields: dict[str, object] = {"failure_code": code}
        if ack_type is not None:
            fields.update(acked_at=now_iso(), ack_type=ack_type, ack_codes=" ".join(ack_codes),
                          ack_body=compress(ack_body or b""))
        self._message_move(message_id, PatientState.FAILED, fields, reason=code)

    def mark_existing_at_spine(self, message_id: str, ack_codes: tuple[str, ...],
                               ack_body: bytes | None) -> None:
        """AE 30134: the Spine already holds a summary for the patient. The message failed, but
        the patient is not required (``existing_summary_at_spine``), never a failure to fix."""
        self._message_move(message_id, PatientState.FAILED,
                           {"failure_code": DUPLICATE_EVENT, "acked_at": now_iso(),
                            "ack_type": "AE", "ack_codes": " ".join(ack_codes),
                            "ack_body": compress(ack_body or b"")},
                           patient_state=PatientState.NOT_REQUIRED,
                           reason=EXISTING_SUMMARY_AT_SPINE)

    def unqueue_unsent(self, group: str | None) -> int:
        """After a stop: patients whose message was built but never posted go back to unprocessed
        (nothing is counted as Sending); the message keeps its id for the next job of the chain."""
        self.flush()
        where, args = self._scope(group)
        with self.transaction() as db:
            return db.execute(
                "UPDATE patients SET state = 'unprocessed', updated_at = ? WHERE state = 'queued' "
                "AND message_id IN (SELECT message_id FROM messages WHERE ods = ? "
                f"AND state = 'queued') AND {where}", (now_iso(), self.ods, *args)).rowcount

    def unsent(self, chain_id: int, group: str | None) -> list[tuple[str, str]]:
        """(pkey, message_id) of unprocessed patients of this chain whose message was built and
        never posted: sent next with that id, before anything is built."""
        self.flush()
        where, args = self._scope(group, "p.")
        return self.db.rows(
            "SELECT p.pkey, p.message_id FROM patients AS p JOIN messages AS m "
            "ON m.ods = p.ods AND m.message_id = p.message_id WHERE p.state = 'unprocessed' "
            "AND p.message_id IS NOT NULL AND m.state = 'queued' "
            f"AND m.body IS NOT NULL AND p.chain_id = ? AND {where} ORDER BY p.source_row",
            (chain_id, *args))

    def record_attempt(self, message_id: str, kind: str, status: int | None, detail: str) -> None:
        """Note one HTTP exchange for the patient's timeline; written with the next state change
        (or by ``flush``), so the timeline costs no transaction of its own."""
        attempt = (message_id, now_iso(), kind, status, detail)
        with self._pending:
            self._attempts.append(attempt)

    def flush(self) -> None:
        """Write the deferred moves and attempts now."""
        if not self.readonly and (self._moves or self._attempts):
            with self.transaction():
                pass

    # --- reading --------------------------------------------------------------------------------

    def state_counts(self) -> dict[str, int]:
        self.flush()
        counts = {s.value: 0 for s in PatientState}
        counts.update(self.db.pairs("SELECT state, COUNT(*) FROM patients WHERE ods = ? "
                                    "GROUP BY state", (self.ods,)))
        return counts

    def not_required_by_reason(self) -> dict[str, int]:
        self.flush()
        found = self.db.pairs("SELECT reason, COUNT(*) FROM patients WHERE ods = ? AND state = "
                              "'not_required' GROUP BY reason", (self.ods,))
        ordered = {r: found.pop(r, 0) for r in NOT_REQUIRED_REASONS}
        ordered.update(found)
        return ordered

    def failed_by_code(self) -> dict[str, int]:
        self.flush()
        return self.db.pairs("SELECT reason, COUNT(*) FROM patients WHERE ods = ? AND state = "
                             "'failed' GROUP BY reason ORDER BY COUNT(*) DESC, reason",
                             (self.ods,))

    # --- control requests: Stop, Stop and Close, Cancel from anywhere -------------------------------

    def running_job(self) -> Job | None:
        """The job running on this store now, if any: the latest, while its lock is held."""
        if self.lock_holder() is None:
            return None
        latest = self.latest_job(any_scope=True)
        return latest if latest is not None and latest.status in RUNNING_STATUSES else None

    def ask(self, job_id: int, request: str, user_id: str, user_name: str) -> None:
        """Ask a running job to stop (``stop``), stop and close (``close``) or cancel (``cancel``);
        the job reads it within two seconds and logs who asked."""
        if request not in CONTROL_REQUESTS:
            raise ValueError(f"a request is one of {', '.join(CONTROL_REQUESTS)}, not {request!r}")
        for tries in range(5):   # two people asking at once may both take the next number
            try:
                with self.transaction() as db:
                    db.execute("INSERT INTO control_requests (ods, id, job_id, request, user_id, "
                               "user_name, asked_at) SELECT ?1, COALESCE(MAX(id), 0) + 1, "
                               "CAST(?2 AS INTEGER), CAST(?3 AS TEXT), CAST(?4 AS TEXT), "
                               "CAST(?5 AS TEXT), CAST(?6 AS TEXT) FROM control_requests "
                               "WHERE ods = ?1",
                               (self.ods, job_id, request, user_id, user_name, now_iso()))
                return
            except StoreError:
                if tries == 4:
                    raise

    def take_requests(self, job_id: int) -> list[tuple[str, str, str]]:
        """The requests for ``job_id`` not seen yet, oldest first, as (request, user id, user
        name); they are marked seen."""
        rows = self.db.rows("SELECT id, request, user_id, user_name FROM control_requests "
                            "WHERE ods = ? AND job_id = ? AND seen_at IS NULL ORDER BY id",
                            (self.ods, job_id))
        if rows:
            with self.transaction() as db:
                db.executemany("UPDATE control_requests SET seen_at = ? WHERE ods = ? AND id = ?",
                               [(now_iso(), self.ods, row[0]) for row in rows])
        return [tuple(row[1:]) for row in rows]

    def lock_holder(self) -> dict | None:
        """Who holds the store's job lock (user, host, pid, since), if anyone."""
        holder = self.db.record("SELECT user_id, user_name, host, pid, since, started "
                                "FROM job_lock WHERE ods = ?", (self.ods,))
        if holder is not None and self.location.is_postgres and not self.lock_taken():
            return None   # the row of a job whose connection is gone: its lock went with it
        return holder

    def lock_taken(self) -> bool:
        """PostgreSQL: whether some connection holds this practice's advisory lock."""
        return practice_lock_key(self.ods) in held_practice_locks(self.db)

    def status(self) -> dict:
        """The ``scr-nb status --json`` object (SPEC 10)."""
        states = self.state_counts()
        latest = self.latest_job(any_scope=True)
        return {
            "store": self.label,
            "counters": counters(states),
            "states": states,
            "not_required_by_reason": self.not_required_by_reason(),
            "failed_by_code": self.failed_by_code(),
            "transmitted_not_acknowledged": states.get("transmitted", 0),
            "latest_job": latest.to_json() if latest else None,
            "running": self.lock_holder(),
            "groups": self.group_names(),
        }




def held_practice_locks(db: Database) -> set[int]:
    """PostgreSQL: the practices' advisory lock keys (``practice_lock_key``) some connection to
    this database holds now. pg_locks shows a one-number key as its high and low 32 bits."""
    return {(high << 32 | low) - ((1 << 64) if high >= 1 << 31 else 0)
            for high, low in db.rows(
                "SELECT CAST(classid AS BIGINT), CAST(objid AS BIGINT) FROM pg_locks "
                "WHERE locktype = 'advisory' AND granted AND objsubid = 1 AND database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database())")}


_PRACTICE_TABLES = ("practice_meta", "patients", "messages", "attempts", "jobs", "groups",
                    "job_lock", "control_requests", "practice_log")


def _words(err: Exception) -> str:
    """The database's own words for a failure, without SQLAlchemy's statement dump."""
    return str(getattr(err, "orig", err)).strip().splitlines()[0]


def read_status(store: str | Path | Location, ods: str | None = None) -> dict:
    """The ``scr-nb status --json`` object of a store, read alongside any job."""
    store = Store(store, ods, readonly=True)
    try:
        return store.status()
    finally:
        store.close()


__all__ = ["Store", "Job", "StoredMessage", "read_status"]
