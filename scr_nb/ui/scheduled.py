"""Headless, scheduled uploads (SPEC 9 and 10): ``notebooks/scheduled_upload.ipynb`` run by papermill.

``scr-nb scheduled`` executes the notebook with its parameters, writes the executed notebook and an
HTML export (inputs hidden) under ``<report dir>/<store name>/<UTC time>/`` (the SQLite file's
stem, or the practice's ODS code in a PostgreSQL store), and exits with the job's own exit code. A
refused or failed job still leaves its report saying why. The notebook's cells call
``run_from_parameters`` and ``plot_outcome`` below, so nothing in it is untestable.
"""

from __future__ import annotations

import json
import signal
import threading
from datetime import datetime, timezone
from pathlib import Path

from scr_nb.errors import StoreError
from scr_nb.job.options import JobControl, JobOptions
from scr_nb.job.runner import EXIT_ERROR, Outcome, run_upload
from scr_nb.job.schedule import Schedule, parse_local
from scr_nb.spine.tls import TlsSettings
from scr_nb.store.database import Location
from scr_nb.store.states import Mode

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "scheduled_upload.ipynb"
STOP_FILE, CANCEL_FILE = "stop-requested", "cancel-requested"   # left by `scr-nb scheduled` on a signal
KERNEL = "python3"
START_TIMEOUT = 120      # seconds for the kernel to start; the upload cell itself has no timeout


def run_from_parameters(*, practice: str, store: str, spine: str, session: str, mode: str = "run",
                        group: str | None = None, start_at: str | None = None,
                        stop_at: str | None = None, pause_at: str | None = None,
                        resume_at: str | None = None, rate_limit: float | None = None,
                        concurrency: int = 8, ack_timeout: float = 600.0,
                        dissent: str = "exclude", skip_acknowledged: bool = False,
                        ca_bundle: str | None = None, client_cert: str | None = None,
                        client_key: str | None = None, outcome_path: str | None = None,
                        control_dir: str | None = None, ods: str | None = None) -> Outcome:
    """The scheduled notebook's upload cell: never raises, so the report is always written.
    ``store`` is an SQLite file or a PostgreSQL URL with the practice in ``ods`` (or ``?ods=``).
    The TLS settings not given come from SCR_NB_CA_BUNDLE, SCR_NB_CLIENT_CERT, SCR_NB_CLIENT_KEY.
    With ``control_dir``, a file named ``stop-requested`` there is Stop and Close and one named
    ``cancel-requested`` is Cancel: how ``scr-nb scheduled`` passes on Ctrl-C and SIGTERM."""
    control = JobControl()
    watching = threading.Event()
    if control_dir:
        threading.Thread(target=_watch_for_requests, args=(Path(control_dir), control, watching),
                         daemon=True, name="scr-nb-scheduled-control").start()
    try:
        times = {name: parse_local(value, name) for name, value in
                 (("start_at", start_at), ("stop_at", stop_at), ("pause_at", pause_at),
                  ("resume_at", resume_at)) if value}
        options = JobOptions(mode=Mode(mode), group=group or None, concurrency=int(concurrency),
                             rate_limit=float(rate_limit) if rate_limit else None,
                             ack_timeout=float(ack_timeout), dissent=dissent,
                             skip_acknowledged=bool(skip_acknowledged),
                             schedule=Schedule(**times))
        tls = TlsSettings.from_options(ca_bundle, client_cert, client_key)
        outcome = run_upload(practice, Location.of(store, ods or None), spine, session, options,
                             control=control, tls=tls)
    except Exception as err:  # reported, not raised: the report must say why
        outcome = Outcome(EXIT_ERROR, f"upload {mode} failed: {type(err).__name__}: {err}")
    finally:
        watching.set()
    if outcome_path:
        Path(outcome_path).write_text(json.dumps(outcome.to_json(), indent=2, default=str))
    return outcome


def header_html(outcome: Outcome, *, practice: str, store: str, mode: str,
                session: str = "", started: datetime | None = None,
                ods: str | None = None) -> str:
    """The top of a scheduled run's report: the practice by name and ODS code, the store, the
    mode, the user and the times, and, for a refused run, that it was refused and sent nothing."""
    from html import escape

    from scr_nb.errors import ScrNbError
    from scr_nb.extract.reader import load_details
    from scr_nb.spine import session as sessions
    from scr_nb.store.words import MODE_WORDS, job_words, words

    try:
        details = load_details(practice)
        who = f"{details.name or 'not named'} (ODS {details.ods_code or 'not given'})"
    except ScrNbError:
        who = "the extract's practice.json cannot be read"
    try:
        user = sessions.load(session)
        user_words = f"{user.name} ({user.user_id})"
    except (ScrNbError, OSError, ValueError):
        user_words = "no usable session"
    job = outcome.job or {}
    location = _location(store, ods)
    rows = [("Practice", who), ("Store", location.label if location else store or "not set"),
            ("Mode", words(mode, MODE_WORDS)),
            ("User", user_words),
            ("Started", (job.get("started_at") or (started.isoformat(timespec="seconds")
                                                   if started else ""))[:19].replace("T", " ")),
            ("Ended", (job.get("ended_at") or "")[:19].replace("T", " ") or "\u2013"),
            ("Outcome", job_words(job["status"], job.get("reason")) if job
             else "refused: nothing was sent" if outcome.refused else outcome.message)]
    table = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{escape(k)}</th>"
                    f"<td>{escape(str(v))}</td></tr>" for k, v in rows)
    banner = ""
    if outcome.refused or outcome.job is None:
        banner = ("<p style='background:#fff4e5;border-left:4px solid #ed8b00;padding:6px 10px'>"
                  f"<b>This run was refused and sent nothing.</b> {escape(outcome.message)}</p>")
    return f"<h2>Scheduled upload</h2><table>{table}</table>{banner}"


def plot_outcome(store: str, outcome: Outcome | None = None, ods: str | None = None):
    """The analysts' charts for this store (the same functions as the HTML report and the
    monitor notebook): success rate per job, throughput, ack latency, failures by code. None when
    this run sent nothing (a refused run), so older jobs' charts are never shown as this run's."""
    import matplotlib.pyplot as plt

    from scr_nb.reporting import charts, frames

    location = _location(store, ods)
    if location is None or (location.path is not None and not location.path.exists()):
        return None
    if outcome is not None and outcome.job is None:
        return None
    figure, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    charts.plot_success_rate(axes[0][0], frames.jobs(location))
    charts.plot_throughput(axes[0][1], frames.throughput(location, freq="auto"))
    charts.plot_ack_latency(axes[1][0], frames.ack_latency_percentiles(location))
    charts.plot_failures_by_code(axes[1][1], frames.failures_by_code(location))
    if outcome is not None:
        figure.suptitle(f"Every job on this store; this run is job #{outcome.job['id']}")
    figure.tight_layout()
    return figure


def _location(store: str | None, ods: str | None) -> Location | None:
    """Where the store is, or None when none is named (or a PostgreSQL URL names no practice)."""
    try:
        return Location.of(store, ods or None) if store else None
    except StoreError:
        return None


def _watch_for_requests(folder: Path, control: JobControl, done: threading.Event) -> None:
    while not done.wait(0.5):
        if (folder / CANCEL_FILE).exists():
            control.cancel()
        elif (folder / STOP_FILE).exists():
            control.stop_and_close()


def report_folder(report_dir: str | Path, store: str | Path, ods: str | None = None) -> Path:
    """A new folder per run: reports/<store name>/<UTC time>[-n]/, the store named by its SQLite
    file's stem, or by its practice's ODS code in a PostgreSQL store."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    location = _location(str(store), ods)
    name = location.ods if location is not None and location.path is None else Path(store).stem
    base = Path(report_dir) / name
    folder, n = base / stamp, 1
    while folder.exists():
        folder, n = base / f"{stamp}-{n}", n + 1
    folder.mkdir(parents=True)
    return folder


def run_scheduled(parameters: dict, report_dir: str | Path = "reports") -> tuple[int, Path]:
    """Execute the notebook with papermill and export it to HTML; returns (exit code, folder)."""
    import nbformat
    import papermill
    from nbconvert import HTMLExporter

    folder = report_folder(report_dir, parameters["store"], parameters.get("ods"))
    executed = folder / "scheduled_upload.ipynb"
    outcome_path = folder / "outcome.json"
    parameters = {**parameters, "report_dir": str(report_dir), "outcome_path": str(outcome_path),
                  "control_dir": str(folder)}
    error = None
    signals = _pass_signals_on(folder)
    try:
        papermill.execute_notebook(str(NOTEBOOK), str(executed), parameters=parameters,
                                   kernel_name=KERNEL, start_timeout=START_TIMEOUT,
                                   progress_bar=False, request_save_on_cell_execute=True)
    except papermill.PapermillExecutionError as err:
        error = f"the notebook stopped at cell {err.exec_count}: {err.ename}: {err.evalue}"
    except Exception as err:   # the kernel would not start or died: still leave a report
        error = f"the notebook could not run: {type(err).__name__}: {err}"
    finally:
        for signum, previous in signals.items():
            signal.signal(signum, previous)
    if executed.exists():
        exporter = HTMLExporter(exclude_input=True)
        body, _ = exporter.from_notebook_node(nbformat.read(str(executed), as_version=4))
        (folder / "scheduled_upload.html").write_text(body, encoding="utf-8")
    if outcome_path.exists():
        code = json.loads(outcome_path.read_text())["exit_code"]
    else:
        code = EXIT_ERROR
    if error:
        (folder / "error.txt").write_text(error + "\n")
        code = code or EXIT_ERROR
    return code, folder


def _pass_signals_on(folder: Path) -> dict:
    """Ctrl-C or SIGTERM: Stop and Close in the notebook's job (a file it watches for); a second
    one: Cancel. The notebook then ends normally and its report is written."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    count = {"n": 0}

    def handler(signum: int, frame: object) -> None:
        count["n"] += 1
        (folder / (STOP_FILE if count["n"] == 1 else CANCEL_FILE)).touch()

    return {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
