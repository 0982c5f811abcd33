"""Every read the analysts' frames and the support desk make of a store, as SQL in one place.

Each function takes an open ``Store`` (read-only alongside a running job, or the job's own) and
returns plain rows: a ``Table`` (column names, row tuples) or simple values. ``reading`` opens the
store a reader names by path, or flushes and lends the one it already holds. Turning rows into
pandas frames, plain words and charts is ``scr_nb.reporting``'s work.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from scr_nb.errors import StoreError
from scr_nb.store.practice_store import Store
from scr_nb.store.states import PatientState

Table = tuple[list[str], list[tuple]]
StoreLike = str | Path | Store

_FAILED = PatientState.FAILED.value
_NOT_REQUIRED = PatientState.NOT_REQUIRED.value


@contextmanager
def reading(store: StoreLike) -> Iterator[Store]:
    """The store to read: a ``Store`` as it is (its deferred writes flushed first), or the file at a
    path opened read-only for the reading and closed after."""
    if isinstance(store, Store):
        store.flush()
        yield store
        return
    if not str(store):
        raise StoreError("no store given: set it to the practice's store file (the one "
                         "scr-nb upload --store wrote)")
    opened = Store(store, readonly=True)
    try:
        yield opened
    finally:
        opened.close()


def _table(store: Store, sql: str, args: Iterable[object] = ()) -> Table:
    cur = store.db.execute(sql, tuple(args))
    return [c[0] for c in cur.description], cur.fetchall()


def _scope(group: str | None) -> tuple[str, tuple]:
    if group is None:
        return "1", ()
    return "patient_id IN (SELECT patient_id FROM groups WHERE group_name = ?)", (group,)


# --- counts ---------------------------------------------------------------------------------------

def state_counts(store: Store) -> dict[str, int]:
    return dict(store.db.execute("SELECT state, COUNT(*) FROM patients GROUP BY state"))


def eligible_count(store: Store, group: str | None = None) -> int:
    where, args = _scope(group)
    return store.db.execute(f"SELECT COUNT(*) FROM patients WHERE eligibility IS NULL AND {where}",
                            args).fetchone()[0]


def not_required_counts(store: Store) -> dict[str, int]:
    return dict(store.db.execute("SELECT reason, COUNT(*) FROM patients WHERE state = ? "
                                 "GROUP BY reason", (_NOT_REQUIRED,)))


def failure_codes(store: Store) -> dict[str, int]:
    """Failure code -> patients whose latest attempt failed, most frequent first."""
    return dict(store.db.execute("SELECT reason, COUNT(*) FROM patients WHERE state = ? "
                                 "GROUP BY reason ORDER BY COUNT(*) DESC, reason", (_FAILED,)))


# --- jobs -----------------------------------------------------------------------------------------

def practice_identity(store: Store) -> tuple[str | None, str | None]:
    """(ODS code, practice name) the store's latest job ran with, or (None, None) before any."""
    row = store.db.execute("SELECT settings FROM jobs ORDER BY id DESC LIMIT 1").fetchone()
    if row is None:
        return None, None
    settings = json.loads(row[0] or "{}")
    return settings.get("practice_ods") or None, settings.get("practice_name") or None


def job_rows(store: Store) -> Table:
    return _table(store, "SELECT id AS job_id, chain_id, mode, group_name AS 'group', status, "
                         "reason, user_id, user_name, started_at, ended_at, totals FROM jobs "
                         "ORDER BY id")


def live_job_counts(store: Store) -> dict[int, dict[str, int]]:
    """Per job, from the messages it holds: queued, transmitted, acknowledged, failed."""
    cols, rows = _table(store, "SELECT job_id, SUM(body IS NOT NULL) AS queued, "
                               "SUM(transmitted_at IS NOT NULL) AS transmitted, "
                               "SUM(state = 'acknowledged') AS acknowledged, "
                               "SUM(state = 'failed') AS failed FROM messages GROUP BY job_id")
    return {row[0]: dict(zip(cols[1:], row[1:])) for row in rows}


def job_failure_rows(store: Store) -> tuple[dict[int, dict[str, int]], list[tuple]]:
    """(failed messages per job and code, (job id, mode, totals) of every job)."""
    live: dict[int, dict[str, int]] = {}
    for job_id, code, n in store.db.execute(
            "SELECT job_id, failure_code, COUNT(*) FROM messages WHERE state = 'failed' "
            "GROUP BY job_id, failure_code"):
        live.setdefault(job_id, {})[str(code)] = n
    return live, store.db.execute("SELECT id, mode, totals FROM jobs ORDER BY id").fetchall()


# --- messages -------------------------------------------------------------------------------------

# acked_at is the time of its ack, of any type; acknowledged_at only for an AA.
# When a message failed: its error ack; else (ack timeout, retries exhausted, too large) the moment
# its patient was marked failed while it is still the patient's message; else its last exchange.
_MESSAGES_SQL = """
SELECT m.message_id, m.job_id, p.patient_id, m.state, m.size, m.post_attempts,
       CASE WHEN m.body IS NOT NULL THEN m.created_at END AS queued_at,
       m.transmitted_at, m.acked_at,
       CASE WHEN m.state = 'acknowledged' THEN m.acked_at END AS acknowledged_at,
       CASE WHEN m.state = 'failed' THEN COALESCE(
           m.acked_at,
           CASE WHEN p.message_id = m.message_id AND p.state = 'failed' THEN p.updated_at END,
           (SELECT MAX(a.at) FROM attempts AS a WHERE a.message_id = m.message_id),
           m.created_at) END AS failed_at,
       m.ack_type, m.failure_code AS code,
       COALESCE(p.message_id = m.message_id, 0) AS 'current'
FROM messages AS m LEFT JOIN patients AS p ON p.pkey = m.pkey
ORDER BY m.created_at, m.rowid
"""


def message_rows(store: Store) -> Table:
    """One row per message built: its job, state, size and the moments of its life."""
    return _table(store, _MESSAGES_SQL)


def failure_rows(store: Store) -> Table:
    """One row per patient whose latest attempt failed, in extract order."""
    return _table(store, """
        SELECT p.patient_id, p.nhs_number, p.reason AS code, m.job_id, p.message_id,
               m.ack_type, COALESCE(m.acked_at, p.updated_at) AS failed_at
        FROM patients AS p LEFT JOIN messages AS m ON m.message_id = p.message_id
        WHERE p.state = ? ORDER BY p.source_row""", (_FAILED,))


# --- the support desk -----------------------------------------------------------------------------

def failed_patient_rows(store: Store, code: str | None = None, job_id: int | None = None,
                        group: str | None = None) -> Table:
    """Failed patients with the message that failed, filtered by code, job and group."""
    where, args = ["p.state = ?"], [_FAILED]
    if code:
        where.append("p.reason = ?")
        args.append(str(code))
    if job_id is not None:
        where.append("m.job_id = ?")
        args.append(int(job_id))
    if group:
        where.append("p.patient_id IN (SELECT patient_id FROM groups WHERE group_name = ?)")
        args.append(group)
    return _table(store, f"""
        SELECT p.pkey, p.patient_id, p.nhs_number, p.reason AS failure_code,
               COALESCE(m.acked_at, p.updated_at) AS failed_at, m.job_id, p.message_id,
               m.ack_codes, p.source_row
        FROM patients AS p LEFT JOIN messages AS m ON m.message_id = p.message_id
        WHERE {' AND '.join(where)} ORDER BY p.source_row, p.pkey""", args)


def first_failed_patient(store: Store) -> str | None:
    row = store.db.execute("SELECT pkey FROM patients WHERE state = ? "
                           "ORDER BY source_row, pkey LIMIT 1", (_FAILED,)).fetchone()
    return row[0] if row else None


def find_patient(store: Store, who: str, nhs_number: str) -> str | None:
    """The store key of the patient whose key, patient id or NHS number is given."""
    row = store.db.execute("SELECT pkey FROM patients WHERE pkey = ? OR patient_id = ? "
                           "OR nhs_number = ? ORDER BY pkey != ?, source_row LIMIT 1",
                           (who, who, nhs_number, who)).fetchone()
    return row[0] if row else None


def has_patient(store: Store, pkey: str) -> bool:
    return store.db.execute("SELECT 1 FROM patients WHERE pkey = ?", (pkey,)).fetchone() is not None


def patient_states(store: Store, patient_ids: list[str]) -> dict[str, set[str]]:
    """Patient id -> the states of the store's patients with that id."""
    states: dict[str, set[str]] = {}
    for start in range(0, len(patient_ids), 500):
        chunk = patient_ids[start:start + 500]
        for pid, state in store.db.execute(
                f"SELECT patient_id, state FROM patients WHERE patient_id IN "
                f"({', '.join('?' * len(chunk))})", chunk):
            states.setdefault(pid, set()).add(state)
    return states


def timeline_rows(store: Store, pkey: str) -> Table:
    """Every message of one patient with each HTTP exchange it took, oldest first."""
    return _table(store, """
        SELECT m.message_id, m.job_id, m.event_id AS gp_summary_id,
               m.prior_event_id AS replaces_summary_id, m.created_at, a.at AS time, a.kind,
               a.http_status, a.detail, m.ack_type, m.ack_codes, m.state AS message_state,
               m.failure_code
        FROM messages AS m LEFT JOIN attempts AS a ON a.message_id = m.message_id
        WHERE m.pkey = ? ORDER BY m.created_at, m.rowid, a.at, a.id""", (pkey,))


def last_kept_message(store: Store, pkey: str) -> str | None:
    """The newest message of the patient whose text was kept."""
    row = store.db.execute("SELECT message_id FROM messages WHERE pkey = ? AND body IS NOT NULL "
                           "ORDER BY created_at DESC, rowid DESC LIMIT 1", (pkey,)).fetchone()
    return row[0] if row else None


def message_text(store: Store, message_id: str) -> tuple[bytes | None, str, str | None] | None:
    """(body or None when it was not kept, content type, failure code), None for no message."""
    row = store.db.execute("SELECT body, content_type, failure_code FROM messages "
                           "WHERE message_id = ?", (message_id,)).fetchone()
    if row is None:
        return None
    return (zlib.decompress(row[0]) if row[0] is not None else None), row[1] or "", row[2]


def ack_text(store: Store, message_id: str) -> bytes | None:
    """The kept ack body of a message (b"" when none was kept), None for no message."""
    row = store.db.execute("SELECT ack_body FROM messages WHERE message_id = ?",
                           (message_id,)).fetchone()
    if row is None:
        return None
    return zlib.decompress(row[0]) if row[0] is not None else b""


__all__ = [
    "Table", "StoreLike", "reading", "state_counts", "eligible_count", "not_required_counts",
    "failure_codes", "practice_identity", "job_rows", "live_job_counts", "job_failure_rows", "message_rows",
    "failure_rows", "failed_patient_rows", "first_failed_patient", "find_patient", "has_patient",
    "patient_states", "timeline_rows", "last_kept_message", "message_text", "ack_text",
]
