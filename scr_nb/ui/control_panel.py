"""The administrator's control panel (SPEC 9): Vision's Initial Upload dialog as an operations
console in ipywidgets.

Choose a mode (Run, Resume, Rerun, Failed; each enabled only where the store allows it, with
Vision's message where not), a Patient Group and the schedule, check, then OK. The job runs on a
thread of its own, so the kernel stays responsive. The panel reads the store every second: Vision's
five counters, the progress of the whole upload across Resume and the latest job are live, and a
job running on the store from anywhere else (another tab, kernel or machine, the CLI) is shown with
its progress and can be stopped from here: Stop, Stop and Close and Cancel go through the store.
Threads only set widget values (they never print: ipykernel routes a thread's output unpredictably).
"""

from __future__ import annotations

import html
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import ipywidgets as w

from scr_nb.constants import B0062, explain
from scr_nb.errors import ScrNbError, StoreError
from scr_nb.extract.reader import load_details, load_groups
from scr_nb.job.modes import refusal
from scr_nb.job.options import JobControl, JobOptions, Progress, describe_duration
from scr_nb.job.preflight import run_preflight
from scr_nb.job.runner import Outcome, run_upload
from scr_nb.job.schedule import Schedule
from scr_nb.spine import session as sessions
from scr_nb.spine.tls import TlsSettings
from scr_nb.store.database import Location
from scr_nb.store.practice_store import Store
from scr_nb.store.schema import DatabaseError
from scr_nb.store.states import Mode
from scr_nb.store.words import MODE_WORDS, NOT_REQUIRED_WORDS, VISION_COUNTERS, job_words, words

MODES = (("Run", Mode.RUN), ("Resume", Mode.RESUME), ("Rerun", Mode.RERUN),
         ("Failed", Mode.FAILED))
WHOLE_LIST = "Whole list"
REFRESH_SECONDS = 1.0
WIDE = w.Layout(width="auto")
LABELS = {"description_width": "initial"}     # labels are never cut off


def _located(store: str, ods: str | None) -> tuple[Location | None, str]:
    """Where the store is, or None and why not in a few words (none given, a PostgreSQL URL
    naming no practice)."""
    if not store:
        return None, ""
    try:
        return Location.of(store, ods or None), ""
    except StoreError as err:
        return None, f" ({err})"


def _aware(moment: datetime | None) -> datetime | None:
    return None if moment is None else (moment.astimezone() if moment.tzinfo is None else moment)


def _e(value: object) -> str:
    return html.escape(str(value))


def counters_table(counters: dict[str, int]) -> str:
    """Vision's five counters: labels over numbers."""
    head = "".join(f"<th style='padding:2px 14px'>{label}</th>" for label, _ in VISION_COUNTERS)
    cells = "".join(f"<td style='padding:2px 14px;text-align:center;font-size:1.3em'>"
                    f"{counters.get(key, 0)}</td>" for _, key in VISION_COUNTERS)
    return f"<table><tr>{head}</tr><tr>{cells}</tr></table>"


def statistics_table(stats: dict) -> str:
    """The completion statistics, as Vision's completion screen lays them out, in words."""
    c, this = stats["counters"], stats.get("this_job", {})
    rows = [("Job", f"#{stats['job_id']} {words(stats['mode'], MODE_WORDS)} of "
                    f"{stats['group'] or 'the whole list'}"),
            ("Qualifying patients", stats["qualifying_patients"]),
            *((label, c[key]) for label, key in VISION_COUNTERS),
            ("Transmitted, waiting for the ack", stats["states"].get("transmitted", 0)),
            ("This job: sent to the queue", this.get("queued", 0)),
            ("This job: acknowledged", this.get("acknowledged", 0)),
            ("This job: failed", this.get("failed", 0)),
            ("Time spent sending", describe_duration(stats["elapsed_seconds"])),
            ("Rate", f"{stats['rate_per_second']:.1f} messages a second")]
    avg = stats.get("average_seconds_per_patient")
    if avg:
        rows.append(("Average time per patient", f"{avg:.3f} s"))
    rows += [(f"Not required: {words(reason, NOT_REQUIRED_WORDS)}", n)
             for reason, n in stats["not_required_by_reason"].items() if n]
    rows += [(f"Failed {code}: {explain(code)}", n) for code, n in stats["failed_by_code"].items()]
    body = "".join(f"<tr><td style='padding:1px 10px'>{_e(k)}</td>"
                   f"<td style='padding:1px 10px;text-align:right'>{_e(v)}</td></tr>"
                   for k, v in rows)
    return f"<b>Completion statistics</b><table>{body}</table>"


class ControlPanel:
    """The panel for one practice. ``store`` is its SQLite file, or a PostgreSQL URL with the
    practice's ODS code in ``ods`` (or in the URL as ``?ods=CODE``). ``ca_bundle``,
    ``client_cert`` and ``client_key`` are the TLS settings for the Spine and its identity
    provider; those not given come from SCR_NB_CA_BUNDLE, SCR_NB_CLIENT_CERT and
    SCR_NB_CLIENT_KEY. ``live=False`` leaves out the once-a-second reading of the store (tests
    call ``refresh()`` themselves)."""

    def __init__(self, practice: str, store: str, spine: str, session: str = "",
                 ca_bundle: str | None = None, client_cert: str | None = None,
                 client_key: str | None = None, live: bool = True, ods: str | None = None):
        self.practice, self.spine = practice, spine
        self.location, self.store_problem = _located(store, ods)
        self.session_path = session
        self.tls = TlsSettings.from_options(ca_bundle, client_cert, client_key)
        self.mode: Mode | None = None
        self.control: JobControl | None = None
        self.thread: threading.Thread | None = None
        self.outcome: Outcome | None = None
        self.attached: dict | None = None        # a job running on the store from elsewhere
        self._busy = False
        self._closed = threading.Event()

        self.title = w.HTML(self._title())
        self.session_line = w.HTML()
        self.user = w.Text(description="Smartcard user id", style=LABELS)
        self.passcode = w.Password(description="Passcode", style=LABELS)
        self.login_button = w.Button(description="Log in", layout=WIDE)
        self.login_button.on_click(lambda _: self.login())
        self.login_box = w.HBox([self.user, self.passcode, self.login_button])
        self.store_line = w.HTML()
        self.mode_buttons = {label: w.Button(description=label, layout=WIDE)
                             for label, _ in MODES}
        for label, mode in MODES:
            self.mode_buttons[label].on_click(lambda _, m=mode: self.choose(m))
        self.mode_message = w.HTML()
        self.group = w.Dropdown(description="Patient Group", options=[WHOLE_LIST], style=LABELS)
        self.group.observe(lambda _: self.refresh(), names="value")
        # Timezone-aware pickers: the time the administrator types is their browser's local time.
        self.start_at = w.DatetimePicker(description="Start at", style=LABELS)
        self.stop_at = w.DatetimePicker(description="Stop at", style=LABELS)
        self.pause_at = w.DatetimePicker(description="Pause at", style=LABELS)
        self.resume_at = w.DatetimePicker(description="Resume at", style=LABELS)
        self.rate_limit = w.FloatText(description="Rate limit (messages a second)", value=0.0,
                                      style=LABELS)
        self.rate_help = w.HTML("<i>The most messages a second the job sends; 0 sends as fast as "
                                "the Spine allows. Agree the rate with the NHS before a large "
                                "upload.</i>")
        self.concurrency = w.BoundedIntText(description="Messages in transit at once", value=8,
                                            min=1, max=256, style=LABELS)
        self.check_button = w.Button(description="Check", layout=WIDE,
                                     tooltip="Check everything the job needs, sending nothing")
        self.check_button.on_click(lambda _: self.check())
        self.checks = w.HTML()
        self.ok = w.Button(description="OK", button_style="primary", layout=WIDE)
        self.ok.on_click(lambda _: self.start())
        self.ok_reason = w.HTML()
        self.stop_button = w.Button(description="Stop", layout=WIDE,
                                    tooltip="Pause the job: Resume continues it")
        self.stop_close_button = w.Button(description="Stop and Close", layout=WIDE,
                                          tooltip="Finish the messages in transit, then stop")
        self.cancel_button = w.Button(description="Cancel", button_style="danger", layout=WIDE,
                                      tooltip="Abandon sending (asks to confirm)")
        self.confirm_cancel = w.Button(description="Yes, cancel the upload",
                                       button_style="danger", layout=w.Layout(display="none"))
        self.keep_going = w.Button(description="No, keep going", layout=w.Layout(display="none"))
        self.stop_button.on_click(lambda _: self.ask("stop"))
        self.stop_close_button.on_click(lambda _: self.ask("close"))
        self.cancel_button.on_click(lambda _: self._confirming(True))
        self.confirm_cancel.on_click(lambda _: (self._confirming(False), self.ask("cancel")))
        self.keep_going.on_click(lambda _: self._confirming(False))
        self.phase = w.HTML()
        self.progress = w.IntProgress(min=0, max=1, value=0,
                                      layout=w.Layout(width="60%", height="22px"))
        self.percent = w.HTML()
        self.counters = w.HTML(counters_table({}))
        self.job_line = w.HTML()
        self.schedule_line = w.HTML()
        self.statistics = w.HTML()
        self.widget = w.VBox([
            self.title, self.session_line, self.login_box, self.store_line,
            w.HBox(list(self.mode_buttons.values())), self.mode_message, self.group,
            w.HBox([self.start_at, self.stop_at]), w.HBox([self.pause_at, self.resume_at]),
            w.HBox([self.rate_limit, self.concurrency]), self.rate_help,
            w.HBox([self.check_button, self.ok, self.stop_button, self.stop_close_button,
                    self.cancel_button, self.confirm_cancel, self.keep_going]),
            self.ok_reason, self.checks, self.phase, w.HBox([self.progress, self.percent]),
            self.counters, self.job_line, self.schedule_line, self.statistics,
        ])
        self.refresh()
        if live:
            threading.Thread(target=self._tick, name="scr-nb-panel-refresh", daemon=True).start()

    # --- what the panel shows -----------------------------------------------------------------

    def _title(self) -> str:
        try:
            details = load_details(self.practice) if self.practice else None
        except ScrNbError:
            details = None
        who = ""
        if details and (details.name or details.ods_code):
            who = f"{details.name or ''} ({details.ods_code or 'no ODS code'})"
        return (f"<h3 style='margin:4px 0'>SCR GP Summary upload{': ' + _e(who) if who else ''}"
                f"</h3><small>Store {_e(self.location.label if self.location else 'not set')}"
                "</small>")

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

    def close(self) -> None:
        """Stop reading the store (the panel's job, if any, goes on)."""
        self._closed.set()

    def _tick(self) -> None:
        while not self._closed.wait(REFRESH_SECONDS):
            try:
                self.refresh()
            except Exception:   # a store mid-creation, a file moved: the next tick tries again
                continue

    def _reader(self) -> Store | None:
        """The store opened read-only, or None while there is none to read (not named, not
        created yet, not reachable)."""
        if self.location is None or (self.location.path is not None
                                     and not self.location.path.is_file()):
            return None
        try:
            return Store(self.location, readonly=True)
        except StoreError:
            return None

    @staticmethod
    def _status(store: Store | None) -> dict | None:
        if store is None:
            return None
        try:
            return store.status()
        except DatabaseError:   # a store being created by the job that just started
            return None

    def refresh(self) -> None:
        """The store's state, the session, and what may be done now: the store is opened once
        for all of it (a PostgreSQL store is a connection each time)."""
        store = self._reader()
        try:
            self._refresh(store)
        finally:
            if store is not None:
                store.close()

    def _refresh(self, store: Store | None) -> None:
        session = self.session()
        now = datetime.now(timezone.utc)
        self._show_session(session, now)
        status = self._status(store)
        self._show_store(status)
        groups = sorted(set(load_groups(self.practice)) | set(status["groups"] if status else ()))
        options = [WHOLE_LIST, *groups]
        if list(self.group.options) != options:
            current = self.group.value
            self.group.options = options
            self.group.value = current if current in options else WHOLE_LIST
        busy = self.running or self.attached is not None
        messages = []
        for label, mode in MODES:
            why = self.why_not(mode, store)
            self.mode_buttons[label].disabled = busy or why is not None
            self.mode_buttons[label].button_style = "info" if mode == self.mode else ""
            self.mode_buttons[label].tooltip = why or f"{label}: {MODE_HELP[mode]}"
            if why and mode == Mode.RUN:
                messages.append(why)
        self.mode_message.value = "" if busy else _e(" ".join(messages))
        if self.location is None or (self.location.path is not None
                                     and self.location.path.is_dir()):
            self.mode_message.value = (f"<b>No store{_e(self.store_problem)}:</b> set the "
                                       "<code>store</code> parameter (or SCR_NB_STORE) to the "
                                       "practice's store: an SQLite file, or "
                                       "postgresql://...?ods=CODE.")
            for button in self.mode_buttons.values():
                button.disabled = True
        reason = self._why_not_ok(session, now)
        self.ok.disabled = busy or reason is not None
        self.ok_reason.value = "" if busy or reason is None else f"<i>OK: {_e(reason)}</i>"
        for button in (self.stop_button, self.stop_close_button, self.cancel_button):
            button.disabled = not busy

    def _why_not_ok(self, session, now: datetime) -> str | None:
        if session is None:
            return "log in first."
        if session.expired(now):
            return "the Smartcard session has ended: log in again."
        if B0062 not in session.activities:
            return (f"{session.name}'s role does not hold B0062, which starting an upload needs: "
                    "ask your Registration Authority.")
        if self.location is None:
            return "no store is set."
        if self.mode is None:
            return "choose Run, Resume, Rerun or Failed."
        return None

    def _show_session(self, session, now: datetime) -> None:
        if session is None:
            self.session_line.value = "<b>Not logged in.</b> Log in with your Smartcard user."
            self.login_box.layout.display = None
            return
        left = session.seconds_left(now)
        expiry = ("the card's session has ended" if left <= 0 else
                  f"{int(left // 3600)} h {int(left % 3600 // 60):02d} min to card expiry")
        activities = ", ".join(session.activities) or "none"
        holds = "holds B0062" if B0062 in session.activities else "<b>does not hold B0062</b>"
        self.session_line.value = (f"{_e(session.name)} ({_e(session.user_id)}), role "
                                   f"{_e(session.role_profile_id)}: {_e(expiry)}. Activities "
                                   f"{_e(activities)}: {holds}.")
        self.login_box.layout.display = "none" if left > 0 else None   # folded once logged in

    def _show_store(self, status: dict | None) -> None:
        if status is None:
            self.store_line.value = "<i>Nothing has been uploaded from this store yet.</i>"
            self.attached = None
            return
        self.counters.value = counters_table(status["counters"])
        c = status["counters"]
        done, total = c["sent"] + c["failed"], c["sent"] + c["failed"] + c["unprocessed"] \
            + c["sending"]
        self.progress.max = max(1, total)
        self.progress.value = min(done, self.progress.max)
        self.percent.value = (f"&nbsp;<b>{100 * done / total:.1f}%</b> of the upload "
                              f"({done} of {total} qualifying patients)" if total else "")
        latest, holder = status["latest_job"], status["running"]
        parts = []
        if latest:
            parts.append(f"Latest job: #{latest['id']} {words(latest['mode'], MODE_WORDS)} of "
                         f"{latest['group'] or 'the whole list'}, "
                         f"{job_words(latest['status'], latest['reason'])}")
        if holder:
            parts.append(f"Running now: {holder['user_name']} on {holder['host']}, since "
                         f"{holder['since'][:16].replace('T', ' ')} UTC")
        self.store_line.value = "<br>".join(_e(p) for p in parts)
        self.attached = (latest if holder and not self.running and latest
                         and latest["status"] in ("running", "paused") else None)
        if self.attached:
            self.phase.value = ("<b>A job started elsewhere is running on this store.</b> Its "
                                "progress shows here; Stop, Stop and Close and Cancel reach it.")

    @property
    def selected_group(self) -> str | None:
        return None if self.group.value == WHOLE_LIST else self.group.value

    def why_not(self, mode: Mode, store: Store | None = None) -> str | None:
        """Vision's message when ``mode`` cannot start now, else None. ``store``: the store
        already open for reading, else it is opened for this question."""
        nothing_yet = None if mode == Mode.RUN else "nothing has been uploaded yet: use Run."
        reader = store or self._reader()
        if reader is None:
            return nothing_yet
        try:
            refused = refusal(reader, mode, self.selected_group)
        except DatabaseError:   # a store being created by the job that just started
            return nothing_yet
        finally:
            if store is None:
                reader.close()
        return refused[0] if refused else None

    # --- what the buttons do ------------------------------------------------------------------

    def login(self) -> None:
        identity = self.spine
        try:
            session = sessions.login(identity, self.user.value, self.passcode.value,
                                     tls=self.tls)
        except ScrNbError as err:
            self.session_line.value = f"<b>Login refused:</b> {_e(err)}"
            return
        finally:
            self.passcode.value = ""
        if not self.session_path and self.location is not None:
            where = self.location.path
            self.session_path = str(where.with_suffix(".session.json") if where is not None
                                    else self.location.sibling(".session.json"))
        sessions.save(session, self.session_path)
        self.refresh()

    def choose(self, mode: Mode) -> None:
        self.mode = mode
        self.statistics.value = self.checks.value = ""     # the previous job's figures go
        self.refresh()

    def options(self) -> JobOptions:
        return JobOptions(
            mode=self.mode or Mode.RUN, group=self.selected_group,
            concurrency=int(self.concurrency.value),
            rate_limit=float(self.rate_limit.value) or None,
            schedule=Schedule(start_at=_aware(self.start_at.value),
                              stop_at=_aware(self.stop_at.value),
                              pause_at=_aware(self.pause_at.value),
                              resume_at=_aware(self.resume_at.value)))

    def check(self) -> None:
        """The preflight checks, shown before OK: what would stop the job, in words."""
        self.checks.value = "<i>Checking the extract, the session, the Spine and the messages...</i>"
        try:
            report = run_preflight(self.practice, self.spine, self.session_path, self.options(),
                                   tls=self.tls)
        except (ScrNbError, ValueError) as err:
            self.checks.value = f"<b>Cannot check:</b> {_e(err)}"
            return
        lines = "".join(f"<li>{'&#10004;' if c.ok else '&#10008; <b>'}{_e(c.words)}"
                        f"{'' if c.ok else '</b>'}</li>" for c in report.checks)
        head = ("Ready: every check passed." if report.ready
                else f"Not ready: {len(report.reasons)} check(s) failed.")
        self.checks.value = f"<b>{head}</b><ul style='margin:2px 0'>{lines}</ul>"

    def start(self) -> None:
        """OK: run the chosen mode on a thread of its own."""
        if self.running or self.mode is None:
            return
        try:
            options = self.options()
        except ValueError as err:       # a bad option: say what is wrong, start nothing
            self.ok_reason.value = f"<b>Not started:</b> {_e(err)}"
            return
        self.control = JobControl()
        self.outcome = None
        self.statistics.value = ""
        self.phase.value = "<b>Checking the extract</b> and the store..."
        self.schedule_line.value = _e(options.schedule.describe() or "Starts now")
        self._busy = True
        self.thread = threading.Thread(target=self._run, args=(options,), name="scr-nb-panel",
                                       daemon=True)
        self.thread.start()
        self.refresh()

    def ask(self, request: str) -> None:
        """Stop, Stop and Close or Cancel: this panel's own job at once; a job started elsewhere
        through the store, with this panel's user."""
        session = self.session()
        by = (session.user_id, session.name) if session else ("", "control panel")
        if self.running and self.control is not None:
            self.control.ask(request, by)
        elif self.attached is not None:
            store = Store(self.location)
            try:
                store.ask(self.attached["id"], request, *by)
            finally:
                store.close()
        self.phase.value = {"stop": "<b>Stopping</b> (Resume continues the job)...",
                            "close": "<b>Stopping and closing:</b> waiting for the acks of "
                                     "messages in transit...",
                            "cancel": "<b>Cancelling...</b>"}[request]

    def _confirming(self, asking: bool) -> None:
        self.confirm_cancel.layout.display = None if asking else "none"
        self.keep_going.layout.display = None if asking else "none"
        self.cancel_button.layout.display = "none" if asking else None

    def _run(self, options: JobOptions) -> None:
        try:
            outcome = run_upload(self.practice, self.location, self.spine, self.session_path,
                                 options, on_progress=self.show, control=self.control,
                                 tls=self.tls)
        except Exception as err:  # shown in the panel: the thread must not print
            outcome = Outcome(1, f"upload failed: {type(err).__name__}: {err}")
        self.outcome = outcome
        self.phase.value = f"<b>{_e(_outcome_words(outcome))}</b>"
        if outcome.statistics:
            self.statistics.value = statistics_table(outcome.statistics)
        self.mode = None
        self._busy = False
        self.refresh()

    def show(self, p: Progress) -> None:
        """The engine's progress callback: only widget values change."""
        now = time.time()
        if p.waiting:
            start = p.schedule.get("start_at")
            left = (datetime.fromisoformat(start).timestamp() - now) if start else 0
            self.phase.value = (f"<b>Waiting</b> for the start at {_e(start[11:16])} "
                                f"(in {_e(describe_duration(max(0.0, left)))})" if start
                                else "<b>Waiting</b> for the start time")
        elif p.paused:
            self.phase.value = "<b>Paused</b> until the resume time"
        elif self.control is not None and self.control.stopping:
            pass
        else:
            self.phase.value = (f"<b>Sending</b>: checked {p.checked} of {p.patients_in_scope} "
                                f"patients, {p.eligible} qualify")
        avg, eta = p.average_seconds_per_patient, p.eta_seconds
        self.job_line.value = _e(
            f"This job: {p.queued} sent to the queue, {p.transmitted} transmitted, "
            f"{p.acknowledged} acknowledged, {p.failed} failed of {p.to_send}; "
            f"{describe_duration(p.elapsed)} sending, {p.rate:.1f} messages a second"
            + (f", {avg:.3f} s per patient" if avg else "")
            + (f", about {describe_duration(eta)} to go" if eta else ""))
        schedule = ", ".join(f"{k.replace('_at', '')} {v[:16].replace('T', ' ')}"
                             for k, v in p.schedule.items() if v)
        left = p.session_seconds_left
        self.schedule_line.value = _e(
            (f"Schedule: {schedule}" if schedule else "No schedule")
            + (f"; the card's session ends in {describe_duration(left)}"
               if left is not None else ""))
        if p.warnings:
            self.schedule_line.value += "<br><b>" + _e(p.warnings[-1]) + "</b>"


MODE_HELP = {
    Mode.RUN: "send every eligible patient in scope, for the first time",
    Mode.RESUME: "continue the latest stopped, paused or cancelled job",
    Mode.RERUN: "send everyone again, replacing the summaries on the Spine",
    Mode.FAILED: "send the patients whose latest attempt failed",
}


def _outcome_words(outcome: Outcome) -> str:
    job = outcome.job
    if job is None:
        return outcome.message[:1].upper() + outcome.message[1:]
    said = job_words(job["status"], job["reason"])
    if outcome.exit_code == 0:
        return f"{said}: every patient in scope is acknowledged or failed."
    return f"{said}. Resume continues the job." if outcome.exit_code == 4 else said
