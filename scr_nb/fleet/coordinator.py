"""The fleet's coordinating process (SPEC 12): one Dask task per practice, at most
``max_practices`` of them submitted at once, the next submitted as one ends.

The cap lives here, in the process that submits, not in any worker: a worker that dies takes
nothing of it with it, and a cluster started by someone else (``--scheduler``) needs no special
option. A task whose worker dies is rescheduled by Dask on another worker and resumes the job
its first run left (``task``). With SQLite stores this process also holds the fleet's rate limit
(``rate.RateServer``); with a PostgreSQL store the database holds it.

Progress comes back as Dask events (``task.PROGRESS_TOPIC``): a line is printed as each
practice ends, and a summary of the fleet every ``progress_every`` seconds.

A fleet stops as one: asked through ``FleetControl`` (Ctrl-C), or when a practice's job ends
stopped by someone (``scr-nb fleet stop``, or ``scr-nb stop`` on one store), every running
practice is asked the same through its store, a job that starts late as soon as it runs, and no
practice not yet started is started (each is reported stopped, to be run later).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from scr_nb.errors import OptionError, ScrNbError
from scr_nb.fleet import stop as stopping
from scr_nb.fleet.plan import Practice
from scr_nb.fleet.rate import RateServer, configure_database
from scr_nb.fleet.task import (PROGRESS_TOPIC, PracticeTask, latest_job_id, practice_result,
                                run_practice)
from scr_nb.job.options import JobOptions
from scr_nb.job.runner import EXIT_ERROR, EXIT_OK, EXIT_REFUSED, EXIT_STOPPED, EXIT_USAGE
from scr_nb.spine.tls import TlsSettings
from scr_nb.store.database import Location
from scr_nb.store.schema import open_database
from scr_nb.store.states import JobStatus, StopReason

# A fleet's exit code is its practices' worst, in this order (SPEC 10: 0 only when every
# practice completed; 4 when some practice stopped and can be resumed; 3 when refused).
WORST_FIRST = (EXIT_ERROR, EXIT_USAGE, EXIT_STOPPED, EXIT_REFUSED, EXIT_OK)
USER_STOPS = frozenset({StopReason.USER_STOP.value, StopReason.USER_CANCEL.value})
# The request that ends a job the way a stopped practice's job ended (SPEC 8's table).
STOP_REQUESTS = {JobStatus.PAUSED.value: "stop", JobStatus.STOPPED.value: "close",
                 JobStatus.CANCELLED.value: "cancel"}
WAIT_S = 0.5                      # how often the coordinator looks up from waiting


@dataclass(frozen=True)
class FleetOptions:
    """How a fleet runs: each practice's job options (``job``, its mode among them), the Spine,
    and the fleet's own: its cap, its one rate limit, its cluster."""

    job: JobOptions
    spine: str
    tls: TlsSettings = TlsSettings()
    max_practices: int = 4
    rate_limit: float | None = None        # POSTs a second for the whole fleet
    scheduler: str | None = None           # an existing cluster's scheduler; None: a local one
    workers: int | None = None             # the local cluster's worker processes
    progress_every: float = 10.0

    def __post_init__(self) -> None:
        if isinstance(self.max_practices, bool) or not isinstance(self.max_practices, int) \
                or self.max_practices < 1:
            raise OptionError(f"--max-practices must be a whole number of at least 1, not "
                              f"{self.max_practices!r}")
        if self.rate_limit is not None and not (self.rate_limit > 0):
            raise OptionError(f"--rate-limit must be a number of messages a second above 0, "
                              f"not {self.rate_limit!r}")
        if self.workers is not None and self.workers < 1:
            raise OptionError(f"--workers must be at least 1, not {self.workers!r}")


@dataclass
class FleetOutcome:
    exit_code: int
    message: str
    results: dict[str, dict] = field(default_factory=dict)    # ODS code -> the task's result

    def to_json(self) -> dict:
        return {"exit_code": self.exit_code, "message": self.message,
                "practices": [self.results[ods] for ods in sorted(self.results)]}


class FleetControl:
    """Asks a running fleet to stop: every running practice job is asked through its store
    (``stop``, ``close`` or ``cancel``), and no practice not yet started is started. Safe to
    call from a signal handler."""

    def __init__(self) -> None:
        self.request: str | None = None

    def ask(self, request: str) -> None:
        if self.request != "cancel":
            self.request = request


class _Progress:
    """The latest progress event of each practice (written by the client's event thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latest: dict[str, dict] = {}

    def __call__(self, event: tuple) -> None:
        _at, message = event
        if isinstance(message, dict) and "ods" in message:
            with self.lock:
                self.latest[message["ods"]] = message

    def of(self, ods: str) -> dict | None:
        with self.lock:
            return self.latest.get(ods)


def run_fleet(practices: list[Practice], options: FleetOptions, *, client=None,
              control: FleetControl | None = None,
              who: tuple[str, str] = ("scr-nb", "scr-nb fleet"),
              say: Callable[[str], None] = print) -> FleetOutcome:
    """Run one job per practice and say how the fleet ended. ``client`` is a Dask Client to use
    (default: one on ``options.scheduler``, else on a local cluster made and closed here)."""
    control = control or FleetControl()
    if not practices:
        raise OptionError("a fleet needs at least one practice")
    if practices[0].on_database:   # a new database gets its tables before anything reads it
        open_database(Location.of(practices[0].store, practices[0].ods)).close()
    owned = []
    rate_server = None
    try:
        gate = None
        if options.rate_limit is not None:
            if practices[0].on_database:
                gate = configure_database(practices[0].store, practices[0].ods,
                                          fleet_name(options), options.rate_limit)
            else:
                rate_server = RateServer(options.rate_limit, _reachable_host(options)).start()
                gate = rate_server.spec()
        if client is None:
            client, owned = _connect(options, len(practices))
        runner = _Fleet(client, practices, options, gate, control, who, say)
        return runner.run()
    finally:
        if rate_server is not None:
            rate_server.stop()
        for thing in reversed(owned):
            thing.close()


def fleet_name(options: FleetOptions) -> str:
    """The key of the fleet's rate-limit row: the Spine it limits, so fleets sending to the same
    Spine through one database share one limit."""
    return options.spine.rstrip("/")


def _reachable_host(options: FleetOptions) -> str:
    """Where the workers can reach this process: loopback for a local cluster, else the address
    this machine uses to reach the scheduler."""
    if options.scheduler is None:
        return "127.0.0.1"
    from distributed.utils import get_ip

    host = options.scheduler.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return get_ip(host)


def _connect(options: FleetOptions, practices: int):
    """A Client on the scheduler given, else on a local cluster of worker processes on
    loopback: one worker per practice job at once, up to the machine's cores, each running as
    many jobs as it must for the cap."""
    from distributed import Client, LocalCluster

    if options.scheduler is not None:
        client = Client(options.scheduler)
        return client, [client]
    at_once = min(options.max_practices, practices)
    workers = options.workers or max(1, min(at_once, os.cpu_count() or 1))
    threads = -(-at_once // workers)
    # Ctrl-C at the terminal reaches the whole process group: the workers are started ignoring
    # it (a process keeps an ignored SIGINT across exec, and Python leaves it so), so only this
    # process hears it, and stops the jobs through their stores instead of killing them.
    quiet = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if quiet else None
    try:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                               host="127.0.0.1", dashboard_address=None,
                               silence_logs=logging.ERROR)
    finally:
        if quiet:
            signal.signal(signal.SIGINT, previous)
    client = Client(cluster)
    return client, [cluster, client]


class _Fleet:
    def __init__(self, client, practices: list[Practice], options: FleetOptions, gate,
                 control: FleetControl, who: tuple[str, str], say: Callable[[str], None]):
        self.client, self.options, self.gate = client, options, gate
        self.control, self.who, self.say = control, who, say
        self.waiting = list(practices)
        self.total = len(practices)
        self.running: dict = {}                 # future -> Practice
        self.results: dict[str, dict] = {}
        self.asked: dict[str, set] = {}         # ODS -> (job, request) asked already
        self.progress = _Progress()
        self.key = f"scr-nb-fleet-{uuid.uuid4().hex[:8]}"
        self.started = time.monotonic()

    def run(self) -> FleetOutcome:
        from distributed import wait

        self.client.subscribe_topic(PROGRESS_TOPIC, self.progress)
        self.say(f"Fleet {self.options.job.mode.value}: {self.total} practices, at most "
                 f"{self.options.max_practices} at once"
                 + (f", {self.options.rate_limit:g} messages/s in all"
                    if self.options.rate_limit else ""))
        next_summary = time.monotonic() + self.options.progress_every
        try:
            while self.waiting or self.running:
                self._submit()
                if not self.running:
                    continue
                try:
                    done, _ = wait(list(self.running), timeout=WAIT_S,
                                   return_when="FIRST_COMPLETED")
                except TimeoutError:
                    done = ()
                for future in done:
                    self._collect(future)
                self._pass_on_stop()
                if time.monotonic() >= next_summary:
                    self.say(self.summary())
                    next_summary = time.monotonic() + self.options.progress_every
        finally:
            self.client.unsubscribe_topic(PROGRESS_TOPIC)
            for future in self.running:
                future.cancel()
        return self.outcome()

    # --- submitting and collecting ----------------------------------------------------------

    def _submit(self) -> None:
        while self.waiting and len(self.running) < self.options.max_practices:
            practice = self.waiting.pop(0)
            if self.control.request is not None:
                self._record(practice, practice_result(
                    practice, EXIT_STOPPED, "not started: the fleet was asked to stop"))
                continue
            try:
                known = latest_job_id(practice)
            except ScrNbError as err:
                self._record(practice, practice_result(
                    practice, EXIT_REFUSED, f"its store cannot be read: {err}"))
                continue
            key = f"{self.key}-{practice.ods}"
            task = PracticeTask(practice, self.options.spine,
                                replace(self.options.job, practice_ods=practice.ods,
                                        started_by=key),
                                self.options.tls, self.gate, known)
            future = self.client.submit(run_practice, task, key=key, pure=False)
            self.running[future] = practice

    def _collect(self, future) -> None:
        practice = self.running.pop(future)
        if future.status == "finished":
            result = future.result()
        else:   # the task itself never raises: this is Dask's (KilledWorker, a lost cluster)
            try:
                error = future.exception()
            except Exception as err:   # cancelled
                error = err
            result = practice_result(practice, EXIT_ERROR, f"{type(error).__name__}: {error}")
        self._record(practice, result)
        job = result.get("job") or {}
        if job.get("reason") in USER_STOPS and self.control.request is None:
            # someone stopped this practice's job (scr-nb fleet stop, or scr-nb stop on its
            # store): the fleet stops, every running practice asked the same, nothing more
            # started; a practice whose job starts late is asked as soon as it runs
            self.control.ask(STOP_REQUESTS.get(job.get("status"), "close"))

    def _record(self, practice: Practice, result: dict) -> None:
        self.results[practice.ods] = result
        counters = result.get("counters") or {}
        figures = (f" (sent {counters.get('sent', 0)}, failed {counters.get('failed', 0)}, "
                   f"unprocessed {counters.get('unprocessed', 0)})" if counters else "")
        resumed = (f" after its worker died (resumed job {result['resumed']})"
                   if result.get("resumed") else "")
        self.say(f"[{len(self.results)}/{self.total}] {practice.ods}: exit "
                 f"{result['exit_code']}{resumed}: {result['message']}{figures}")

    def _pass_on_stop(self) -> None:
        """Ask each running practice's job to stop, once per job, while the fleet is stopping."""
        request = self.control.request
        if request is None:
            return
        for practice in list(self.running.values()):
            before = self.asked.setdefault(practice.ods, set())
            try:
                asked = stopping.ask_to_stop(practice.ods, practice.store, request, self.who,
                                             [job for job, made in before if made == request])
            except ScrNbError as err:
                self.say(f"{practice.ods}: cannot ask its job to stop ({err})")
                continue
            if asked is not None:
                before.add((asked.job_id, request))

    # --- reporting --------------------------------------------------------------------------

    def summary(self) -> str:
        ended = {code: 0 for code in WORST_FIRST}
        for result in self.results.values():
            ended[result["exit_code"]] = ended.get(result["exit_code"], 0) + 1
        acknowledged = failed = in_transit = 0
        for practice in self.running.values():
            seen = self.progress.of(practice.ods) or {}
            acknowledged += seen.get("acknowledged", 0)
            failed += seen.get("failed", 0)
            in_transit += max(0, seen.get("transmitted", 0) - seen.get("done", 0))
        for result in self.results.values():
            counters = result.get("counters") or {}
            acknowledged += counters.get("sent", 0)
            failed += counters.get("failed", 0)
        elapsed = time.monotonic() - self.started
        return (f"Fleet after {elapsed:.0f} s: {len(self.results)}/{self.total} practices ended "
                f"(completed {ended[EXIT_OK]}, stopped {ended[EXIT_STOPPED]}, refused "
                f"{ended[EXIT_REFUSED]}, errors {ended[EXIT_ERROR] + ended[EXIT_USAGE]}), "
                f"{len(self.running)} running; acknowledged {acknowledged}, failed {failed}, "
                f"waiting for their acks {in_transit}")

    def outcome(self) -> FleetOutcome:
        codes = {result["exit_code"] for result in self.results.values()}
        code = next((c for c in WORST_FIRST if c in codes), EXIT_OK)
        words = {EXIT_OK: "every practice completed",
                 EXIT_STOPPED: "some practices stopped before completion: continue them with "
                               "scr-nb fleet resume ...",
                 EXIT_REFUSED: "some practices were refused (their lines above say why and "
                               "which mode to use next)",
                 EXIT_ERROR: "some practices ended in an error (their lines above say which)",
                 EXIT_USAGE: "some practices could not use the options given"}
        self.say(self.summary())
        return FleetOutcome(code, f"fleet {self.options.job.mode.value}: {words[code]}",
                            self.results)


__all__ = ["FleetControl", "FleetOptions", "FleetOutcome", "fleet_name", "run_fleet"]
