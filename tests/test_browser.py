"""The control panel served by Voila and driven in headless Chromium (Debian's, through Playwright):
Run and OK, the progress moving, Stop, Resume and OK, the completion statistics. A screenshot of the
finished panel is kept under reports/test-artifacts/."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from scr_nb.sim.demo import free_port
from scr_nb.spine import session as sessions
from tests.conftest import ADMIN
from tests.test_engine import eligible_numbers, held
from tests.test_frames import uploaded  # noqa: F401  (a store after Run and Failed)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "reports" / "test-artifacts"


@pytest.fixture
def voila(practice, tmp_path, spine_factory):
    with serving_the_panel(practice, tmp_path, spine_factory,
                           {"SCR_NB_STORE": str(tmp_path / "practice.sqlite")}) as served:
        yield served


@contextmanager
def serving_the_panel(practice, tmp_path, spine_factory, store: dict):
    """The control panel notebook served by Voila, its store named by the variables ``store``;
    yields (its URL, the simulator)."""
    spine = spine_factory(rate_limit_tps=40, rate_limit_burst=1)
    session = tmp_path / "session.json"
    sessions.save(sessions.login(spine.url, ADMIN["user_id"], ADMIN["passcode"]), session)
    port = free_port()
    env = {**os.environ, "SCR_NB_PRACTICE": str(practice), **store, "SCR_NB_SPINE": spine.url,
           "SCR_NB_SESSION": str(session)}
    server = subprocess.Popen(
        [sys.executable, "-m", "voila", str(ROOT / "notebooks" / "control_panel.ipynb"),
         "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"voila exited: {server.stdout.read()}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    try:
        yield url, spine
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def test_the_control_panel_in_a_real_browser(voila, practice, today):
    from playwright.sync_api import expect, sync_playwright

    url, spine = voila
    with sync_playwright() as playwright:
        browser = _browser(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, timeout=60_000)
            button = lambda name: page.get_by_role("button", name=name, exact=True)  # noqa: E731
            expect(button("Run")).to_be_enabled(timeout=60_000)
            expect(page.get_by_text(ADMIN["name"]).first).to_be_visible()
            button("Run").click()
            expect(button("OK")).to_be_enabled()
            button("OK").click()
            expect(page.get_by_text(re.compile(r"[1-9]\d* acknowledged"))).to_be_visible(
                timeout=30_000)
            expect(page.get_by_text(re.compile(r"% of the upload"))).to_be_visible()
            expect(button("Stop")).to_be_enabled()
            button("Stop").click()
            expect(page.get_by_text("Paused: stopped by the user. Resume continues the job.")
                   ).to_be_visible(timeout=30_000)
            assert len(held(spine)) < len(eligible_numbers(practice, today))
            expect(button("Resume")).to_be_enabled(timeout=10_000)
            button("Resume").click()
            button("OK").click()
            expect(page.get_by_text(re.compile(r"Completed: every patient"))).to_be_visible(
                timeout=60_000)
            expect(page.get_by_text("Completion statistics")).to_be_visible()
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "control-panel-finished.png"), full_page=True)
        finally:
            browser.close()
    assert set(held(spine)) == eligible_numbers(practice, today)


def test_the_control_panel_of_a_practice_in_a_postgresql_store(tmp_path, spine_factory, pg_url,
                                                                 today):
    """Under Voila the practice in a PostgreSQL store comes from SCR_NB_STORE and SCR_NB_ODS (a
    small practice: the upload itself is the other browser test's)."""
    from playwright.sync_api import expect, sync_playwright

    from scr_nb.sim.synth import write_practice

    practice = tmp_path / "small"
    write_practice(practice, 60, seed=11)
    with serving_the_panel(practice, tmp_path, spine_factory,
                           {"SCR_NB_STORE": pg_url, "SCR_NB_ODS": "A12345"}) as (url, spine):
        with sync_playwright() as playwright:
            browser = _browser(playwright)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(url, timeout=60_000)
                button = lambda name: page.get_by_role("button", name=name, exact=True)  # noqa
                expect(page.get_by_text(f"{pg_url} practice A12345")).to_be_visible(
                    timeout=60_000)
                expect(button("Run")).to_be_enabled(timeout=60_000)
                button("Run").click()
                expect(button("OK")).to_be_enabled()
                button("OK").click()
                expect(page.get_by_text(re.compile(r"Completed: every patient"))).to_be_visible(
                    timeout=60_000)
                expect(page.get_by_text("Completion statistics")).to_be_visible()
            finally:
                browser.close()
    assert set(held(spine)) == eligible_numbers(practice, today)


def test_a_panel_opened_later_attaches_to_a_running_upload_and_stops_it(voila, practice,
                                                                         tmp_path):
    """The upload runs as a `scr-nb upload run` process; the panel, opened in the browser while it
    runs, shows it with its counters moving, and its Stop reaches that process through the
    store."""
    from playwright.sync_api import expect, sync_playwright

    url, spine = voila
    command = [sys.executable, "-m", "scr_nb", "upload", "run", "--practice", str(practice),
               "--store", str(tmp_path / "practice.sqlite"), "--spine", spine.url,
               "--session", str(tmp_path / "session.json"), "--quiet", "--rate-limit", "15"]
    upload = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while spine.simulator.stats()["accepted"] < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        with sync_playwright() as playwright:
            browser = _browser(playwright)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(url, timeout=60_000)
                button = lambda name: page.get_by_role("button", name=name, exact=True)  # noqa
                expect(page.get_by_text(re.compile("Running now: Dr Alex Morgan"))).to_be_visible(
                    timeout=60_000)
                expect(button("Stop")).to_be_enabled(timeout=10_000)
                expect(button("OK")).to_be_disabled()
                first = page.get_by_text(re.compile(r"% of the upload")).inner_text()
                expect(page.get_by_text(re.compile(r"% of the upload"))).not_to_have_text(
                    first, timeout=10_000)                       # the progress moves
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "control-panel-attached.png"),
                                full_page=True)
                button("Stop").click()
                out, err = upload.communicate(timeout=60)
                assert upload.returncode == 4, err
                expect(page.get_by_text(re.compile("Paused: stopped by the user"))).to_be_visible(
                    timeout=15_000)
            finally:
                browser.close()
    finally:
        if upload.poll() is None:
            upload.kill()
def _browser(playwright):
    assert Path(CHROMIUM).exists(), ("Debian's chromium is needed: apt-get install chromium "
                                     "(scripts/test.sh installs it when it can)")
    return playwright.chromium.launch(
        executable_path=CHROMIUM, headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync"])


@pytest.mark.kernel
def test_the_report_and_the_monitor_read_on_a_laptop_screen(uploaded, tmp_path):
    """The HTML report, the monitor and the support desk (executed and exported as the scheduler
    files them) opened at 1280 pixels wide: nothing runs off the side of the report and the
    monitor, the practice is named, the desk's next steps and filter show, and screenshots are
    kept under reports/test-artifacts/ to be read by eye."""
    import nbformat
    import papermill
    from nbconvert import HTMLExporter
    from playwright.sync_api import sync_playwright

    from scr_nb.reporting.html_report import write_report

    report = write_report(uploaded, tmp_path / "reports")
    executed = tmp_path / "monitor.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / "monitor.ipynb"), str(executed),
                               parameters={"stores": [str(uploaded)]}, kernel_name="python3",
                               progress_bar=False)
    desk_run = tmp_path / "desk.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / "investigate_errors.ipynb"),
                               str(desk_run), parameters={"store": str(uploaded)},
                               kernel_name="python3", progress_bar=False)
    exporter = HTMLExporter()
    exporter.exclude_input = True
    monitor, desk = tmp_path / "monitor.html", tmp_path / "desk.html"
    for source, page in ((executed, monitor), (desk_run, desk)):
        body, _ = exporter.from_notebook_node(nbformat.read(source, as_version=4))
        page.write_text(body, encoding="utf-8")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = _browser(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            for path, shot in ((report, "report.png"), (monitor, "monitor.png")):
                page.goto(path.as_uri())
                assert page.evaluate("document.documentElement.scrollWidth") <= 1280, shot
                assert page.get_by_text("Synthetic practice A12345 (A12345)").first.is_visible()
                page.screenshot(path=str(ARTIFACTS / shot), full_page=True)
            page.goto(desk.as_uri())
            assert page.get_by_text(re.compile("Next: ")).first.is_visible()
            assert page.get_by_text(re.compile(r"^Filter")).first.is_visible()   # in the export
            page.screenshot(path=str(ARTIFACTS / "support-desk.png"), full_page=True)
        finally:
            browser.close()
