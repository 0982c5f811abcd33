"""The upload engine (SPEC 8): one job = one mode over one scope.

It orchestrates and nothing else: the extract and eligibility decide who, ``modes`` whether the job
may start, the ``pipeline`` sends and tracks, the store keeps every state change. The store, the
Spine client and the clock are handed in, so tests can replace any of them.

Flow of one patient: build -> store (queued, id committed) -> POST with retries (sending) -> 202
(transmitted) -> poll -> AA (acknowledged) or AE/AR, retries exhausted, ack timeout (failed).

Before the lock, the store or anything else, a job makes one complete non-clinical request to the
Spine (``tls.check_connection``): a TLS failure or an unreachable Spine refuses it within seconds.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from scr_nb.clock import SystemClock
from scr_nb.errors import ExtractError, RefusedError, SessionError, TlsFailure, Unreachable
from scr_nb.extract.eligibility import Policy
from scr_nb.extract.prepared import Prepared, decisions, prepare
from scr_nb.extract.reader import load_details
from scr_nb.job.modes import choose_chain
from scr_nb.job.options import JobControl, JobOptions, JobResult, Progress
from scr_nb.job.pipeline import Pipeline
from scr_nb.job.schedule import ScheduleError
from scr_nb.spine.client import SpineClient
from scr_nb.spine.pacing import SendGate
from scr_nb.spine.session import Session
from scr_nb.spine.tls import CHECK_TIMEOUT, TlsSettings, check_connection
from scr_nb.store.extract_index import ExtractIndex, index_path
from scr_nb.store.lock import StoreLock
from scr_nb.store.log import PracticeLog
from scr_nb.store.practice_store import Store
from scr_nb.store.states import JobStatus, Mode

# A session with less than this left is not started on: the longest one request may take (the
# Spine client's request timeout), before the clock difference with the Spine is known (SPEC 7).
SESSION_MARGIN_AT_START = 30.0
# The settings a job's start records in the practice log.
LOGGED_SETTINGS = ("concurrency", "rate_limit", "ack_timeout", "dissent", "skip_acknowledged")


class Engine:
    def __init__(self, store: Store, session: Session, spine_url: str, practice_dir: str | Path,
                 *, clock: SystemClock | None = None,
                 client_factory: Callable[..., SpineClient] | None = None,
                 on_progress: Callable[[Progress], None] | None = None,
                 control: JobControl | None = None, tls: TlsSettings | None = None,
                 gate: SendGate | None = None):
        self.store, self.session, self.spine_url = store, session, spine_url
        self.send_gate = gate   # a fleet's one rate limit, waited on before every POST
        self.tls = tls if tls is not None else TlsSettings.from_options()
        self.stop_detail: str | None = None   # the words of a 403 or TLS failure that stopped it
        self.practice_dir = Path(practice_dir)
        self.clock = clock or SystemClock()
        self.client_factory = client_factory or SpineClient
        self.on_progress = on_progress
        self.control = control or JobControl()
        self.log = PracticeLog(store)

    # --- preparing ----------------------------------------------------------------------------

    def policy(self, options: JobOptions) -> Policy:
        return Policy(today=self.clock.today(), dissent=options.dissent,
                      update_existing_after_days=options.update_existing_after_days)

    def read_extract(self, options: JobOptions) -> Prepared:
        """The extract and its eligibility decisions, in the store's extract index: read from the
        files only when they (or the eligibility settings) changed since the store was last
        brought in line with them. Writes nothing in the store."""
        prepared = prepare(self.practice_dir, index_path(self.store.location), self.policy(options),
                           known=self.store.extract_fingerprint())
        self.dry_run = prepared.summary
        return prepared

    def _chain_rules(self, options: JobOptions, resumed, chain_mode: str) -> JobOptions:
        """A Resume goes on with the work rule its chain started with: a Rerun begun with
        ``--skip-acknowledged`` still leaves the acknowledged patients alone when resumed."""
        first = self.store.job(resumed.chain_id) if resumed is not None else None
        if chain_mode == Mode.RERUN.value and first is not None and \
                first.settings.get("skip_acknowledged"):
            return replace(options, skip_acknowledged=True)
        return options

    @contextmanager
    def _refusals_logged(self, options: JobOptions) -> Iterator[None]:
        """Every refusal, whatever refused (the session, the lock, the schedule, the extract, the
        mode's rules), is logged once with the user, and raised on."""
        try:
            yield
        except (RefusedError, ExtractError) as err:
            self.log.write("refused", mode=options.mode.value, group=options.group,
                           user_id=self.session.user_id, reason=str(err),
                           use_mode=getattr(err, "use_mode", None))
            raise

    async def _check_connection(self) -> None:
        """One GET of the Spine's base URL on a fresh connection (never a clinical message): any
        HTTP answer will do; a TLS failure, or no answer at all, refuses the job."""
        try:
            await asyncio.to_thread(check_connection, self.spine_url, self.tls, CHECK_TIMEOUT)
        except (TlsFailure, Unreachable) as err:
            raise RefusedError(f"{err}. Nothing was sent and no job was started; start it "
                               "again once the connection works.") from err

    def _check_margin(self) -> None:
        """Refuse a session already inside its safety margin: no request may go out on it."""
        left = self.session.seconds_left(self.clock.now())
        if left <= SESSION_MARGIN_AT_START:
            raise SessionError(
                f"the Smartcard session ends in {max(0, left):.0f} s, inside the safety margin of "
                f"{SESSION_MARGIN_AT_START:.0f} s kept for the longest request: log in again "
                "(scr-nb login) and start the job")

    def _check_schedule(self, options: JobOptions) -> None:
        options.schedule.check(self.clock.now())
        start = options.schedule.start_at
        if start is not None and start >= self.session.expires_at:
            raise ScheduleError(
                f"the start time {start.isoformat(timespec='minutes')} is after the Smartcard "
                f"session ends ({self.session.expires_at.isoformat(timespec='minutes')}): "
                "log in nearer the time, or choose an earlier start")

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

    def _check_practice(self, ods_code: str | None) -> None:
        """The extract and the store must be the same practice's: an SQLite store not yet named
        takes the extract's ODS code; a store of another practice is refused."""
        if not ods_code:
            return
        self.store.claim(ods_code)
        if self.store.ods and self.store.ods != ods_code.strip().upper():
            raise RefusedError(f"the extract is practice {ods_code} (practice.json) but the store "
                               f"{self.store.label} holds practice {self.store.ods}; nothing was "
                               "sent")

    async def run_async(self, options: JobOptions) -> JobResult:
        self.lock = StoreLock(self.store, self.session.user_id, self.session.name, self.clock.now)
        with self._refusals_logged(options):
            self.session.require_b0062(self.clock.now())
            self._check_margin()
            await self._check_connection()
            crashed = self.lock.acquire()
        if crashed is not None:
            self.log.write("takeover", user_id=self.session.user_id,
                           previous_holder=crashed.describe())
        try:
            with self._refusals_logged(options):
                self._check_schedule(options)
                details = load_details(self.practice_dir)
                self._check_practice(details.ods_code)
                prepared = self.read_extract(options)
                # The extract's Patient Groups mirror groups.csv: kept before the mode's rules
                # are read, which change nothing (a refused job leaves the patients as they were).
                if prepared.read:
                    self.store.sync_extract_groups(prepared.index.groups())
                resumed, chain_mode, group = choose_chain(self.store, options.mode, options.group)
            if prepared.read:
                self.store.sync_patients(decisions(prepared.index, self.policy(options)),
                                         prepared.fingerprint)
            options = self._chain_rules(options.for_practice(details), resumed, chain_mode)
            try:
                return await self._run_job(options, prepared.index, resumed, chain_mode, group)
            finally:
                prepared.index.close()
        finally:
            self.lock.release()

    async def _run_job(self, options: JobOptions, extract: ExtractIndex, resumed,
                       chain_mode: str, group: str | None) -> JobResult:
        if resumed is not None and resumed.status == JobStatus.RUNNING.value:
            # Its process is gone (we hold the store's lock): close it so the chain goes on.
            self.store.end_job(resumed.id, JobStatus.STOPPED, None, resumed.totals)
        chain_id = resumed.chain_id if resumed is not None else None
        job = self.store.start_job(options.mode.value, chain_mode, group, chain_id,
                                   self.session.user_id, self.session.name, options.settings())
        in_scope, eligible = self.store.scope_size(group)
        progress = Progress(job_id=job.id, mode=job.mode, group=group,
                            patients_in_scope=in_scope, checked=in_scope, eligible=eligible,
                            session_expires_at=self.session.expires_at.isoformat(),
                            schedule=options.schedule.to_json())
        self.log.write("job_start", job_id=job.id, mode=job.mode, chain_mode=chain_mode,
                       group=group, user_id=self.session.user_id, user_name=self.session.name,
                       resumes=job.chain_id if job.chain_id != job.id else None,
                       settings={k: v for k, v in options.settings().items()
                                 if k in LOGGED_SETTINGS},
                       not_required_by_reason=self.dry_run["not_required_by_reason"])
        if not options.schedule.empty:
            self.log.write("schedule", job_id=job.id, user_id=self.session.user_id,
                           **options.schedule.to_json())
        pipeline = Pipeline(self, options, job, chain_mode, extract, progress)
        try:
            status, reason = await pipeline.execute()
        except Exception as err:
            # An unexpected error: the job is left resumable, never "completed".
            self.store.end_job(job.id, JobStatus.STOPPED, None, pipeline.statistics())
            self.log.write("job_error", job_id=job.id, user_id=self.session.user_id,
                           error=f"{type(err).__name__}: {err}")
            raise
        totals = pipeline.statistics()
        self.stop_detail = pipeline.stop_detail
        job = self.store.end_job(job.id, status, reason.value if reason else None, totals)
        progress.status = job.status
        self.log.write("job_end", job_id=job.id, mode=job.mode, group=group,
                       user_id=self.session.user_id, status=job.status, reason=job.reason,
                       counters=totals["counters"])
        return JobResult(job, progress, totals)


__all__ = ["Engine"]
