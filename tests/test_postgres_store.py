"""The store in a real PostgreSQL server (SPEC 10's --store URL, SPEC 12): a single-practice upload
passes the same checks as with SQLite; practices share one database apart; one job per practice by
an advisory lock that goes with its holder's connection; kill -9 and Resume, exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psycopg
import pytest

from scr_nb.errors import RefusedError, StoreError
from scr_nb.job.options import JobOptions
from scr_nb.job.runner import run_upload
from scr_nb.sim.synth import write_practice
from scr_nb.store.database import practice_lock_key, practice_url
from scr_nb.store.lock import StoreLock
from scr_nb.store.log import PracticeLog
from scr_nb.store.practice_store import Store, read_status
from scr_nb.store.states import Mode
from scr_nb.ui import cli
from tests.conftest import cli_login
from tests.test_engine import eligible_numbers, held

NOW = __import__("tests.test_store", fromlist=["NOW"]).NOW


login = cli_login


def test_an_upload_on_postgresql_gives_what_sqlite_gives(practice, tmp_path, spine_factory,
                                                         pg_url, monkeypatch, today, capsys):
    eligible = eligible_numbers(practice, today)
    results = {}
    for kind, store, ods in (("sqlite", str(tmp_path / "p.sqlite"), None),
                             ("postgresql", pg_url, "A12345")):
        spine = spine_factory()
        session = login(spine, tmp_path, monkeypatch)
        outcome = run_upload(practice, store, spine.url, session, JobOptions(Mode.RUN),
                             ods=ods)
        assert outcome.exit_code == 0, outcome.message
        assert set(held(spine)) == eligible                  # every eligible patient, once
        assert spine.simulator.stats()["duplicates"] == 0
        status = read_status(store, ods)
        results[kind] = {key: status[key] for key in
                         ("counters", "states", "not_required_by_reason", "failed_by_code")}
    assert results["postgresql"] == results["sqlite"]
    assert results["postgresql"]["counters"]["sent"] == len(eligible)
    # the CLI reads it by URL and practice, and the log lives in the database
    capsys.readouterr()
    assert cli.main(["status", "--store", pg_url, "--ods", "a12345", "--json"]) == 0
    assert '"sent": %d' % len(eligible) in capsys.readouterr().out
    events = [e["event"] for e in PracticeLog(pg_url, "A12345").read()]
    assert events[0] == "job_start" and events[-1] == "job_end"
    assert cli.main(["status", "--store", pg_url, "--json"]) == 1
    assert "--ods" in capsys.readouterr().err


def test_practices_share_one_database_apart(tmp_path, spine, pg_url, monkeypatch):
    session = login(spine, tmp_path, monkeypatch)
    for ods, seed in (("B11111", 1), ("C22222", 2)):
        write_practice(tmp_path / ods, 60, seed=seed, ods_code=ods)
        outcome = run_upload(tmp_path / ods, pg_url, spine.url, session, JobOptions(Mode.RUN),
                             ods=ods)
        assert outcome.exit_code == 0, outcome.message
    assert Store.practices(pg_url) == ["B11111", "C22222"]
    b, c = read_status(pg_url, "B11111"), read_status(pg_url, "C22222")
    assert b["latest_job"]["id"] == c["latest_job"]["id"] == 1    # numbered per practice
    assert b["counters"]["sent"] + c["counters"]["sent"] == len(held(spine))
    # the one-string form names the practice too
    assert read_status(practice_url(pg_url, "C22222"))["counters"] == c["counters"]
    # an extract of one practice is refused on another's store, before anything is sent
    before = spine.simulator.stats()["requests"]
    outcome = run_upload(tmp_path / "B11111", pg_url, spine.url, session, JobOptions(Mode.RUN),
                         ods="C22222")
    assert outcome.exit_code == 3 and "holds practice C22222" in outcome.message
    assert spine.simulator.stats()["requests"] == before


def test_one_job_per_practice_and_a_dead_holders_lock_goes_with_its_connection(pg_url):
    first = Store(pg_url, "D33333")
    holder = StoreLock(first, "555000000009", "Pat Other", NOW)
    assert holder.acquire() is None
    second = Store(pg_url, "D33333")
    other_practice = Store(pg_url, "E44444")
    try:
        with pytest.raises(RefusedError, match="Pat Other .* process .* since"):
            StoreLock(second, "555000000001", "Dr A", NOW).acquire()
        assert second.lock_holder()["user_name"] == "Pat Other"
        elsewhere = StoreLock(other_practice, "555000000001", "Dr A", NOW)
        assert elsewhere.acquire() is None                      # another practice: its own lock
        elsewhere.release()
        # the holder dies without releasing: its connection goes, and its lock with it
        first.db.close()
        deadline = time.monotonic() + 10
        while second.lock_holder() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert second.lock_holder() is None and second.running_job() is None
        taker = StoreLock(second, "555000000001", "Dr A", NOW)
        crashed = taker.acquire()
        assert crashed is not None and crashed.user_name == "Pat Other"
        assert second.lock_holder()["user_name"] == "Dr A"
        taker.release()
        assert second.lock_holder() is None
    finally:
        second.close()
        other_practice.close()


def test_the_advisory_lock_keys_of_ods_codes_never_meet():
    codes = ["A12345", "A1234", "A123450", "Y99999", "0", "Z", "ZZZZZZZZZZZZ", "A12346"]
    keys = [practice_lock_key(code) for code in codes]
    assert len(set(keys)) == len(keys) and all(-2**63 <= k < 2**63 for k in keys)
    assert practice_lock_key("a12345") == practice_lock_key("A12345")
    assert -2**63 <= practice_lock_key("not an ODS code, hashed") < 2**63


def test_a_postgresql_store_needs_its_practice_named(pg_url):
    with pytest.raises(StoreError, match="--ods"):
        Store(pg_url)
    with pytest.raises(StoreError, match="postgresql://postgres@127.0.0.1"):
        Store(pg_url.replace("/test_", "/no_such_database_"), "A12345")


def test_kill_9_then_resume_on_postgresql_sends_each_summary_once(practice, tmp_path,
                                                                   spine_factory, pg_url,
                                                                   monkeypatch, today):
    spine = spine_factory(rate_limit_tps=120, rate_limit_burst=2, ack_delay_ms=30)
    session = login(spine, tmp_path, monkeypatch)
    command = [sys.executable, "-m", "scr_nb", "upload", "run", "--practice", str(practice),
               "--store", pg_url, "--ods", "A12345", "--spine", spine.url, "--session",
               str(session), "--quiet", "--concurrency", "8"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while spine.simulator.stats()["accepted"] < 40 and time.monotonic() < deadline \
            and process.poll() is None:
        time.sleep(0.01)
    assert process.poll() is None, process.stderr.read()
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    status = read_status(pg_url, "A12345")
    assert status["latest_job"]["status"] == "running"        # it died: nobody closed it
    assert status["running"] is None                           # ... and its lock went with it
    command[4] = "resume"
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    eligible = eligible_numbers(practice, today)
    assert set(held(spine)) == eligible
    assert spine.simulator.stats()["rejected_by_code"] == {}   # no 30134: nothing stored twice
    final = read_status(pg_url, "A12345")
    assert final["counters"]["sent"] == len(eligible) and final["counters"]["sending"] == 0
    with psycopg.connect(pg_url) as conn:   # the store's own tables: practice first in every key
        keys = conn.execute(
            "SELECT t.relname, a.attname FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid "
            "JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = i.indkey[0] "
            "WHERE i.indisprimary AND t.relnamespace = 'public'::regnamespace "
            "AND t.relname NOT IN ('meta', 'fleet_rate')").fetchall()
    assert len(keys) == 9 and all(column == "ods" for _, column in keys), keys


def test_a_database_of_a_newer_kit_is_refused_not_changed(pg_url):
    Store(pg_url, "A12345").close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    with pytest.raises(StoreError, match="schema 99 is not 6; use the scr-nb version"):
        Store(pg_url, "A12345")
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT value FROM meta").fetchall() == [("99",)]
