"""The administrator's control panel (SPEC 9): Vision's Initial Upload dialog as ipywidgets.

Choose a mode (Run, Resume, Rerun, Failed; each enabled only where the store allows it, with
Vision's message where not), a Patient Group and the schedule, then OK. The job runs on a thread of
its own, so the kernel stays responsive and Stop, Stop and Close and Cancel work mid-run. The thread
only sets widget values (it never prints: ipykernel routes a thread's output unpredictably).
"""

from __future__ import annotations

import html
import threading
from datetime import datetime, timezone
from pathlib import Path

import ipywidgets as w

from scr_nb.errors import ScrNbError, StoreError
from scr_nb.extract.reader import load_groups
from scr_nb.job.modes import refusal
from scr_nb.job.options import JobControl, JobOptions, Progress
from scr_nb.job.runner import Outcome, format_statistics, run_upload
from scr_nb.job.schedule import Schedule
from scr_nb.spine import session as sessions
from scr_nb.spine.tls import TlsSettings
from scr_nb.store.practice_store import Store
from scr_nb.store.schema import DatabaseError
from scr_nb.store.states import Mode

MODES = (("Run", Mode.RUN), ("Resume", Mode.RESUME), ("Rerun", Mode.RERUN),
         ("Failed", Mode.FAILED))
WHOLE_LIST = "Whole list"


def _aware(moment: datetime | None) -> datetime | None:
    return None if moment is None else (moment.astimezone() if moment.tzinfo is None else moment)


class ControlPanel:
    """The panel for one practice. ``ca_bundle``, ``client_cert`` and ``client_key`` are the TLS
    settings for the Spine and its identity provider; those not given come from SCR_NB_CA_BUNDLE,
    SCR_NB_CLIENT_CERT and SCR_NB_CLIENT_KEY."""

    def __init__(self, practice: str, store: str, spine: str, session: str = "",
                 ca_bundle: str | None = None, client_cert: str | None = None,
                 client_key: str | None = None):
        self.practice, self.store_path, self.spine = practice, store, spine
        self.session_path = session
        self.tls = TlsSettings.from_options(ca_bundle, client_cert, client_key)
        self.mode: Mode | None = None
        self.control: JobControl | None = None
        self.thread: threading.Thread | None = None
        self.outcome: Outcome | None = None
        self._busy = False

        self.session_line = w.HTML()
        self.user = w.Text(description="User")
        self.passcode = w.Password(description="Passcode")
        self.login_button = w.Button(description="Log in")
        self.login_button.on_click(lambda _: self.login())
        self.mode_buttons = {label: w.Button(description=label) for label, _ in MODES}
        for label, mode in MODES:
            self.mode_buttons[label].on_click(lambda _, m=mode: self.choose(m))
        self.mode_message = w.HTML()
        self.group = w.Dropdown(description="Patient Group", options=[WHOLE_LIST])
        self.group.observe(lambda _: self.refresh(), names="value")
        # Timezone-aware pickers: the time the administrator types is their browser's local time.
        self.start_at = w.DatetimePicker(description="Start at")
        self.stop_at = w.DatetimePicker(description="Stop at")
        self.pause_at = w.DatetimePicker(description="Pause at")
        self.resume_at = w.DatetimePicker(description="Resume at")
        self.rate_limit = w.FloatText(description="Rate limit/s", value=0.0)
        self.concurrency = w.BoundedIntText(description="Concurrency", value=8, min=1, max=256)
        self.ok = w.Button(description="OK", button_style="primary")
        self.ok.on_click(lambda _: self.start())
        self.stop_button = w.Button(description="Stop")
        self.stop_close_button = w.Button(description="Stop and Close")
        self.cancel_button = w.Button(description="Cancel", button_style="danger")
        self.stop_button.on_click(lambda _: self.control and self.control.stop())
        self.stop_close_button.on_click(lambda _: self.control and self.control.stop_and_close())
        self.cancel_button.on_click(lambda _: self.control and self.control.cancel())
        self.progress = w.IntProgress(description="Progress", min=0, max=1, value=0)
        self.counters = w.HTML()
        self.schedule_line = w.HTML()
        self.statistics = w.HTML()
        self.widget = w.VBox([
            self.session_line, w.HBox([self.user, self.passcode, self.login_button]),
            w.HBox(list(self.mode_buttons.values())), self.mode_message, self.group,
            w.HBox([self.start_at, self.stop_at]), w.HBox([self.pause_at, self.resume_at]),
            w.HBox([self.rate_limit, self.concurrency]),
            w.HBox([self.ok, self.stop_button, self.stop_close_button, self.cancel_button]),
            self.progress, self.counters, self.schedule_line, self.statistics,
        ])
        self.refresh()

    # --- what the panel shows -----------------------------------------------------------------

    def session(self) -> sessions.Session | None:
        if not self.session_path or not Path(self.session_path).exists():
            return None
        try:
            return sessions.load(self.session_path)
        except ScrNbError:
            return None

    @property
    def running(self) -> bool:
        return self._busy

    def refresh(self) -> None:
        """Enable what the store's state allows; show the session and Vision's messages."""
        session = self.session()
        now = datetime.now(timezone.utc)
        if session is None:
            self.session_line.value = "<b>Not logged in.</b> Log in with your Smartcard user."
        else:
            left = session.seconds_left(now)
            expiry = ("expired" if left <= 0 else
                      f"{int(left // 3600)} h {int(left % 3600 // 60):02d} min to card expiry")
            self.session_line.value = html.escape(
                f"{session.name} ({session.user_id}), role {session.role_profile_id}: {expiry}")
        groups = sorted(set(load_groups(self.practice)) | set(self._store_groups()))
        options = [WHOLE_LIST, *groups]
        if list(self.group.options) != options:
            current = self.group.value
            self.group.options = options
            self.group.value = current if current in options else WHOLE_LIST
        messages = []
        for label, mode in MODES:
            why = self.why_not(mode)
            self.mode_buttons[label].disabled = self.running or why is not None
            self.mode_buttons[label].button_style = "info" if mode == self.mode else ""
            self.mode_buttons[label].tooltip = why or f"{label} the upload"
            if why and mode == Mode.RUN:
                messages.append(why)
        self.mode_message.value = html.escape(" ".join(messages))
        if not self.store_path or Path(self.store_path).is_dir():
            self.mode_message.value = ("<b>No store:</b> set the <code>store</code> parameter "
                                       "(or SCR_NB_STORE) to the practice's store file.")
            for button in self.mode_buttons.values():
                button.disabled = True
        self.ok.disabled = (self.running or self.mode is None or session is None
                            or not self.store_path)
        for button in (self.stop_button, self.stop_close_button, self.cancel_button):
            button.disabled = not self.running

    def _store_groups(self) -> list[str]:
        try:
            store = Store(self.store_path, readonly=True)
        except StoreError:
            return []
        try:
            return store.group_names()
        except DatabaseError:   # a store being created by the job that just started
            return []
        finally:
            store.close()

    @property
    def selected_group(self) -> str | None:
        return None if self.group.value == WHOLE_LIST else self.group.value

    def why_not(self, mode: Mode) -> str | None:
        """Vision's message when ``mode`` cannot start now, else None."""
        nothing_yet = None if mode == Mode.RUN else "nothing has been uploaded yet: use Run."
        try:
            store = Store(self.store_path, readonly=True)
        except StoreError:
            return nothing_yet
        try:
            refused = refusal(store, mode, self.selected_group)
        except DatabaseError:   # a store being created by the job that just started
            return nothing_yet
        finally:
            store.close()
        return refused[0] if refused else None

    # --- what the buttons do ------------------------------------------------------------------

    def login(self) -> None:
        identity = self.spine
        try:
            session = sessions.login(identity, self.user.value, self.passcode.value,
                                     tls=self.tls)
        except ScrNbError as err:
            self.session_line.value = f"<b>Login refused:</b> {html.escape(str(err))}"
            return
        finally:
            self.passcode.value = ""
        if not self.session_path:
            self.session_path = str(Path(self.store_path).with_suffix(".session.json"))
        sessions.save(session, self.session_path)
        self.refresh()

    def choose(self, mode: Mode) -> None:
        self.mode = mode
        self.refresh()

    def options(self) -> JobOptions:
        return JobOptions(
            mode=self.mode, group=self.selected_group, concurrency=int(self.concurrency.value),
            rate_limit=float(self.rate_limit.value) or None,
            schedule=Schedule(start_at=_aware(self.start_at.value),
                              stop_at=_aware(self.stop_at.value),
                              pause_at=_aware(self.pause_at.value),
                              resume_at=_aware(self.resume_at.value)))

    def start(self) -> None:
        """OK: run the chosen mode on a thread of its own."""
        if self.running or self.mode is None:
            return
        options = self.options()
        self.control = JobControl()
        self.outcome = None
        self.statistics.value = ""
        self.schedule_line.value = html.escape(options.schedule.describe() or "Start now")
        self._busy = True
        self.thread = threading.Thread(target=self._run, args=(options,), name="scr-nb-panel",
                                       daemon=True)
        self.thread.start()
        self.refresh()

    def _run(self, options: JobOptions) -> None:
        try:
            outcome = run_upload(self.practice, self.store_path, self.spine, self.session_path,
                                 options, on_progress=self.show, control=self.control,
                                 tls=self.tls)
        except Exception as err:  # shown in the panel: the thread must not print
            outcome = Outcome(1, f"upload failed: {type(err).__name__}: {err}")
        self.outcome = outcome
        text = html.escape(outcome.message)
        if outcome.statistics:
            text += "<pre>" + html.escape(format_statistics(outcome.statistics)) + "</pre>"
        self.statistics.value = text
        self.mode = None
        self._busy = False
        self.refresh()

    def show(self, p: Progress) -> None:
        """The engine's progress callback: only widget values change."""
        self.progress.max = max(1, p.to_send)
        self.progress.value = min(p.done, self.progress.max)
        avg = p.average_seconds_per_patient
        eta = p.eta_seconds
        state = "Waiting for the start time. " if p.waiting else (
            "Paused until the resume time. " if p.paused else "")
        self.counters.value = html.escape(
            f"{state}Checked {p.checked} of {p.patients_in_scope}; sent to the queue {p.queued}; "
            f"transmitted {p.transmitted}; acknowledged {p.acknowledged}; failed {p.failed}; "
            f"{p.rate:.1f} messages/s"
            + (f"; {avg:.3f} s per patient" if avg else "")
            + (f"; ETA {eta / 60:.1f} min" if eta else ""))
        schedule = ", ".join(f"{k.replace('_at', '')} {v[:16].replace('T', ' ')}"
                             for k, v in p.schedule.items() if v)
        left = p.session_seconds_left
        self.schedule_line.value = html.escape(
            (schedule or "No schedule") + (f"; card expires in {left / 3600:.1f} h"
                                           if left is not None else ""))
        if p.warnings:
            self.schedule_line.value += "<br><b>" + html.escape(p.warnings[-1]) + "</b>"
