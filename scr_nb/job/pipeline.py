"""The send and track pipeline of one job (SPEC 8, 6): plan the work, build messages a batch at a
time (ids committed before sending), POST them with a bounded number in flight, poll each for its
ack, and keep every state change in the store; the watcher's decisions are carried out here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from itertools import chain, islice
from typing import TYPE_CHECKING

from scr_nb.constants import DUPLICATE_EVENT, MAX_MESSAGE_BYTES, UNCERTAIN_FAILURES
from scr_nb.errors import AccessDenied, SessionExpired, SessionRejected, SpineError, TlsFailure
from scr_nb.extract.records import Allergy, Medication, Patient
from scr_nb.job.options import JobOptions, Progress, describe_duration
from scr_nb.job.watcher import Phase, Step, next_step, sending_allowed, starts_waiting
from scr_nb.spine.acks import Ack
from scr_nb.spine.client import (
    Attempt,
    Pacer,
    RateLimiter,
    SendHeld,
    Transmission,
)
from scr_nb.spine.content import Windows, select_content
from scr_nb.spine.gp_summary import Author, OutboundMessage, build_message, new_id
from scr_nb.store.extract_index import ExtractIndex
from scr_nb.store.practice_store import Job
from scr_nb.store.states import JobStatus, Mode, PatientState, StopReason, counters

if TYPE_CHECKING:
    from scr_nb.job.engine import Engine

# What stops a job without failing anyone: the Spine's 403, and a TLS failure (SPEC 6.3, 6.5).
STOPPING_ERRORS = {AccessDenied: StopReason.ACCESS_DENIED, TlsFailure: StopReason.TLS_FAILURE}
FLUSH_SECONDS = 1.0       # deferred state moves written at least this often (status readers lag as much)
REQUESTS_SECONDS = 0.5    # how often Stop requests made through the store are read (SPEC: 2 s)
DEFAULT_REQUEST_SECONDS = 30.0   # the longest one request may take, when the client does not say
WORK_PAGE = 2_000          # patients read from the store at a time to be built and sent
WATCH_SECONDS = 0.1       # how often the schedule and the session are checked against the clock


@dataclass(frozen=True)
class Batch:
    """One batch's rows: pkey -> the store's facts (``Store.to_build``), patients.csv row ->
    (patient, latest consent date), patient id -> medications and allergies."""

    facts: dict[str, tuple[int, str | None, bool, str | None]]
    patients: dict[int, tuple[Patient, date | None]]
    medications: dict[str, list[Medication]]
    allergies: dict[str, list[Allergy]]


@dataclass
class Work:
    pkey: str
    message_id: str
    event_id: str                            # the GP Summary id the Spine will hold
    message: OutboundMessage | None = None   # set when it has to be (re)sent
    poll_url: str | None = None              # set when it only has to be polled


class Pipeline:
    """The moving parts of one job; lives as long as the job runs."""

    def __init__(self, engine: "Engine", options: JobOptions, job: Job, chain_mode: str,
                 extract: ExtractIndex, progress: Progress):
        self.engine, self.options, self.job, self.chain_mode = engine, options, job, chain_mode
        self.store, self.clock, self.control = engine.store, engine.clock, engine.control
        self.extract, self.progress = extract, progress
        self.author = Author(user_id=engine.session.user_id, name=engine.session.name,
                             role_profile_id=engine.session.role_profile_id,
                             sender_asid=options.sender_asid,
                             receiver_asid=options.receiver_asid,
                             practice_ods=options.practice_ods,
                             practice_name=options.practice_name)
        self.windows = Windows(today=self.clock.today())
        self.started = self.last_tick = self.clock.monotonic()
        self.active = 0.0
        self.stop_reason: StopReason | None = None
        self.stop_status: JobStatus | None = None
        self.stop_detail: str | None = None      # the words of a 403 or a TLS failure
        self.trackers: set[asyncio.Task] = set()
        self.tracker_errors: list[BaseException] = []
        self.last_report = 0.0
        self.gate = asyncio.Event()      # open: sending may go on (closed before the start and
        self.gate.set()                  # inside a scheduled pause)
        self.phase = Phase()
        self.next_request_check = 0.0
        self.control_logged = False
        self.produced_all = False

    # --- bookkeeping --------------------------------------------------------------------------

    def active_seconds(self) -> float:
        """Time spent sending: waiting for the start and scheduled pauses do not count."""
        now = self.clock.monotonic()
        if not (self.progress.waiting or self.progress.paused):
            self.active += now - self.last_tick
        self.last_tick = now
        return self.active

    def report(self, force: bool = False) -> None:
        now = self.clock.monotonic()
        self.progress.elapsed = self.active_seconds()
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
        elapsed = self.active_seconds()
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
                         "already_at_spine": self.progress.already_at_spine,
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

    async def build_batch(self, items: list[str | Work]) -> list[Work]:
        """Build new messages for the patients among ``items`` and store them all in one
        transaction (ids committed before anything is sent), on a thread of its own so the event
        loop goes on sending and polling while it reaches the disk or the server; in-flight work
        passes through. Only this batch's patients are read from the extract index."""
        works: list[Work] = []
        fresh: list[tuple[str, str, str, str | None, str, bytes]] = []
        batch = self.read_batch([item for item in items if not isinstance(item, Work)])
        for item in items:
            if isinstance(item, Work):
                works.append(item)
                continue
            built = self.build(item, batch)
            if built is None:
                continue
            message, prior = built
            fresh.append((item, message.message_id, message.event_id, prior,
                          message.content_type, message.body))
            works.append(Work(item, message.message_id, message.event_id, message=message))
        if fresh:
            await asyncio.to_thread(self.store.queue_messages, self.job.id, self.job.chain_id,
                                    fresh)
        return works

    def read_batch(self, pkeys: list[str]) -> Batch:
        """The store's and the extract's rows for the patients of one batch."""
        if not pkeys:
            return Batch({}, {}, {}, {})
        facts = self.store.to_build(pkeys)
        patients = self.extract.patients([fact[0] for fact in facts.values() if fact[1] is None])
        medications, allergies = self.extract.clinical(
            [patient.patient_id for patient, _ in patients.values()])
        return Batch(facts, patients, medications, allergies)

    def build(self, pkey: str, batch: Batch) -> tuple[OutboundMessage, str | None] | None:
        """Build a new message for one patient, with the summary it replaces; None when it
        cannot be sent (a message over the size limit fails the patient here)."""
        fact = batch.facts.get(pkey)
        if fact is None or fact[1] is not None:
            return None   # no longer in the extract or no longer eligible: sync made it so
        row, _, dissent, prior = fact
        if row not in batch.patients:
            raise RuntimeError(f"patient {pkey} (patients.csv line {row}) is not in the extract "
                               f"index {self.extract.path}: the index and the store disagree; "
                               "Resume reads the extract again")
        patient, consent_on = batch.patients[row]
        content = select_content(batch.medications.get(patient.patient_id, ()),
                                 batch.allergies.get(patient.patient_id, ()), self.windows)
        # The Refusal entry is dated the day the dissent was recorded.
        message = build_message(patient, content, author=self.author, message_id=new_id(),
                                event_id=new_id(), created=self.clock.now(),
                                prior_event_id=prior, dissent=bool(dissent),
                                dissent_on=consent_on if dissent else None)
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

    def plan(self) -> tuple[int, Iterator[str | Work]]:
        """(how many, the work): in-flight patients first (finished with their original id), then
        messages built and never posted before a stop, then the mode's work read from the store a
        page at a time, so the first message goes out at once whatever the practice's size."""
        first: list[Work] = []
        for pkey, message_id in self.store.in_flight(self.job.group):
            kept = self.store.message(message_id)
            if kept is None:
                continue
            if kept.state == PatientState.TRANSMITTED.value and kept.poll_url:
                first.append(Work(pkey, kept.message_id, kept.event_id, poll_url=kept.poll_url))
            else:
                first.append(Work(pkey, kept.message_id, kept.event_id,
                                  message=self.stored(message_id)))
        # Sent with the id they were given; queued again, so the mode's work leaves them out.
        for pkey, message_id in self.store.unsent(self.job.chain_id, self.job.group):
            kept = self.store.message(message_id)
            self.store.requeue(pkey, message_id, self.job.id, self.job.chain_id)
            first.append(Work(pkey, message_id, kept.event_id, message=self.stored(message_id)))
        rule = (self.chain_mode, self.job.chain_id, self.job.group, self.options.skip_acknowledged)
        return len(first) + self.store.count_work(*rule), chain(first, self.work(rule))

    def work_left(self) -> bool:
        """Whether some patient of this job is not finished: in flight, built and never posted
        (a stop put it back to Unprocessed with its id), or not reached yet."""
        rule = (self.chain_mode, self.job.chain_id, self.job.group, self.options.skip_acknowledged)
        return bool(self.store.in_flight(self.job.group)
                    or self.store.unsent(self.job.chain_id, self.job.group)
                    or self.store.count_work(*rule))

    def work(self, rule: tuple) -> Iterator[str | Work]:
        """The mode's work, a page of the store at a time in extract order."""
        after = -1
        while page := self.store.select_work(*rule, after_row=after, limit=WORK_PAGE):
            for pkey, after in page:
                yield self.again_if_uncertain(pkey) or pkey

    def again_if_uncertain(self, pkey: str) -> Work | None:
        """Failed and Rerun send a patient whose outcome was uncertain (the Spine may hold it)
        with the same id, and duplicate elimination answers."""
        if self.chain_mode not in (Mode.FAILED.value, Mode.RERUN.value):
            return None
        row = self.store.patient(pkey)
        kept = self.store.message(row["message_id"]) if row["message_id"] else None
        if kept is None or kept.failure_code not in UNCERTAIN_FAILURES or not kept.body:
            return None
        self.store.requeue(pkey, kept.message_id, self.job.id, self.job.chain_id)
        return Work(pkey, kept.message_id, kept.event_id, message=self.stored(kept.message_id))

    async def execute(self) -> tuple[JobStatus, StopReason | None]:
        to_send, plan = self.plan()
        self.progress.to_send = to_send
        self.report(force=True)
        limiter = RateLimiter(self.options.rate_limit, clock=self.clock.monotonic,
                              sleep=self.clock.sleep) if self.options.rate_limit else None
        if self.engine.send_gate is not None:   # a fleet's one rate limit, over this practice's own
            limiter = limiter or Pacer(clock=self.clock.monotonic, sleep=self.clock.sleep)
            limiter.gate = self.engine.send_gate
        client = self.engine.client_factory(
            self.engine.spine_url, self.engine.session, asid=self.options.sender_asid,
            rate_limiter=limiter, concurrency=self.options.concurrency,
            retry_window=self.options.retry_window, ack_timeout=self.options.ack_timeout,
            now=self.clock.now, tls=self.engine.tls,
            monotonic=self.clock.monotonic, sleep=self.clock.sleep,
            on_attempt=self.record_attempt, may_send=self.may_send)
        self.client = client
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.options.concurrency * 2)
        self.warn_if_too_slow(to_send)
        self.phase = starts_waiting(self.clock.now(), self.options.schedule)
        if self.phase.waiting:
            self.gate.clear()
            self.active_seconds()   # the time so far counted before the phase changes
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
            # A clean stop leaves nothing counted as Sending: built, never posted -> Unprocessed.
            self.store.unqueue_unsent(self.job.group)
        self.report(force=True)
        self.log_control()
        if self.stop_reason is not None:
            return self.stop_status, self.stop_reason
        if self.control.stopping and self.produced_all and not self.work_left():
            return JobStatus.COMPLETED, None   # the Stop came after the last patient was done
        if self.control.stopping:
            if self.phase.paused:   # a Stop inside a scheduled pause cancels the pending resume
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
                        f"{describe_duration(needed)}, but {what} ({end.isoformat(timespec='minutes')}) "
                        f"leaves {describe_duration(max(0.0, available))}: the job will stop before it "
                        "completes; Resume continues it")
                self.progress.warnings.append(text)
                self.engine.log.write("warning", job_id=self.job.id,
                                      user_id=self.engine.session.user_id, warning=text)

    def log_control(self) -> None:
        """Log a Stop, Stop and Close or Cancel once, with the user, when it is first seen."""
        if self.control.stopping and not self.control_logged:
            self.control_logged = True
            user_id, user_name = self.control.requested_by or (self.engine.session.user_id,
                                                               self.engine.session.name)
            self.engine.log.write("cancel" if self.control.requested == JobStatus.CANCELLED
                                  else "stop", job_id=self.job.id, user_id=user_id,
                                  user_name=user_name, reason=self.control.reason.value,
                                  becomes=self.control.requested.value)

    def session_ends(self) -> datetime:
        """When sending must stop: a safety margin before the card's session ends, the longest a
        request may take plus the clock difference with the Spine (read from its Date header), so
        latency and clock skew never put a request on a dead session (SPEC 7)."""
        client = getattr(self, "client", None)
        margin = (getattr(client, "request_timeout", DEFAULT_REQUEST_SECONDS)
                  + abs(getattr(client, "clock_offset", 0.0)))
        return self.engine.session.expires_at - timedelta(seconds=margin)

    def may_send(self) -> bool:
        """Asked by the Spine client just before each POST (after a rate-limit wait or a retry
        backoff): the schedule, the session and the controls, against the clock now."""
        if self.halted or not self.gate.is_set():
            return False
        return sending_allowed(self.clock.now(), self.options.schedule,
                               self.session_ends(), self.phase)

    def stopped(self, status: JobStatus, reason: StopReason, detail: str | None = None) -> None:
        """Stop sending for a reason of the job's own (schedule, session, the Spine's 403, TLS);
        acks are still tracked."""
        if self.stop_reason is None:
            self.stop_status, self.stop_reason, self.stop_detail = status, reason, detail
            fields = {"detail": detail} if detail else {}
            self.engine.log.write("stop", job_id=self.job.id,
                                  user_id=self.engine.session.user_id, reason=reason.value,
                                  **fields)
        self.gate.set()   # let waiting senders see the stop

    def stopped_by(self, err: AccessDenied | TlsFailure) -> None:
        """A 403 or a TLS failure: nothing more is sent, and nobody is failed for it."""
        reason = next(r for kind, r in STOPPING_ERRORS.items() if isinstance(err, kind))
        self.stopped(JobStatus.STOPPED, reason, str(err))

    async def watch(self) -> None:
        """The schedule and the session, checked a few times a second against the clock; what to
        do is ``watcher.next_step``'s decision, carried out here."""
        schedule, session = self.options.schedule, self.engine.session
        while True:
            now = self.clock.now()
            self.progress.session_seconds_left = max(0.0, session.seconds_left(now))
            if self.engine.lock.lost:
                raise RuntimeError("another job took this store's lock: this one stops sending; "
                                   "see the practice log")
            if self.stop_reason is not None:
                return
            if self.clock.monotonic() >= self.next_request_check:
                self.next_request_check = self.clock.monotonic() + REQUESTS_SECONDS
                for request, user_id, user_name in self.store.take_requests(self.job.id):
                    self.control.ask(request, (user_id, user_name))
            step = next_step(now, schedule, self.session_ends(), self.phase,
                             self.control.stopping)
            if step == Step.STOP_TIME:
                self.stopped(JobStatus.STOPPED, StopReason.STOP_TIME)
                return
            if step == Step.RESUME_CANCELLED:
                self.stopped(JobStatus.STOPPED, StopReason.RESUME_CANCELLED)
                return
            if step == Step.SESSION_ENDED:
                self.session_lost(SessionExpired(f"the Smartcard session ended at "
                                                 f"{session.expires_at.isoformat()}"))
                self.gate.set()
                return
            if step == Step.RESUME:
                self.phase = replace(self.phase, paused=False, resumed=True)
                self.active_seconds()   # the time so far counted before the phase changes
                self.progress.paused = False
                self.store.mark_job(self.job.id, JobStatus.RUNNING, None)
                self.engine.log.write("resume", job_id=self.job.id, user_id=session.user_id,
                                      reason="resume_time")
                self.gate.set()
                self.report(force=True)
            elif step == Step.START:
                self.phase = replace(self.phase, waiting=False)
                self.active_seconds()   # the time so far counted before the phase changes
                self.progress.waiting = False
                self.engine.log.write("start", job_id=self.job.id, user_id=session.user_id,
                                      reason="start_time")
                self.gate.set()
            elif step == Step.PAUSE:
                self.phase = replace(self.phase, paused=True)
                self.active_seconds()   # the time so far counted before the phase changes
                self.progress.paused = True
                self.gate.clear()
                self.store.mark_job(self.job.id, JobStatus.PAUSED, StopReason.PAUSE_TIME.value)
                self.engine.log.write("pause", job_id=self.job.id, user_id=session.user_id,
                                      reason="pause_time", resume_at=schedule.resume_at.isoformat())
                self.report(force=True)
            elif step == Step.LET_STOP:
                self.gate.set()
            self.log_control()
            self.report()
            await asyncio.sleep(WATCH_SECONDS)

    async def flush_now_and_then(self) -> None:
        """Write deferred state changes every FLUSH_SECONDS, so status readers see progress, and
        as soon as the store says enough are waiting; always on a thread, off the event loop."""
        backlog = asyncio.Event()
        self.store.on_backlog = backlog.set
        try:
            while True:
                try:
                    await asyncio.wait_for(backlog.wait(), FLUSH_SECONDS)
                except asyncio.TimeoutError:
                    pass
                backlog.clear()
                await asyncio.to_thread(self.store.flush)
        finally:
            self.store.on_backlog = None

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

    async def produce(self, plan: Iterator[str | Work], queue: asyncio.Queue) -> None:
        """Build ahead of the senders, a batch at a time (the outbound queue is bounded)."""
        size = max(1, min(64, self.options.concurrency * 2))
        while True:
            await self.gate.wait()
            if self.halted:
                return
            batch = list(islice(plan, size))
            if not batch:
                break
            for work in await self.build_batch(batch):
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
            self.track(Work(work.pkey, work.message_id, work.event_id, poll_url=sent.poll_url),
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
            except (AccessDenied, TlsFailure) as err:
                self.store.unsend(message.message_id)   # queued again with its id
                self.stopped_by(err)
                return None
            except SpineError as err:
                code = err.codes[0] if err.codes else (
                    "retries_exhausted" if err.retriable else "http_error")
                self.failed(message.message_id, code)
                return None

    def track(self, work: Work, first_wait: float = 0.0) -> None:
        task = asyncio.create_task(self.await_ack(work, first_wait))
        self.trackers.add(task)
        task.add_done_callback(self._tracker_done)

    def _tracker_done(self, task: asyncio.Task) -> None:
        self.trackers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.tracker_errors.append(task.exception())

    async def await_ack(self, work: Work, wait: float) -> None:
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
            except (AccessDenied, TlsFailure) as err:
                self.stopped_by(err)
                return   # stays transmitted: Resume polls it again
            except SpineError as err:
                # After the 202 the Spine holds the message: whatever went wrong, the outcome is
                # uncertain, and Failed re-sends it with this id (SPEC 6.6).
                code = err.codes[0] if err.codes and err.codes[0] in UNCERTAIN_FAILURES \
                    else "poll_failed"
                self.failed(message_id, code)
                return
            if result.ack is None:
                wait = max(0.05, result.retry_after)
                continue
            ack = result.ack
            if ack.message_ref and ack.message_ref.upper() != message_id.upper():
                # Never take another message's ack as this one's: the poll goes on until the
                # ack timeout, and the patient then fails with a reason support can see.
                self.engine.log.write("ack_mismatch", job_id=self.job.id, message_id=message_id,
                                      user_id=self.engine.session.user_id,
                                      message_ref=ack.message_ref)
                wait = max(0.05, result.retry_after or 1.0)
                continue
            if ack.accepted:
                self.store.mark_acknowledged(message_id, work.event_id)
                self.progress.acknowledged += 1
                self.report()
            elif ack.failure_code == DUPLICATE_EVENT:
                # The Spine already holds a summary for the patient: not required, not failed.
                self.store.mark_existing_at_spine(message_id, ack.codes, result.body)
                self.progress.already_at_spine += 1
                self.report()
            else:
                self.failed(message_id, ack.failure_code or ack.type_code, ack, result.body)
            return


__all__ = ["Pipeline", "Work", "UNCERTAIN_FAILURES"]
