"""The control panel driven as an administrator would: its own buttons' click() and .value."""

from __future__ import annotations

import time

from scr_nb.ui.control_panel import ControlPanel
from tests.conftest import ADMIN
from tests.test_engine import eligible_numbers, held


def wait(panel, timeout=60):
    panel.thread.join(timeout)
    assert not panel.thread.is_alive() and not panel.running


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
    assert "Sent: " in panel.statistics.value
    assert panel.progress.value == panel.progress.max
    assert buttons["Run"].disabled and "already run to completion" in buttons["Run"].tooltip
    assert "already run to completion" in panel.mode_message.value
    assert not buttons["Rerun"].disabled
    groups = list(panel.group.options)
    assert groups[0] == "Whole list" and len(groups) > 1


def test_stop_mid_run_then_resume(practice, tmp_path, spine_factory, admin_session, today):
    from scr_nb.spine import session as sessions

    spine = spine_factory(rate_limit_tps=60, rate_limit_burst=1)
    session_file = tmp_path / "session.json"
    sessions.save(sessions.login(spine.url, ADMIN["user_id"], ADMIN["passcode"]), session_file)
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
