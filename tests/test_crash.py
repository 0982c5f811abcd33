"""kill -9 at random moments, then Resume: every eligible patient ends acknowledged exactly once at
the Spine, with the counters right. The upload runs as a real `scr-nb upload` process."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from scr_nb.ui import cli
from tests.conftest import ADMIN
from tests.test_engine import eligible_numbers, held


def start_upload(mode, practice, tmp_path, spine, session):
    command = [sys.executable, "-m", "scr_nb", "upload", mode, "--practice", str(practice),
               "--store", str(tmp_path / "s.sqlite"), "--spine", spine.url, "--session",
               str(session), "--quiet", "--concurrency", "8"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_three_times_then_resume(practice, tmp_path, spine_factory, monkeypatch, capsys,
                                        today):
    spine = spine_factory(rate_limit_tps=120, rate_limit_burst=2, ack_delay_ms=30)
    monkeypatch.setenv("SCR_NB_PASSCODE", ADMIN["passcode"])
    session = tmp_path / "session.json"
    assert cli.main(["login", "--identity", spine.url, "--user", ADMIN["user_id"],
                     "--session", str(session)]) == 0
    eligible = eligible_numbers(practice, today)
    chance = random.Random(20261122)
    mode, kills = "run", 0
    for _ in range(3):
        before = spine.simulator.stats()["accepted"]
        process = start_upload(mode, practice, tmp_path, spine, session)
        target = before + chance.randint(15, 60)
        deadline = time.monotonic() + 60
        while spine.simulator.stats()["accepted"] < target and time.monotonic() < deadline:
            if process.poll() is not None:
                break
            time.sleep(0.01)
        time.sleep(chance.random() * 0.05)
        if process.poll() is None:      # on a busy machine the upload may have ended by itself
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
            assert process.returncode == -signal.SIGKILL
            kills += 1
        else:
            assert process.returncode == 0, process.stderr.read()
            break
        mode = "resume"
    assert kills >= 1
    if process.returncode != 0:
        final = start_upload("resume", practice, tmp_path, spine, session)
        out, err = final.communicate(timeout=120)
        assert final.returncode == 0, err
    capsys.readouterr()
    assert cli.main(["status", "--store", str(tmp_path / "s.sqlite"), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert set(held(spine)) == eligible
    assert spine.simulator.stats()["rejected_by_code"] == {}   # no 30134: nothing stored twice
    assert status["counters"]["sent"] == len(eligible)
    assert status["counters"]["unprocessed"] == 0 and status["counters"]["sending"] == 0
    assert status["counters"]["failed"] == 0
    assert status["running"] is None
    capsys.readouterr()
    assert cli.main(["log", "--store", str(tmp_path / "s.sqlite"), "--json"]) == 0
    log = [json.loads(line)["event"] for line in capsys.readouterr().out.splitlines()]
    assert log.count("takeover") == kills and log[-1] == "job_end"
