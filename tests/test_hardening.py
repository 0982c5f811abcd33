"""Nothing stranded, nothing leaked: failures after the 202, 30134, clean stops, refusals that change
nothing, stops asked through the store, and the session's safety margin. Real HTTP against the
simulator on loopback."""

from __future__ import annotations

import threading
import time

import pytest

from scr_nb.errors import RefusedError, SpineError
from scr_nb.job.options import JobControl
from scr_nb.spine import session as sessions
from scr_nb.spine.client import SpineClient
from scr_nb.store.log import PracticeLog
from scr_nb.store.practice_store import Store
from tests.conftest import ADMIN, CLERK
from tests.test_engine import eligible_numbers, held, job, status


def login(spine):
    return sessions.login(spine.url, ADMIN["user_id"], ADMIN["passcode"])


class PollsAnswer404(SpineClient):
    """A Spine whose poll answers 404 for every message the first time round, after it took the
    message with a 202: the outcome is uncertain."""

    failing = True

    async def poll(self, poll_url: str, message_id: str = ""):
        if PollsAnswer404.failing:
            raise SpineError("the Spine answered the poll with HTTP 404", retriable=False,
                             status=404)
        return await super().poll(poll_url, message_id)


def test_failures_after_the_202_are_resent_with_their_id_and_nothing_is_stored_twice(
        tmp_path, spine, admin_session, practice, today):
    PollsAnswer404.failing = True
    first = job(tmp_path, admin_session, spine, practice, "run", client_factory=PollsAnswer404)
    eligible = eligible_numbers(practice, today)
    assert first.completed
    assert status(tmp_path)["failed_by_code"] == {"poll_failed": len(eligible)}
    assert set(held(spine)) == eligible                   # the Spine took every one of them
    PollsAnswer404.failing = False
    second = job(tmp_path, admin_session, spine, practice, "failed")
    assert second.completed
    st = status(tmp_path)
    assert st["counters"]["sent"] == len(eligible) and st["counters"]["failed"] == 0
    stats = spine.simulator.stats()
    assert stats["rejected_by_code"] == {} and stats["duplicates"] == len(eligible)
    assert set(held(spine)) == eligible


def test_a_summary_already_at_the_spine_is_not_required_never_a_failure(
        tmp_path, spine, admin_session, practice, today):
    """The Spine already holds every summary (sent from another store): AE 30134 for each."""
    (tmp_path / "other").mkdir()
    assert job(tmp_path / "other", admin_session, spine, practice, "run").completed
    result = job(tmp_path, admin_session, spine, practice, "run")
    eligible = eligible_numbers(practice, today)
    assert result.completed and result.statistics["this_job"]["already_at_spine"] == len(eligible)
    st = status(tmp_path)
    assert st["counters"]["failed"] == 0 and st["failed_by_code"] == {}
    assert st["not_required_by_reason"]["existing_summary_at_spine"] == len(eligible)
    with pytest.raises(RefusedError, match="no failed patients"):    # nothing to fix
        job(tmp_path, admin_session, spine, practice, "failed")
    assert status(tmp_path)["not_required_by_reason"]["existing_summary_at_spine"] == \
        len(eligible)                                   # kept across the extract's next sync


def test_a_refused_run_changes_nothing_in_the_store(tmp_path, spine, admin_session, practice):
    assert job(tmp_path, admin_session, spine, practice, "run").completed
    before = status(tmp_path)
    with pytest.raises(RefusedError, match="already run to completion"):
        job(tmp_path, admin_session, spine, practice, "run", dissent="blank")
    after = status(tmp_path)
    for key in ("counters", "states", "not_required_by_reason", "failed_by_code"):
        assert after[key] == before[key], key
    assert before["not_required_by_reason"]["dissent"] > 0


def test_a_clean_stop_leaves_nothing_counted_as_sending_and_resume_finishes(
        tmp_path, spine_factory, practice, today):
    spine = spine_factory(rate_limit_tps=150, rate_limit_burst=2, ack_delay_ms=20)
    admin_session = login(spine)
    control = JobControl()
    first = job(tmp_path, admin_session, spine, practice, "run", control=control,
                concurrency=8, on_progress=lambda p: p.acknowledged >= 40
                and control.stop_and_close())
    assert first.job.status == "stopped" and first.job.reason == "user_stop"
    st = status(tmp_path)
    assert st["counters"]["sending"] == 0 and st["states"]["queued"] == 0
    assert st["counters"]["unprocessed"] > 0
    assert job(tmp_path, admin_session, spine, practice, "resume").completed
    assert set(held(spine)) == eligible_numbers(practice, today)
    assert spine.simulator.stats()["rejected_by_code"] == {}


def test_a_stop_asked_through_the_store_is_obeyed_within_two_seconds(
        tmp_path, spine_factory, practice):
    spine = spine_factory(rate_limit_tps=60, rate_limit_burst=1)
    admin_session = login(spine)
    asked: dict[str, float] = {}

    def ask_from_elsewhere(progress) -> None:
        if progress.acknowledged >= 20 and not asked:
            asked["at"] = time.monotonic()
            threading.Thread(target=_ask, args=(tmp_path, progress.job_id)).start()

    result = job(tmp_path, admin_session, spine, practice, "run", on_progress=ask_from_elsewhere)
    took = time.monotonic() - asked["at"]
    assert result.job.status == "paused" and result.job.reason == "user_stop"
    assert took < 2.5, took
    stop = next(e for e in PracticeLog(tmp_path / "practice.sqlite").read() if e["event"] == "stop")
    assert stop["user_id"] == CLERK["user_id"] and stop["user_name"] == CLERK["name"]


def _ask(tmp_path, job_id: int) -> None:
    other = Store(tmp_path / "practice.sqlite")      # as another process or panel would
    try:
        other.ask(job_id, "stop", CLERK["user_id"], CLERK["name"])
    finally:
        other.close()


def test_no_request_goes_out_on_a_dying_session(tmp_path, spine_factory, practice):
    """Three runs on 34-second sessions with 40 ms of latency: each stops a safety margin (the
    longest a request may take, 30 s here, plus the clock difference) before its card's session
    ends, and the Spine never sees an expired token. A session already inside the margin is
    refused before anything is sent."""
    short = {**ADMIN, "session_hours": 34 / 3600}
    spine = spine_factory(users=[short], latency_ms=40, rate_limit_tps=30, rate_limit_burst=1)
    mode = "run"
    for _ in range(3):
        session = sessions.login(spine.url, short["user_id"], short["passcode"])
        result = job(tmp_path, session, spine, practice, mode)
        assert result.job.status == "stopped" and result.job.reason == "session_expired"
        mode = "resume"
    stats = spine.simulator.stats()
    assert stats["unauthorized"] == 0 and stats["accepted"] > 0
    assert status(tmp_path)["counters"]["failed"] == 0

    dying = sessions.login(spine_factory(users=[{**ADMIN, "session_hours": 20 / 3600}]).url,
                           ADMIN["user_id"], ADMIN["passcode"])
    with pytest.raises(RefusedError, match="inside the safety margin"):
        job(tmp_path / "x", dying, spine, practice, "run")


def test_every_log_line_carries_the_keys_spec_8_pins(tmp_path, spine, admin_session, practice):
    control = JobControl()
    job(tmp_path, admin_session, spine, practice, "run", control=control,
        on_progress=lambda p: p.acknowledged >= 10 and control.stop())
    with pytest.raises(RefusedError):
        job(tmp_path, admin_session, spine, practice, "run")
    job(tmp_path, admin_session, spine, practice, "resume")
    lines = list(PracticeLog(tmp_path / "practice.sqlite").read())
    assert {"job_start", "stop", "job_end", "refused"} <= {line["event"] for line in lines}
    for line in lines:
        assert {"at", "event", "user_id"} <= set(line), line
        if line["event"] in ("job_start", "job_end", "stop", "pause", "resume", "cancel"):
            assert "job_id" in line, line
        if line["event"] in ("stop", "pause", "resume"):
            assert line.get("reason"), line
