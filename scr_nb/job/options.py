"""What a job is asked to do (``JobOptions``), how it reports (``Progress``), how it ends
(``JobResult``) and how it is asked to stop (``JobControl``): the objects the CLI, the control panel,
the scheduled notebook and the support desk hand to the runner and read back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from scr_nb.errors import OptionError
from scr_nb.extract.records import PracticeDetails
from scr_nb.job.schedule import Schedule
from scr_nb.store.practice_store import Job
from scr_nb.store.states import JobStatus, Mode, StopReason


def describe_duration(seconds: float) -> str:
    """Seconds as an administrator reads them: "45 s", "12 min", "3 h 05 min"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


DEFAULT_PRACTICE = PracticeDetails(ods_code="A12345", name="scr-nb demonstration practice",
                                   asid="200000000001")


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def option_problem(options: "JobOptions") -> str | None:
    """What is wrong with a job's options, in the words of the CLI's options, or None. Every
    shell (the CLI, the control panel, the notebooks) meets this one check before a job is
    recorded, through ``JobOptions`` itself."""
    if not isinstance(options.mode, Mode):
        return f"the mode must be one of {', '.join(m.value for m in Mode)}, not {options.mode!r}"
    concurrency = options.concurrency
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        return f"--concurrency must be a whole number of at least 1, not {concurrency!r}"
    if options.rate_limit is not None:
        rate = _number(options.rate_limit)
        if rate is None or rate <= 0:
            return (f"--rate-limit must be a number of messages a second above 0, or none for "
                    f"no limit, not {options.rate_limit!r}")
    for name, value in (("--ack-timeout", options.ack_timeout),
                        ("the retry window", options.retry_window)):
        seconds = _number(value)
        if seconds is None or seconds <= 0:
            return f"{name} must be a number of seconds above 0, not {value!r}"
    if options.dissent not in ("exclude", "blank"):
        return f"--dissent must be exclude or blank, not {options.dissent!r}"
    if options.skip_acknowledged and options.mode not in (Mode.RERUN, Mode.RESUME):
        return "--skip-acknowledged goes with Rerun (or the Resume of one) only"
    days = options.update_existing_after_days
    if days is not None and (isinstance(days, bool) or not isinstance(days, int) or days < 0):
        return f"the days before existing summaries are updated must be 0 or more, not {days!r}"
    if options.group is not None and not str(options.group).strip():
        return "the Patient Group name is blank: give a group's name, or none for the whole list"
    return None


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
    # Who the practice is on the Spine: None takes it from the extract's practice.json, else the
    # built-in demonstration values (DEFAULT_PRACTICE); given, it overrides practice.json (SPEC 3).
    sender_asid: str | None = None
    receiver_asid: str = "990101234567"
    practice_ods: str | None = None
    practice_name: str | None = None
    schedule: Schedule = Schedule()
    # Which run of a fleet's task started the job (kept in the job's settings), so a task run
    # again after its worker died knows its own job from anyone else's.
    started_by: str | None = None

    def __post_init__(self) -> None:
        problem = option_problem(self)
        if problem is not None:
            raise OptionError(problem)

    def for_practice(self, details: PracticeDetails) -> "JobOptions":
        """These options with the practice's ODS code, name and ASID filled in: an option given
        wins, then practice.json, then the demonstration practice."""
        return replace(self,
                       sender_asid=self.sender_asid or details.asid or DEFAULT_PRACTICE.asid,
                       practice_ods=self.practice_ods or details.ods_code
                       or DEFAULT_PRACTICE.ods_code,
                       practice_name=self.practice_name or details.name or DEFAULT_PRACTICE.name)

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
    already_at_spine: int = 0        # AE 30134: the Spine holds a summary already (not required)
    elapsed: float = 0.0
    session_expires_at: str | None = None
    session_seconds_left: float | None = None
    schedule: dict = field(default_factory=dict)
    waiting: bool = False            # before the scheduled start
    paused: bool = False             # inside a scheduled pause
    warnings: list[str] = field(default_factory=list)

    @property
    def done(self) -> int:
        return self.acknowledged + self.failed + self.already_at_spine

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
    reads the request before it takes each patient and before each send. Requests made through
    the store (``scr-nb stop``, a panel in another process) arrive here too, with who asked."""

    def __init__(self) -> None:
        self.requested: JobStatus | None = None
        self.reason: StopReason | None = None
        self.requested_by: tuple[str, str] | None = None    # (user id, name) when known

    def request(self, status: JobStatus, reason: StopReason,
                by: tuple[str, str] | None = None) -> None:
        if self.requested is None or status == JobStatus.CANCELLED:
            self.requested, self.reason = status, reason
            self.requested_by = by or self.requested_by

    def stop(self, by: tuple[str, str] | None = None) -> None:
        self.request(JobStatus.PAUSED, StopReason.USER_STOP, by)

    def stop_and_close(self, by: tuple[str, str] | None = None) -> None:
        self.request(JobStatus.STOPPED, StopReason.USER_STOP, by)

    def cancel(self, by: tuple[str, str] | None = None) -> None:
        self.request(JobStatus.CANCELLED, StopReason.USER_CANCEL, by)

    def ask(self, request: str, by: tuple[str, str] | None = None) -> None:
        """A request by name, as the store keeps them: ``stop``, ``close`` or ``cancel``."""
        {"stop": self.stop, "close": self.stop_and_close, "cancel": self.cancel}[request](by)

    @property
    def stopping(self) -> bool:
        return self.requested is not None


__all__ = ["JobControl", "JobOptions", "JobResult", "OptionError", "Progress", "describe_duration",
           "option_problem"]
