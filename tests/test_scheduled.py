"""`scr-nb scheduled`: the scheduled-upload notebook run by papermill, its report, its exit code."""

from __future__ import annotations

import re

from scr_nb.ui import cli
from tests.conftest import ADMIN, CLERK
from tests.test_engine import eligible_numbers, held

IMAGE_DATA = re.compile(r"data:image/[a-z+]+;base64,[A-Za-z0-9+/=]+")   # ten digits can occur in it


def login(spine, user, tmp_path, monkeypatch):
    monkeypatch.setenv("SCR_NB_PASSCODE", user["passcode"])
    session = tmp_path / f"{user['user_id']}.json"
    assert cli.main(["login", "--identity", spine.url, "--user", user["user_id"],
                     "--session", str(session)]) == 0
    return session


def scheduled(practice, tmp_path, spine, session, *extra):
    return cli.main(["scheduled", "--practice", str(practice), "--store",
                     str(tmp_path / "practice.sqlite"), "--spine", spine.url, "--session",
                     str(session), "--mode", "run", "--report-dir", str(tmp_path / "reports"),
                     *extra])


def the_report(tmp_path):
    [folder] = list((tmp_path / "reports" / "practice").iterdir())
    return folder


def test_a_scheduled_run_uploads_everyone_and_files_its_report(practice, tmp_path, spine,
                                                               monkeypatch, capsys, today):
    session = login(spine, ADMIN, tmp_path, monkeypatch)
    assert scheduled(practice, tmp_path, spine, session) == 0
    assert set(held(spine)) == eligible_numbers(practice, today)
    folder = the_report(tmp_path)
    html = (folder / "scheduled_upload.html").read_text(encoding="utf-8")
    assert "Completion statistics" in html and "data:image/png;base64," in html
    assert "Synthetic practice A12345 (ODS A12345)" in html and "Dr Alex Morgan" in html
    assert "Completed" in html
    assert "run_from_parameters" not in html          # inputs hidden
    # no NHS number of the practice, written any way (ten digits in a row also turn up by chance
    # in ids and embedded data, so the practice's own numbers are looked for)
    plain = IMAGE_DATA.sub("", html)
    numbers = eligible_numbers(practice, today)
    assert not [n for n in numbers if n in plain or f"{n[:3]} {n[3:6]} {n[6:]}" in plain]
    assert (folder / "scheduled_upload.ipynb").exists()
    assert "completed" in capsys.readouterr().out


def test_a_refused_scheduled_run_exits_3_and_still_leaves_its_report(practice, tmp_path, spine,
                                                                     monkeypatch):
    session = login(spine, CLERK, tmp_path, monkeypatch)
    assert scheduled(practice, tmp_path, spine, session, "--stop-at", "2099-01-01T00:00") == 3
    assert spine.simulator.stats()["requests"] == 0
    html = (the_report(tmp_path) / "scheduled_upload.html").read_text(encoding="utf-8")
    assert "B0062" in html and "This run was refused and sent nothing." in html
    assert "<img" not in html and "No charts: this run sent nothing" in html


def test_sigterm_stops_a_scheduled_run_cleanly_and_it_still_files_its_report(
        practice, tmp_path, spine_factory, monkeypatch):
    import json
    import signal
    import subprocess
    import sys
    import time

    spine = spine_factory(rate_limit_tps=30, rate_limit_burst=1)
    session = login(spine, ADMIN, tmp_path, monkeypatch)
    command = [sys.executable, "-m", "scr_nb.ui.cli", "scheduled", "--practice", str(practice),
               "--store", str(tmp_path / "practice.sqlite"), "--spine", spine.url,
               "--session", str(session), "--mode", "run", "--rate-limit", "30",
               "--report-dir", str(tmp_path / "reports")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while spine.simulator.stats()["accepted"] < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 4, err
    folder = the_report(tmp_path)
    outcome = json.loads((folder / "outcome.json").read_text())
    assert outcome["job"]["status"] == "stopped" and outcome["job"]["reason"] == "user_stop"
    assert "Resume" in (folder / "scheduled_upload.html").read_text(encoding="utf-8")


def test_scheduled_passes_the_tls_options_to_the_notebook(practice, tmp_path, spine_factory, pki,
                                                         monkeypatch, today):
    """`scr-nb scheduled` over mutual TLS: the options reach the notebook's job."""
    spine = spine_factory(tls=pki.server(mutual=True))
    monkeypatch.setenv("SCR_NB_PASSCODE", ADMIN["passcode"])
    session = tmp_path / "session.json"
    assert cli.main(["login", "--identity", spine.url, "--user", ADMIN["user_id"],
                     "--session", str(session), *pki.client_options()]) == 0
    assert scheduled(practice, tmp_path, spine, session, *pki.client_options()) == 0
    assert set(held(spine)) == eligible_numbers(practice, today)
    notebook = (the_report(tmp_path) / "scheduled_upload.ipynb").read_text(encoding="utf-8")
    assert f'client_cert = \\"{pki.client_cert}\\"' in notebook


def test_a_scheduled_run_on_a_postgresql_store_files_its_report_under_the_ods_code(
        practice, tmp_path, spine, pg_url, monkeypatch, today):
    """The notebook's ``store`` as one string, postgresql://...?ods=A12345."""
    from scr_nb.store.database import practice_url
    from scr_nb.ui.scheduled import report_folder, run_scheduled

    session = login(spine, ADMIN, tmp_path, monkeypatch)
    one_string = practice_url(pg_url, "A12345")
    code, folder = run_scheduled({"practice": str(practice), "store": one_string,
                                  "spine": spine.url, "session": str(session), "mode": "run"},
                                 tmp_path / "reports")
    assert code == 0
    assert set(held(spine)) == eligible_numbers(practice, today)
    assert folder.parent == tmp_path / "reports" / "A12345"
    html = (folder / "scheduled_upload.html").read_text(encoding="utf-8")
    assert "Completion statistics" in html and "data:image/png;base64," in html
    assert f"{pg_url} practice A12345" in html and "Completed" in html
    assert report_folder(tmp_path / "r", pg_url, "A12345").parent.name == "A12345"
