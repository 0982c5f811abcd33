"""The fleet's status and monitor (SPEC 12): ``fleet_status`` on a folder of SQLite stores and on a
PostgreSQL store says of each practice what ``Store.status()`` says, in ODS code order, with a store
that cannot be read listed and a crashed job called interrupted; errors by code add up across the
practices; the fleet monitor notebook runs under papermill on both kinds of store."""

from __future__ import annotations

import os
import re
import shutil
import socket
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import nbformat
import pandas as pd
import papermill
import pytest

from scr_nb.constants import explain
from scr_nb.errors import StoreError
from scr_nb.fleet.status import (COUNTERS, INTERRUPTED, NOT_STARTED, PAUSED, RUNNING, STARTING,
                                 UNREADABLE, PracticeReading, fleet_status, practice_status,
                                 read_fleet)
from scr_nb.job.options import JobOptions
from scr_nb.job.runner import run_upload
from scr_nb.reporting import fleet
from scr_nb.sim.spine_sim import SimConfig, SimulatorThread
from scr_nb.sim.synth import write_practice
from scr_nb.spine import session as sessions
from scr_nb.store.database import practice_url
from scr_nb.store.lock import StoreLock
from scr_nb.store.practice_store import Store
from scr_nb.store.states import Mode
from tests.conftest import ADMIN, USERS

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "fleet_monitor.ipynb"
NHS_LIKE = re.compile(r"\b\d{10}\b|\d{3} \d{3} \d{4}")
EMBEDDED = re.compile(r"data:(image/png|text/csv);base64,[A-Za-z0-9+/=]+")
REJECTIONS = {"30418": 0.1, "35160": 0.08}
UPLOADED = {"B82001": (60, 21), "A12345": (90, 22)}   # ODS code: (patients, seed)
INTERRUPTED_ODS, NEVER_RUN_ODS, BROKEN_ODS = "C33333", "D44444", "E55555"


def upload(where: Path, spine: SimulatorThread, session: Path, store: str, ods: str,
           patients: int, seed: int) -> None:
    practice = where / "practices" / ods
    if not practice.exists():
        write_practice(practice, patients, seed=seed, ods_code=ods)
    outcome = run_upload(practice, store, spine.url, session, JobOptions(mode=Mode.RUN), ods=ods)
    assert outcome.exit_code == 0, outcome.message


def uploads(where: Path, store_of) -> None:
    """Run each practice of UPLOADED against a simulator rejecting some patients; ``store_of(ods)``
    names its store."""
    sim = SimulatorThread(SimConfig(users=USERS, poll_retry_after_ms=5, seed=3,
                                    reject_rates=REJECTIONS))
    sim.start()
    try:
        session = where / "session.json"
        sessions.save(sessions.login(sim.url, ADMIN["user_id"], ADMIN["passcode"]), session)
        for ods, (patients, seed) in UPLOADED.items():
            upload(where, sim, session, store_of(ods), ods, patients, seed)
    finally:
        sim.stop()


def crashed_job(store: str, ods: str) -> None:
    """A practice whose job was recorded running and whose process died: its patients still to
    send, nobody holding its lock (rows written through the Store's own methods)."""
    opened = Store(store, ods=ods)
    try:
        opened.sync_patients((f"p{i}", f"P{i}", f"{9_000_000_000 + i}", i, None, False)
                             for i in range(12))
        opened.start_job("run", "run", None, None, ADMIN["user_id"], ADMIN["name"],
                         {"practice_ods": ods})
    finally:
        opened.close()


@pytest.fixture(scope="module")
def stores_dir(tmp_path_factory) -> Path:
    """A folder of SQLite stores: two practices uploaded with Spine rejections, one whose job
    crashed, one never run, and one file that is no store."""
    where = tmp_path_factory.mktemp("fleet")
    folder = where / "stores"
    folder.mkdir()
    uploads(where, lambda ods: str(folder / f"{ods}.sqlite"))
    crashed_job(str(folder / f"{INTERRUPTED_ODS}.sqlite"), INTERRUPTED_ODS)
    Store(folder / f"{NEVER_RUN_ODS}.sqlite", ods=NEVER_RUN_ODS).close()
    (folder / f"{BROKEN_ODS}.sqlite").write_bytes(b"not a database at all " * 100)
    (folder / "notes.txt").write_text("not a store")
    return folder


def status_of(store: str, ods: str | None = None) -> dict:
    opened = Store(store, ods=ods, readonly=True)
    try:
        return opened.status()
    finally:
        opened.close()


@contextmanager
def holding_lock(store: str, ods: str):
    """The practice's job lock held, as a live job holds it, for the block."""
    opened = Store(store, ods=ods)
    lock = StoreLock(opened, ADMIN["user_id"], ADMIN["name"], lambda: datetime.now(timezone.utc))
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
        opened.close()


def check_readings(readings, store_of) -> None:
    """What the fleet monitor reads beyond fleet status, as each practice's store says it."""
    for reading in readings:
        if reading.status != UNREADABLE:
            alone = status_of(store_of(reading.ods_code))
            assert reading.failed_by_code == alone["failed_by_code"]
            assert reading.running == alone["running"]


def check_against_stores(status: dict, store_of) -> None:
    """Each readable practice as ``scr-nb status`` says it; the totals their sums."""
    for practice in status["practices"]:
        assert set(practice) >= {"ods_code", "status", "counters", "latest_job"}
        if practice["status"] == UNREADABLE:
            continue
        assert set(practice) == {"ods_code", "status", "counters", "latest_job"}
        alone = status_of(store_of(practice["ods_code"]))
        assert practice["counters"] == alone["counters"]
        assert practice["latest_job"] == alone["latest_job"]
    assert status["totals"] == {
        name: sum(p["counters"][name] for p in status["practices"] if p["counters"])
        for name in COUNTERS}


def test_fleet_status_of_a_folder_of_sqlite_stores(stores_dir):
    status = fleet_status(stores_dir=str(stores_dir))
    practices = {p["ods_code"]: p for p in status["practices"]}
    assert list(practices) == sorted([*UPLOADED, INTERRUPTED_ODS, NEVER_RUN_ODS, BROKEN_ODS])
    check_against_stores(status, lambda ods: str(stores_dir / f"{ods}.sqlite"))

    for ods in UPLOADED:
        assert practices[ods]["status"] == "completed"
        assert practices[ods]["latest_job"]["mode"] == "run"
        assert practices[ods]["counters"]["sent"] > 0 and practices[ods]["counters"]["failed"] > 0
    assert practices[INTERRUPTED_ODS]["status"] == INTERRUPTED
    assert practices[INTERRUPTED_ODS]["latest_job"]["status"] == RUNNING
    assert practices[INTERRUPTED_ODS]["counters"]["unprocessed"] == 12
    assert practices[NEVER_RUN_ODS] == {"ods_code": NEVER_RUN_ODS, "status": NOT_STARTED,
                                        "counters": dict.fromkeys(COUNTERS, 0),
                                        "latest_job": None}
    broken = practices[BROKEN_ODS]
    assert broken["status"] == UNREADABLE and broken["counters"] is None
    assert str(stores_dir / f"{BROKEN_ODS}.sqlite") in broken["error"]
    assert status["totals"]["unprocessed"] == 12

    crashed = str(stores_dir / f"{INTERRUPTED_ODS}.sqlite")
    with holding_lock(crashed, INTERRUPTED_ODS):
        readings = read_fleet(stores_dir=str(stores_dir))
        assert {r.ods_code: r.status for r in readings}[INTERRUPTED_ODS] == RUNNING
        check_readings(readings, lambda ods: str(stores_dir / f"{ods}.sqlite"))
    assert practices[INTERRUPTED_ODS]["status"] == INTERRUPTED


def test_fleet_status_of_a_postgresql_store(pg_url, tmp_path):
    uploads(tmp_path, lambda ods: pg_url)
    crashed_job(pg_url, INTERRUPTED_ODS)
    status = fleet_status(store=pg_url)
    assert [p["ods_code"] for p in status["practices"]] == sorted([*UPLOADED, INTERRUPTED_ODS])
    check_against_stores(status, lambda ods: practice_url(pg_url, ods))
    states = {p["ods_code"]: p["status"] for p in status["practices"]}
    assert states == {"A12345": "completed", "B82001": "completed", INTERRUPTED_ODS: INTERRUPTED}
    assert status["totals"]["sent"] == sum(status_of(pg_url, ods)["counters"]["sent"]
                                           for ods in UPLOADED)
    with holding_lock(pg_url, INTERRUPTED_ODS):
        readings = read_fleet(store=pg_url, details=True)
        assert {r.ods_code: r.status for r in readings}[INTERRUPTED_ODS] == RUNNING
        check_readings(readings, lambda ods: practice_url(pg_url, ods))
        for reading in readings:   # every eligible patient acknowledged or failed, or still to send
            counts = reading.counters
            assert reading.eligible == counts["sent"] + counts["failed"] + counts["unprocessed"]
    after = fleet_status(store=pg_url)   # the lock went with its connection
    assert {p["ods_code"]: p["status"] for p in after["practices"]}[INTERRUPTED_ODS] == INTERRUPTED

    one = fleet_status(store=practice_url(pg_url, "B82001"))   # a URL naming one practice
    assert [p["ods_code"] for p in one["practices"]] == ["B82001"]
    assert one["totals"] == one["practices"][0]["counters"]


def test_exactly_one_of_store_and_stores_dir(stores_dir, tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        fleet_status()
    with pytest.raises(ValueError, match="not both"):
        fleet_status(store="postgresql://localhost/fleet", stores_dir=str(stores_dir))
    with pytest.raises(ValueError, match="stores_dir"):
        fleet_status(store=str(stores_dir))
    with pytest.raises(StoreError, match="no such folder"):
        fleet_status(stores_dir=str(tmp_path / "absent"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert fleet_status(stores_dir=str(empty)) == {"practices": [],
                                                    "totals": dict.fromkeys(COUNTERS, 0)}


def test_a_practice_status_in_an_operators_words():
    here, me = socket.gethostname(), os.getpid()
    running, paused = {"id": 1, "status": "running"}, {"id": 1, "status": "paused"}
    alive = {"host": here, "pid": me}
    dead = {"host": here, "pid": 2 ** 22 + 12345}   # above any pid this machine hands out
    elsewhere = {"host": here + "-other", "pid": 1}
    assert practice_status(running, alive, here) == RUNNING
    assert practice_status(running, elsewhere, here) == RUNNING
    assert practice_status(running, None, here) == INTERRUPTED
    assert practice_status(running, dead, here) == INTERRUPTED
    assert practice_status(paused, None, here) == PAUSED          # stopped by its user
    assert practice_status(paused, alive, here) == PAUSED         # waiting for its resume time
    assert practice_status(paused, dead, here) == INTERRUPTED
    assert practice_status(None, alive, here) == STARTING
    assert practice_status(None, None, here) == NOT_STARTED
    for ended in ("completed", "stopped", "cancelled"):
        assert practice_status({"id": 2, "status": ended}, None, here) == ended


def test_errors_by_code_progress_and_the_slowest_across_practices(stores_dir):
    readings = read_fleet(stores_dir=str(stores_dir), details=True)
    by_ods = {r.ods_code: r for r in readings}

    errors = fleet.errors_by_code(readings)
    expected: dict[str, dict[str, int]] = {}
    for ods in UPLOADED:
        for code, count in status_of(str(stores_dir / f"{ods}.sqlite"))["failed_by_code"].items():
            expected.setdefault(code, {})[ods] = count
    assert set(errors["code"]) == set(expected) and set(expected) <= set(REJECTIONS)
    for row in errors.itertuples():
        assert row.patients == sum(expected[row.code].values())
        assert row.practices == len(expected[row.code])
        assert row.meaning == explain(row.code)
        assert row.most_affected == max(sorted(expected[row.code]),
                                        key=lambda ods: expected[row.code][ods])
    assert list(errors["patients"]) == sorted(errors["patients"], reverse=True)

    progress = fleet.progress(readings).set_index("ods_code")
    for ods in UPLOADED:
        counts = by_ods[ods].counters
        row = progress.loc[ods]
        assert (row.acknowledged, row.failed, row.remaining) == (counts["sent"],
                                                                 counts["failed"], 0)
        assert row.eligible == counts["sent"] + counts["failed"] + counts["sending"] \
            + counts["unprocessed"]
        assert row.done == 1.0
        assert row.success_rate == pytest.approx(counts["sent"] / (counts["sent"]
                                                                   + counts["failed"]))
    crashed = progress.loc[INTERRUPTED_ODS]
    assert (crashed.eligible, crashed.remaining, crashed.done) == (12, 12, 0.0)
    assert progress.loc[BROKEN_ODS, "status"] == UNREADABLE
    assert "store" in progress.loc[BROKEN_ODS, "error"]

    rates = fleet.rates(readings).set_index("ods_code")
    assert rates.loc["A12345", "finished"] > 0 and rates.loc["A12345", "messages_per_s"] > 0
    slow = fleet.slowest(readings)
    assert list(slow["ods_code"]) == [INTERRUPTED_ODS]   # the only one with patients left
    assert slow.loc[0, "messages_per_s"] == 0

    page = fleet.render(readings)
    for ods in (*UPLOADED, INTERRUPTED_ODS, NEVER_RUN_ODS, BROKEN_ODS):
        assert ods in page
    assert page.count("data:image/png;base64,") == 2
    assert NHS_LIKE.search(EMBEDDED.sub("", page)) is None


def test_the_pace_of_each_practice_and_the_slowest_first():
    """Messages a second of the latest job: finished messages over the seconds from its start to
    its end, or to the reading while it runs; the time to finish only while it runs."""
    read_at = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)

    def reading(ods, status, seconds, finished, remaining, ended_after=None):
        started = read_at - timedelta(seconds=seconds)
        job = {"id": 3, "mode": "resume", "status": "running" if status != "completed" else status,
               "started_at": started.isoformat(),
               "ended_at": (started + timedelta(seconds=ended_after)).isoformat()
               if ended_after else None}
        return PracticeReading(ods, status, read_at, latest_job=job,
                               counters={"unprocessed": remaining, "sending": 0, "sent": finished,
                                         "failed": 0, "not_required": 0},
                               latest_job_counts={"acknowledged": finished - min(finished, 1),
                                                  "failed": min(finished, 1)})

    readings = [reading("F1", RUNNING, 100, 50, 100), reading("S2", RUNNING, 400, 40, 10),
                reading("I3", INTERRUPTED, 1000, 100, 30), reading("Z4", RUNNING, 10, 0, 5),
                reading("D5", "completed", 1000, 60, 0, ended_after=30)]
    rates = fleet.rates(readings).set_index("ods_code")
    assert rates.loc["F1", "messages_per_s"] == 0.5 and rates.loc["F1", "eta_s"] == 200
    assert rates.loc["S2", "messages_per_s"] == 0.1 and rates.loc["S2", "eta_s"] == 100
    assert rates.loc["I3", "messages_per_s"] == 0.1 and pd.isna(rates.loc["I3", "eta_s"])
    assert rates.loc["D5", "messages_per_s"] == 2 and rates.loc["D5", "elapsed_s"] == 30
    assert list(fleet.slowest(readings)["ods_code"]) == ["Z4", "I3", "S2", "F1"]
    assert list(fleet.slowest(readings, count=2)["ods_code"]) == ["Z4", "I3"]


def run_notebook(tmp_path: Path, name: str, **parameters) -> str:
    """Execute the fleet monitor with papermill; the text and HTML of its outputs."""
    out = tmp_path / f"{name}.ipynb"
    papermill.execute_notebook(str(NOTEBOOK), str(out), parameters=parameters,
                               kernel_name="python3", progress_bar=False)
    executed = nbformat.read(out, as_version=4)
    outputs = [o for cell in executed.cells for o in cell.get("outputs", [])]
    return "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/html", ""))
                     for o in outputs)


@pytest.mark.kernel
def test_the_fleet_monitor_notebook_on_both_kinds_of_store(stores_dir, pg_url, tmp_path):
    """Runs a Jupyter kernel twice (papermill): a few seconds each. With neither store the
    notebook shows ``fleet.monitor()``'s message (test_the_live_view_...)."""
    source = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in source.cells if cell.cell_type == "code")
    parameters = source.cells[1]
    assert "parameters" in parameters.metadata["tags"]
    assert "store = None" in parameters.source and "stores_dir = None" in parameters.source

    sqlite_page = run_notebook(tmp_path, "sqlite", stores_dir=str(stores_dir),
                               refresh_seconds=1)
    for ods in (*UPLOADED, INTERRUPTED_ODS, NEVER_RUN_ODS, BROKEN_ODS):
        assert ods in sqlite_page
    assert INTERRUPTED in sqlite_page and "could not be read" in sqlite_page
    assert "30418" in sqlite_page and explain("30418") in sqlite_page
    assert sqlite_page.count("data:image/png;base64,") >= 2
    assert NHS_LIKE.search(EMBEDDED.sub("", sqlite_page)) is None

    shutil.rmtree(tmp_path / "practices", ignore_errors=True)
    uploads(tmp_path, lambda ods: pg_url)
    pg_page = run_notebook(tmp_path, "postgresql", store=pg_url)
    for ods in UPLOADED:
        assert ods in pg_page
    assert "Fleet: 2 practices" in pg_page and "could not be read" not in pg_page
    assert NHS_LIKE.search(EMBEDDED.sub("", pg_page)) is None


def test_the_live_view_reads_again_only_while_it_is_watched(stores_dir, tmp_path):
    folder = tmp_path / "stores"
    folder.mkdir()
    shutil.copy(stores_dir / "A12345.sqlite", folder)
    view = fleet.FleetMonitor(stores_dir=str(folder), live=False)
    assert view.refreshes == 1 and "Fleet: 1 practice<" in view.html
    bundle = view._repr_mimebundle_()
    assert bundle["text/html"] == view.html            # what a papermill run keeps
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert view.output.outputs[0]["data"]["text/html"] == view.html

    shutil.copy(stores_dir / "B82001.sqlite", folder)   # a practice joins the fleet
    assert not view.tick() and view.refreshes == 1     # nobody watches: the one rendering stays
    view.output._view_count = 1                        # as a front end counts its view
    assert view.tick() and view.refreshes == 2
    assert "Fleet: 2 practices" in view.html
    assert "B82001" in view.output.outputs[0]["data"]["text/html"]

    shutil.rmtree(folder)
    view.refresh()                                     # the fleet gone: said, not raised
    assert "could not be read" in view.html
    assert "Nothing to monitor" in fleet.monitor().data   # the notebook's one cell, given neither
    assert "Nothing to monitor" in fleet.monitor(None, "").data
    assert "Nothing to monitor" in fleet.monitor(store="postgresql://h/db", stores_dir="x").data
