"""The scr-nb command line as a user drives it: output, JSON shapes and exit codes (SPEC 10)."""

from __future__ import annotations

import json
import os
import signal
import stat
import socket
import subprocess
import sys
import time

import pytest

from scr_nb.extract.eligibility import Policy, decide, summarise
from scr_nb.extract.reader import load_practice
from scr_nb.ui import cli
from tests.conftest import ADMIN, cli_login


@pytest.fixture
def logged_in(spine, tmp_path, monkeypatch):
    return cli_login(spine, tmp_path, monkeypatch)


def upload_args(mode, practice, tmp_path, spine, session, *extra):
    return ["upload", mode, "--practice", str(practice), "--store", str(tmp_path / "s.sqlite"),
            "--spine", spine.url, "--session", str(session), "--quiet", *extra]


def test_eligibility_json_is_the_dry_run(practice, capsys, today):
    assert cli.main(["eligibility", "--practice", str(practice), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = summarise(decide(load_practice(practice, today=today), Policy(today=today)))
    assert printed == expected
    assert set(printed) == {"total", "eligible", "not_required_by_reason"}


def test_a_bad_extract_is_refused_naming_file_line_and_column(practice, tmp_path, spine,
                                                              logged_in, capsys):
    text = (practice / "medications.csv").read_text(encoding="utf-8")
    (practice / "medications.csv").write_text(text.replace("prescribed_on", "issued", 1),
                                              encoding="utf-8")
    code = cli.main(upload_args("run", practice, tmp_path, spine, logged_in))
    err = capsys.readouterr().err
    assert code == 3
    assert "medications.csv, line 1, column 'prescribed_on'" in err
    assert spine.simulator.stats()["requests"] == 0


def test_login_writes_a_private_session_file(logged_in):
    assert stat.S_IMODE(os.stat(logged_in).st_mode) == 0o600
    assert json.loads(logged_in.read_text())["user_id"] == ADMIN["user_id"]


def test_login_with_a_wrong_passcode_is_refused(spine, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SCR_NB_PASSCODE", "wrong")
    code = cli.main(["login", "--identity", spine.url, "--user", ADMIN["user_id"],
                     "--session", str(tmp_path / "s.json")])
    assert code == 3 and "refused" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


def test_run_status_log_and_the_refusals(practice, tmp_path, spine, logged_in, capsys, today):
    eligible = summarise(decide(load_practice(practice, today=today), Policy(today=today)))
    assert cli.main(upload_args("resume", practice, tmp_path, spine, logged_in)) == 3
    assert "nothing to resume" in capsys.readouterr().err

    assert cli.main(upload_args("run", practice, tmp_path, spine, logged_in)) == 0
    out = capsys.readouterr().out
    assert f"Sent: {eligible['eligible']}" in out and "Not Required:" in out
    assert stat.S_IMODE(os.stat(tmp_path / "s.sqlite").st_mode) == 0o600

    assert cli.main(["status", "--store", str(tmp_path / "s.sqlite"), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert set(status["counters"]) == {"unprocessed", "sending", "sent", "failed", "not_required"}
    assert set(status["states"]) == {"unprocessed", "queued", "sending", "transmitted",
                                     "acknowledged", "failed", "not_required"}
    assert status["counters"]["sent"] == eligible["eligible"]
    assert status["not_required_by_reason"] == eligible["not_required_by_reason"]
    assert status["failed_by_code"] == {}
    job = status["latest_job"]
    assert {k: job[k] for k in ("mode", "group", "status", "reason")} == {
        "mode": "run", "group": None, "status": "completed", "reason": None}
    assert job["id"] and job["started_at"] and job["ended_at"]

    assert cli.main(upload_args("run", practice, tmp_path, spine, logged_in)) == 3
    err = capsys.readouterr().err
    assert "already run to completion" in err and "rerun" in err

    assert cli.main(["log", "--store", str(tmp_path / "s.sqlite"), "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["refused", "job_start", "job_end", "refused"]
    assert all(e["user_id"] == ADMIN["user_id"] for e in events)
    assert events[2]["counters"]["sent"] == eligible["eligible"]
    assert stat.S_IMODE(os.stat(str(tmp_path / "s.sqlite") + ".log.jsonl").st_mode) == 0o600


def slow_upload(practice, tmp_path, spine_factory, monkeypatch, accepted: int):
    """A `scr-nb upload run` process at 40 messages a second, once the Spine has taken some."""
    spine = spine_factory(rate_limit_tps=40, rate_limit_burst=1)
    monkeypatch.setenv("SCR_NB_PASSCODE", ADMIN["passcode"])
    session = tmp_path / "session.json"
    assert cli.main(["login", "--identity", spine.url, "--user", ADMIN["user_id"],
                     "--session", str(session)]) == 0
    command = [sys.executable, "-m", "scr_nb.ui.cli",
               *upload_args("run", practice, tmp_path, spine, session, "--rate-limit", "40")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while spine.simulator.stats()["accepted"] < accepted and time.monotonic() < deadline:
        time.sleep(0.05)
    return spine, session, process


def test_ctrl_c_stops_and_closes_with_exit_4_and_resume_finishes(practice, tmp_path,
                                                                 spine_factory, monkeypatch,
                                                                 capsys):
    spine, session, process = slow_upload(practice, tmp_path, spine_factory, monkeypatch, 20)
    try:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 4, err
    assert "resume" in err
    capsys.readouterr()
    assert cli.main(["status", "--store", str(tmp_path / "s.sqlite"), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["latest_job"]["status"] == "stopped"
    assert status["latest_job"]["reason"] == "user_stop"
    assert status["states"]["sending"] == 0 and status["states"]["transmitted"] == 0
    assert 0 < status["counters"]["sent"] < 300

    assert cli.main(upload_args("resume", practice, tmp_path, spine, session)) == 0
    capsys.readouterr()
    assert cli.main(["status", "--store", str(tmp_path / "s.sqlite"), "--json"]) == 0
    final = json.loads(capsys.readouterr().out)
    assert final["counters"]["unprocessed"] == 0 and final["counters"]["sending"] == 0
    held = {s["nhs_number"] for s in spine.simulator.summaries()}
    assert len(held) == final["counters"]["sent"]
    assert spine.simulator.stats()["rejected_by_code"] == {}


def test_schedule_options_are_checked_and_recorded(practice, tmp_path, spine, logged_in, capsys):
    bad = upload_args("run", practice, tmp_path, spine, logged_in, "--start-at", "soon")
    with pytest.raises(SystemExit) as caught:
        cli.main(bad)
    assert caught.value.code == 2 and "--start-at" in capsys.readouterr().err
    code = cli.main(upload_args("run", practice, tmp_path, spine, logged_in,
                                "--pause-at", "2030-01-01T20:00"))
    assert code == 3 and "resume time" in capsys.readouterr().err
    assert spine.simulator.stats()["requests"] == 0
    code = cli.main(upload_args("run", practice, tmp_path, spine, logged_in,
                                "--stop-at", "2099-01-01T20:00", "--rate-limit", "1000"))
    assert code == 0
    capsys.readouterr()
    assert cli.main(["log", "--store", str(tmp_path / "s.sqlite"), "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    schedule = next(e for e in events if e["event"] == "schedule")
    assert schedule["stop_at"].startswith("2099-01-01T20:00")


def test_a_second_upload_is_refused_while_the_first_runs(practice, tmp_path, spine_factory,
                                                         monkeypatch, capsys):
    spine, session, first = slow_upload(practice, tmp_path, spine_factory, monkeypatch, 5)
    try:
        capsys.readouterr()
        assert cli.main(upload_args("resume", practice, tmp_path, spine, session)) == 3
        err = capsys.readouterr().err
        assert ADMIN["name"] in err and f"process {first.pid}" in err and "since" in err
        assert cli.main(["status", "--store", str(tmp_path / "s.sqlite"), "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["latest_job"]["status"] == "running"
        assert status["running"]["pid"] == first.pid
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == 4


def test_every_command_that_talks_to_the_spine_takes_the_tls_options():
    """Defined once (cli.add_tls_options) and on login, upload and scheduled alike."""
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("login", "upload", "scheduled"):
        options = {o for action in commands[name]._actions for o in action.option_strings}
        assert {"--ca-bundle", "--client-cert", "--client-key"} <= options, name
    for name in ("synth", "eligibility", "status", "log", "report"):
        options = {o for action in commands[name]._actions for o in action.option_strings}
        assert "--client-cert" not in options, name
    sim = {o for action in commands["spine-sim"]._actions for o in action.option_strings}
    assert {"--tls-cert", "--tls-key", "--client-ca"} <= sim


def test_upload_gives_the_callers_signal_handlers_back(practice, tmp_path, spine, logged_in):
    """Ctrl-C is Stop and Close only while the job runs: afterwards (a test run, a notebook)
    the caller's own handlers are back."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert cli.main(upload_args("run", practice, tmp_path, spine, logged_in)) == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_stop_from_another_process_reaches_the_running_job(practice, tmp_path, spine_factory,
                                                           monkeypatch, capsys):
    spine, session, process = slow_upload(practice, tmp_path, spine_factory, monkeypatch, 20)
    store = str(tmp_path / "s.sqlite")
    try:
        stopper = subprocess.run([sys.executable, "-m", "scr_nb", "stop", "--store", store,
                                  "--close", "--session", str(session)],
                                 capture_output=True, text=True, timeout=60)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert stopper.returncode == 0, stopper.stderr
    assert "Stopped: stopped by the user" in stopper.stdout
    assert process.returncode == 4, err
    again = subprocess.run([sys.executable, "-m", "scr_nb", "stop", "--store", store],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 3 and "nothing to stop" in again.stderr
    capsys.readouterr()
    assert cli.main(["log", "--store", store, "--json"]) == 0
    stops = [json.loads(line) for line in capsys.readouterr().out.splitlines()
             if json.loads(line)["event"] == "stop"]
    assert stops and stops[0]["user_id"] == ADMIN["user_id"] and stops[0]["becomes"] == "stopped"


def test_bad_job_options_are_exit_2_and_record_no_job(practice, tmp_path, spine, logged_in):
    for bad in (["--rate-limit", "-1"], ["--concurrency", "0"], ["--ack-timeout", "-5"]):
        run = subprocess.run([sys.executable, "-m", "scr_nb",
                              *upload_args("run", practice, tmp_path, spine, logged_in), *bad],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2, (bad, run.stderr)
        assert bad[0] in run.stderr
    assert not (tmp_path / "s.sqlite").exists()
    assert spine.simulator.stats()["requests"] == 0


def test_preflight_says_ready_or_every_reason(practice, tmp_path, spine, logged_in, capsys):
    assert cli.main(["preflight", "--practice", str(practice), "--spine", spine.url,
                     "--session", str(logged_in), "--rate-limit", "50", "--json"]) == 0
    ready = json.loads(capsys.readouterr().out)
    assert ready["ready"] and ready["eligibility"]["eligible"] > 0
    assert cli.main(["preflight", "--practice", str(practice), "--spine", spine.url,
                     "--session", str(logged_in), "--rate-limit", "0.005", "--stop-at",
                     "2099-01-01T00:00"]) == 3
    printed = capsys.readouterr().out
    assert "NOT timing" in printed and "Not ready: 1 check(s) failed." in printed
    assert spine.simulator.stats()["requests"] == 0


def test_break_lock_refuses_a_live_holder_and_frees_a_dead_one(practice, tmp_path, spine,
                                                              logged_in, capsys):
    from scr_nb.store.practice_store import Store

    store_path = tmp_path / "s.sqlite"
    store = Store(store_path)
    with store.transaction() as db:    # a job whose process died: a pid no process has
        db.execute("INSERT INTO job_lock (ods, user_id, user_name, host, pid, since, heartbeat, "
                   "token, started, beat) VALUES ('', '555000000009', 'Pat Other', ?, 2147480000, "
                   "'2026-11-20T19:00:00+00:00', 0, 'gone', NULL, 0)", (socket.gethostname(),))
    store.close()
    assert cli.main(["break-lock", "--store", str(store_path), "--session", str(logged_in)]) == 0
    assert "Pat Other" in capsys.readouterr().out
    assert cli.main(["break-lock", "--store", str(store_path)]) == 3
    assert "nothing to break" in capsys.readouterr().err
    assert cli.main(["log", "--store", str(store_path), "--json"]) == 0
    broken = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert broken[-1]["event"] == "lock_broken" and broken[-1]["user_id"] == ADMIN["user_id"]
