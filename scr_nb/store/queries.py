"""Every read the analysts' frames and the support desk make of a store, as SQL in one place.

Each function takes an open ``Store`` (read-only alongside a running job, or the job's own) and
returns plain rows: a ``Table`` (column names, row tuples) or simple values. Every statement reads
the store's own practice only (``ods = ?``, joins on the practice too), since a PostgreSQL store
holds many, and is written in SQL that SQLite and PostgreSQL both read. ``reading`` opens the store
a reader names (a path, a ``postgresql://...?ods=CODE`` URL or a ``Location``), or flushes and lends
the one it already holds. Turning rows into pandas frames, plain words and charts is
``scr_nb.reporting``'s work.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from scr_nb.errors import StoreError
from scr_nb.store.database import Location
from scr_nb.store.practice_store import Store
from scr_nb.store.states import PatientState

Table = tuple[list[str], list[tuple]]
StoreLike = str | Path | Location | Store

_FAILED = PatientState.FAILED.value
_NOT_REQUIRED = PatientState.NOT_REQUIRED.value
_IN_CHUNK = 500     # patient ids bound to one IN (...) at most


@contextmanager
def reading(store: StoreLike, ods: str | None = None) -> Iterator[Store]:
    """The store to read: a ``Store`` as it is (its deferred writes flushed first), or the one a
    path, a PostgreSQL URL (its practice in ``ods`` or in the URL as ``?ods=CODE``) or a
    ``Location`` names, opened read-only for the reading and closed after."""
    if isinstance(store, Store):
        store.flush()
        yield store
        return
    if not isinstance(store, Location) and not str(store or ""):
        raise StoreError("no store given: set it to the practice's store (the SQLite file or the "
                         "postgresql://...?ods=CODE URL that scr-nb upload --store wrote)")
    opened = Store(store, ods=ods, readonly=True)
    try:
        yield opened
    finally:
        opened.close()


def _table(store: Store, sql: str, args: Sequence[object] = ()) -> Table:
    result = store.db.execute(sql, tuple(args))
    return list(result.keys()), [tuple(row) for row in result]


def _scope(store: Store, group: str | None) -> tuple[str, tuple]:
    """The patients of the whole list, or of one Patient Group, as a WHERE clause and its values."""
    if group is None:
        return "1 = 1", ()
    return ("patient_id IN (SELECT patient_id FROM groups WHERE ods = ? AND group_name = ?)",
            (store.ods, group))


# --- counts ---------------------------------------------------------------------------------------

def state_counts(store: Store) -> dict[str, int]:
    return store.db.pairs("SELECT state, COUNT(*) FROM patients WHERE ods = ? GROUP BY state",
                          (store.ods,))


def eligible_count(store: Store, group: str | None = None) -> int:
    where, args = _scope(store, group)
    return store.db.scalar(f"SELECT COUNT(*) FROM patients WHERE ods = ? AND eligibility IS NULL "
                           f"AND {where}", (store.ods, *args))


def not_required_counts(store: Store) -> dict[str, int]:
    return store.db.pairs("SELECT reason, COUNT(*) FROM patients WHERE ods = ? AND state = ? "
                          "GROUP BY reason", (store.ods, _NOT_REQUIRED))


def failure_codes(store: Store) -> dict[str, int]:
    """Failure code -> patients whose latest attempt failed, most frequent first."""
    return store.db.pairs("SELECT reason, COUNT(*) FROM patients WHERE ods = ? AND state = ? "
                          "GROUP BY reason ORDER BY COUNT(*) DESC, reason", (store.ods, _FAILED))


# --- jobs -----------------------------------------------------------------------------------------

def practice_identity(store: Store) -> tuple[str | None, str | None]:
    """(ODS code, practice name) the store's latest job ran with, or (None, None) before any (the
    practice's ODS code alone when the store names one)."""
    settings = store.db.scalar("SELECT settings FROM jobs WHERE ods = ? ORDER BY id DESC LIMIT 1",
                               (store.ods,))
    known = json.loads(settings or "{}")
    return (known.get("practice_ods") or store.ods or None), (known.get("practice_name") or None)


def job_rows(store: Store) -> Table:
    return _table(store, 'SELECT id AS job_id, chain_id, mode, group_name AS "group", status, '
                         "reason, user_id, user_name, started_at, ended_at, totals FROM jobs "
                         "WHERE ods = ? ORDER BY id", (store.ods,))


def live_job_counts(store: Store) -> dict[int, dict[str, int]]:
    """Per job, from the messages it holds: queued, transmitted, acknowledged, failed."""
    cols, rows = _table(store, """
        SELECT job_id,
               SUM(CASE WHEN body IS NOT NULL THEN 1 ELSE 0 END) AS queued,
               SUM(CASE WHEN transmitted_at IS NOT NULL THEN 1 ELSE 0 END) AS transmitted,
               SUM(CASE WHEN state = 'acknowledged' THEN 1 ELSE 0 END) AS acknowledged,
               SUM(CASE WHEN state = 'failed' THEN 1 ELSE 0 END) AS failed
        FROM messages WHERE ods = ? GROUP BY job_id""", (store.ods,))
    return {row[0]: {c: int(n or 0) for c, n in zip(cols[1:], row[1:])} for row in rows}


def job_failure_rows(store: Store) -> tuple[dict[int, dict[str, int]], list[tuple]]:
    """(failed messages per job and code, (job id, mode, totals) of every job)."""
    live: dict[int, dict[str, int]] = {}
    for job_id, code, n in store.db.rows(
            "SELECT job_id, failure_code, COUNT(*) FROM messages WHERE ods = ? AND "
            "state = 'failed' GROUP BY job_id, failure_code", (store.ods,)):
        live.setdefault(job_id, {})[str(code)] = n
    return live, store.db.rows("SELECT id, mode, totals FROM jobs WHERE ods = ? ORDER BY id",
                               (store.ods,))


# --- messages -------------------------------------------------------------------------------------

# acked_at is the time of its ack, of any type; acknowledged_at only for an AA.
# When a message failed: its error ack; else (ack timeout, retries exhausted, too large) the moment
# its patient was marked failed while it is still the patient's message; else its last exchange.
# Messages built in the same millisecond keep their job's order, then the extract's.
_MESSAGES_SQL = """
SELECT m.message_id, m.job_id, p.patient_id, m.state, m.size, m.post_attempts,
       CASE WHEN m.body IS NOT NULL THEN m.created_at END AS queued_at,
       m.transmitted_at, m.acked_at,
       CASE WHEN m.state = 'acknowledged' THEN m.acked_at END AS acknowledged_at,
       CASE WHEN m.state = 'failed' THEN COALESCE(
           m.acked_at,
           CASE WHEN p.message_id = m.message_id AND p.state = 'failed' THEN p.updated_at END,
           (SELECT MAX(a.at) FROM attempts AS a
            WHERE a.ods = m.ods AND a.message_id = m.message_id),
           m.created_at) END AS failed_at,
       m.ack_type, m.failure_code AS code,
       CASE WHEN p.message_id = m.message_id THEN 1 ELSE 0 END AS "current"
FROM messages AS m LEFT JOIN patients AS p ON p.ods = m.ods AND p.pkey = m.pkey
WHERE m.ods = ?
ORDER BY m.created_at, m.job_id, p.source_row, m.message_id
"""


def message_rows(store: Store) -> Table:
    """One row per message built: its job, state, size and the moments of its life."""
    return _table(store, _MESSAGES_SQL, (store.ods,))


def failure_rows(store: Store) -> Table:
    """One row per patient whose latest attempt failed, in extract order."""
    return _table(store, """
        SELECT p.patient_id, p.nhs_number, p.reason AS code, m.job_id, p.message_id,
               m.ack_type, COALESCE(m.acked_at, p.updated_at) AS failed_at
        FROM patients AS p
        LEFT JOIN messages AS m ON m.ods = p.ods AND m.message_id = p.message_id
        WHERE p.ods = ? AND p.state = ? ORDER BY p.source_row""", (store.ods, _FAILED))


# --- the support desk -----------------------------------------------------------------------------

def failed_patient_rows(store: Store, code: str | None = None, job_id: int | None = None,
                        group: str | None = None) -> Table:
    """Failed patients with the message that failed, filtered by code, job and group."""
    where, args = ["p.ods = ?", "p.state = ?"], [store.ods, _FAILED]
    if code:
        where.append("p.reason = ?")
        args.append(str(code))
    if job_id is not None:
        where.append("m.job_id = ?")
        args.append(int(job_id))
    if group:
        where.append("p.patient_id IN (SELECT patient_id FROM groups "
                     "WHERE ods = p.ods AND group_name = ?)")
        args.append(group)
    return _table(store, f"""
        SELECT p.pkey, p.patient_id, p.nhs_number, p.reason AS failure_code,
               COALESCE(m.acked_at, p.updated_at) AS failed_at, m.job_id, p.message_id,
               m.ack_codes, p.source_row
        FROM patients AS p
        LEFT JOIN messages AS m ON m.ods = p.ods AND m.message_id = p.message_id
        WHERE {' AND '.join(where)} ORDER BY p.source_row, p.pkey""", args)


def first_failed_patient(store: Store) -> str | None:
    return store.db.scalar("SELECT pkey FROM patients WHERE ods = ? AND state = ? "
                           "ORDER BY source_row, pkey LIMIT 1", (store.ods, _FAILED))


def find_patient(store: Store, who: str, nhs_number: str) -> str | None:
    """The store key of the patient whose key, patient id or NHS number is given (the key first)."""
    return store.db.scalar("SELECT pkey FROM patients WHERE ods = ? AND (pkey = ? OR "
                           "patient_id = ? OR nhs_number = ?) ORDER BY CASE WHEN pkey = ? THEN 0 "
                           "ELSE 1 END, source_row LIMIT 1",
                           (store.ods, who, who, nhs_number, who))


def has_patient(store: Store, pkey: str) -> bool:
    return store.db.scalar("SELECT 1 FROM patients WHERE ods = ? AND pkey = ?",
                           (store.ods, pkey)) is not None


def patient_states(store: Store, patient_ids: list[str]) -> dict[str, set[str]]:
    """Patient id -> the states of the store's patients with that id."""
    states: dict[str, set[str]] = {}
    for start in range(0, len(patient_ids), _IN_CHUNK):
        chunk = patient_ids[start:start + _IN_CHUNK]
        for pid, state in store.db.rows(
                f"SELECT patient_id, state FROM patients WHERE ods = ? AND patient_id IN "
                f"({', '.join('?' * len(chunk))})", (store.ods, *chunk)):
            states.setdefault(pid, set()).add(state)
    return states


def timeline_rows(store: Store, pkey: str) -> Table:
    """Every message of one patient with each HTTP exchange it took, oldest first."""
    return _table(store, """
        SELECT m.message_id, m.job_id, m.event_id AS gp_summary_id,
               m.prior_event_id AS replaces_summary_id, m.created_at, a.at AS time, a.kind,
               a.http_status, a.detail, m.ack_type, m.ack_codes, m.state AS message_state,
               m.failure_code
        FROM messages AS m
        LEFT JOIN attempts AS a ON a.ods = m.ods AND a.message_id = m.message_id
        WHERE m.ods = ? AND m.pkey = ?
        ORDER BY m.created_at, m.job_id, m.message_id, a.at, a.id""", (store.ods, pkey))


def last_kept_message(store: Store, pkey: str) -> str | None:
    """The newest message of the patient whose text was kept."""
    return store.db.scalar("SELECT message_id FROM messages WHERE ods = ? AND pkey = ? AND "
                           "body IS NOT NULL ORDER BY created_at DESC, job_id DESC, "
                           "message_id DESC LIMIT 1", (store.ods, pkey))


def message_text(store: Store, message_id: str) -> tuple[bytes | None, str, str | None] | None:
    """(body or None when it was not kept, content type, failure code), None for no message."""
    row = store.db.record("SELECT body, content_type, failure_code FROM messages "
                          "WHERE ods = ? AND message_id = ?", (store.ods, message_id))
    if row is None:
        return None
    body = zlib.decompress(row["body"]) if row["body"] is not None else None
    return body, row["content_type"] or "", row["failure_code"]


def ack_text(store: Store, message_id: str) -> bytes | None:
    """The kept ack body of a message (b"" when none was kept), None for no message."""
    row = store.db.record("SELECT ack_body FROM messages WHERE ods = ? AND message_id = ?",
                          (store.ods, message_id))
    if row is None:
        return None
    return zlib.decompress(row["ack_body"]) if row["ack_body"] is not None else b""


__all__ = [
    "Table", "StoreLike", "reading", "state_counts", "eligible_count", "not_required_counts",
    "failure_codes", "practice_identity", "job_rows", "live_job_counts", "job_failure_rows",
    "message_rows", "failure_rows", "failed_patient_rows", "first_failed_patient", "find_patient",
    "has_patient", "patient_states", "timeline_rows", "last_kept_message", "message_text",
    "ack_text",
]
