"""The state machines, written down once: patient states, job states, and their reasons.

Reports, the CLI and the widgets read names from here instead of repeating strings.
"""

from __future__ import annotations

from enum import Enum


class PatientState(str, Enum):
    UNPROCESSED = "unprocessed"
    QUEUED = "queued"            # message built, id stored, on the outbound queue
    SENDING = "sending"          # being transmitted (with retries)
    TRANSMITTED = "transmitted"  # 202 received, waiting for the application ack
    ACKNOWLEDGED = "acknowledged"
    FAILED = "failed"
    NOT_REQUIRED = "not_required"


P = PatientState
PATIENT_TRANSITIONS: dict[PatientState, frozenset[PatientState]] = {
    P.UNPROCESSED: frozenset({P.QUEUED, P.FAILED, P.NOT_REQUIRED}),
    P.QUEUED: frozenset({P.SENDING, P.UNPROCESSED, P.FAILED, P.NOT_REQUIRED}),
    P.SENDING: frozenset({P.TRANSMITTED, P.FAILED, P.QUEUED, P.ACKNOWLEDGED}),
    # An AE 30134 says the Spine already holds a summary: the patient is not required (SPEC 6.6).
    P.TRANSMITTED: frozenset({P.ACKNOWLEDGED, P.FAILED, P.NOT_REQUIRED}),
    # A new job (Rerun, Failed) or a changed extract takes a patient back to the start.
    P.ACKNOWLEDGED: frozenset({P.UNPROCESSED, P.QUEUED, P.FAILED, P.NOT_REQUIRED}),
    P.FAILED: frozenset({P.UNPROCESSED, P.QUEUED, P.NOT_REQUIRED}),
    P.NOT_REQUIRED: frozenset({P.UNPROCESSED, P.NOT_REQUIRED}),
}
# For each state, the states it may be entered from (itself included): the store's updates use it.
PREDECESSORS: dict[PatientState, tuple[str, ...]] = {
    new: tuple(sorted({new.value} | {old.value for old, targets in PATIENT_TRANSITIONS.items()
                                     if new in targets}))
    for new in PatientState
}
IN_FLIGHT = frozenset({P.QUEUED, P.SENDING, P.TRANSMITTED})


def check_transition(old: PatientState | str, new: PatientState | str) -> None:
    old, new = PatientState(old), PatientState(new)
    if old != new and new not in PATIENT_TRANSITIONS[old]:
        raise ValueError(f"patient state cannot go from {old.value} to {new.value}")


def counters(states: dict[str, int]) -> dict[str, int]:
    """Vision's five completion counters from the per-state counts (SPEC 8)."""
    get = lambda s: int(states.get(s.value, 0))  # noqa: E731
    return {
        "unprocessed": get(P.UNPROCESSED),
        "sending": get(P.QUEUED) + get(P.SENDING) + get(P.TRANSMITTED),
        "sent": get(P.ACKNOWLEDGED),
        "failed": get(P.FAILED),
        "not_required": get(P.NOT_REQUIRED),
    }


class JobStatus(str, Enum):
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    CANCELLED = "cancelled"
    COMPLETED = "completed"


J = JobStatus
JOB_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    J.RUNNING: frozenset({J.PAUSED, J.STOPPED, J.CANCELLED, J.COMPLETED}),
    J.PAUSED: frozenset({J.RUNNING, J.STOPPED, J.CANCELLED, J.COMPLETED}),
    J.STOPPED: frozenset({J.COMPLETED}),    # a resumed job's ancestors are closed when it completes
    J.CANCELLED: frozenset({J.COMPLETED}),
    J.COMPLETED: frozenset(),
}


def check_job_transition(old: JobStatus | str, new: JobStatus | str) -> None:
    old, new = JobStatus(old), JobStatus(new)
    if old != new and new not in JOB_TRANSITIONS[old]:
        raise ValueError(f"job status cannot go from {old.value} to {new.value}")


class Mode(str, Enum):
    RUN = "run"
    RESUME = "resume"
    RERUN = "rerun"
    FAILED = "failed"


class StopReason(str, Enum):
    STOP_TIME = "stop_time"
    PAUSE_TIME = "pause_time"
    RESUME_CANCELLED = "resume_cancelled"
    SESSION_EXPIRED = "session_expired"
    USER_STOP = "user_stop"
    USER_CANCEL = "user_cancel"
    ACCESS_DENIED = "access_denied"    # the Spine answered 403
    TLS_FAILURE = "tls_failure"        # the TLS connection failed mid-run


# Not-required reasons in the order SPEC 4 gives: a patient gets the first that applies.
NOT_REQUIRED_REASONS = (
    "malformed_record",
    "duplicate_record",
    "no_nhs_number",
    "invalid_nhs_number",
    "not_permanent",
    "left_practice",
    "deceased",
    "fp69",
    "sensitive",
    "not_pds_synchronised",
    "existing_summary",
    "dissent",
)
