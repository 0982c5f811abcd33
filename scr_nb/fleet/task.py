"""One practice's job as a Dask task (SPEC 12): what a worker runs, and what it hands back.

A worker that dies mid-job has its task run again by another worker (the scheduler reschedules
what a lost worker was running). The task then finds, in the practice's store, the job its first
run started: a job newer than the practice's latest when the fleet submitted the task
(``PracticeTask.known_job``). That job did not end, so this run is its Resume, with the crash
rules of SPEC 8: in-flight patients re-sent with their message ids, nothing lost, nothing sent
twice. No clock is compared: job numbers only grow.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

from scr_nb.fleet.plan import Practice
from scr_nb.fleet.rate import GateSpec
from scr_nb.job.options import JobOptions, Progress
from scr_nb.job.runner import EXIT_ERROR, EXIT_OK, EXIT_STOPPED, run_upload
from scr_nb.spine.tls import TlsSettings
from scr_nb.store.states import JobStatus, Mode

PROGRESS_TOPIC = "scr-nb-fleet-progress"   # the Dask event topic the coordinator listens to
PROGRESS_EVERY_S = 1.0


@dataclass(frozen=True)
class PracticeTask:
    """Everything a worker needs for one practice's job; pickled to the worker."""

    practice: Practice
    spine: str
    options: JobOptions
    tls: TlsSettings
    gate: GateSpec | None = None
    known_job: int | None = None    # the practice's latest job id when the task was submitted


def _latest_job(practice: Practice):
    """The practice's latest job, of any mode and scope; None when it has none."""
    from scr_nb.store.practice_store import Store

    if not practice.on_database and not Path(practice.store).exists():
        return None
    store = Store(practice.store, practice.ods, readonly=True)
    try:
        return store.latest_job(any_scope=True)
    finally:
        store.close()


def latest_job_id(practice: Practice) -> int | None:
    """What the coordinator hands a task as ``known_job``."""
    job = _latest_job(practice)
    return job.id if job is not None else None


def _earlier_run(task: PracticeTask):
    """The job an earlier run of this task started, when a worker died under it; else None. It is
    known by the task's mark in its settings: a job someone else started meanwhile (an upload by
    hand, another fleet) is not this task's."""
    job = _latest_job(task.practice)
    if job is None or (task.known_job is not None and job.id <= task.known_job):
        return None
    if job.settings.get("started_by") != task.options.started_by:
        return None
    return job


class _Reporter:
    """The job's progress, at most once a PROGRESS_EVERY_S, as a Dask event the coordinator
    reads (nothing when the task runs outside a worker)."""

    def __init__(self, ods: str):
        self.ods = ods
        self.sent_at = 0.0
        try:
            from distributed import get_worker

            self.worker = get_worker()
        except (ImportError, ValueError):
            self.worker = None

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if self.worker is None or now - self.sent_at < PROGRESS_EVERY_S:
            return
        self.sent_at = now
        self.worker.log_event(PROGRESS_TOPIC, {
            "ods": self.ods, "job_id": p.job_id, "mode": p.mode, "to_send": p.to_send,
            "queued": p.queued, "transmitted": p.transmitted, "acknowledged": p.acknowledged,
            "failed": p.failed, "done": p.done, "rate": round(p.rate, 3)})


def run_practice(task: PracticeTask) -> dict:
    """Run the practice's job on this worker and say how it ended: ``ods``, ``exit_code``,
    ``message``, ``job``, ``counters`` (the store's five) and ``resumed`` (this run finished a
    job a dead worker left). Never raises: an unexpected error is exit 1 with its words."""
    practice = task.practice
    options = task.options
    resumed = None
    try:
        earlier = _earlier_run(task)
        if earlier is not None and earlier.status == JobStatus.COMPLETED.value:
            return practice_result(practice, EXIT_OK, f"job {earlier.id} completed (its worker "
                                                      "died before it could say so)",
                                   earlier.to_json(), resumed=earlier.id)
        if earlier is not None and earlier.status != JobStatus.RUNNING.value:
            # it ended (a stop, a cancel) before its worker died: reported as it ended, never
            # sent again against the stop
            return practice_result(practice, EXIT_STOPPED,
                                   f"job {earlier.id} {earlier.status} ({earlier.reason}) before "
                                   "its worker died; continue it with Resume",
                                   earlier.to_json(), resumed=earlier.id)
        if earlier is not None:
            resumed = earlier.id
            options = replace(options, mode=Mode.RESUME)
        gate = task.gate.build() if task.gate is not None else None
        try:
            outcome = run_upload(practice.folder, practice.store, task.spine, practice.session,
                                 options, ods=practice.ods, gate=gate,
                                 on_progress=_Reporter(practice.ods), tls=task.tls)
        finally:
            if gate is not None:
                gate.close()
        return practice_result(practice, outcome.exit_code, outcome.message, outcome.job,
                               outcome.statistics, resumed)
    except Exception as err:   # the coordinator reports it; the other practices go on
        return practice_result(practice, EXIT_ERROR, f"{type(err).__name__}: {err}",
                               resumed=resumed, detail=traceback.format_exc())


def practice_result(practice: Practice, exit_code: int, message: str, job: dict | None = None,
                    statistics: dict | None = None, resumed: int | None = None,
                    detail: str | None = None) -> dict:
    """How a practice ended, as the coordinator collects it (``counters`` from the job's
    statistics, else read from the store, else None)."""
    counters = (statistics or {}).get("counters")
    if counters is None:
        counters = _store_counters(practice)
    return {"ods": practice.ods, "exit_code": exit_code, "message": message, "job": job,
            "counters": counters, "resumed": resumed, "detail": detail}


def _store_counters(practice: Practice) -> dict | None:
    from scr_nb.store.practice_store import read_status

    try:
        if not practice.on_database and not Path(practice.store).exists():
            return None
        return read_status(practice.store, practice.ods)["counters"]
    except Exception:
        return None   # the words of the outcome say what went wrong; counters are a courtesy


__all__ = ["PROGRESS_TOPIC", "PracticeTask", "latest_job_id", "practice_result", "run_practice"]
