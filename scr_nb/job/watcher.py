"""The watcher's decisions (SPEC 8): what a running job does next, given the clock, the schedule,
the end of the Smartcard session and any Stop asked for.

Pure functions of their arguments, so the schedule's rules are tested without asyncio or sleeps;
the job's pipeline asks them a few times a second and before every POST, and carries them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from scr_nb.job.schedule import Schedule


class Step(str, Enum):
    CARRY_ON = "carry_on"                  # nothing changes now
    START = "start"                        # the scheduled start has come: open the gate
    PAUSE = "pause"                        # the pause time has come: close the gate
    RESUME = "resume"                      # the resume time has come: open it again
    STOP_TIME = "stop_time"                # the stop time has come: stop, resumable
    SESSION_ENDED = "session_ended"        # the Smartcard session is over: stop, resumable
    RESUME_CANCELLED = "resume_cancelled"  # a Stop, or the session's end, during a pause
    LET_STOP = "let_stop"                  # a Stop was asked for: let waiting senders see it


@dataclass(frozen=True)
class Phase:
    """Where the job stands against its schedule."""

    waiting: bool = False    # before the scheduled start
    paused: bool = False     # inside the scheduled pause
    resumed: bool = False    # the pause is over: the window is not entered again


def starts_waiting(now: datetime, schedule: Schedule) -> Phase:
    """The phase a job starts in: waiting when its start time is still ahead."""
    return Phase(waiting=schedule.start_at is not None and now < schedule.start_at)


def in_pause_window(now: datetime, schedule: Schedule, phase: Phase) -> bool:
    return (schedule.pause_at is not None and not phase.resumed
            and schedule.pause_at <= now < schedule.resume_at)


def next_step(now: datetime, schedule: Schedule, session_ends: datetime, phase: Phase,
              stop_requested: bool) -> Step:
    """The one thing to do now. The order matters: inside a pause only the stop time, a Stop or
    the session's end, and the resume time count; otherwise the session's end comes first, then
    the stop time, then the start, then the pause, then a Stop."""
    stop_time = schedule.stop_at is not None and now >= schedule.stop_at
    session_over = now >= session_ends
    if phase.paused:
        if stop_time:
            return Step.STOP_TIME
        if stop_requested or session_over:
            return Step.RESUME_CANCELLED
        return Step.RESUME if now >= schedule.resume_at else Step.CARRY_ON
    if session_over:
        return Step.SESSION_ENDED
    if stop_time:
        return Step.STOP_TIME
    if phase.waiting:
        if stop_requested:
            return Step.LET_STOP
        return Step.START if now >= schedule.start_at else Step.CARRY_ON
    if in_pause_window(now, schedule, phase):
        return Step.PAUSE
    return Step.LET_STOP if stop_requested else Step.CARRY_ON


def sending_allowed(now: datetime, schedule: Schedule, session_ends: datetime,
                    phase: Phase) -> bool:
    """Asked just before each POST: no request after the stop time, inside the pause window or
    once the session is over, whatever the watcher has yet to notice."""
    if phase.waiting or phase.paused:
        return False
    if schedule.stop_at is not None and now >= schedule.stop_at:
        return False
    if in_pause_window(now, schedule, phase):
        return False
    return now < session_ends


__all__ = ["Phase", "Step", "in_pause_window", "next_step", "sending_allowed", "starts_waiting"]
