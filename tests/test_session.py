"""The Smartcard session (SPEC 7): SDS ids checked at login and in session files, and a session
file that claims more than its token carries getting nothing past the Spine."""

from __future__ import annotations

import json

import httpx
import pytest

from scr_nb.errors import SessionError
from scr_nb.job.options import JobOptions
from scr_nb.job.runner import run_upload
from scr_nb.spine import session as sessions
from scr_nb.store.log import PracticeLog
from scr_nb.store.practice_store import read_status
from scr_nb.store.states import Mode
from scr_nb.ui import cli
from tests.conftest import ADMIN, CLERK


def identity_provider(answer: dict, calls: list):
    """An identity provider that answers every login with ``answer`` (no network)."""

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content))
        return httpx.Response(200, json=answer)

    return httpx.MockTransport(handle)


GOOD_ANSWER = {"token": "opaque", "user_id": ADMIN["user_id"], "name": ADMIN["name"],
               "role_profile_id": ADMIN["role_profile_id"], "activities": ["B0062"],
               "expires_at": "2099-01-01T00:00:00+00:00"}


@pytest.mark.parametrize("user_id", ["u1", "55500000000", "5550000000011", "55500000000x",
                                     " 555000000001", "５５５000000001"])
def test_login_refuses_a_user_id_that_is_not_a_12_digit_sds_id_before_asking(user_id):
    calls: list = []
    with pytest.raises(SessionError, match="not a 12-digit SDS id"):
        sessions.login("http://127.0.0.1:1", user_id, "passcode",
                       transport=identity_provider(GOOD_ANSWER, calls))
    assert calls == []


@pytest.mark.parametrize("field, value", [("user_id", "u1"), ("role_profile_id", "R8000"),
                                          ("role_profile_id", 555000001001)])
def test_login_refuses_an_answer_whose_ids_are_not_sds_ids(field, value):
    calls: list = []
    with pytest.raises(SessionError, match=rf"the {field.replace('_', ' ')} .* not a 12-digit SDS"):
        sessions.login("http://127.0.0.1:1", ADMIN["user_id"], "passcode",
                       transport=identity_provider({**GOOD_ANSWER, field: value}, calls))
    assert len(calls) == 1
    good = sessions.login("http://127.0.0.1:1", ADMIN["user_id"], "passcode",
                          transport=identity_provider(GOOD_ANSWER, calls))
    assert good.role_profile_id == ADMIN["role_profile_id"]


def test_scr_nb_login_with_a_non_sds_user_id_is_refused(spine, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCR_NB_PASSCODE", ADMIN["passcode"])
    code = cli.main(["login", "--identity", spine.url, "--user", "admin", "--session",
                     str(tmp_path / "s.json")])
    assert code == 3
    assert "'admin' is not a 12-digit SDS id" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


def test_a_session_file_with_a_non_sds_role_profile_is_refused(spine, admin_session, practice,
                                                               tmp_path):
    path = tmp_path / "session.json"
    sessions.save(admin_session, path)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "role_profile_id": "R8000"}))
    with pytest.raises(SessionError, match=r"session.json has the role profile id 'R8000'"):
        sessions.load(path)
    outcome = run_upload(practice, tmp_path / "s.sqlite", spine.url, path,
                         JobOptions(mode=Mode.RUN))
    assert outcome.exit_code == 3 and "log in again" in outcome.message
    assert spine.simulator.stats()["requests"] == 0


def test_a_session_file_claiming_b0062_gets_nothing_past_the_spine(spine, practice, tmp_path):
    """The clerk's real token, in a session file edited to claim B0062: the kit's own check
    passes, but the Spine authorises from the token alone and answers 403."""
    clerk = sessions.login(spine.url, CLERK["user_id"], CLERK["passcode"])
    path = tmp_path / "session.json"
    sessions.save(clerk, path)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "activities": ["B0062", *data["activities"]]}))
    assert "B0062" in sessions.load(path).activities

    outcome = run_upload(practice, tmp_path / "s.sqlite", spine.url, path,
                         JobOptions(mode=Mode.RUN))
    assert outcome.exit_code == 3, outcome.message
    assert "403" in outcome.message and "B0062" in outcome.message
    stats = spine.simulator.stats()
    assert stats["forbidden"] > 0 and stats["accepted"] == 0
    assert spine.simulator.summaries() == []
    status = read_status(tmp_path / "s.sqlite")
    assert status["counters"]["failed"] == 0 and status["counters"]["sent"] == 0
    assert status["states"]["sending"] == 0 and status["states"]["transmitted"] == 0
    assert status["latest_job"]["status"] == "stopped"
    assert status["latest_job"]["reason"] == "access_denied"
    stops = [e for e in PracticeLog(tmp_path / "s.sqlite").read() if e["event"] == "stop"]
    assert [e["reason"] for e in stops] == ["access_denied"]
    assert stops[0]["user_id"] == CLERK["user_id"]
