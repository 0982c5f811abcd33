"""Reads of every practice of a PostgreSQL store at once, for the fleet's status and monitor
(SPEC 12): one statement per figure for the whole fleet, in one read-only snapshot, where
``Store.status()`` takes a connection and a handful of statements per practice (hundreds of
practices every few seconds would be hundreds of connections).

Each figure is what ``Store`` reads of one practice, grouped by the practice's ODS code; the fleet
tests hold the two to the same answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scr_nb.store.database import Database
from scr_nb.store.practice_store import held_practice_locks
from scr_nb.store.states import PatientState

_FAILED = PatientState.FAILED.value
_ACKNOWLEDGED = PatientState.ACKNOWLEDGED.value
# the columns of a job, in the order practice_store.Job takes them
JOB_COLUMNS = ("id, chain_id, mode, chain_mode, group_name, status, reason, user_id, started_at, "
               "ended_at, settings, totals")
_LATEST = "SELECT ods, MAX(id) AS id FROM jobs GROUP BY ods"   # each practice's latest job


@dataclass
class FleetFigures:
    """Everything the fleet's status and monitor show, by ODS code."""

    states: dict[str, dict[str, int]] = field(default_factory=dict)
    failed_by_code: dict[str, dict[str, int]] = field(default_factory=dict)
    latest_jobs: dict[str, tuple] = field(default_factory=dict)        # JOB_COLUMNS
    lock_rows: dict[str, dict] = field(default_factory=dict)          # user, host, pid, since
    advisory_locks: set[int] = field(default_factory=set)             # keys held now
    eligible: dict[str, int] = field(default_factory=dict)
    latest_job_counts: dict[str, dict[str, int]] = field(default_factory=dict)


def read_figures(db: Database, details: bool = False) -> FleetFigures:
    """The fleet's figures from one snapshot of the database (a read-only, repeatable-read
    transaction); ``details`` adds the eligible patients and the latest job's own messages."""
    figures = FleetFigures()
    db.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        for ods, state, count in db.rows("SELECT ods, state, COUNT(*) FROM patients "
                                         "GROUP BY ods, state"):
            figures.states.setdefault(ods, {})[state] = int(count)
        for ods, code, count in db.rows(
                "SELECT ods, reason, COUNT(*) FROM patients WHERE state = ? GROUP BY ods, reason "
                "ORDER BY ods, COUNT(*) DESC, reason", (_FAILED,)):
            figures.failed_by_code.setdefault(ods, {})[code] = int(count)
        for row in db.rows(f"SELECT ods, {JOB_COLUMNS} FROM jobs WHERE (ods, id) IN "
                           f"({_LATEST})"):
            figures.latest_jobs[row[0]] = tuple(row[1:])
        for row in db.rows("SELECT ods, user_id, user_name, host, pid, since, started "
                           "FROM job_lock"):
            figures.lock_rows[row[0]] = dict(zip(("user_id", "user_name", "host", "pid",
                                                  "since", "started"), row[1:]))
        figures.advisory_locks = held_practice_locks(db)
        if details:
            figures.eligible = {ods: int(n) for ods, n in db.rows(
                "SELECT ods, COUNT(*) FROM patients WHERE eligibility IS NULL GROUP BY ods")}
            for ods, transmitted, acknowledged, failed in db.rows(
                    "SELECT m.ods, "
                    "SUM(CASE WHEN m.transmitted_at IS NOT NULL THEN 1 ELSE 0 END), "
                    "SUM(CASE WHEN m.state = ? THEN 1 ELSE 0 END), "
                    "SUM(CASE WHEN m.state = ? THEN 1 ELSE 0 END) "
                    f"FROM messages AS m JOIN ({_LATEST}) AS j ON m.ods = j.ods "
                    "AND m.job_id = j.id GROUP BY m.ods",
                    (_ACKNOWLEDGED, _FAILED)):
                figures.latest_job_counts[ods] = {"transmitted": int(transmitted or 0),
                                                  "acknowledged": int(acknowledged or 0),
                                                  "failed": int(failed or 0)}
    finally:
        db.execute("COMMIT")
    return figures


__all__ = ["FleetFigures", "JOB_COLUMNS", "read_figures"]
