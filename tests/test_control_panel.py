"""The control panel driven as an administrator would: its own buttons' click() and .value."""

from __future__ import annotations

import time

from scr_nb.ui.control_panel import ControlPanel
from tests.conftest import ADMIN
from tests.test_engine import eligible_numbers, held


def wait(panel, timeout=60):
    panel.thread.join(timeout)
    assert not panel.thread.is_alive() and not panel.running


def logged_in(spine, tmp_path):
    """The administrator's session file for ``spine``."""
    from scr_nb.spine import session as sessions

    path = tmp_path / "session.json"
    sessions.save(sessions.login(spine.url, ADMIN["user_id"], ADMIN["passcode"]), path)
    return path


def panel_for(practice, tmp_path, spine, session=""):
    return ControlPanel(str(practice), str(tmp_path / "practice.sqlite"), spine.url, session)


def test_log_in_run_ok_and_the_buttons_follow_the_state(practice, tmp_path, spine, today):
    panel = panel_for(practice, tmp_path, spine)
    assert "Not logged in" in panel.session_line.value
    panel.user.value, panel.passcode.value = ADMIN["user_id"], ADMIN["passcode"]
    panel.login_button.click()
    assert ADMIN["name"] in panel.session_line.value and "card expiry" in panel.session_line.value
    assert panel.passcode.value == ""
    buttons = panel.mode_buttons
    assert not buttons["Run"].disabled
    assert buttons["Resume"].disabled and buttons["Failed"].disabled
    assert panel.ok.disabled                          # no mode chosen yet
    buttons["Run"].click()
    panel.ok.click()
    wait(panel)
    assert panel.outcome.exit_code == 0
    assert set(held(spine)) == eligible_numbers(practice, today)
    assert "Completion statistics" in panel.statistics.value and ">Sent<" in panel.statistics.value
    assert "Completed: every patient" in panel.phase.value
    assert panel.progress.value == panel.progress.max
    assert buttons["Run"].disabled and "already run to completion" in buttons["Run"].tooltip
    assert "already run to completion" in panel.mode_message.value
    assert not buttons["Rerun"].disabled
    groups = list(panel.group.options)
    assert groups[0] == "Whole list" and len(groups) > 1


def test_stop_mid_run_then_resume(practice, tmp_path, spine_factory, admin_session, today):
    spine = spine_factory(rate_limit_tps=60, rate_limit_burst=1)
    session_file = logged_in(spine, tmp_path)
    panel = panel_for(practice, tmp_path, spine, str(session_file))
    panel.mode_buttons["Run"].click()
    panel.rate_limit.value = 60
    panel.ok.click()
    deadline = time.monotonic() + 30
    while panel.progress.value < 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not panel.stop_button.disabled, (panel.outcome, panel.progress.value, panel.running)
    panel.stop_button.click()
    wait(panel)
    assert panel.outcome.exit_code == 4 and "paused (user_stop)" in panel.outcome.message
    assert "Paused: stopped by the user. Resume continues the job." in panel.phase.value
    assert not panel.mode_buttons["Resume"].disabled
    assert "partially completed" in panel.mode_buttons["Run"].tooltip
    panel.mode_buttons["Resume"].click()
    panel.rate_limit.value = 0
    panel.ok.click()
    wait(panel)
    assert panel.outcome.exit_code == 0
    assert set(held(spine)) == eligible_numbers(practice, today)


def test_the_control_panel_notebook_runs_under_papermill(practice, tmp_path, spine):
    import papermill

    from scr_nb.ui.scheduled import NOTEBOOK

    out = tmp_path / "control_panel.ipynb"
    papermill.execute_notebook(str(NOTEBOOK.parent / "control_panel.ipynb"), str(out),
                               parameters={"practice": str(practice),
                                           "store": str(tmp_path / "s.sqlite"),
                                           "spine": spine.url, "session": ""},
                               kernel_name="python3", progress_bar=False)
    text = out.read_text()
    assert "application/vnd.jupyter.widget-view+json" in text


def test_the_panel_logs_in_and_uploads_over_mutual_tls_from_the_environment(
        practice, tmp_path, spine_factory, pki, monkeypatch, today):
    """Under Voila the TLS settings come from SCR_NB_CA_BUNDLE, SCR_NB_CLIENT_CERT and
    SCR_NB_CLIENT_KEY, as the notebook's parameters cell reads them."""
    spine = spine_factory(tls=pki.server(mutual=True))
    monkeypatch.setenv("SCR_NB_CA_BUNDLE", str(pki.ca))
    monkeypatch.setenv("SCR_NB_CLIENT_CERT", str(pki.client_cert))
    monkeypatch.setenv("SCR_NB_CLIENT_KEY", str(pki.client_key))
    panel = panel_for(practice, tmp_path, spine)
    panel.user.value, panel.passcode.value = ADMIN["user_id"], ADMIN["passcode"]
    panel.login_button.click()
    assert ADMIN["name"] in panel.session_line.value
    panel.mode_buttons["Run"].click()
    panel.ok.click()
    wait(panel)
    assert panel.outcome.exit_code == 0, panel.outcome.message
    assert set(held(spine)) == eligible_numbers(practice, today)

    stranger = ControlPanel(str(practice), str(tmp_path / "other.sqlite"), spine.url, "",
                            client_cert=str(pki.stranger_cert), client_key=str(pki.stranger_key))
    stranger.user.value, stranger.passcode.value = ADMIN["user_id"], ADMIN["passcode"]
    stranger.login_button.click()
    assert "Login refused" in stranger.session_line.value
    assert "refused the client certificate" in stranger.session_line.value


def test_a_panel_opened_while_a_job_runs_elsewhere_shows_it_and_stops_it(
        practice, tmp_path, spine_factory, today):
    """The job runs in another panel (standing in for another kernel or machine); a second panel
    opened later sees it running, its counters moving, and stops it through the store."""
    spine = spine_factory(rate_limit_tps=50, rate_limit_burst=1)
    session_file = logged_in(spine, tmp_path)
    first = panel_for(practice, tmp_path, spine, str(session_file))
    first.mode_buttons["Run"].click()
    first.ok.click()
    time.sleep(1.5)
    second = ControlPanel(str(practice), str(tmp_path / "practice.sqlite"), spine.url,
                          str(session_file), live=False)
    second.refresh()
    assert second.attached is not None and "Running now: Dr Alex Morgan" in second.store_line.value
    assert not second.stop_button.disabled and second.ok.disabled
    assert all(b.disabled for b in second.mode_buttons.values())
    seen = second.counters.value
    time.sleep(1.2)
    second.refresh()
    assert second.counters.value != seen                     # Vision's counters are live
    second.stop_button.click()
    wait(first)
    assert first.outcome.job["status"] == "paused"
    second.refresh()
    assert second.attached is None and not second.mode_buttons["Resume"].disabled
    assert "stopped by the user" in second.store_line.value
    first.close()


def test_ok_says_why_it_is_disabled_and_the_login_folds_away(practice, tmp_path, spine):
    from tests.conftest import CLERK

    panel = panel_for(practice, tmp_path, spine)
    assert panel.ok.disabled and "log in first" in panel.ok_reason.value
    panel.user.value, panel.passcode.value = CLERK["user_id"], CLERK["passcode"]
    panel.login_button.click()
    assert panel.login_box.layout.display == "none"            # folded after login
    assert "does not hold B0062" in panel.session_line.value
    panel.mode_buttons["Run"].click()
    assert panel.ok.disabled and "does not hold B0062" in panel.ok_reason.value
    panel.close()


def test_cancel_asks_first_and_bad_options_start_nothing(practice, tmp_path, spine,
                                                         admin_session):
    from scr_nb.spine import session as sessions

    session_file = tmp_path / "session.json"
    sessions.save(admin_session, session_file)
    panel = panel_for(practice, tmp_path, spine, str(session_file))
    panel.mode_buttons["Run"].click()
    panel.rate_limit.value = -1
    panel.ok.click()
    assert not panel.running and "--rate-limit must be" in panel.ok_reason.value
    assert not (tmp_path / "practice.sqlite").exists()
    panel.cancel_button.click()
    assert panel.confirm_cancel.layout.display is None and panel.cancel_button.layout.display == "none"
    panel.keep_going.click()
    assert panel.confirm_cancel.layout.display == "none"
    panel.rate_limit.value = 0
    panel.check_button.click()
    assert "Ready: every check passed." in panel.checks.value
    panel.close()


def test_scr_nb_stop_reaches_a_job_started_from_a_panel(practice, tmp_path, spine_factory):
    import subprocess
    import sys

    spine = spine_factory(rate_limit_tps=40, rate_limit_burst=1)
    session_file = logged_in(spine, tmp_path)
    panel = panel_for(practice, tmp_path, spine, str(session_file))
    panel.mode_buttons["Run"].click()
    panel.ok.click()
    time.sleep(1.0)
    stopped = subprocess.run([sys.executable, "-m", "scr_nb", "stop", "--store",
                              str(tmp_path / "practice.sqlite")], capture_output=True, text=True,
                             timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    wait(panel)
    assert panel.outcome.job["status"] == "paused" and panel.outcome.exit_code == 4
    panel.close()


def test_panels_on_the_practices_of_a_postgresql_store(practice, tmp_path, spine, pg_url, today):
    """A panel names its practice in a PostgreSQL store by ``ods`` or inside the URL; each
    practice's panel shows that practice alone."""
    from scr_nb.store.database import practice_url
    from scr_nb.ui.control_panel import counters_table

    session_file = logged_in(spine, tmp_path)
    panel = ControlPanel(str(practice), pg_url, spine.url, str(session_file), live=False,
                         ods="A12345")
    assert f"{pg_url} practice A12345" in panel.title.value
    assert not panel.mode_buttons["Run"].disabled and panel.mode_buttons["Resume"].disabled
    panel.mode_buttons["Run"].click()
    panel.ok.click()
    wait(panel)
    assert panel.outcome.exit_code == 0, panel.outcome.message
    assert set(held(spine)) == eligible_numbers(practice, today)
    assert panel.progress.value == panel.progress.max > 1

    again = ControlPanel(str(practice), practice_url(pg_url, "A12345"), spine.url,
                         str(session_file), live=False)
    assert again.counters.value == panel.counters.value != counters_table({})
    assert "already run to completion" in again.mode_buttons["Run"].tooltip
    assert not again.mode_buttons["Rerun"].disabled and again.ok_reason.value

    other = ControlPanel(str(practice), pg_url, spine.url, str(session_file), live=False,
                         ods="B82001")
    assert other.counters.value == counters_table({})
    assert not other.mode_buttons["Run"].disabled
    assert other.mode_buttons["Resume"].disabled and other.mode_buttons["Failed"].disabled

    nameless = ControlPanel(str(practice), pg_url, spine.url, str(session_file), live=False)
    assert "No store" in nameless.mode_message.value and "--ods" in nameless.mode_message.value
    assert all(b.disabled for b in nameless.mode_buttons.values())
    assert nameless.ok.disabled
