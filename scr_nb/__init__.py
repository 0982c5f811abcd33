"""scr-nb: the SCR GP Summary Initial Upload, as an importable engine with notebooks on top.

What a notebook user calls, in the order of the data flow: load a practice and decide who is
eligible, log in, run a job, read a store's status, and the analysts' frames. Everything else is
reachable through its subpackage (``scr_nb.extract``, ``spine``, ``store``, ``job``, ``reporting``,
``ui``); the README's "Python API" lists these names, and a test keeps the two in step.
"""

from scr_nb.errors import (
    ExtractError,
    RefusedError,
    ScrNbError,
    SessionError,
    SpineError,
    StoreError,
)
from scr_nb.extract.eligibility import Decision, Policy, decide, summarise
from scr_nb.extract.reader import load_practice
from scr_nb.job.options import JobControl, JobOptions, JobResult, Progress
from scr_nb.job.runner import Outcome, format_statistics, run_upload
from scr_nb.job.schedule import Schedule, parse_local
from scr_nb.spine.session import Session, login
from scr_nb.spine.session import load as load_session
from scr_nb.spine.session import save as save_session
from scr_nb.store.practice_store import Store, read_status
from scr_nb.store.states import JobStatus, Mode, PatientState

# The analysts' frames (pandas) load on first use, so the command line starts without pandas.
FRAMES = (
    "completion", "not_required", "jobs", "messages", "throughput", "ack_latency",
    "ack_latency_percentiles", "failures", "failures_by_code", "failures_by_category",
    "failures_by_job",
)

__all__ = [
    # the extract and eligibility
    "load_practice", "Policy", "Decision", "decide", "summarise",
    # the Smartcard session
    "Session", "login", "load_session", "save_session",
    # a job
    "JobOptions", "Schedule", "parse_local", "Mode", "JobControl", "Progress", "run_upload",
    "Outcome", "JobResult", "format_statistics",
    # a store
    "Store", "read_status", "PatientState", "JobStatus",
    # analysts' frames
    *FRAMES,
    # errors
    "ScrNbError", "ExtractError", "RefusedError", "SessionError", "SpineError", "StoreError",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in FRAMES:
        from scr_nb.reporting import frames
        return getattr(frames, name)
    raise AttributeError(f"module 'scr_nb' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(FRAMES))
