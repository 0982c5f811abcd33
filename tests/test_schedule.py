"""Schedules, pauses and the Smartcard session's end, with an injected clock: the test moves the
wall clock the engine sees; nothing sleeps for the schedule's sake."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from scr_nb.clock import SystemClock
from scr_nb.errors import RefusedError
from scr_nb.job.engine import Engine
from scr_nb.job.options import JobControl, JobOptions
from scr_nb.job.schedule import Schedule, ScheduleError, parse_local
from scr_nb.store.log import PracticeLog
from scr_nb.store.practice_store import Store
from scr_nb.store.states import Mode
from tests.test_engine import eligible_numbers, held, status

T0 = datetime.now(timezone.utc).replace(microsecond=0)


class FakeClock(SystemClock):
    """Real monotonic time and real sleeps (network waits stay real); a wall clock the test sets."""

    def __init__(self, at: datetime):
        self.at = at

    def now(self) -> datetime:
        return self.at


def run(tmp_path, session, spine, practice, clock, on_progress=None, control=None, mode="run",
        **options):
    store = Store(tmp_path / "practice.sqlite")
    try:
        engine = Engine(store, session, spine.url, practice, clock=clock, on_progress=on_progress,
                        control=control)
        options.setdefault("concurrency", 4)
        return engine.run(JobOptions(mode=Mode(mode), **options))
    finally:
        store.close()


def events(tmp_path) -> list[dict]:
    return list(PracticeLog(tmp_path / "practice.sqlite").read())


def test_stop_time_stops_part_way_and_resume_finishes(tmp_path, spine, admin_session, practice,
                                                      today):
    clock = FakeClock(T0)
    stop_at = T0 + timedelta(hours=1)

    def later(progress):
        if progress.acknowledged >= 20:
            clock.at = stop_at + timedelta(seconds=1)

    result = run(tmp_path, admin_session, spine, practice, clock, later,
                 schedule=Schedule(stop_at=stop_at))
    assert result.job.status == "stopped" and result.job.reason == "stop_time"
    st = status(tmp_path)
    assert 0 < st["counters"]["sent"] < len(eligible_numbers(practice, today))
    assert st["states"]["sending"] == 0 and st["states"]["transmitted"] == 0
    with pytest.raises(RefusedError) as caught:
        run(tmp_path, admin_session, spine, practice, clock)
    assert caught.value.use_mode == "resume"
    assert run(tmp_path, admin_session, spine, practice, clock, mode="resume").completed
    assert set(held(spine)) == eligible_numbers(practice, today)
    assert [e["event"] for e in events(tmp_path)][:4] == ["job_start", "schedule", "stop",
                                                          "job_end"]


def test_a_pause_window_sends_nothing_and_resumes_by_itself(tmp_path, spine, admin_session,
                                                            practice, today):
    clock = FakeClock(T0)
    pause_at, resume_at = T0 + timedelta(hours=1), T0 + timedelta(hours=2)
    seen: dict[str, int] = {}

    def drive(progress):
        if progress.paused:
            seen["calls"] = seen.get("calls", 0) + 1
            requests = spine.simulator.stats()["requests"]
            if seen["calls"] == 3:
                seen["at_pause"] = requests
            elif seen["calls"] == 8:
                seen["later"] = requests
                assert status_now(tmp_path)["latest_job"]["status"] == "paused"
                clock.at = resume_at + timedelta(seconds=1)
        elif progress.acknowledged >= 20 and "calls" not in seen:
            clock.at = pause_at + timedelta(seconds=1)

    result = run(tmp_path, admin_session, spine, practice, clock, drive,
                 schedule=Schedule(pause_at=pause_at, resume_at=resume_at))
    assert result.completed
    assert seen["at_pause"] == seen["later"]          # nothing sent inside the window
    assert set(held(spine)) == eligible_numbers(practice, today)
    log = [e["event"] for e in events(tmp_path)]
    assert log.index("pause") < log.index("resume") < log.index("job_end")
    pause = next(e for e in events(tmp_path) if e["event"] == "pause")
    assert pause["reason"] == "pause_time"


def status_now(tmp_path) -> dict:
    return status(tmp_path)


def test_stop_inside_a_pause_cancels_the_pending_resume(tmp_path, spine, admin_session,
                                                        practice):
    clock = FakeClock(T0)
    control = JobControl()
    pause_at, resume_at = T0 + timedelta(hours=1), T0 + timedelta(hours=2)

    def drive(progress):
        if progress.paused:
            control.stop()
        elif progress.acknowledged >= 10:
            clock.at = pause_at + timedelta(seconds=1)

    result = run(tmp_path, admin_session, spine, practice, clock, drive, control=control,
                 schedule=Schedule(pause_at=pause_at, resume_at=resume_at))
    assert result.job.status == "stopped" and result.job.reason == "resume_cancelled"
    assert status(tmp_path)["counters"]["failed"] == 0


def test_a_deferred_start_waits_for_its_time(tmp_path, spine, admin_session, practice, today):
    clock = FakeClock(T0)
    start_at = T0 + timedelta(hours=3)
    waited = {"n": 0}

    def drive(progress):
        if progress.waiting:
            assert spine.simulator.stats()["requests"] == 0
            waited["n"] += 1
            if waited["n"] >= 3:
                clock.at = start_at
    result = run(tmp_path, admin_session, spine, practice, clock, drive,
                 schedule=Schedule(start_at=start_at))
    assert result.completed and waited["n"] >= 3
    assert set(held(spine)) == eligible_numbers(practice, today)
    assert "start" in [e["event"] for e in events(tmp_path)]


def test_the_session_ending_mid_run_stops_the_job_and_fails_nobody(tmp_path, spine,
                                                                   admin_session, practice,
                                                                   today):
    clock = FakeClock(T0)
    short = replace(admin_session, expires_at=T0 + timedelta(minutes=30))
    seen = {}

    def drive(progress):
        if progress.acknowledged >= 20 and "at" not in seen:
            clock.at = T0 + timedelta(minutes=31)
            seen["at"] = True

    result = run(tmp_path, short, spine, practice, clock, drive)
    assert result.job.status == "stopped" and result.job.reason == "session_expired"
    requests = spine.simulator.stats()["requests"]
    st = status(tmp_path)
    assert st["counters"]["failed"] == 0 and st["states"]["sending"] == 0
    assert spine.simulator.stats()["unauthorized"] == 0   # nothing went out on the dead session
    with pytest.raises(RefusedError) as caught:            # and nothing starts on it either
        run(tmp_path, short, spine, practice, clock, mode="resume")
    assert "expired" in str(caught.value)
    assert spine.simulator.stats()["requests"] == requests
    assert run(tmp_path, admin_session, spine, practice, FakeClock(T0), mode="resume").completed
    assert set(held(spine)) == eligible_numbers(practice, today)
    assert "session_expired" in [e["event"] for e in events(tmp_path)]


@pytest.mark.parametrize("schedule, words", [
    (Schedule(pause_at=T0 + timedelta(hours=1)), "needs a resume time"),
    (Schedule(pause_at=T0 + timedelta(hours=2), resume_at=T0 + timedelta(hours=1)),
     "not after the pause"),
    (Schedule(start_at=T0 + timedelta(hours=2), stop_at=T0 + timedelta(hours=1)),
     "not after the start"),
    (Schedule(stop_at=T0 - timedelta(minutes=5)), "not after the start"),
])
def test_schedules_that_cannot_be_kept_are_refused(tmp_path, spine, admin_session, practice,
                                                   schedule, words):
    with pytest.raises(ScheduleError) as caught:
        run(tmp_path, admin_session, spine, practice, FakeClock(T0), schedule=schedule)
    assert words in str(caught.value)
    assert spine.simulator.stats()["requests"] == 0


def test_a_warning_when_the_rate_cannot_finish_before_the_stop_time(tmp_path, spine,
                                                                    admin_session, practice):
    clock = FakeClock(T0)
    stop_at = T0 + timedelta(seconds=5)

    def drive(progress):
        clock.at = stop_at + timedelta(seconds=1)

    result = run(tmp_path, admin_session, spine, practice, clock, drive, rate_limit=10,
                 schedule=Schedule(stop_at=stop_at))
    assert result.job.reason == "stop_time"
    assert any("the stop time" in w for w in result.progress.warnings)
    assert any(e["event"] == "warning" for e in events(tmp_path))


def test_parse_local_times():
    assert parse_local("2026-11-23T19:00").tzinfo is not None
    assert parse_local("2026-11-23T19:00+00:00").utcoffset() == timedelta(0)
    with pytest.raises(ValueError):
        parse_local("tomorrow evening", "--start-at")
