"""Fleets (SPEC 12) on a real Dask local cluster against the simulator on loopback: every eligible
patient of every practice held once at the Spine, at most --max-practices jobs at once, one rate
limit for the fleet measured by the simulator's own record, a worker killed mid-run and its
practices resumed, on SQLite stores and on a PostgreSQL store."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from scr_nb.errors import OptionError
from scr_nb.fleet.coordinator import FleetOptions, fleet_name, run_fleet
from scr_nb.fleet.plan import find_practices
from scr_nb.fleet.rate import RateServer
from scr_nb.job.options import JobOptions
from scr_nb.sim.synth import write_practice
from scr_nb.spine import session as sessions
from scr_nb.spine.tls import TlsSettings
from scr_nb.store.database import Database, Location
from scr_nb.store.fleet_rate import reserve
from scr_nb.store.practice_store import Store, read_status
from scr_nb.store.states import Mode
from scr_nb.ui import cli
from tests.conftest import ADMIN, USERS
from tests.test_engine import eligible_numbers, held

PATIENTS = 40


@pytest.fixture(scope="module")
def dask_client():
    """One local cluster of two worker processes (two threads each) for the module's tests."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=2, processes=True, host="127.0.0.1",
                           dashboard_address=None, silence_logs=logging.ERROR)
    client = Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.fixture
def client(dask_client):
    dask_client.wait_for_workers(2, timeout=60)   # a worker killed by an earlier test is back
    return dask_client


class _AdminEndpoints:
    """The simulator's inspection endpoints, read over HTTP, as ``SimulatorThread.simulator``."""

    def __init__(self, url: str):
        self.url = url

    def _get(self, what: str):
        return httpx.get(f"{self.url}/_admin/{what}", timeout=10).json()

    def stats(self) -> dict:
        return self._get("stats")

    def summaries(self) -> list[dict]:
        return self._get("summaries")

    def traffic(self) -> dict:
        return self._get("traffic")


class SpineProcess:
    """``scr-nb spine-sim`` in a process of its own: the rate tests read its record of the POSTs'
    times, which a simulator thread in the test's process would blur (its clock is read when it
    gets the GIL, after the coordinator's threads and the garbage collector let it)."""

    def __init__(self, folder: Path, *switches: str):
        users = folder / "users.json"
        users.write_text(json.dumps(USERS))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "scr_nb", "spine-sim", "--port", "0", "--users", str(users),
             "--poll-retry-after-ms", "5", *switches],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, line or self.process.stderr.read()
        self.url = line.split()[-1]
        self.simulator = _AdminEndpoints(self.url)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


@pytest.fixture
def spine_process(tmp_path):
    started: list[SpineProcess] = []

    def start(*switches: str) -> SpineProcess:
        started.append(SpineProcess(tmp_path, *switches))
        return started[-1]

    yield start
    for one in started:
        one.stop()


def write_fleet(root: Path, count: int, seed: int = 0, patients: int = PATIENTS
                ) -> dict[str, Path]:
    """``count`` synthetic practices under root/practices, ODS code -> folder. The last one has
    no ODS code in practice.json: its folder's name is its code."""
    folders = {}
    for i in range(count):
        ods = f"F{seed:02d}{i:03d}"
        folder = root / "practices" / (ods if i == count - 1 else f"practice-{i}")
        write_practice(folder, patients, seed=1000 * seed + i, ods_code=ods)
        if i == count - 1:
            details = json.loads((folder / "practice.json").read_text())
            del details["ods_code"]
            (folder / "practice.json").write_text(json.dumps(details))
        folders[ods] = folder
    return folders


def login(spine, path: Path) -> Path:
    sessions.save(sessions.login(spine.url, ADMIN["user_id"], ADMIN["passcode"]), path)
    return path


def eligible_of(folders: dict[str, Path], today) -> set[str]:
    numbers: set[str] = set()
    for folder in folders.values():
        mine = eligible_numbers(folder, today)
        assert not numbers & mine    # the practices' patients are all different people
        numbers |= mine
    return numbers


def assert_held_once(spine, eligible: set[str]) -> dict:
    """Every eligible patient of every practice holds one summary, and nothing was stored twice
    (no replacement, no AE 30134 for a summary already there). Re-sent message ids that the
    Spine's duplicate elimination answered are allowed: that is how a Resume finishes what was
    in flight."""
    stats = spine.simulator.stats()
    assert set(held(spine)) == eligible
    assert stats["accepted"] == len(eligible)
    assert stats["replacements"] == 0 and stats["rejected_by_code"] == {}
    return stats


def job_spans(store: str, ods: str) -> list[tuple[float, float]]:
    handle = Store(store, ods, readonly=True)
    try:
        return [(datetime.fromisoformat(job.started_at).timestamp(),
                 datetime.fromisoformat(job.ended_at).timestamp()) for job in handle.jobs()]
    finally:
        handle.close()


def most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def posts_per_second(spine) -> list[int]:
    """POSTs the simulator answered in each whole second (202 or 429): its own record."""
    rows = spine.simulator.traffic()["per_second"]
    return [row["accepted_posts"] + row["rate_limited_posts"] for row in rows]


def options(spine, mode: str = "run", **fleet) -> FleetOptions:
    fleet.setdefault("progress_every", 2.0)
    return FleetOptions(job=JobOptions(mode=Mode(mode)), spine=spine.url, **fleet)


def run_killing_a_worker(client, spine, practices, fleet_options, after_accepted: int = 30):
    """Run the fleet and SIGKILL the worker process running a practice's job (the job's lock
    names its pid) once the Spine has accepted ``after_accepted`` summaries and that job still
    has patients to send; returns the fleet's outcome and the practice whose worker died."""
    result = {}
    fleet = threading.Thread(target=lambda: result.update(outcome=run_fleet(
        practices, fleet_options, client=client, say=lambda line: None)))
    fleet.start()
    try:
        deadline = time.monotonic() + 60
        victim = None
        while victim is None:
            assert time.monotonic() < deadline, "no practice's job was found mid-run"
            if spine.simulator.stats()["accepted"] >= after_accepted:
                victim = next((found for found in map(mid_run, practices) if found), None)
            time.sleep(0.02)
        os.kill(victim[1], signal.SIGKILL)
    finally:
        fleet.join(120)
    assert not fleet.is_alive()
    return result["outcome"], victim[0]


def mid_run(practice) -> tuple[str, int] | None:
    """(ODS code, the pid of its job) when the practice's job runs and has patients left."""
    if not practice.on_database and not Path(practice.store).exists():
        return None
    status = read_status(practice.store, practice.ods)
    holder, counters = status["running"], status["counters"]
    if holder is None or not counters["unprocessed"] + counters["sending"]:
        return None
    return practice.ods, holder["pid"]


def assert_within_limit(spine, limit: float, reached: bool = False) -> None:
    """The simulator's own record: its rate limit (a token bucket of ``limit`` a second, a tenth
    of a second's worth deep) refused no POST, and no whole second of its record holds more than
    ``limit`` POSTs, give or take the one a send delayed across a second's edge may add (the
    fleet's slots are 1.03/limit apart: at most ``limit`` of them fall in any second).
    ``reached``: and the fleet did go at the limit, in some whole second in the middle."""
    counts = posts_per_second(spine)
    assert spine.simulator.stats()["transient_faults_injected"].get("429", 0) == 0, counts
    assert max(counts) <= limit + 1, counts
    if reached:
        assert max(counts[1:-1], default=0) >= 0.8 * limit, counts


# --- SQLite stores ------------------------------------------------------------------------------

def test_a_fleet_uploads_every_practice_at_most_max_practices_at_once_within_its_rate(
        client, spine_process, tmp_path, today):
    limit = 40
    spine = spine_process("--rate-limit", str(limit))   # refuses more (a bucket of limit/10)
    folders = write_fleet(tmp_path, 4, seed=1)
    eligible = eligible_of(folders, today)
    practices = find_practices(tmp_path / "practices", stores_dir=tmp_path / "stores",
                               session=login(spine, tmp_path / "session.json"))
    assert [p.ods for p in practices] == sorted(folders)   # the last named by its folder
    lines: list[str] = []
    outcome = run_fleet(practices, options(spine, max_practices=2, rate_limit=limit),
                        client=client, say=lines.append)

    assert outcome.exit_code == 0, lines
    assert {ods: r["exit_code"] for ods, r in outcome.results.items()} == dict.fromkeys(folders, 0)
    assert_held_once(spine, eligible)
    assert spine.simulator.stats()["duplicates"] == 0
    for practice in practices:
        counters = outcome.results[practice.ods]["counters"]
        assert counters["sent"] == len(eligible_numbers(folders[practice.ods], today))
        assert counters["unprocessed"] == counters["sending"] == counters["failed"] == 0
        assert Path(practice.store) == tmp_path / "stores" / f"{practice.ods}.sqlite"
    spans = [span for p in practices for span in job_spans(p.store, p.ods)]
    assert len(spans) == 4 and most_at_once(spans) == 2
    assert sum(line.startswith("[") for line in lines) == 4     # a line per practice ending
    assert any(line.startswith("Fleet after") for line in lines)
    assert_within_limit(spine, limit, reached=True)   # held by this process: SQLite stores

    again = run_fleet(practices, options(spine, max_practices=2), client=client,
                      say=lines.append)
    assert again.exit_code == 3          # Run again: each practice refused, use Rerun or Failed
    assert all("refused" in r["message"] for r in again.results.values())
    assert spine.simulator.stats()["accepted"] == len(eligible)


def test_fleet_stop_stops_every_running_practice_and_the_fleet_starts_no_more(
        client, spine, tmp_path, capsys, today):
    folders = write_fleet(tmp_path, 4, seed=4, patients=120)   # more than a job builds ahead
    practices = find_practices(tmp_path / "practices", stores_dir=tmp_path / "stores",
                               session=login(spine, tmp_path / "session.json"))
    result = {}
    fleet = threading.Thread(target=lambda: result.update(outcome=run_fleet(
        practices, options(spine, max_practices=2, rate_limit=10), client=client,
        say=lambda line: None)))
    fleet.start()
    deadline = time.monotonic() + 60
    while spine.simulator.stats()["accepted"] < 5:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    code = cli.main(["fleet", "stop", "--stores", str(tmp_path / "stores"), "--close"])
    fleet.join(120)
    err = capsys.readouterr().err

    assert code == 0, err
    outcome = result["outcome"]
    assert outcome.exit_code == 4
    ended = {ods: r["job"] for ods, r in outcome.results.items()}
    stopped = [ods for ods, job in ended.items() if job and job["reason"] == "user_stop"]
    assert len(stopped) == 2, outcome.to_json()
    assert all(ended[ods]["status"] == "stopped" for ods in stopped)
    assert [ods for ods, job in ended.items() if job is None] == sorted(set(folders) - set(stopped))
    assert cli.main(["fleet", "stop", "--stores", str(tmp_path / "stores")]) == 3
    assert "nothing to stop" in capsys.readouterr().err
    assert len(held(spine)) < len(eligible_of(folders, today))


def test_a_fleets_practices_are_named_by_practice_json_or_their_folder(tmp_path):
    folders = write_fleet(tmp_path, 3, seed=8)
    sessions_dir = tmp_path / "sessions"
    sessions_dir.mkdir()
    for ods in folders:
        (sessions_dir / f"{ods}.json").write_text("{}")
    found = find_practices(tmp_path / "practices", store="postgresql://db.example/scr",
                           sessions_dir=sessions_dir)
    assert [(p.ods, Path(p.folder), p.store, Path(p.session).name) for p in found] == [
        (ods, folder.resolve(), "postgresql://db.example/scr", f"{ods}.json")
        for ods, folder in sorted(folders.items())]
    (sessions_dir / "F08001.json").unlink()
    with pytest.raises(OptionError, match="F08001: no session file"):
        find_practices(tmp_path / "practices", stores_dir=tmp_path / "s", sessions_dir=sessions_dir)
    twin = tmp_path / "practices" / "twin"
    twin.mkdir()
    (twin / "practice.json").write_text(json.dumps({"ods_code": "F08000"}))
    with pytest.raises(OptionError, match="both practice F08000"):
        find_practices(tmp_path / "practices", stores_dir=tmp_path / "s",
                       session=tmp_path / "practices" / "twin" / "practice.json")


def test_a_fleet_on_a_new_postgresql_database_without_a_rate_limit(client, spine, pg_url,
                                                                   tmp_path, today):
    folders = write_fleet(tmp_path, 2, seed=10)
    practices = find_practices(tmp_path / "practices", store=pg_url,
                               session=login(spine, tmp_path / "session.json"))
    outcome = run_fleet(practices, options(spine), client=client, say=lambda line: None)
    assert outcome.exit_code == 0, outcome.to_json()
    assert_held_once(spine, eligible_of(folders, today))


# --- the rate limit's own arithmetic ----------------------------------------------------------------

def test_slots_from_the_database_are_spaced_at_the_limit_and_never_saved_up(tmp_path):
    from scr_nb.store.fleet_rate import set_rate
    from scr_nb.store.schema import open_database

    db = open_database(Location.of(tmp_path / "s.sqlite"))
    try:
        set_rate(db, "spine", 10.0)
        first, spacing, _ = reserve(db, "spine", 3)
        second, _, _ = reserve(db, "spine", 2)
        assert first == pytest.approx(0.0, abs=0.01) and spacing == pytest.approx(0.103)
        assert second == pytest.approx(3 * spacing, abs=0.01)     # right after the first three
        time.sleep(0.6)                                             # nobody sends for a while
        later, _, _ = reserve(db, "spine", 1)
        assert later == pytest.approx(0.0, abs=0.01)                # no credit saved up
        with pytest.raises(LookupError):
            reserve(db, "another spine", 1)
    finally:
        db.close()


def test_a_gate_on_the_coordinators_slots_lets_posts_go_no_closer_than_the_limit():
    server = RateServer(50.0).start()
    gate = server.spec().build()

    async def senders() -> list[float]:
        times: list[float] = []

        async def send() -> None:
            for _ in range(5):
                await gate.take()
                times.append(time.monotonic())

        await asyncio.gather(*(send() for _ in range(4)))
        return sorted(times)

    try:
        times = asyncio.run(senders())
    finally:
        gate.close()
        server.stop()
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(times) == 20
    assert min(gaps) >= 1.03 / 50 - 0.005           # a slot may be taken up to LATE_S late
    assert times[-1] - times[0] >= 19 * 1.03 / 50 - 0.005   # 20 POSTs take 19 intervals


# --- the command line -------------------------------------------------------------------------------

def test_scr_nb_fleet_run_on_an_existing_cluster_then_status(client, spine, tmp_path, today,
                                                            capsys):
    """--scheduler: a cluster started by someone else, its workers with no option of the kit's."""
    folders = write_fleet(tmp_path, 3, seed=6)
    eligible = eligible_of(folders, today)
    session = login(spine, tmp_path / "session.json")
    code = cli.main(["fleet", "run", "--practices", str(tmp_path / "practices"), "--stores",
                     str(tmp_path / "stores"), "--spine", spine.url, "--session", str(session),
                     "--max-practices", "2", "--rate-limit", "100", "--json",
                     "--scheduler", client.scheduler.address])
    out = capsys.readouterr().out
    assert code == 0, out
    assert_held_once(spine, eligible)
    report = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert [p["ods"] for p in report["practices"]] == sorted(folders)

    assert cli.main(["fleet", "status", "--stores", str(tmp_path / "stores"), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert {p["ods_code"] for p in status["practices"]} == set(folders)
    assert status["totals"]["sent"] == len(eligible)


def test_a_fleet_over_mutual_tls_hands_its_workers_the_certificates(
        client, spine_factory, pki, tmp_path, today, monkeypatch, capsys):
    spine = spine_factory(tls=pki.server())
    folders = write_fleet(tmp_path, 2, seed=9)
    session = tmp_path / "session.json"
    tls = TlsSettings(str(pki.ca), str(pki.client_cert), str(pki.client_key))
    sessions.save(sessions.login(spine.url, ADMIN["user_id"], ADMIN["passcode"], tls=tls), session)
    monkeypatch.chdir(pki.ca.parent)   # the options as names in this folder, not the workers'
    code = cli.main(["fleet", "run", "--practices", str(tmp_path / "practices"), "--stores",
                     str(tmp_path / "stores"), "--spine", spine.url, "--session", str(session),
                     "--scheduler", client.scheduler.address, "--ca-bundle", pki.ca.name,
                     "--client-cert", pki.client_cert.name, "--client-key", pki.client_key.name])
    assert code == 0, capsys.readouterr()
    assert_held_once(spine, eligible_of(folders, today))


@pytest.mark.parametrize("wrong", [["--max-practices", "0"], ["--rate-limit", "-1"],
                                   ["--store", "not-a-url"]])
def test_bad_fleet_options_are_exit_2_before_anything(spine, tmp_path, capsys, wrong):
    write_fleet(tmp_path, 1, seed=7)
    session = login(spine, tmp_path / "session.json")
    where = [] if "--store" in wrong else ["--stores", str(tmp_path / "stores")]
    assert cli.main(["fleet", "run", "--practices", str(tmp_path / "practices"), *where,
                     "--spine", spine.url, "--session", str(session), *wrong]) == 2
    assert spine.simulator.stats()["requests"] == 0


# --- a worker killed mid-run (last: its replacement takes a while to start) ----------------------

def test_a_worker_killed_mid_run_has_its_practices_resumed_and_the_coordinator_holds_the_rate(
        client, spine_process, tmp_path, today):
    limit = 40
    spine = spine_process("--rate-limit", str(limit), "--ack-delay-ms", "20")  # bucket: limit/10
    folders = write_fleet(tmp_path, 4, seed=3)
    eligible = eligible_of(folders, today)
    practices = find_practices(tmp_path / "practices", stores_dir=tmp_path / "stores",
                               session=login(spine, tmp_path / "session.json"))
    outcome, killed = run_killing_a_worker(client, spine, practices,
                                           options(spine, max_practices=4, rate_limit=limit))

    assert outcome.exit_code == 0, outcome.to_json()
    resumed = [r for r in outcome.results.values() if r["resumed"]]
    assert killed in [r["ods"] for r in resumed]
    for r in resumed:
        assert r["job"]["mode"] == "resume" and r["job"]["resumes"] == r["resumed"]
    assert_held_once(spine, eligible)
    for practice in practices:
        status = Store(practice.store, practice.ods, readonly=True)
        try:
            counters = status.status()["counters"]
        finally:
            status.close()
        assert counters["sent"] == len(eligible_numbers(folders[practice.ods], today)), counters
        assert counters["sending"] == counters["unprocessed"] == counters["failed"] == 0, counters
    assert_within_limit(spine, limit)


# --- PostgreSQL: one database for the fleet -------------------------------------------------------

def test_a_fleet_on_postgresql_holds_its_rate_in_the_database_and_survives_a_killed_worker(
        client, spine_process, pg_url, tmp_path, today):
    limit = 40
    spine = spine_process("--rate-limit", str(limit), "--ack-delay-ms", "20")
    folders = write_fleet(tmp_path, 4, seed=5)
    eligible = eligible_of(folders, today)
    practices = find_practices(tmp_path / "practices", store=pg_url,
                               session=login(spine, tmp_path / "session.json"))
    outcome, killed = run_killing_a_worker(client, spine, practices,
                                           options(spine, max_practices=3, rate_limit=limit))

    assert outcome.exit_code == 0, outcome.to_json()
    assert outcome.results[killed]["resumed"]
    assert_held_once(spine, eligible)
    assert_within_limit(spine, limit)
    assert sorted(Store.practices(pg_url)) == sorted(folders)
    spans = [span for p in practices for span in job_spans(p.store, p.ods)]
    assert most_at_once(spans) <= 3
    db = Database(Location.of(pg_url, "-"))
    try:   # the fleet's row is there, and a reservation now starts at the database's now or later
        first_in, spacing, _now = reserve(db, fleet_name(options(spine)), 1)
    finally:
        db.close()
    assert first_in > -0.01 and spacing == pytest.approx(1.03 / limit)


def test_a_task_run_again_knows_its_own_job_from_anyone_elses(tmp_path):
    """A task whose worker died resumes only the job its own earlier run started (marked in the
    job's settings), and reports a job of its own that a stop ended as stopped, never sending
    again against the stop; a job someone else started meanwhile is not its own."""
    from scr_nb.fleet.plan import Practice
    from scr_nb.fleet.task import PracticeTask, _earlier_run, run_practice
    from scr_nb.store.states import JobStatus

    practice = Practice("A12345", str(tmp_path), str(tmp_path / "A12345.sqlite"),
                        str(tmp_path / "none.json"))
    mark = "fleet-1-A12345"
    task = PracticeTask(practice, "http://127.0.0.1:9", JobOptions(Mode.RUN, started_by=mark),
                        TlsSettings(), None, known_job=None)
    store = Store(practice.store)
    try:
        by_hand = store.start_job("run", "run", None, None, "555000000001", "Dr A",
                                  JobOptions(Mode.RUN).settings())
        assert _earlier_run(task) is None                     # someone else's job
        store.end_job(by_hand.id, JobStatus.STOPPED, "user_stop", {})
        ours = store.start_job("run", "run", None, by_hand.chain_id, "555000000001", "Dr A",
                               JobOptions(Mode.RUN, started_by=mark).settings())
        assert _earlier_run(task).id == ours.id
        store.end_job(ours.id, JobStatus.STOPPED, "user_stop", {})
    finally:
        store.close()
    result = run_practice(task)
    assert result["exit_code"] == 4 and "stopped (user_stop) before its worker died" in \
        result["message"]
