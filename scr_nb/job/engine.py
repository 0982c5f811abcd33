"""The upload engine (SPEC 8): one job = one mode over one scope.

It orchestrates and nothing else: the extract and eligibility decide who, ``message`` builds the
XML, ``spine_client`` speaks HTTP, ``store`` keeps every state change. The store, the Spine client
and the clock are handed in, so tests can replace any of them.

Flow of one patient: build -> store (queued, id committed) -> POST with retries (sending) -> 202
(transmitted) -> poll -> AA (acknowledged) or AE/AR, retries exhausted, ack timeout (failed).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from scr_nb.spine.acks import Ack
from scr_nb.clock import SystemClock
from scr_nb.constants import MAX_MESSAGE_BYTES
from scr_nb.extract.eligibility import Decision, Policy, decide, summarise
from scr_nb.errors import ExtractError, RefusedError, SessionExpired, SessionRejected, SpineError
from scr_nb.extract.reader import load_practice
from scr_nb.store.lock import StoreLock
from scr_nb.spine.content import Windows, select_content
from scr_nb.spine.gp_summary import Author, OutboundMessage, build_message, new_id
from scr_nb.store.log import PracticeLog
from scr_nb.extract.records import Practice
from scr_nb.job.schedule import Schedule, ScheduleError
from scr_nb.spine.session import Session
from scr_nb.spine.client import Attempt, RateLimiter, SendHeld, SpineClient, Transmission
from scr_nb.store.states import JobStatus, Mode, PatientState, StopReason, counters
from scr_nb.store.practice_store import Job, Store


# Failures after which the Spine may still hold the message: Failed re-sends these with their
# original id (SPEC 8 names ack_timeout; a send whose transient failures never cleared is as
# uncertain, since a timed-out POST may have been taken), and rebuilds every other failure.
UNCERTAIN_FAILURES = frozenset({"ack_timeout", "retries_exhausted"})
FLUSH_SECONDS = 0.25
WATCH_SECONDS = 0.1       # how often the schedule and the session are checked against the clock


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


@dataclass(frozen=True)
class JobOptions:
    mode: Mode
    group: str | None = None
    concurrency: int = 8
    rate_limit: float | None = None          # messages a second, None: no limit
    ack_timeout: float = 600.0               # seconds from 202 to the ack
    dissent: str = "exclude"                 # exclude | blank
    skip_acknowledged: bool = False          # rerun only
    update_existing_after_days: int | None = None
    retry_window: float = 600.0              # seconds of transient failures before giving up
    sender_asid: str = "200000000001"
    receiver_asid: str = "990101234567"
    practice_ods: str = "A12345"
    practice_name: str = "scr-nb demonstration practice"
    schedule: Schedule = Schedule()

    def settings(self) -> dict:
        data = asdict(self)
        data["mode"] = self.mode.value
        data["schedule"] = self.schedule.to_json()
        return data


@dataclass
class Progress:
    """One snapshot of a running job: the numbers the CLI bar, the widgets and reports show."""

    job_id: int = 0
    mode: str = ""
    group: str | None = None
    status: str = "running"
    patients_in_scope: int = 0
    checked: int = 0                 # patients checked for eligibility
    eligible: int = 0
    to_send: int = 0                 # messages this job has to get acknowledged
    queued: int = 0                  # messages sent to the outbound queue
    transmitted: int = 0
    acknowledged: int = 0
    failed: int = 0
    failed_by_code: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0
    session_expires_at: str | None = None
    session_seconds_left: float | None = None
    schedule: dict = field(default_factory=dict)
    waiting: bool = False            # before the scheduled start
    paused: bool = False             # inside a scheduled pause
    warnings: list[str] = field(default_factory=list)

    @property
    def done(self) -> int:
        return self.acknowledged + self.failed

    @property
    def rate(self) -> float:
        """Messages finished (acknowledged or failed) a second."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def average_seconds_per_patient(self) -> float | None:
        return self.elapsed / self.done if self.done else None

    @property
    def eta_seconds(self) -> float | None:
        remaining = self.to_send - self.done
        if remaining <= 0:
            return 0.0
        return remaining / self.rate if self.rate > 0 else None

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(rate=round(self.rate, 3), eta_seconds=self.eta_seconds,
                    average_seconds_per_patient=self.average_seconds_per_patient)
        return data


@dataclass(frozen=True)
class JobResult:
    job: Job
    progress: Progress
    statistics: dict

    @property
    def completed(self) -> bool:
        return self.job.status == JobStatus.COMPLETED.value


class JobControl:
    """Asks a running job to stop. Stop -> paused; Stop and Close -> stopped; Cancel -> cancelled.

    Safe to call from another thread (the CLI's signal handler, a widget's button): the engine
    reads the request before it takes each patient and before each send."""

    def __init__(self) -> None:
        self.requested: JobStatus | None = None
        self.reason: StopReason | None = None

    def request(self, status: JobStatus, reason: StopReason) -> None:
        if self.requested is None or status == JobStatus.CANCELLED:
            self.requested, self.reason = status, reason

    def stop(self) -> None:
        self.request(JobStatus.PAUSED, StopReason.USER_STOP)

    def stop_and_close(self) -> None:
        self.request(JobStatus.STOPPED, StopReason.USER_STOP)

    def cancel(self) -> None:
        self.request(JobStatus.CANCELLED, StopReason.USER_CANCEL)

    @property
    def stopping(self) -> bool:
        return self.requested is not None


@dataclass
class _Work:
    pkey: str
    message_id: str
    event_id: str                            # the GP Summary id the Spine will hold
    message: OutboundMessage | None = None   # set when it has to be (re)sent
    poll_url: str | None = None              # set when it only has to be polled


class Engine:
    def __init__(self, store: Store, session: Session, spine_url: str, practice_dir: str | Path,
                 *, clock: SystemClock | None = None,
                 client_factory: Callable[..., SpineClient] | None = None,
                 on_progress: Callable[[Progress], None] | None = None,
                 control: JobControl | None = None):
        self.store, self.session, self.spine_url = store, session, spine_url
        self.practice_dir = Path(practice_dir)
        self.clock = clock or SystemClock()
        self.client_factory = client_factory or SpineClient
        self.on_progress = on_progress
        self.control = control or JobControl()
        self.log = PracticeLog(store.path)

    # --- preparing ----------------------------------------------------------------------------

    def prepare(self, options: JobOptions) -> tuple[Practice, dict[str, Decision]]:
        """Read the extract, decide eligibility, bring the store in line. Sends nothing."""
        practice = load_practice(self.practice_dir, today=self.clock.today())
        policy = Policy(today=self.clock.today(), dissent=options.dissent,
                        update_existing_after_days=options.update_existing_after_days)
        decisions = decide(practice, policy)
        self.store.sync_patients((d.key, d.patient.patient_id, d.patient.nhs_number,
                                  d.patient.row, d.reason, d.dissent) for d in decisions)
        self.store.sync_extract_groups(practice.groups)
        self.dry_run = summarise(decisions)
        return practice, {d.key: d for d in decisions}

    def _refuse(self, options: JobOptions, message: str, use_mode: str | None = None) -> None:
        self.log.write("refused", mode=options.mode.value, group=options.group,
                       user_id=self.session.user_id, reason=message, use_mode=use_mode)
        raise RefusedError(message, use_mode)

    def _chain(self, options: JobOptions) -> tuple[int | None, str, str | None]:
        """(chain id or None for a new chain, the work rule, the group) or a refusal."""
        mode, group = options.mode, options.group
        if group is not None and not self.store.has_group(group):
            names = ", ".join(self.store.group_names()) or "none"
            self._refuse(options, f"there is no Patient Group called {group!r} (groups: {names})")
        refused = refusal(self.store, mode, group)
        if refused is not None:
            self._refuse(options, *refused)
        if mode == Mode.RESUME:
            latest = self.store.latest_unfinished(group, any_scope=group is None)
            if latest.status == JobStatus.RUNNING.value:
                # Its process is gone (we hold the store's lock): close it so the chain goes on.
                self.store.end_job(latest.id, JobStatus.STOPPED, None, latest.totals)
            return latest.chain_id, latest.chain_mode, latest.group
        return None, mode.value, group

    # --- running --------------------------------------------------------------------------------

    def run(self, options: JobOptions) -> JobResult:
        """Run one job to its end. Inside a running event loop (a Jupyter kernel) the job gets a
        thread of its own, and this call waits for it."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.run_async(options))
        outcome: dict[str, object] = {}

        def job() -> None:
            try:
                outcome["result"] = asyncio.run(self.run_async(options))
            except BaseException as err:  # handed to the caller's thread below
                outcome["error"] = err

        worker = threading.Thread(target=job, name="scr-nb-job")
        worker.start()
        while worker.is_alive():
            try:
                worker.join(0.2)
            except KeyboardInterrupt:   # the kernel's interrupt: Stop and Close, then Cancel
                if self.control.stopping:
                    self.control.cancel()
                else:
                    self.control.stop_and_close()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    async def run_async(self, options: JobOptions) -> JobResult:
        try:
            self.session.require_b0062(self.clock.now())
        except RefusedError as err:
            self.log.write("refused", mode=options.mode.value, group=options.group,
                           user_id=self.session.user_id, reason=str(err))
            raise
        self.lock = StoreLock(self.store, self.session.user_id, self.session.name, self.clock.now)
        try:
            crashed = self.lock.acquire()
        except RefusedError as err:
            self.log.write("refused", mode=options.mode.value, group=options.group,
                           user_id=self.session.user_id, reason=str(err))
            raise
        if crashed is not None:
            self.log.write("takeover", user_id=self.session.user_id,
                           previous_holder=crashed.describe())
        try:
            return await self._locked(options)
        finally:
            self.lock.release()

    async def _locked(self, options: JobOptions) -> JobResult:
        try:
            options.schedule.check(self.clock.now())
            start = options.schedule.start_at
            if start is not None and start >= self.session.expires_at:
                raise ScheduleError(
                    f"the start time {start.isoformat(timespec='minutes')} is after the Smartcard "
                    f"session ends ({self.session.expires_at.isoformat(timespec='minutes')}): "
                    "log in nearer the time, or choose an earlier start")
        except RefusedError as err:
            self.log.write("refused", mode=options.mode.value, group=options.group,
                           user_id=self.session.user_id, reason=str(err))
            raise
        try:
            practice, decisions = self.prepare(options)
        except ExtractError as err:
            self.log.write("refused", mode=options.mode.value, group=options.group,
                           user_id=self.session.user_id, reason=str(err))
            raise
        chain_id, chain_mode, group = self._chain(options)
        job = self.store.start_job(options.mode.value, chain_mode, group, chain_id,
                                   self.session.user_id, self.session.name, options.settings())
        chain_id = job.chain_id
        in_scope, eligible = self.store.scope_size(group)
        progress = Progress(job_id=job.id, mode=job.mode, group=group,
                            patients_in_scope=in_scope, checked=in_scope, eligible=eligible,
                            session_expires_at=self.session.expires_at.isoformat(),
                            schedule=options.schedule.to_json())
        self.log.write("job_start", job_id=job.id, mode=job.mode, chain_mode=chain_mode,
                       group=group, user_id=self.session.user_id, user_name=self.session.name,
                       resumes=chain_id if chain_id != job.id else None,
                       settings={k: v for k, v in options.settings().items()
                                 if k in ("concurrency", "rate_limit", "ack_timeout", "dissent",
                                          "skip_acknowledged")},
                       not_required_by_reason=self.dry_run["not_required_by_reason"])
        if not options.schedule.empty:
            self.log.write("schedule", job_id=job.id, user_id=self.session.user_id,
                           **options.schedule.to_json())
        run = _Run(self, options, job, chain_mode, practice, decisions, progress)
        try:
            status, reason = await run.execute()
        except Exception as err:
            # An unexpected error: the job is left resumable, never "completed".
            self.store.end_job(job.id, JobStatus.STOPPED, None, run.statistics())
            self.log.write("job_error", job_id=job.id, user_id=self.session.user_id,
                           error=f"{type(err).__name__}: {err}")
            raise
        totals = run.statistics()
        job = self.store.end_job(job.id, status, reason.value if reason else None, totals)
        progress.status = job.status
        self.log.write("job_end", job_id=job.id, mode=job.mode, group=group,
                       user_id=self.session.user_id, status=job.status, reason=job.reason,
                       counters=totals["counters"])
        return JobResult(job, progress, totals)


def refusal(store: Store, mode: Mode, group: str | None) -> tuple[str, str | None] | None:
    """Why ``mode`` may not start on ``group`` now, in Vision's words, with the mode to use
    instead; None when it may. The engine refuses with it, the control panel greys buttons."""
    if mode == Mode.RESUME:
        if store.latest_unfinished(group, any_scope=group is None) is None:
            where = f"Patient Group {group!r}" if group else "this store"
            return ("there is nothing to resume: no stopped, paused or cancelled upload in "
                    f"{where}. Use Run, Rerun or Failed.", None)
        return None
    latest = store.latest_job(group)
    if mode == Mode.RUN and latest is not None:
        if latest.status == JobStatus.COMPLETED.value:
            return ("the initial upload has already run to completion: use Rerun to send every "
                    "summary again or Failed to reprocess failures.", "rerun or failed")
        return "the upload is partially completed: use Resume to continue it.", "resume"
    if mode == Mode.FAILED and not store.count_in_scope(group, PatientState.FAILED):
        return f"there are no failed patients to reprocess in {group or 'the whole list'}.", None
    return None


class _Run:
    """The moving parts of one job; lives as long as the job runs."""

    def __init__(self, engine: Engine, options: JobOptions, job: Job, chain_mode: str,
                 practice: Practice, decisions: dict[str, Decision], progress: Progress):
        self.engine, self.options, self.job, self.chain_mode = engine, options, job, chain_mode
        self.store, self.clock, self.control = engine.store, engine.clock, engine.control
        self.practice, self.decisions, self.progress = practice, decisions, progress
        self.author = Author(user_id=engine.session.user_id, name=engine.session.name,
                             role_profile_id=engine.session.role_profile_id,
                             sender_asid=options.sender_asid,
                             receiver_asid=options.receiver_asid,
                             practice_ods=options.practice_ods,
                             practice_name=options.practice_name)
        self.windows = Windows(today=self.clock.today())
        self.started = self.clock.monotonic()
        self.stop_reason: StopReason | None = None
        self.stop_status: JobStatus | None = None
        self.trackers: set[asyncio.Task] = set()
        self.tracker_errors: list[BaseException] = []
        self.last_report = 0.0
        self.gate = asyncio.Event()      # open: sending may go on (closed before the start and
        self.gate.set()                  # inside a scheduled pause)
        self.paused = self.resumed = False
        self.control_logged = False
        self.produced_all = False

    # --- bookkeeping --------------------------------------------------------------------------

    def report(self, force: bool = False) -> None:
        now = self.clock.monotonic()
        self.progress.elapsed = now - self.started
        if self.engine.on_progress and (force or now - self.last_report >= 0.2):
            self.last_report = now
            self.engine.on_progress(self.progress)

    def record_attempt(self, attempt: Attempt) -> None:
        if attempt.message_id:
            self.store.record_attempt(attempt.message_id, attempt.kind, attempt.status,
                                      attempt.detail)

    def statistics(self) -> dict:
        """Completion statistics (SPEC 8)."""
        store = self.store
        states = store.state_counts()
        elapsed = self.clock.monotonic() - self.started
        done = self.progress.done
        return {
            "job_id": self.job.id,
            "mode": self.job.mode,
            "group": self.job.group,
            "qualifying_patients": self.progress.eligible,
            "patients_in_scope": self.progress.patients_in_scope,
            "counters": counters(states),
            "states": states,
            "not_required_by_reason": store.not_required_by_reason(),
            "failed_by_code": store.failed_by_code(),
            "this_job": {"to_send": self.progress.to_send, "queued": self.progress.queued,
                         "transmitted": self.progress.transmitted,
                         "acknowledged": self.progress.acknowledged,
                         "failed": self.progress.failed,
                         "failed_by_code": dict(self.progress.failed_by_code)},
            "elapsed_seconds": round(elapsed, 3),
            "average_seconds_per_patient": round(elapsed / done, 4) if done else None,
            "rate_per_second": round(done / elapsed, 3) if elapsed > 0 else 0.0,
        }

    def failed(self, message_id: str, code: str, ack: Ack | None = None,
               ack_body: bytes | None = None) -> None:
        self.store.mark_failed(message_id, code, ack.type_code if ack else None,
                               ack.codes if ack else (), ack_body)
        self.progress.failed += 1
        self.progress.failed_by_code[code] = self.progress.failed_by_code.get(code, 0) + 1
        self.report()

    def session_lost(self, err: Exception) -> None:
        if self.stop_reason is None:
            self.stop_status, self.stop_reason = JobStatus.STOPPED, StopReason.SESSION_EXPIRED
            self.engine.log.write("session_expired", job_id=self.job.id,
                                  user_id=self.engine.session.user_id, detail=str(err))

    @property
    def halted(self) -> bool:
        return self.stop_reason is not None or self.control.stopping

    # --- work -----------------------------------------------------------------------------------

    def build_batch(self, items: list[str | _Work]) -> list[_Work]:
        """Build new messages for the patients among ``items`` and store them all in one
        transaction (ids committed before anything is sent); in-flight work passes through."""
        works: list[_Work] = []
        fresh: list[tuple[str, str, str, str | None, str, bytes]] = []
        for item in items:
            if isinstance(item, _Work):
                works.append(item)
                continue
            built = self.build(item)
            if built is None:
                continue
            message, prior = built
            fresh.append((item, message.message_id, message.event_id, prior,
                          message.content_type, message.body))
            works.append(_Work(item, message.message_id, message.event_id, message=message))
        if fresh:
            self.store.queue_messages(self.job.id, self.job.chain_id, fresh)
        return works

    def build(self, pkey: str) -> tuple[OutboundMessage, str | None] | None:
        """Build a new message for one patient, with the summary it replaces; None when it
        cannot be sent (a message over the size limit fails the patient here)."""
        decision = self.decisions.get(pkey)
        if decision is None or not decision.eligible:
            return None   # no longer in the extract or no longer eligible: sync made it so
        patient = decision.patient
        content = select_content(self.practice.medications.get(patient.patient_id, ()),
                                 self.practice.allergies.get(patient.patient_id, ()),
                                 self.windows)
        prior = self.store.patient(pkey)["ack_event_id"]
        message = build_message(patient, content, author=self.author, message_id=new_id(),
                                event_id=new_id(), created=self.clock.now(),
                                prior_event_id=prior, dissent=decision.dissent)
        if message.size > MAX_MESSAGE_BYTES:
            self.store.fail_unsent(pkey, self.job.id, self.job.chain_id, message.message_id,
                                   message.event_id, message.size, "message_too_large")
            self.progress.failed += 1
            self.progress.failed_by_code["message_too_large"] = \
                self.progress.failed_by_code.get("message_too_large", 0) + 1
            return None
        return message, prior

    def stored(self, message_id: str) -> OutboundMessage | None:
        kept = self.store.message(message_id)
        if kept is None or not kept.body:
            return None
        nhs = self.store.patient(kept.pkey)["nhs_number"]
        return OutboundMessage(message_id=kept.message_id, event_id=kept.event_id,
                               nhs_number=nhs, content_type=kept.content_type, body=kept.body)

    def plan(self) -> list[str | _Work]:
        """In-flight patients first (finished with their original id), then the mode's work."""
        plan: list[str | _Work] = []
        for pkey, message_id in self.store.in_flight(self.job.group):
            kept = self.store.message(message_id)
            if kept is None:
                continue
            if kept.state == PatientState.TRANSMITTED.value and kept.poll_url:
                plan.append(_Work(pkey, kept.message_id, kept.event_id, poll_url=kept.poll_url))
            else:
                plan.append(_Work(pkey, kept.message_id, kept.event_id,
                                  message=self.stored(message_id)))
        for pkey in self.store.select_work(self.chain_mode, self.job.chain_id, self.job.group,
                                           self.options.skip_acknowledged):
            if self.chain_mode in (Mode.FAILED.value, Mode.RERUN.value):
                row = self.store.patient(pkey)
                kept = self.store.message(row["message_id"]) if row["message_id"] else None
                if kept is not None and kept.failure_code in UNCERTAIN_FAILURES and kept.body:
                    # The Spine may hold it: same id, and duplicate elimination answers.
                    self.store.requeue(pkey, kept.message_id, self.job.id, self.job.chain_id)
                    plan.append(_Work(pkey, kept.message_id, kept.event_id,
                                      message=self.stored(kept.message_id)))
                    continue
            plan.append(pkey)
        return plan

    async def execute(self) -> tuple[JobStatus, StopReason | None]:
        plan = self.plan()
        self.progress.to_send = len(plan)
        self.report(force=True)
        limiter = RateLimiter(self.options.rate_limit, clock=self.clock.monotonic,
                              sleep=self.clock.sleep) if self.options.rate_limit else None
        client = self.engine.client_factory(
            self.engine.spine_url, self.engine.session, asid=self.options.sender_asid,
            rate_limiter=limiter, concurrency=self.options.concurrency,
            retry_window=self.options.retry_window, now=self.clock.now,
            monotonic=self.clock.monotonic, sleep=self.clock.sleep,
            on_attempt=self.record_attempt, may_send=self.may_send)
        self.client = client
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.options.concurrency * 2)
        self.warn_if_too_slow(len(plan))
        schedule = self.options.schedule
        if schedule.start_at is not None and self.clock.now() < schedule.start_at:
            self.gate.clear()
            self.progress.waiting = True
        watcher = asyncio.create_task(self.watch())
        producer = asyncio.create_task(self.produce(plan, queue))
        flusher = asyncio.create_task(self.flush_now_and_then())
        senders = [asyncio.create_task(self.send_loop(queue))
                   for _ in range(self.options.concurrency)]
        try:
            await self.supervise(producer, senders, queue, [watcher, flusher])
            # Acks of transmitted messages are tracked to the end, whatever stopped the sending,
            # except after Cancel: those stay transmitted and Resume polls them.
            while self.trackers:
                if self.control.requested == JobStatus.CANCELLED:
                    for task in list(self.trackers):
                        task.cancel()
                    break
                await asyncio.wait(list(self.trackers), timeout=0.2)
            if self.tracker_errors:
                raise self.tracker_errors[0]
        finally:
            for task in [producer, flusher, watcher, *senders, *self.trackers]:
                task.cancel()
            await client.aclose()
            self.store.flush()
        self.report(force=True)
        self.log_control()
        if self.stop_reason is not None:
            return self.stop_status, self.stop_reason
        if self.control.stopping and self.produced_all and not self.store.in_flight(
                self.job.group):
            return JobStatus.COMPLETED, None   # the Stop came after the last patient was done
        if self.control.stopping:
            if self.paused:   # a Stop inside a scheduled pause cancels the pending resume
                self.stopped(JobStatus.STOPPED, StopReason.RESUME_CANCELLED)
                return self.stop_status, self.stop_reason
            return self.control.requested, self.control.reason
        left = self.store.in_flight(self.job.group)
        if left:
            raise RuntimeError(f"{len(left)} patients are still in flight at the end of job "
                               f"{self.job.id}; Resume finishes them")
        return JobStatus.COMPLETED, None

    def warn_if_too_slow(self, messages: int) -> None:
        """Before sending: say so when, at the configured rate, the job cannot finish before the
        stop time or the end of the Smartcard session."""
        rate = self.options.rate_limit
        if not rate or not messages:
            return
        start = max(self.options.schedule.start_at or self.clock.now(), self.clock.now())
        needed = messages / rate
        ends = [("the stop time", self.options.schedule.stop_at),
                ("the Smartcard session's expiry", self.engine.session.expires_at)]
        for what, end in ends:
            if end is None:
                continue
            available = (end - start).total_seconds()
            if needed > available:
                text = (f"at {rate:g} messages a second, {messages} messages need about "
                        f"{_duration(needed)}, but {what} ({end.isoformat(timespec='minutes')}) "
                        f"leaves {_duration(max(0.0, available))}: the job will stop before it "
                        "completes; Resume continues it")
                self.progress.warnings.append(text)
                self.engine.log.write("warning", job_id=self.job.id,
                                      user_id=self.engine.session.user_id, warning=text)

    def log_control(self) -> None:
        """Log a Stop, Stop and Close or Cancel once, with the user, when it is first seen."""
        if self.control.stopping and not self.control_logged:
            self.control_logged = True
            self.engine.log.write("cancel" if self.control.requested == JobStatus.CANCELLED
                                  else "stop", job_id=self.job.id,
                                  user_id=self.engine.session.user_id,
                                  reason=self.control.reason.value,
                                  becomes=self.control.requested.value)

    def may_send(self) -> bool:
        """Asked by the Spine client just before each POST (after a rate-limit wait or a retry
        backoff): the schedule, the session and the controls, against the clock now."""
        if self.halted or not self.gate.is_set():
            return False
        now, schedule = self.clock.now(), self.options.schedule
        if schedule.stop_at is not None and now >= schedule.stop_at:
            return False
        if (schedule.pause_at is not None and not self.resumed
                and schedule.pause_at <= now < schedule.resume_at):
            return False
        return not self.engine.session.expired(now)

    def stopped(self, status: JobStatus, reason: StopReason) -> None:
        """Stop sending for a reason of the job's own (schedule, session); acks are still tracked."""
        if self.stop_reason is None:
            self.stop_status, self.stop_reason = status, reason
            self.engine.log.write("stop", job_id=self.job.id,
                                  user_id=self.engine.session.user_id, reason=reason.value)
        self.gate.set()   # let waiting senders see the stop

    async def watch(self) -> None:
        """The schedule and the session, checked a few times a second against the clock."""
        schedule, session = self.options.schedule, self.engine.session
        while True:
            now = self.clock.now()
            self.progress.session_seconds_left = max(0.0, session.seconds_left(now))
            if self.engine.lock.lost:
                raise RuntimeError("another job took this store's lock: this one stops sending; "
                                   "see the practice log")
            if self.stop_reason is not None:
                return
            if self.paused:
                if schedule.stop_at is not None and now >= schedule.stop_at:
                    self.stopped(JobStatus.STOPPED, StopReason.STOP_TIME)
                    return
                if self.control.stopping or session.expired(now):
                    self.stopped(JobStatus.STOPPED, StopReason.RESUME_CANCELLED)
                    return
                if now >= schedule.resume_at:
                    self.paused, self.resumed = False, True
                    self.progress.paused = False
                    self.store.mark_job(self.job.id, JobStatus.RUNNING, None)
                    self.engine.log.write("resume", job_id=self.job.id,
                                          user_id=session.user_id, reason="resume_time")
                    self.gate.set()
                    self.report(force=True)
            elif session.expired(now):
                self.session_lost(SessionExpired(f"the Smartcard session ended at "
                                                 f"{session.expires_at.isoformat()}"))
                self.gate.set()
                return
            elif schedule.stop_at is not None and now >= schedule.stop_at:
                self.stopped(JobStatus.STOPPED, StopReason.STOP_TIME)
                return
            elif self.progress.waiting:
                if self.control.stopping:
                    self.gate.set()
                elif now >= schedule.start_at:
                    self.progress.waiting = False
                    self.engine.log.write("start", job_id=self.job.id, user_id=session.user_id,
                                          reason="start_time")
                    self.gate.set()
            elif (schedule.pause_at is not None and not self.resumed
                  and now >= schedule.pause_at and now < schedule.resume_at):
                self.paused = self.progress.paused = True
                self.gate.clear()
                self.store.mark_job(self.job.id, JobStatus.PAUSED, StopReason.PAUSE_TIME.value)
                self.engine.log.write("pause", job_id=self.job.id, user_id=session.user_id,
                                      reason="pause_time", resume_at=schedule.resume_at.isoformat())
                self.report(force=True)
            elif self.control.stopping:
                self.gate.set()
            self.log_control()
            self.report()
            await asyncio.sleep(WATCH_SECONDS)

    async def flush_now_and_then(self) -> None:
        """Write deferred state changes a few times a second, so status readers see progress."""
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            self.store.flush()

    async def supervise(self, producer: asyncio.Task, senders: list[asyncio.Task],
                        queue: asyncio.Queue, background: list[asyncio.Task]) -> None:
        """Wait for the producer and the senders; the first unexpected error in any of them or in
        a background task (the watcher, the flusher) ends the job and is raised, so no task can
        leave the others waiting for ever."""

        async def close_queue() -> None:
            for _ in senders:
                await queue.put(None)

        work: set[asyncio.Task] = {producer, *senders}
        pending: set[asyncio.Task] = work | set(background)
        while work & pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()
            if producer in done:
                closer = asyncio.create_task(close_queue())
                work.add(closer)
                pending.add(closer)

    async def produce(self, plan: list[str | _Work], queue: asyncio.Queue) -> None:
        """Build ahead of the senders, a batch at a time (the outbound queue is bounded)."""
        batch = max(1, min(64, self.options.concurrency * 2))
        for start in range(0, len(plan), batch):
            await self.gate.wait()
            if self.halted:
                return
            for work in self.build_batch(plan[start:start + batch]):
                self.progress.queued += 1
                if work.poll_url:
                    self.track(work)
                else:
                    await queue.put(work)   # stopped meanwhile: the sender leaves it queued
        self.produced_all = True

    async def send_loop(self, queue: asyncio.Queue) -> None:
        while True:
            work = await queue.get()
            if work is None:
                return
            sent = await self.send_one(work.message)
            if sent is None:
                continue
            self.store.mark_transmitted(work.message_id, sent.poll_url, sent.attempts)
            self.progress.transmitted += 1
            self.report()
            self.track(_Work(work.pkey, work.message_id, work.event_id, poll_url=sent.poll_url),
                       first_wait=sent.retry_after)

    async def send_one(self, message: OutboundMessage) -> Transmission | None:
        """POST one message; None when it was not transmitted (held, stopped, failed)."""
        while True:
            await self.gate.wait()
            if self.halted:
                return None   # stays queued, with its id: Resume sends it
            self.store.mark_sending(message.message_id)
            try:
                return await self.client.send(message)
            except SendHeld:
                # Held at the last moment (a pause or stop the watcher has not closed the gate
                # for yet): queued again with its id, and tried again once the gate opens.
                self.store.unsend(message.message_id)
                await asyncio.sleep(WATCH_SECONDS)
            except (SessionExpired, SessionRejected) as err:
                self.store.unsend(message.message_id)
                self.session_lost(err)
                return None
            except SpineError as err:
                code = err.codes[0] if err.codes else (
                    "retries_exhausted" if err.retriable else "http_error")
                self.failed(message.message_id, code)
                return None

    def track(self, work: _Work, first_wait: float = 0.0) -> None:
        task = asyncio.create_task(self.await_ack(work, first_wait))
        self.trackers.add(task)
        task.add_done_callback(self._tracker_done)

    def _tracker_done(self, task: asyncio.Task) -> None:
        self.trackers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.tracker_errors.append(task.exception())

    async def await_ack(self, work: _Work, wait: float) -> None:
        client = self.client
        message_id = work.message_id
        deadline = self.clock.monotonic() + self.options.ack_timeout
        while True:
            await self.clock.sleep(min(wait, max(0.0, deadline - self.clock.monotonic())))
            if self.clock.monotonic() >= deadline:
                self.failed(message_id, "ack_timeout")
                return
            try:
                result = await client.poll(work.poll_url, message_id)
            except (SessionExpired, SessionRejected) as err:
                self.session_lost(err)
                return   # stays transmitted: Resume polls it again after a new login
            except SpineError as err:
                self.failed(message_id, "http_error" if not err.codes else err.codes[0])
                return
            if result.ack is None:
                wait = max(0.05, result.retry_after)
                continue
            ack = result.ack
            if ack.message_ref and ack.message_ref.upper() != message_id.upper():
                # Never take another message's ack as this one's: the poll goes on until the
                # ack timeout, and the patient then fails with a reason support can see.
                self.engine.log.write("ack_mismatch", job_id=self.job.id, message_id=message_id,
                                      message_ref=ack.message_ref)
                wait = max(0.05, result.retry_after or 1.0)
                continue
            if ack.accepted:
                self.store.mark_acknowledged(message_id, work.event_id)
                self.progress.acknowledged += 1
                self.report()
            else:
                self.failed(message_id, ack.failure_code or ack.type_code, ack, result.body)
            return
