"""scr-nb: the SCR GP Summary Initial Upload, as an importable engine with notebooks on top.

What a user calls: the engine and its options, the store, sessions, and the extract/eligibility
dry run. Everything else is reachable through its module.
"""

from scr_nb.job.engine import Engine
from scr_nb.job.options import JobControl, JobOptions, JobResult, Progress
from scr_nb.errors import ExtractError, RefusedError, ScrNbError, SessionError, SpineError
from scr_nb.store.states import JobStatus, Mode, PatientState
from scr_nb.store.practice_store import Store

__all__ = [
    "Engine", "JobControl", "JobOptions", "JobResult", "Progress", "Store",
    "ExtractError", "RefusedError", "ScrNbError", "SessionError", "SpineError",
    "JobStatus", "Mode", "PatientState",
]
__version__ = "0.1.0"
