"""The analyst's side: the frames of ``scr_nb.reporting.frames`` agree with ``Store.status()`` on a store
filled by real jobs against the simulator, in an SQLite file and in a PostgreSQL database shared with
another practice, NHS numbers stay masked, the HTML report is whole, and the monitor notebook runs
under papermill."""

from __future__ import annotations

import re
import shutil
import stat
from pathlib import Path

import nbformat
import pandas as pd
import papermill
import pytest

from scr_nb.errors import StoreError
from scr_nb.job.engine import Engine
from scr_nb.job.options import JobOptions
from scr_nb.reporting import frames
from scr_nb.reporting.html_report import write_report
from scr_nb.sim.spine_sim import SimConfig, SimulatorThread
from scr_nb.sim.synth import write_practice
from scr_nb.spine import session as sessions
from scr_nb.store.database import Location, practice_url
from scr_nb.store.practice_store import Store
from scr_nb.store.states import Mode
from tests.conftest import ADMIN, USERS
from tests.test_engine import job

ROOT = Path(__file__).resolve().parents[1]
MONITOR = ROOT / "notebooks" / "monitor.ipynb"
NHS_LIKE = re.compile(r"\b\d{10}\b|\d{3} \d{3} \d{4}")
CSV_DATA = re.compile(r"data:text/csv;base64,[A-Za-z0-9+/=]+")
IMAGE_DATA = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")

EVERY_FRAME = {
    "completion": frames.completion, "not_required": frames.not_required,
    "jobs": frames.jobs, "messages": frames.messages, "throughput": frames.throughput,
    "ack_latency": frames.ack_latency,
    "ack_latency_percentiles": frames.ack_latency_percentiles,
    "failures": frames.failures, "failures_by_code": frames.failures_by_code,
    "failures_by_category": frames.failures_by_category,
    "failures_by_job": frames.failures_by_job,
}


@pytest.fixture(scope="module")
def uploaded(tmp_path_factory, synthetic_practice):
    """A store after a Run with Spine rejections (30418, 35160) and a Failed job after it. Built
    once for the module, so it starts its own simulator as ``spine_factory`` does."""
    where = tmp_path_factory.mktemp("uploaded")
    practice = where / "practice"
    shutil.copytree(synthetic_practice, practice)
    sim = SimulatorThread(SimConfig(users=USERS, poll_retry_after_ms=5, seed=1,
                                    reject_rates={"30418": 0.1, "35160": 0.05}))
    sim.start()
    try:
        session = sessions.login(sim.url, ADMIN["user_id"], ADMIN["passcode"])
        first = job(where, session, sim, practice, "run")
        second = job(where, session, sim, practice, "failed")
    finally:
        sim.stop()
    assert first.completed and second.completed
    return where / "practice.sqlite"


@pytest.fixture(scope="module")
def uploaded_pg(postgres_server, tmp_path_factory, synthetic_practice):
    """``uploaded`` in PostgreSQL: practice A12345 after a Run with Spine rejections and a Failed
    job, in one database with practice B82001 after a clean Run of its own (its patients carry
    the same patient ids). The one string naming A12345's store."""
    where = tmp_path_factory.mktemp("uploaded_pg")
    neighbour = where / "neighbour"
    write_practice(neighbour, 60, seed=5, ods_code="B82001", name="Neighbour Surgery")
    sim = SimulatorThread(SimConfig(users=USERS, poll_retry_after_ms=5, seed=1))
    sim.start()
    with postgres_server.fresh_database("frames_uploaded") as url:
        try:
            session = sessions.login(sim.url, ADMIN["user_id"], ADMIN["passcode"])
            assert pg_job(url, "B82001", session, sim, neighbour, "run").completed
            sim.simulator.config.reject_rates = {"30418": 0.1, "35160": 0.05}
            assert pg_job(url, "A12345", session, sim, synthetic_practice, "run").completed
            assert pg_job(url, "A12345", session, sim, synthetic_practice, "failed").completed
        finally:
            sim.stop()
        yield practice_url(url, "A12345")


def pg_job(url, ods, session, sim, practice, mode):
    store = Store(url, ods=ods)
    try:
        return Engine(store, session, sim.url, practice).run(
            JobOptions(mode=Mode(mode), concurrency=8))
    finally:
        store.close()


def status_of(where) -> dict:
    store = Store(where)
    try:
        return store.status()
    finally:
        store.close()


def query(where, sql: str) -> list[tuple]:
    """The rows of ``sql``, whose one ``?`` is the store's practice."""
    store = Store(where)
    try:
        return store.db.rows(sql, (store.ods,))
    finally:
        store.close()


def nhs_like(frame) -> list[str]:
    """Every string value in a frame that looks like an NHS number, whole or spaced."""
    return [v for column in frame.columns for v in frame[column]
            if isinstance(v, str) and NHS_LIKE.search(v)]


def test_frames_agree_with_the_store_status(uploaded):
    frames_agree_with_the_store_status(uploaded)


def frames_agree_with_the_store_status(uploaded):
    status = status_of(uploaded)
    assert status["counters"]["failed"] > 0     # the rejections left some failures to count

    (completion,) = frames.completion([uploaded]).to_dict("records")
    assert {k: completion[k] for k in status["counters"]} == status["counters"]
    assert completion["patients"] == sum(status["states"].values())
    assert completion["acknowledged"] == status["states"]["acknowledged"]

    failures = frames.failures(uploaded)
    assert len(failures) == status["counters"]["failed"]
    assert set(failures["patient_id"]) == {
        r[0] for r in query(uploaded, "SELECT patient_id FROM patients "
                                      "WHERE ods = ? AND state = 'failed'")}
    words = {"30418": "Dissent is recorded on the Spine for this patient (access control)",
             "35160": "NHS number missing or incorrect"}
    assert all(words[c] == w for c, w in zip(failures["code"], failures["words"]))
    by_code = frames.failures_by_code(uploaded)
    assert dict(zip(by_code["code"], by_code["patients"])) == status["failed_by_code"]
    assert dict(zip(by_code["code"], by_code["category"])) == {
        code: {"30418": "access", "35160": "data"}[code] for code in status["failed_by_code"]}
    by_category = frames.failures_by_category(uploaded)
    assert by_category["patients"].sum() == status["counters"]["failed"]

    not_required = frames.not_required(uploaded)
    assert dict(zip(not_required["reason"], not_required["patients"])) == \
        status["not_required_by_reason"]

    jobs = frames.jobs(uploaded)
    run, failed = jobs.to_dict("records")
    assert (run["mode"], failed["mode"]) == ("run", "failed")
    assert run["status"] == failed["status"] == "completed"
    assert run["counted_from"] == failed["counted_from"] == "totals"
    assert run["to_send"] == run["eligible_in_scope"] == status["counters"]["sent"] + \
        status["counters"]["failed"]
    assert run["acknowledged"] + run["failed"] == run["to_send"]
    assert failed["to_send"] == run["failed"]           # Failed resends exactly the failures
    assert run["acknowledged"] + failed["acknowledged"] == status["counters"]["sent"]
    assert failed["failed"] == status["counters"]["failed"]
    assert run["success_rate"] == pytest.approx(
        run["acknowledged"] / (run["acknowledged"] + run["failed"]))
    assert failed["acknowledged_of_eligible"] == pytest.approx(
        failed["acknowledged"] / failed["eligible_in_scope"])
    assert (jobs["duration_s"] > 0).all()

    by_job = frames.failures_by_job(uploaded)
    assert by_job.groupby("job_id")["failed"].sum().to_dict() == {1: run["failed"],
                                                                   2: failed["failed"]}

    messages = frames.messages(uploaded)
    assert len(messages) == run["to_send"] + failed["to_send"]
    per_period = frames.throughput(uploaded, freq="1s")
    assert per_period["queued"].sum() == per_period["transmitted"].sum() == len(messages)
    assert per_period["acknowledged"].sum() == status["counters"]["sent"]
    assert per_period["failed"].sum() == run["failed"] + failed["failed"]
    assert per_period["period"].is_monotonic_increasing

    latency = frames.ack_latency(uploaded)
    assert len(latency) == len(messages) and (latency["latency_s"] >= 0).all()
    assert set(latency["ack_type"]) == {"AA", "AE"}
    percentiles = frames.ack_latency_percentiles(uploaded).set_index("job_id")
    assert percentiles["acks"].to_dict() == {1: run["to_send"], 2: failed["to_send"]}
    assert (percentiles["p50"] <= percentiles["p90"]).all()
    assert (percentiles["p90"] <= percentiles["p99"]).all()
    assert (percentiles["p99"] <= percentiles["max"]).all()


def test_no_nhs_number_in_any_frame_unless_asked(uploaded):
    no_nhs_number_in_any_frame_unless_asked(uploaded)


def no_nhs_number_in_any_frame_unless_asked(uploaded):
    for name, frame_of in EVERY_FRAME.items():
        assert nhs_like(frame_of([uploaded])) == [], name
    masked = frames.failures(uploaded)
    assert masked["nhs_number"].str.fullmatch(r"\d{3} \*\*\* \d{4}").all()

    shown = frames.failures(uploaded, show_nhs=True)
    assert len(nhs_like(shown)) == len(shown) > 0        # the check above can fail
    numbers = dict(query(uploaded, "SELECT patient_id, nhs_number FROM patients WHERE ods = ?"))
    assert all(numbers[p] == n for p, n in zip(shown["patient_id"], shown["nhs_number"]))
    assert [n[:3] + n[6:] for n in shown["nhs_number"]] == \
        [n.replace(" *** ", "") for n in masked["nhs_number"]]


def test_report_holds_the_counters_and_charts_with_numbers_masked(uploaded, tmp_path):
    status = status_of(uploaded)
    path = write_report(uploaded, tmp_path / "reports")
    assert re.fullmatch(r"report-practice-\d{8}T\d{6}Z\.html", path.name)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600     # patient ids: the owner only
    text = path.read_text(encoding="utf-8")
    c = status["counters"]
    assert ("<tr><th>Unprocessed</th><th>Sending</th><th>Sent</th><th>Failed</th>"
            "<th>Not Required</th></tr>") in text
    assert (f"<tr><td>{c['unprocessed']}</td><td>{c['sending']}</td><td>{c['sent']}</td>"
            f"<td>{c['failed']}</td><td>{c['not_required']}</td></tr>") in text
    assert '<img src="data:image/png;base64,' in text
    assert "NHS number missing or incorrect" in text or "Dissent is recorded" in text
    assert NHS_LIKE.search(IMAGE_DATA.sub("", text)) is None
    assert re.search(r"<td>\d{3} \*\*\* \d{4}</td>", text)

    shown = write_report(uploaded, tmp_path / "reports", show_nhs=True)
    assert shown != path
    failed = frames.failures(uploaded, show_nhs=True)
    assert f"<td>{failed['nhs_number'].iloc[0]}</td>" in shown.read_text(encoding="utf-8")


def test_report_on_an_empty_store_escapes_its_name(tmp_path):
    odd = tmp_path / "a<b>&c.sqlite"
    Store(odd).close()
    text = write_report(odd, tmp_path / "out").read_text(encoding="utf-8")
    assert "No jobs have run on this store." in text and "No failed patients." in text
    assert "<tr><td>0</td><td>0</td><td>0</td><td>0</td><td>0</td></tr>" in text
    assert "a<b>" not in text and "a&lt;b&gt;&amp;c" in text
    with pytest.raises(StoreError, match="no such store"):
        write_report(tmp_path / "missing.sqlite", tmp_path / "out")
    with pytest.raises(StoreError, match="no such store"):
        frames.jobs([tmp_path / "missing.sqlite"])
    assert not (tmp_path / "missing.sqlite").exists()


def test_a_clean_run_watched_while_it_runs_and_beside_another_store(
        tmp_path, spine, admin_session, practice, uploaded):
    store = tmp_path / "practice.sqlite"
    seen = []

    def watch(progress):
        if progress.queued and not seen:
            seen.append(frames.jobs(store).iloc[0].to_dict())

    result = job(tmp_path, admin_session, spine, practice, "run", on_progress=watch)
    assert result.completed
    (running,) = seen
    assert running["status"] == "running" and running["counted_from"] == "messages"
    assert running["queued"] >= 1 and pd.isna(running["ended_at"])

    assert frames.failures(store).empty
    text = write_report(store, tmp_path / "out").read_text(encoding="utf-8")
    assert "No failed patients." in text and "No job met a failure." in text
    assert '<img src="data:image/png;base64,' in text

    both = frames.jobs([store, uploaded])
    assert both["practice"].nunique() == 2                # same file name, told apart
    assert both.groupby("store")["job_id"].count().to_dict() == {str(store): 1,
                                                                 str(uploaded): 2}
    assert set(frames.failures_by_code([store, uploaded])["store"]) == {str(uploaded)}


@pytest.mark.kernel
def test_monitor_notebook_runs_in_a_kernel_with_stores_and_with_none(uploaded, tmp_path):
    """Runs a Jupyter kernel twice (papermill): a few seconds each."""
    source = nbformat.read(MONITOR, as_version=4)
    assert all(not cell.get("outputs") for cell in source.cells if cell.cell_type == "code")
    assert "parameters" in source.cells[1].metadata["tags"]

    for stores, out in (([str(uploaded)], "with.ipynb"), ([], "without.ipynb")):
        papermill.execute_notebook(str(MONITOR), str(tmp_path / out),
                                   parameters={"stores": stores}, kernel_name="python3",
                                   progress_bar=False)
    executed = nbformat.read(tmp_path / "with.ipynb", as_version=4)
    outputs = [o for cell in executed.cells for o in cell.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                     + str(o.get("data", {}).get("text/html", "")) for o in outputs)
    assert "Completed" in text and ("30418" in text or "35160" in text)
    assert "What to do" in text and 'download="errors.csv"' in text
    assert "practice.sqlite" not in text.replace(str(uploaded), "")   # practices by name
    assert NHS_LIKE.search(IMAGE_DATA.sub("", CSV_DATA.sub("", text))) is None

    empty = nbformat.read(tmp_path / "without.ipynb", as_version=4)
    printed = [o.get("text", "") for cell in empty.cells for o in cell.get("outputs", [])
               if o.get("output_type") == "stream"]
    assert any("Nothing to show" in p for p in printed)


def test_the_monitors_filters_and_csv_exports(uploaded):
    import base64
    from datetime import date, timedelta

    from scr_nb.reporting.monitor import Monitor, csv_link

    monitor = Monitor([uploaded])
    assert len(monitor.tables["jobs"]) == 2 and not monitor.tables["errors"].empty
    assert monitor.tables["errors"]["What to do"].str.contains("Failed|Do not re-send").all()
    first = monitor.jobs.options[0][1]
    monitor.jobs.value = (first,)
    assert list(monitor.tables["jobs"]["Job"]) == [first]
    monitor.jobs.value = ()
    monitor.since.value = date.today() + timedelta(days=1)
    assert monitor.tables["jobs"].empty and "Nothing matches" in monitor.output.value
    monitor.since.value = None
    monitor.practices.value = (monitor.practices.options[0],)
    assert len(monitor.tables["jobs"]) == 2
    link = csv_link(monitor.tables["jobs"], "jobs")
    data = base64.b64decode(re.search(r"base64,([^\"]+)", link).group(1)).decode()
    assert data.splitlines()[0].startswith("Practice,Job,Mode") and len(data.splitlines()) == 3


# --- a PostgreSQL store of two practices ------------------------------------------------------------

def test_frames_agree_with_the_status_of_a_postgresql_practice(uploaded_pg):
    frames_agree_with_the_store_status(uploaded_pg)
    no_nhs_number_in_any_frame_unless_asked(uploaded_pg)


def test_each_practice_of_a_postgresql_store_reads_as_its_own(uploaded_pg):
    neighbour = uploaded_pg.replace("ods=A12345", "ods=B82001")
    url = uploaded_pg.split("?")[0]
    both = frames.completion([uploaded_pg, neighbour])
    assert list(both["store"]) == [uploaded_pg, neighbour]      # the URL, as it can be given
    assert list(both["practice"]) == ["Synthetic practice A12345 (A12345)",
                                      "Neighbour Surgery (B82001)"]
    for row, where in zip(both.to_dict("records"), (uploaded_pg, neighbour)):
        status = status_of(where)
        assert {k: row[k] for k in status["counters"]} == status["counters"]
        assert row["patients"] == sum(status["states"].values())
    assert both["patients"].tolist() == [400, 60]

    jobs = frames.jobs([uploaded_pg, neighbour])
    assert jobs.groupby("practice", sort=False)["job_id"].apply(list).tolist() == [[1, 2], [1]]
    assert frames.failures(neighbour).empty and frames.messages(neighbour)["current"].all()
    assert len(frames.messages(uploaded_pg)) == jobs["to_send"].iloc[:2].sum()
    # the practice named by the ods keyword's Location reads the same as by the one string
    by_location = frames.failures(Location.of(url, ods="A12345"))
    pd.testing.assert_frame_equal(by_location, frames.failures(uploaded_pg))

    with pytest.raises(StoreError, match="name one with --ods"):
        frames.jobs(url)


def test_report_of_a_postgresql_practice_never_shows_the_password(uploaded_pg, tmp_path):
    url = uploaded_pg.split("?")[0]
    status = status_of(uploaded_pg)
    # trust authentication: the server never asks for the password, so any one connects
    secret = url.replace("postgresql://postgres@", "postgresql://postgres:s3cret-pw@")
    path = write_report(secret, tmp_path / "reports", ods="A12345")
    assert re.fullmatch(r"report-A12345-\d{8}T\d{6}Z\.html", path.name)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text(encoding="utf-8")
    c = status["counters"]
    assert (f"<tr><td>{c['unprocessed']}</td><td>{c['sending']}</td><td>{c['sent']}</td>"
            f"<td>{c['failed']}</td><td>{c['not_required']}</td></tr>") in text
    assert "Synthetic practice A12345 (A12345)" in text and "Neighbour" not in text
    assert '<img src="data:image/png;base64,' in text
    assert re.search(r"<td>\d{3} \*\*\* \d{4}</td>", text)
    assert "s3cret-pw" not in text and "postgres:***@" in text
    assert list(frames.jobs(practice_url(secret, "A12345"))["store"].unique()) == [
        practice_url(url.replace("postgres@", "postgres:***@"), "A12345")]
    assert write_report(uploaded_pg, tmp_path / "again").name.startswith("report-A12345-")


@pytest.mark.kernel
def test_monitor_notebook_compares_practices_of_a_postgresql_store(uploaded_pg, tmp_path):
    """The monitor's ``stores`` as one string each: postgresql://...?ods=CODE."""
    neighbour = uploaded_pg.replace("ods=A12345", "ods=B82001")
    papermill.execute_notebook(str(MONITOR), str(tmp_path / "pg.ipynb"),
                               parameters={"stores": [uploaded_pg, neighbour]},
                               kernel_name="python3", progress_bar=False)
    executed = nbformat.read(tmp_path / "pg.ipynb", as_version=4)
    outputs = [o for cell in executed.cells for o in cell.get("outputs", [])]
    text = "\n".join(str(o.get("data", {}).get("text/html", "")) for o in outputs)
    assert "Synthetic practice A12345 (A12345)" in text and "Neighbour Surgery (B82001)" in text
    assert "30418" in text or "35160" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5
    assert NHS_LIKE.search(IMAGE_DATA.sub("", CSV_DATA.sub("", text))) is None
