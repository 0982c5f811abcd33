"""Preflight: every check a night upload needs, run the afternoon before, without a clinical
message; every reason given at once."""

from __future__ import annotations

from datetime import datetime, timedelta

from scr_nb.job.options import JobOptions
from scr_nb.job.preflight import run_preflight
from scr_nb.job.schedule import Schedule
from scr_nb.spine import session as sessions
from scr_nb.store.states import Mode
from tests.conftest import ADMIN, CLERK


def test_a_ready_practice_passes_every_check_and_sends_nothing(practice, spine, tmp_path):
    session = tmp_path / "session.json"
    sessions.save(sessions.login(spine.url, ADMIN["user_id"], ADMIN["passcode"]), session)
    report = run_preflight(practice, spine.url, session,
                           JobOptions(mode=Mode.RUN, dissent="blank", rate_limit=50))
    assert report.ready, report.reasons
    assert [c.name for c in report.checks] == ["extract", "session", "spine", "identity",
                                               "messages", "timing"]
    assert report.counts["eligible"] > 200
    assert "sample messages" in report.checks[4].words
    assert spine.simulator.stats()["requests"] == 0          # no clinical message went out
    assert report.to_json()["ready"] is True


def test_every_reason_is_given_at_once(practice, spine, tmp_path, spine_factory):
    session = tmp_path / "session.json"
    sessions.save(sessions.login(spine.url, CLERK["user_id"], CLERK["passcode"]), session)
    stop = datetime.now().astimezone() + timedelta(minutes=1)
    options = JobOptions(mode=Mode.RUN, rate_limit=0.5, schedule=Schedule(stop_at=stop))
    report = run_preflight(practice, "https://127.0.0.1:9/", session, options)
    failed = {c.name: c.words for c in report.checks if not c.ok}
    assert set(failed) == {"session", "spine", "timing"}, report.checks
    assert "B0062" in failed["session"]
    assert "127.0.0.1:9" in failed["spine"]
    assert "stop time" in failed["timing"] and "raise the rate limit" in failed["timing"]
    assert not report.ready and len(report.reasons) == 3


def test_a_broken_extract_is_one_of_the_reasons(tmp_path, spine):
    session = tmp_path / "session.json"
    sessions.save(sessions.login(spine.url, ADMIN["user_id"], ADMIN["passcode"]), session)
    (tmp_path / "empty").mkdir()
    report = run_preflight(tmp_path / "empty", spine.url, session)
    assert [c.name for c in report.checks if not c.ok] == ["extract"]
    assert "consent.csv: file is missing" in report.reasons[0]
