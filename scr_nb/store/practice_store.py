"""The store: all upload state, one SQLite file per practice (SPEC 8).

Every change of a patient's state goes through ``_move``, which checks it against the transition
table in ``states``. A message and its id are committed before the message is sent, so a crash at
any moment leaves enough to finish it with the same id. Plain SQL with portable types (TEXT,
INTEGER, BLOB) so the schema can move to PostgreSQL.
"""

from __future__ import annotations

import json
import sqlite3
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from scr_nb.constants import DUPLICATE_EVENT, EXISTING_SUMMARY_AT_SPINE
from scr_nb.errors import StoreError
from scr_nb.store.schema import open_readonly, open_writable
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
MAX_DEFERRED = 500                  # deferred moves written at the latest with the 500th


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


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
    """One practice's store. ``readonly=True`` opens it for reading alongside a running job
    (status, the control panel, reports): no schema work, no writes, no waiting on the writer."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self._attempts: list[tuple] = []
        self._moves: list[tuple] = []   # deferred message moves, written by the next transaction
        self.db = open_readonly(self.path) if readonly else open_writable(self.path)

    def close(self) -> None:
        if not self.readonly:
            self.flush()
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One durable transaction: the deferred moves and attempts first, then the caller's work.
        When anything fails, the COMMIT included, all of it is rolled back (the deferred items
        kept for the next transaction) and the error raised: a message whose id did not commit
        is never sent."""
        self.db.execute("BEGIN IMMEDIATE")
        attempts, self._attempts = self._attempts, []
        moves, self._moves = self._moves, []
        deferred_written = False
        try:
            if attempts:
                self.db.executemany("INSERT INTO attempts (message_id, at, kind, http_status, "
                                    "detail) VALUES (?, ?, ?, ?, ?)", attempts)
            for move in moves:
                self._apply_move(self.db, *move)
            deferred_written = True
            yield self.db
            self.db.execute("COMMIT")
        except BaseException as err:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if deferred_written or isinstance(err, sqlite3.Error):
                self._attempts[:0], self._moves[:0] = attempts, moves   # kept for the next one
            # else a deferred move broke the state table: it would break every later transaction,
            # so the deferred items go (Resume re-sends those ids; the Spine answers duplicates)
            if isinstance(err, sqlite3.Error):
                raise StoreError(f"{self.path}: the store could not write ({err}); nothing of "
                                 "this step was kept or sent. Resume continues the job once the "
                                 "store can be written again") from err
            raise

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
            db.execute("DELETE FROM temp.extract_keys")
            while batch := list(islice(rows, SYNC_BATCH)):
                self._sync_batch(db, batch, stamp)
            # Patients gone from the extract are not sent: they get a reason, not silence.
            db.execute("UPDATE patients SET state = 'not_required', reason = ?, eligibility = ?, "
                       "updated_at = ? WHERE state IN ('unprocessed', 'failed', 'not_required') "
                       "AND pkey NOT IN (SELECT pkey FROM temp.extract_keys)",
                       (NOT_IN_EXTRACT, NOT_IN_EXTRACT, stamp))
            db.execute("INSERT INTO meta VALUES ('extract', ?) ON CONFLICT (key) DO UPDATE SET "
                       "value = excluded.value", (json.dumps(extract),))

    def extract_fingerprint(self) -> dict | None:
        """The fingerprint of the extract the patients were last brought in line with."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'extract'").fetchone()
        return json.loads(row[0]) if row else None

    @staticmethod
    def _sync_batch(db: sqlite3.Connection, batch: list[tuple], stamp: str) -> None:
        db.executemany(
            """INSERT INTO patients (pkey, patient_id, nhs_number, source_row, eligibility,
                   dissent, state, reason, updated_at)
               VALUES (?1, ?2, ?3, ?4, ?5, ?6,
                       CASE WHEN ?5 IS NULL THEN 'unprocessed' ELSE 'not_required' END, ?5, ?7)
               ON CONFLICT (pkey) DO UPDATE SET
                   patient_id = excluded.patient_id, nhs_number = excluded.nhs_number,
                   source_row = excluded.source_row, eligibility = excluded.eligibility,
                   dissent = excluded.dissent,
                   state = CASE
                       WHEN patients.state IN ('unprocessed', 'failed', 'not_required')
                            AND excluded.eligibility IS NOT NULL THEN 'not_required'
                       WHEN patients.state = 'not_required' AND excluded.eligibility IS NULL
                            AND patients.reason IS NOT 'existing_summary_at_spine'
                            THEN 'unprocessed'
                       ELSE patients.state END,
                   reason = CASE
                       WHEN patients.state IN ('unprocessed', 'failed', 'not_required')
                            AND excluded.eligibility IS NOT NULL THEN excluded.eligibility
                       WHEN patients.state = 'not_required' AND excluded.eligibility IS NULL
                            AND patients.reason IS NOT 'existing_summary_at_spine'
                            THEN NULL
                       ELSE patients.reason END,
                   updated_at = CASE WHEN patients.eligibility IS excluded.eligibility
                       THEN patients.updated_at ELSE excluded.updated_at END""",
            ((k, pid, nhs, row, reason, int(dissent), stamp)
             for k, pid, nhs, row, reason, dissent in batch))
        db.executemany("INSERT OR IGNORE INTO temp.extract_keys VALUES (?)",
                       ((r[0],) for r in batch))

    def sync_extract_groups(self, groups: dict[str, list[str]]) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM groups WHERE source = 'extract'")
            db.executemany("INSERT OR IGNORE INTO groups VALUES (?, ?, 'extract')",
                           ((name, pid) for name, ids in groups.items() for pid in ids))

    def add_to_group(self, name: str, patient_ids: Iterable[str]) -> int:
        """Make or extend a group kept by the kit (e.g. patients whose errors support resolved)."""
        with self.transaction() as db:
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO groups VALUES (?, ?, 'kit')",
                           ((name, pid) for pid in patient_ids))
            return db.total_changes - before

    def group_names(self) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT DISTINCT group_name FROM groups ORDER BY group_name")]

    def has_group(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM groups WHERE group_name = ? LIMIT 1",
                               (name,)).fetchone() is not None

    def _scope(self, group: str | None, alias: str = "") -> tuple[str, tuple]:
        if group is None:
            return "1", ()
        return (f"{alias}patient_id IN (SELECT patient_id FROM groups WHERE group_name = ?)",
                (group,))

    # --- jobs ---------------------------------------------------------------------------------------

    def _job(self, row: tuple | None) -> Job | None:
        if row is None:
            return None
        (id_, chain, mode, chain_mode, group, status, reason, user_id, started, ended, settings,
         totals) = row
        return Job(id_, chain, mode, chain_mode, group, status, reason, user_id, started, ended,
                   json.loads(settings or "{}"), json.loads(totals or "{}"))

    _JOB_COLUMNS = ("id, chain_id, mode, chain_mode, group_name, status, reason, user_id, "
                    "started_at, ended_at, settings, totals")

    def job(self, job_id: int) -> Job | None:
        return self._job(self.db.execute(
            f"SELECT {self._JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def latest_job(self, group: str | None = None, any_scope: bool = False) -> Job | None:
        if any_scope:
            row = self.db.execute(f"SELECT {self._JOB_COLUMNS} FROM jobs ORDER BY id DESC LIMIT 1")
        else:
            row = self.db.execute(f"SELECT {self._JOB_COLUMNS} FROM jobs WHERE group_name IS ? "
                                  "ORDER BY id DESC LIMIT 1", (group,))
        return self._job(row.fetchone())

    def latest_unfinished(self, group: str | None = None, any_scope: bool = True) -> Job | None:
        """The newest job that is the last of its chain and did not complete: what Resume
        continues. A completed Resume closes its chain, so earlier stops are not picked again."""
        scope = "" if any_scope else "AND group_name IS ?"
        args = () if any_scope else (group,)
        return self._job(self.db.execute(
            f"SELECT {self._JOB_COLUMNS} FROM jobs AS j WHERE status != 'completed' "
            f"AND id = (SELECT MAX(id) FROM jobs WHERE chain_id = j.chain_id) {scope} "
            "ORDER BY id DESC LIMIT 1", args).fetchone())

    def jobs(self) -> list[Job]:
        return [self._job(r) for r in self.db.execute(
            f"SELECT {self._JOB_COLUMNS} FROM jobs ORDER BY id")]

    def start_job(self, mode: str, chain_mode: str, group: str | None, chain_id: int | None,
                  user_id: str, user_name: str, settings: dict) -> Job:
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO jobs (chain_id, mode, chain_mode, group_name, status, user_id, "
                "user_name, started_at, settings) VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?)",
                (chain_id, mode, chain_mode, group, user_id, user_name, now_iso(),
                 json.dumps(settings)))
            job_id = cur.lastrowid
            if chain_id is None:
                db.execute("UPDATE jobs SET chain_id = id WHERE id = ?", (job_id,))
        return self.job(job_id)

    def end_job(self, job_id: int, status: JobStatus, reason: str | None, totals: dict) -> Job:
        current = self.job(job_id)
        check_job_transition(current.status, status)
        ended = None if status == JobStatus.RUNNING else now_iso()
        with self.transaction() as db:
            db.execute("UPDATE jobs SET status = ?, reason = ?, ended_at = ?, totals = ? "
                       "WHERE id = ?", (status.value, reason, ended, json.dumps(totals), job_id))
        return self.job(job_id)

    def mark_job(self, job_id: int, status: JobStatus, reason: str | None) -> None:
        """A change of a running job's status that does not end it (a scheduled pause)."""
        check_job_transition(self.job(job_id).status, status)
        with self.transaction() as db:
            db.execute("UPDATE jobs SET status = ?, reason = ? WHERE id = ?",
                       (status.value, reason, job_id))

    # --- work selection -------------------------------------------------------------------------

    def in_flight(self, group: str | None) -> list[tuple[str, str]]:
        """(pkey, message_id) of patients whose message may be on its way: finish these first."""
        self.flush()
        where, args = self._scope(group)
        return list(self.db.execute(
            f"SELECT pkey, message_id FROM patients WHERE state IN ({_IN_FLIGHT_SQL}) "
            f"AND {where} ORDER BY source_row", args))

    def _work(self, chain_mode: str, chain_id: int, group: str | None,
              skip_acknowledged: bool) -> tuple[str, tuple]:
        """The condition on patients a job of ``chain_mode`` still has to send, and its values."""
        where, args = self._scope(group)
        if chain_mode == "run":
            cond = "state = 'unprocessed'"
        elif chain_mode == "rerun":
            states = "('unprocessed', 'failed')" if skip_acknowledged else \
                "('unprocessed', 'failed', 'acknowledged')"
            cond = f"state IN {states} AND eligibility IS NULL AND chain_id IS NOT ?"
            args = (chain_id, *args)
        elif chain_mode == "failed":
            cond = "state = 'failed' AND chain_id IS NOT ?"
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
        return list(self.db.execute(
            f"SELECT pkey, source_row FROM patients WHERE source_row > ? AND {cond} "
            "ORDER BY source_row LIMIT ?", (after_row, *args, limit)))

    def count_work(self, chain_mode: str, chain_id: int, group: str | None,
                   skip_acknowledged: bool = False) -> int:
        self.flush()
        cond, args = self._work(chain_mode, chain_id, group, skip_acknowledged)
        return self.db.execute(f"SELECT COUNT(*) FROM patients WHERE {cond}", args).fetchone()[0]

    def count_in_scope(self, group: str | None, state: PatientState) -> int:
        self.flush()
        where, args = self._scope(group)
        return self.db.execute(f"SELECT COUNT(*) FROM patients WHERE state = ? AND {where}",
                               (state.value, *args)).fetchone()[0]

    def scope_size(self, group: str | None) -> tuple[int, int]:
        """(patients, eligible patients) in scope."""
        self.flush()
        where, args = self._scope(group)
        count = f"SELECT COUNT(*) FROM patients WHERE {where}"
        return (self.db.execute(count, args).fetchone()[0],
                self.db.execute(count + " AND eligibility IS NULL", args).fetchone()[0])

    def to_build(self, pkeys: list[str]) -> dict[str, tuple[int, str | None, bool, str | None]]:
        """What building these patients' messages needs from the store: pkey -> (row in
        patients.csv, not-required reason or None, dissent, the summary the Spine holds)."""
        found = {}
        for start in range(0, len(pkeys), 900):
            chunk = pkeys[start:start + 900]
            found.update((r[0], r[1:]) for r in self.db.execute(
                "SELECT pkey, source_row, eligibility, dissent, ack_event_id FROM patients "
                f"WHERE pkey IN ({', '.join('?' * len(chunk))})", chunk))
        return found

    def patient(self, pkey: str) -> dict | None:
        cur = self.db.execute("SELECT * FROM patients WHERE pkey = ?", (pkey,))
        row = cur.fetchone()
        return dict(zip([c[0] for c in cur.description], row)) if row else None

    # --- per-patient transitions ----------------------------------------------------------------

    def _move(self, db: sqlite3.Connection, pkey: str, new: PatientState,
              only_if_message: str | None = None, **fields: object) -> bool:
        """Move one patient to ``new`` if the transition table allows it from its state (and, with
        ``only_if_message``, only while that message is still its current one)."""
        sources = PREDECESSORS[new]
        sets = "".join(f", {k} = ?" for k in fields)
        sql = (f"UPDATE patients SET state = ?, updated_at = ?{sets} WHERE pkey = ? "
               f"AND state IN ({', '.join('?' * len(sources))})")
        args: list[object] = [new.value, now_iso(), *fields.values(), pkey, *sources]
        if only_if_message is not None:
            sql += " AND message_id = ?"
            args.append(only_if_message)
        if db.execute(sql, args).rowcount:
            return True
        row = db.execute("SELECT state, message_id FROM patients WHERE pkey = ?",
                         (pkey,)).fetchone()
        if row is None:
            raise StoreError(f"no patient {pkey!r} in {self.path}")
        if only_if_message is not None and row[1] != only_if_message:
            return False   # a newer message has taken over; this one's news is history
        check_transition(row[0], new)   # raises: the table does not allow it
        return False

    def queue_messages(self, job_id: int, chain_id: int,
                       messages: list[tuple[str, str, str, str | None, str, bytes]]) -> None:
        """Store built messages and their ids, and put their patients on the outbound queue, in
        one transaction: committed before any of them is sent. Each item is (pkey, message id,
        event id, prior event id, content type, body)."""
        stamp = now_iso()
        with self.transaction() as db:
            for pkey, message_id, event_id, prior_event_id, content_type, body in messages:
                db.execute(
                    "INSERT INTO messages (message_id, pkey, job_id, event_id, prior_event_id, "
                    "created_at, size, content_type, body, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, "
                    "?, 'queued')",
                    (message_id, pkey, job_id, event_id, prior_event_id, stamp, len(body),
                     content_type, zlib.compress(body, 1)))
                self._move(db, pkey, PatientState.QUEUED, reason=None, message_id=message_id,
                           chain_id=chain_id)

    def fail_unsent(self, pkey: str, job_id: int, chain_id: int, message_id: str, event_id: str,
                    size: int, code: str) -> None:
        """A message the kit will not send (e.g. over the size limit): the patient fails."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO messages (message_id, pkey, job_id, event_id, created_at, size, "
                "state, failure_code) VALUES (?, ?, ?, ?, ?, ?, 'failed', ?)",
                (message_id, pkey, job_id, event_id, now_iso(), size, code))
            self._move(db, pkey, PatientState.FAILED, reason=code, message_id=message_id,
                       chain_id=chain_id)

    def requeue(self, pkey: str, message_id: str, job_id: int, chain_id: int) -> None:
        """Send a stored message again with its own id (Resume; Failed after an ack timeout)."""
        with self.transaction() as db:
            db.execute("UPDATE messages SET state = 'queued', job_id = ?, failure_code = NULL "
                       "WHERE message_id = ?", (job_id, message_id))
            self._move(db, pkey, PatientState.QUEUED, reason=None, message_id=message_id,
                       chain_id=chain_id)

    def unsend(self, message_id: str) -> None:
        """A send that could not go ahead (the session ended): back on the queue, same id."""
        self._message_move(message_id, PatientState.QUEUED, {}, defer=False)

    def message(self, message_id: str) -> StoredMessage | None:
        row = self.db.execute(
            "SELECT message_id, pkey, event_id, prior_event_id, content_type, body, state, "
            "poll_url, failure_code FROM messages WHERE message_id = ?", (message_id,)).fetchone()
        if row is None:
            return None
        body = zlib.decompress(row[5]) if row[5] is not None else b""
        return StoredMessage(row[0], row[1], row[2], row[3], row[4] or "", body, row[6], row[7],
                             row[8])

    def _message_move(self, message_id: str, new: PatientState, message_fields: dict,
                      defer: bool = True, patient_state: PatientState | None = None,
                      **patient_fields: object) -> None:
        """Move a message and, if it is still the patient's current one, the patient.

        Moves after the message was stored are deferred to the next transaction (at most
        ``MAX_DEFERRED`` of them, or when the engine flushes, a few times a second): losing them
        in a crash only means Resume sends the same message id again, and the Spine's duplicate
        elimination answers with the first outcome."""
        self._moves.append((message_id, new, message_fields, patient_fields, patient_state))
        if not defer or len(self._moves) >= MAX_DEFERRED:
            self.flush()

    def _apply_move(self, db: sqlite3.Connection, message_id: str, new: PatientState,
                    message_fields: dict, patient_fields: dict,
                    patient_state: PatientState | None = None) -> None:
        row = db.execute("SELECT pkey FROM messages WHERE message_id = ?", (message_id,)).fetchone()
        if row is None:
            raise StoreError(f"no message {message_id} in {self.path}")
        sets = "".join(f", {k} = ?" for k in message_fields)
        db.execute(f"UPDATE messages SET state = ?{sets} WHERE message_id = ?",
                   (new.value, *message_fields.values(), message_id))
        self._move(db, row[0], patient_state or new, only_if_message=message_id,
                   **patient_fields)

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
                          ack_body=zlib.compress(ack_body or b"", 1))
        self._message_move(message_id, PatientState.FAILED, fields, reason=code)

    def mark_existing_at_spine(self, message_id: str, ack_codes: tuple[str, ...],
                               ack_body: bytes | None) -> None:
        """AE 30134: the Spine already holds a summary for the patient. The message failed, but
        the patient is not required (``existing_summary_at_spine``), never a failure to fix."""
        self._message_move(message_id, PatientState.FAILED,
                           {"failure_code": DUPLICATE_EVENT, "acked_at": now_iso(),
                            "ack_type": "AE", "ack_codes": " ".join(ack_codes),
                            "ack_body": zlib.compress(ack_body or b"", 1)},
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
                "AND message_id IN (SELECT message_id FROM messages WHERE state = 'queued') "
                f"AND {where}", (now_iso(), *args)).rowcount

    def unsent(self, chain_id: int, group: str | None) -> list[tuple[str, str]]:
        """(pkey, message_id) of unprocessed patients of this chain whose message was built and
        never posted: sent next with that id, before anything is built."""
        self.flush()
        where, args = self._scope(group, "p.")
        return list(self.db.execute(
            "SELECT p.pkey, p.message_id FROM patients AS p JOIN messages AS m "
            "ON m.message_id = p.message_id WHERE p.state = 'unprocessed' "
            "AND p.message_id IS NOT NULL AND m.state = 'queued' "
            f"AND m.body IS NOT NULL AND p.chain_id = ? AND {where} ORDER BY p.source_row",
            (chain_id, *args)))

    def record_attempt(self, message_id: str, kind: str, status: int | None, detail: str) -> None:
        """Note one HTTP exchange for the patient's timeline; written with the next state change
        (or by ``flush``), so the timeline costs no transaction of its own."""
        self._attempts.append((message_id, now_iso(), kind, status, detail))

    def flush(self) -> None:
        """Write the deferred moves and attempts now."""
        if not self.readonly and (self._moves or self._attempts):
            with self.transaction():
                pass

    # --- reading --------------------------------------------------------------------------------

    def state_counts(self) -> dict[str, int]:
        self.flush()
        counts = {s.value: 0 for s in PatientState}
        counts.update(dict(self.db.execute("SELECT state, COUNT(*) FROM patients GROUP BY state")))
        return counts

    def not_required_by_reason(self) -> dict[str, int]:
        self.flush()
        found = dict(self.db.execute("SELECT reason, COUNT(*) FROM patients WHERE state = "
                                     "'not_required' GROUP BY reason"))
        ordered = {r: found.pop(r, 0) for r in NOT_REQUIRED_REASONS}
        ordered.update(found)
        return ordered

    def failed_by_code(self) -> dict[str, int]:
        self.flush()
        return dict(self.db.execute("SELECT reason, COUNT(*) FROM patients WHERE state = 'failed' "
                                    "GROUP BY reason ORDER BY COUNT(*) DESC, reason"))

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
        with self.transaction() as db:
            db.execute("INSERT INTO control_requests (job_id, request, user_id, user_name, "
                       "asked_at) VALUES (?, ?, ?, ?, ?)",
                       (job_id, request, user_id, user_name, now_iso()))

    def take_requests(self, job_id: int) -> list[tuple[str, str, str]]:
        """The requests for ``job_id`` not seen yet, oldest first, as (request, user id, user
        name); they are marked seen."""
        rows = self.db.execute("SELECT id, request, user_id, user_name FROM control_requests "
                               "WHERE job_id = ? AND seen_at IS NULL ORDER BY id",
                               (job_id,)).fetchall()
        if rows:
            with self.transaction() as db:
                db.executemany("UPDATE control_requests SET seen_at = ? WHERE id = ?",
                               [(now_iso(), row[0]) for row in rows])
        return [tuple(row[1:]) for row in rows]

    def lock_holder(self) -> dict | None:
        """Who holds the store's job lock (user, host, pid, since), if anyone."""
        cur = self.db.execute("SELECT user_id, user_name, host, pid, since FROM job_lock")
        row = cur.fetchone()
        return dict(zip([c[0] for c in cur.description], row)) if row else None

    def status(self) -> dict:
        """The ``scr-nb status --json`` object (SPEC 10)."""
        states = self.state_counts()
        latest = self.latest_job(any_scope=True)
        return {
            "store": str(self.path),
            "counters": counters(states),
            "states": states,
            "not_required_by_reason": self.not_required_by_reason(),
            "failed_by_code": self.failed_by_code(),
            "transmitted_not_acknowledged": states.get("transmitted", 0),
            "latest_job": latest.to_json() if latest else None,
            "running": self.lock_holder(),
            "groups": self.group_names(),
        }




def read_status(path: str | Path) -> dict:
    """The ``scr-nb status --json`` object of the store at ``path``, read alongside any job."""
    store = Store(path, readonly=True)
    try:
        return store.status()
    finally:
        store.close()


__all__ = ["Store", "Job", "StoredMessage", "read_status"]
