"""A job's schedule (SPEC 8): start at, stop at, pause at with resume at.

Times are ISO 8601 local date-times as an administrator types them ("2026-11-23T19:00"); they are
kept timezone-aware so they compare with the clock and with the session's expiry.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from scr_nb.errors import RefusedError


class ScheduleError(RefusedError):
    """A schedule that cannot be kept: refused before anything is sent."""


def parse_local(text: str, option: str = "time") -> datetime:
    """``2026-11-23T19:00`` (local) or with an offset -> an aware datetime."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{option}: {text!r} is not an ISO 8601 date-time such as "
                         "2026-11-23T19:00") from None
    return moment.astimezone() if moment.tzinfo is None else moment


@dataclass(frozen=True)
class Schedule:
    start_at: datetime | None = None
    stop_at: datetime | None = None
    pause_at: datetime | None = None
    resume_at: datetime | None = None

    @property
    def empty(self) -> bool:
        return not any((self.start_at, self.stop_at, self.pause_at, self.resume_at))

    def check(self, now: datetime) -> None:
        """Refuse a schedule that contradicts itself or is already over."""
        start = self.start_at or now
        if (self.pause_at is None) != (self.resume_at is None):
            raise ScheduleError("a pause time needs a resume time, and a resume time a pause "
                                "time: give both --pause-at and --resume-at")
        if self.stop_at is not None and self.stop_at <= start:
            raise ScheduleError(f"the stop time {self.stop_at.isoformat()} is not after the start "
                                f"({start.isoformat()}): nothing would be sent")
        if self.pause_at is not None:
            if self.resume_at <= self.pause_at:
                raise ScheduleError(f"the resume time {self.resume_at.isoformat()} is not after the "
                                    f"pause time {self.pause_at.isoformat()}")
            if self.pause_at < start:
                raise ScheduleError(f"the pause time {self.pause_at.isoformat()} is before the "
                                    f"start ({start.isoformat()})")

    def to_json(self) -> dict:
        return {name: (value.isoformat() if value else None)
                for name, value in (("start_at", self.start_at), ("stop_at", self.stop_at),
                                    ("pause_at", self.pause_at), ("resume_at", self.resume_at))}

    def describe(self) -> str:
        parts = [f"{name.replace('_at', '')} {value[:16].replace('T', ' ')}"
                 for name, value in self.to_json().items() if value]
        return ", ".join(parts)
