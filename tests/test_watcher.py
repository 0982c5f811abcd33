"""The watcher's decisions as pure functions of the clock, the schedule and the session: no asyncio,
no sleeps, just instants."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from scr_nb.job.schedule import Schedule
from scr_nb.job.watcher import Phase, Step, next_step, sending_allowed, starts_waiting

T0 = datetime(2026, 11, 23, 19, 0, tzinfo=timezone.utc)
SESSION_ENDS = T0 + timedelta(hours=10)
FULL = Schedule(start_at=T0 + timedelta(minutes=10), stop_at=T0 + timedelta(hours=6),
                pause_at=T0 + timedelta(hours=1), resume_at=T0 + timedelta(hours=2))


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def test_a_job_waits_for_its_start_and_starts_on_the_minute():
    phase = starts_waiting(at(0), FULL)
    assert phase.waiting
    assert next_step(at(9.99), FULL, SESSION_ENDS, phase, False) == Step.CARRY_ON
    assert next_step(at(10), FULL, SESSION_ENDS, phase, False) == Step.START
    assert not sending_allowed(at(10), FULL, SESSION_ENDS, phase)
    assert sending_allowed(at(10), FULL, SESSION_ENDS, Phase())
    assert not starts_waiting(at(10), FULL).waiting
    assert not starts_waiting(at(0), Schedule()).waiting


def test_a_stop_asked_for_while_waiting_is_let_through():
    phase = Phase(waiting=True)
    assert next_step(at(5), FULL, SESSION_ENDS, phase, True) == Step.LET_STOP


def test_the_pause_window_closes_sending_and_the_resume_time_reopens_it():
    sending = Phase()
    assert next_step(at(59), FULL, SESSION_ENDS, sending, False) == Step.CARRY_ON
    assert sending_allowed(at(59), FULL, SESSION_ENDS, sending)
    assert next_step(at(60), FULL, SESSION_ENDS, sending, False) == Step.PAUSE
    # Before the watcher notices, the check before a POST already holds it back.
    assert not sending_allowed(at(60), FULL, SESSION_ENDS, sending)
    paused = Phase(paused=True)
    assert next_step(at(119), FULL, SESSION_ENDS, paused, False) == Step.CARRY_ON
    assert next_step(at(120), FULL, SESSION_ENDS, paused, False) == Step.RESUME
    resumed = Phase(resumed=True)
    assert next_step(at(90), FULL, SESSION_ENDS, resumed, False) == Step.CARRY_ON
    assert sending_allowed(at(90), FULL, SESSION_ENDS, resumed)


@pytest.mark.parametrize("stop_requested, session_ends, expected", [
    (True, SESSION_ENDS, Step.RESUME_CANCELLED),
    (False, at(90), Step.RESUME_CANCELLED),
    (False, SESSION_ENDS, Step.CARRY_ON),
])
def test_a_stop_or_the_end_of_the_session_during_a_pause_cancels_the_resume(
        stop_requested, session_ends, expected):
    assert next_step(at(91), FULL, session_ends, Phase(paused=True), stop_requested) == expected


def test_the_stop_time_stops_even_inside_a_pause():
    schedule = Schedule(stop_at=at(90), pause_at=at(60), resume_at=at(120))
    assert next_step(at(90), schedule, SESSION_ENDS, Phase(paused=True), False) == Step.STOP_TIME
    assert next_step(at(90), schedule, SESSION_ENDS, Phase(), False) == Step.STOP_TIME
    assert not sending_allowed(at(90), schedule, SESSION_ENDS, Phase(resumed=True))


def test_the_end_of_the_session_comes_before_the_stop_time():
    schedule = Schedule(stop_at=at(30))
    assert next_step(at(30), schedule, at(30), Phase(), False) == Step.SESSION_ENDED
    assert next_step(at(29), schedule, at(30), Phase(), True) == Step.LET_STOP
    assert not sending_allowed(at(30), Schedule(), at(30), Phase())
    assert sending_allowed(at(29.9), Schedule(), at(30), Phase())

