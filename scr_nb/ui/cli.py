"""The ``scr-nb`` command line (SPEC 10). Option names and exit codes are a stable interface.

Exit codes of ``upload``: 0 completed, 3 refused before sending anything, 4 stopped and resumable,
1 unexpected error, 2 bad usage (a bad option value: an unreadable certificate, plain http:// to
another machine, ...), always before anything happens.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import signal
import sys
import threading
import time
from datetime import date
from pathlib import Path

from scr_nb.errors import ExtractError, OptionError, RefusedError, ScrNbError
from scr_nb.job.options import JobControl, JobOptions, Progress
from scr_nb.job.runner import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_STOPPED,
    EXIT_USAGE,
    format_statistics,
    run_upload,
)
from scr_nb.job.schedule import Schedule, parse_local
from scr_nb.spine import session as sessions
from scr_nb.spine.tls import ENVIRONMENT, TlsSettings, check_url
from scr_nb.store.states import Mode


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, default=str))


# --- options shared by every command that talks to the Spine or its identity provider -----------

def add_tls_options(parser: argparse.ArgumentParser) -> None:
    """--ca-bundle, --client-cert and --client-key (SPEC 10), each defaulting to its environment
    variable; ``tls_settings`` turns them into the one TlsSettings the command hands on."""
    group = parser.add_argument_group(
        "TLS", "mutual TLS to the Spine and the identity provider (each option defaults to the "
               "environment variable named)")
    group.add_argument("--ca-bundle", metavar="FILE",
                       help="PEM CA certificates that sign the Spine's certificate (default: this "
                            f"machine's; {ENVIRONMENT['ca_bundle']})")
    group.add_argument("--client-cert", metavar="FILE",
                       help="this system's endpoint certificate, PEM "
                            f"({ENVIRONMENT['client_cert']})")
    group.add_argument("--client-key", metavar="FILE",
                       help=f"the client certificate's private key, PEM "
                            f"({ENVIRONMENT['client_key']})")


def tls_settings(args: argparse.Namespace) -> TlsSettings:
    """The TlsSettings of parsed ``add_tls_options`` options (the environment for those not
    given), checked: OptionError when a file cannot be read or a certificate has no key."""
    tls = TlsSettings.from_options(args.ca_bundle, args.client_cert, args.client_key)
    tls.check()
    return tls


# --- synth ------------------------------------------------------------------------------------------

def cmd_synth(args: argparse.Namespace) -> int:
    """Write a synthetic practice extract.

    Example: scr-nb synth --patients 2000 --seed 7 --out practice/
    """
    from scr_nb.sim.synth import write_practice

    today = date.fromisoformat(args.today) if args.today else None
    summary = write_practice(args.out, args.patients, args.seed, today=today,
                             ods_code=args.ods)
    eligible = summary.expected_eligible
    print(f"Wrote {summary.patients} patients to {args.out} ({eligible} expected eligible)")
    return EXIT_OK


# --- spine-sim --------------------------------------------------------------------------------------

def cmd_spine_sim(args: argparse.Namespace) -> int:
    """Run the Spine simulator and its identity provider until interrupted.

    Example: scr-nb spine-sim --host 127.0.0.1 --port 8900 --users users.json --ack-delay-ms 50
    Over mutual TLS: scr-nb spine-sim --users users.json --tls-cert server.pem --tls-key server.key \\
                         --client-ca client-ca.pem
    """
    from scr_nb.sim.identity import load_users
    from scr_nb.sim.spine_sim import config_from_args, serve

    config = config_from_args(args, load_users(args.users))
    serve(config, args.host, args.port, args.server_tls)
    return EXIT_OK


# --- login ------------------------------------------------------------------------------------------

def cmd_login(args: argparse.Namespace) -> int:
    """Get a Smartcard session from the identity provider and save it (mode 0600).

    Example: SCR_NB_PASSCODE=... scr-nb login --identity http://127.0.0.1:8900 \\
                 --user 555000000001 --session s.json
    Over mutual TLS: add --ca-bundle nhs-ca.pem --client-cert endpoint.pem --client-key endpoint.key
    """
    passcode = os.environ.get("SCR_NB_PASSCODE")
    if passcode is None:
        if not sys.stdin.isatty():
            print("scr-nb login: no passcode: set SCR_NB_PASSCODE or run in a terminal",
                  file=sys.stderr)
            return EXIT_USAGE
        passcode = getpass.getpass(f"Passcode for {args.user}: ")
    try:
        session = sessions.login(args.identity, args.user, passcode, tls=args.tls)
    except ScrNbError as err:
        print(f"scr-nb login: {err}", file=sys.stderr)
        return EXIT_REFUSED
    sessions.save(session, args.session)
    print(f"Logged in as {session.name} ({session.user_id}), role {session.role_profile_id}, "
          f"activities {', '.join(session.activities) or 'none'}; session ends "
          f"{session.expires_at.astimezone().isoformat(timespec='minutes')}. Saved to {args.session}")
    return EXIT_OK


# --- eligibility ------------------------------------------------------------------------------------

def cmd_eligibility(args: argparse.Namespace) -> int:
    """Dry run: who would get a summary, and why the others would not. Sends nothing.

    Example: scr-nb eligibility --practice practice/ --json
    """
    from scr_nb.clock import SystemClock
    from scr_nb.extract.columnar import dry_run
    from scr_nb.extract.eligibility import Policy

    today = SystemClock().today()
    try:
        summary = dry_run(args.practice, Policy(today=today, dissent=args.dissent))
    except ExtractError as err:
        print(f"scr-nb eligibility: {err}", file=sys.stderr)
        return EXIT_REFUSED
    if args.json:
        _print_json(summary)
    else:
        print(f"Patients: {summary['total']}   eligible: {summary['eligible']}")
        for reason, n in summary["not_required_by_reason"].items():
            print(f"  not required, {reason}: {n}")
    return EXIT_OK


# --- upload -----------------------------------------------------------------------------------------

class _Bar:
    """The progress bar on standard error, fed by the engine's progress callback."""

    def __init__(self, enabled: bool):
        self.bar = None
        self.enabled = enabled
        self.warned: list[str] = []

    def __call__(self, p: Progress) -> None:
        for warning in p.warnings[len(self.warned):]:
            self.warned.append(warning)
            if self.bar is not None:
                self.bar.write(f"Warning: {warning}", file=sys.stderr)
            else:
                print(f"Warning: {warning}", file=sys.stderr)
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=p.to_send, unit="msg", file=sys.stderr, dynamic_ncols=True,
                            desc=f"{p.mode} job {p.job_id}")
        self.bar.total = p.to_send
        self.bar.n = p.done
        avg = p.average_seconds_per_patient
        state = "waiting for the start time; " if p.waiting else (
            "paused until the resume time; " if p.paused else "")
        schedule = ", ".join(f"{k.replace('_at', '')} {v[11:16]}"
                             for k, v in p.schedule.items() if v)
        left = p.session_seconds_left
        self.bar.set_postfix_str(
            f"{state}checked {p.checked}/{p.patients_in_scope} queued {p.queued} transmitted "
            f"{p.transmitted} ack {p.acknowledged} failed {p.failed}"
            + (f" avg {avg:.3f}s/patient" if avg else "")
            + (f" ETA {p.eta_seconds / 60:.0f} min" if p.eta_seconds else "")
            + (f" | {schedule}" if schedule else "")
            + (f" | card {left / 3600:.1f} h left" if left is not None else ""), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _store_ods(args: argparse.Namespace) -> str | None:
    """The practice of ``--store``: ``--ods``; for a PostgreSQL store without it, practice.json's
    ODS code when the command reads an extract."""
    from scr_nb.store.database import is_database_url

    if args.ods or not is_database_url(args.store) or not getattr(args, "practice", None):
        return args.ods
    from scr_nb.extract.reader import load_details
    return load_details(args.practice).ods_code


def _no_store(args: argparse.Namespace) -> str | None:
    """Why ``--store`` names no store: a file that does not exist (a PostgreSQL store's practice
    is checked when it is opened)."""
    from scr_nb.store.database import is_database_url

    if is_database_url(args.store) or Path(args.store).exists():
        return None
    return f"{args.store}: no such store"


def cmd_upload(args: argparse.Namespace) -> int:
    """Run one upload job in the foreground with a progress bar.

    Example: scr-nb upload run --practice practice/ --store practice.sqlite \\
                 --spine http://127.0.0.1:8900 --session session.json
    """
    options = args.options
    control = JobControl()
    bar = _Bar(enabled=not args.quiet)
    interrupts = {"n": 0}

    def on_signal(signum: int, frame: object) -> None:
        interrupts["n"] += 1
        if interrupts["n"] == 1:
            print("\nStopping: finishing messages in transit (Ctrl-C again to cancel)...",
                  file=sys.stderr)
            control.stop_and_close()
        else:
            control.cancel()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, on_signal)
                    for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        outcome = run_upload(args.practice, args.store, args.spine, args.session, options,
                             ods=_store_ods(args), on_progress=bar, control=control,
                             tls=args.tls)
    finally:
        bar.close()
        for signum, handler in previous.items():   # the caller's handlers back (tests, notebooks)
            signal.signal(signum, handler)
    if outcome.statistics is not None:
        if args.json:
            _print_json({"job": outcome.job, "statistics": outcome.statistics})
        else:
            print(format_statistics(outcome.statistics))
    if outcome.exit_code != EXIT_OK:
        print(f"scr-nb {outcome.message}", file=sys.stderr)
    return outcome.exit_code


def cmd_scheduled(args: argparse.Namespace) -> int:
    """Run notebooks/scheduled_upload.ipynb with papermill, headlessly, and file its report.

    Writes the executed notebook and its HTML export under REPORT_DIR/<store name>/<UTC time>/ and
    exits with the job's exit code (0 completed, 3 refused, 4 stopped, 1 error). For cron:
    Example: scr-nb scheduled --practice practice/ --store practice.sqlite \\
                 --spine http://127.0.0.1:8900 --session session.json --mode run --stop-at 2026-11-23T07:00
    """
    from scr_nb.store.database import is_database_url, practice_url
    from scr_nb.ui.scheduled import run_scheduled

    def absolute(path: str | None) -> str | None:   # the kernel's working directory may differ
        return str(Path(path).resolve()) if path else None

    store = absolute(args.store)
    if is_database_url(args.store):   # one string names the practice's store (?ods=)
        ods = _store_ods(args)
        store = practice_url(args.store, ods) if ods else args.store
    parameters = {
        "practice": absolute(args.practice), "store": store, "spine": args.spine,
        "session": absolute(args.session), "mode": args.mode, "group": args.group,
        "start_at": args.start_at, "stop_at": args.stop_at, "pause_at": args.pause_at,
        "resume_at": args.resume_at, "rate_limit": args.rate_limit,
        "concurrency": args.concurrency, "ack_timeout": args.ack_timeout,
        "dissent": args.dissent, "skip_acknowledged": args.skip_acknowledged,
        "ca_bundle": absolute(args.tls.ca_bundle), "client_cert": absolute(args.tls.client_cert),
        "client_key": absolute(args.tls.client_key),
    }
    code, folder = run_scheduled(parameters, args.report_dir)
    outcome = folder / "outcome.json"
    if outcome.exists():
        print(json.loads(outcome.read_text())["message"])
    print(f"Report: {folder / 'scheduled_upload.html'}\nNotebook: {folder / 'scheduled_upload.ipynb'}")
    return code


def cmd_report(args: argparse.Namespace) -> int:
    """Write the HTML report of a store (counters, success rate, throughput, ack latency, errors),
    without running anything. NHS numbers are masked unless --show-nhs-numbers is given.

    Example: scr-nb report --store practice.sqlite --out reports/
    """
    from scr_nb.reporting.html_report import write_report

    if problem := _no_store(args):
        print(f"scr-nb report: {problem}", file=sys.stderr)
        return EXIT_USAGE
    path = write_report(args.store, args.out, show_nhs=args.show_nhs_numbers, ods=args.ods)
    print(f"Report: {path}")
    return EXIT_OK


# --- preflight, stop, break-lock ---------------------------------------------------------------------

def cmd_preflight(args: argparse.Namespace) -> int:
    """Check everything a run needs, without sending a clinical message: the extract and its
    eligibility counts, the session (user, B0062, time left), TLS to the Spine and the identity
    provider, a sample of messages against the Spine's rules, and the time the job needs at the
    rate limit against the stop time and the session. Exit 0 ready, 3 not ready (every reason).

    Example: scr-nb preflight --practice practice/ --spine https://spine.example \\
                 --session session.json --rate-limit 20 --stop-at 2026-11-24T07:00
    """
    from scr_nb.job.preflight import run_preflight

    report = run_preflight(args.practice, args.spine, args.session, args.options, tls=args.tls,
                           identity=args.identity)
    if args.json:
        _print_json(report.to_json())
    else:
        for check in report.checks:
            print(f"{'ok ' if check.ok else 'NOT'} {check.name:<9} {check.words}")
        print("Ready: every check passed." if report.ready else
              f"Not ready: {len(report.reasons)} check(s) failed.")
    return EXIT_OK if report.ready else EXIT_REFUSED


def who_asks(args: argparse.Namespace) -> tuple[str, str]:
    """Who asks: the Smartcard user of --session when given, else this machine's account."""
    if getattr(args, "session", None):
        session = sessions.load(args.session)
        return session.user_id, session.name
    account = getpass.getuser()
    return account, f"{account} (operating system account)"


def cmd_stop(args: argparse.Namespace) -> int:
    """Ask the job running on a store, whichever process or machine runs it, to Stop (default),
    Stop and Close (--close) or Cancel (--cancel); wait until it has stopped. Exit 0 when it
    stopped, 3 when no job was running.

    Example: scr-nb stop --store practice.sqlite --close
    """
    from scr_nb.store.practice_store import Store
    from scr_nb.store.words import job_words

    if problem := _no_store(args):
        print(f"scr-nb stop: {problem}, so no upload is running on it: nothing to stop.",
              file=sys.stderr)
        return EXIT_REFUSED
    request = "cancel" if args.cancel else "close" if args.close else "stop"
    user_id, user_name = who_asks(args)
    store = Store(args.store, args.ods)
    try:
        job = store.running_job()
        if job is None:
            print("scr-nb stop: no upload is running on this store: nothing to stop.",
                  file=sys.stderr)
            return EXIT_REFUSED
        store.ask(job.id, request, user_id, user_name)
        print(f"Asked job {job.id} to {dict(stop='stop', close='stop and close', cancel='cancel')[request]}"
              f" (as {user_name}); waiting for it to stop...", file=sys.stderr)
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline:
            now = store.job(job.id)
            if now.ended_at is not None or store.lock_holder() is None:
                print(f"Job {job.id}: {job_words(now.status, now.reason)}.")
                return EXIT_OK
            time.sleep(0.2)
    finally:
        store.close()
    print(f"scr-nb stop: job {job.id} has not stopped within {args.wait:g} s (Stop and Close "
          "waits for the acks of messages in transit); the request stands.", file=sys.stderr)
    return EXIT_ERROR


def cmd_break_lock(args: argparse.Namespace) -> int:
    """Remove the store's job lock when the job that held it is gone (its process died, or its
    heartbeat stopped 30 s ago); refused while it lives. Logged with who broke it.

    Example: scr-nb break-lock --store practice.sqlite
    """
    from scr_nb.store.lock import break_lock
    from scr_nb.store.log import PracticeLog
    from scr_nb.store.practice_store import Store

    if problem := _no_store(args):
        print(f"scr-nb break-lock: {problem}", file=sys.stderr)
        return EXIT_USAGE
    user_id, user_name = who_asks(args)
    store = Store(args.store, args.ods)
    try:
        holder = break_lock(store)
    finally:
        store.close()
    PracticeLog(args.store, args.ods).write("lock_broken", user_id=user_id, user_name=user_name,
                                  previous_holder=holder.describe())
    print(f"Lock of {holder.describe()} removed.")
    return EXIT_OK


# --- status and log ---------------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace) -> int:
    """The state of a store: Vision's counters, states, reasons, failure codes, latest job.

    Example: scr-nb status --store practice.sqlite --json
    """
    from scr_nb.store.practice_store import read_status

    if problem := _no_store(args):
        print(f"scr-nb status: {problem}", file=sys.stderr)
        return EXIT_USAGE
    status = read_status(args.store, args.ods)
    if args.json:
        _print_json(status)
    else:
        c = status["counters"]
        print(f"Unprocessed {c['unprocessed']}  Sending {c['sending']}  Sent {c['sent']}  "
              f"Failed {c['failed']}  Not Required {c['not_required']}")
        job = status["latest_job"]
        if job:
            print(f"Latest job {job['id']}: {job['mode']} {job['group'] or 'whole list'} "
                  f"{job['status']} {job['reason'] or ''}".rstrip())
    return EXIT_OK


def cmd_log(args: argparse.Namespace) -> int:
    """The practice log, one JSON object a line.

    Example: scr-nb log --store practice.sqlite --json
    """
    from scr_nb.store.log import PracticeLog

    for record in PracticeLog(args.store, args.ods).read():
        if args.json:
            print(json.dumps(record, ensure_ascii=False, default=str))
        else:
            rest = {k: v for k, v in record.items() if k not in ("at", "event")}
            print(f"{record['at']}  {record['event']:<14} {json.dumps(rest, default=str)}")
    return EXIT_OK


# --- the parser -------------------------------------------------------------------------------------

STORE_HELP = "the practice's store: an SQLite file, or a postgresql:// URL with --ods"
ODS_HELP = ("the practice's ODS code, naming it in a PostgreSQL store (an SQLite store holds one "
            "practice)")


def add_command(subparsers, name: str, func, help_text: str) -> argparse.ArgumentParser:
    """A sub-command whose description is its handler's docstring (its example included)."""
    p = subparsers.add_parser(name, help=help_text, description=func.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    return p


def build_parser(parsing: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; given the command about to be parsed (``parsing``), one that leaves out the
    simulator's switches unless it is ``spine-sim``: importing the simulator (aiohttp's server,
    the identity provider's JWT) costs an upload a fifth of a second it never needs."""
    parser = argparse.ArgumentParser(prog="scr-nb", description="SCR GP Summary Initial Upload kit")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, help_text: str) -> argparse.ArgumentParser:
        return add_command(sub, name, func, help_text)

    p = command("synth", cmd_synth, "write a synthetic practice extract")
    p.add_argument("--patients", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--today", help="date the extract is written relative to (YYYY-MM-DD)")
    p.add_argument("--ods", default="A12345",
                   help="the practice's ODS code in practice.json (default A12345)")

    p = command("spine-sim", cmd_spine_sim, "run the Spine simulator")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8900)
    p.add_argument("--users", required=True, help="JSON list of users for the identity provider")
    tls = p.add_argument_group("TLS", "serve HTTPS, and mutual TLS with --client-ca")
    tls.add_argument("--tls-cert", metavar="FILE", help="the simulator's certificate, PEM")
    tls.add_argument("--tls-key", metavar="FILE", help="its private key, PEM")
    tls.add_argument("--client-ca", metavar="FILE",
                     help="require a client certificate issued by this CA (PEM)")
    if parsing in (None, "spine-sim"):
        from scr_nb.sim.spine_sim import add_arguments as add_sim_arguments

        add_sim_arguments(p)

    p = command("login", cmd_login, "get a Smartcard session")
    p.add_argument("--identity", required=True, help="identity provider base URL")
    p.add_argument("--user", required=True, help="the Smartcard's SDS user id (12 digits)")
    p.add_argument("--session", required=True, help="session file to write")
    add_tls_options(p)

    dissent = dict(choices=("exclude", "blank"), default="exclude",
                   help="patients who dissent: leave out (default) or send a blank summary")

    def add_job_options(p: argparse.ArgumentParser) -> None:
        """The options of one job, shared by upload and scheduled."""
        p.add_argument("--group", help="Patient Group to upload instead of the whole list")
        for name in ("--start-at", "--stop-at", "--pause-at", "--resume-at"):
            p.add_argument(name, help="ISO 8601 local date-time, e.g. 2026-11-23T19:00")
        p.add_argument("--rate-limit", type=float, help="messages per second at most")
        p.add_argument("--concurrency", type=int, default=8, help="messages in transit at once")
        p.add_argument("--ack-timeout", type=float, default=600.0,
                       help="seconds to wait for an ack")
        p.add_argument("--dissent", **dissent)
        p.add_argument("--skip-acknowledged", action="store_true",
                       help="rerun: only patients without an acknowledged summary")
    practice = dict(required=True, help="directory of the practice extract CSV files")

    p = command("eligibility", cmd_eligibility, "dry run: eligibility counts")
    p.add_argument("--practice", **practice)
    p.add_argument("--json", action="store_true")
    p.add_argument("--dissent", **dissent)

    p = command("upload", cmd_upload, "run an upload job")
    p.add_argument("mode", choices=[m.value for m in Mode])
    p.add_argument("--practice", **practice)
    p.add_argument("--store", required=True, help=STORE_HELP)
    p.add_argument("--spine", required=True, help="Spine base URL")
    p.add_argument("--session", required=True, help="session file from scr-nb login")
    add_job_options(p)
    add_tls_options(p)
    p.add_argument("--asid", default=None,
                   help="the practice system's ASID (default: practice.json's, else 200000000001)")
    p.add_argument("--ods", default=None,
                   help="the practice's ODS code: its practice in a PostgreSQL store, and its "
                        "code in messages (default: practice.json's, else A12345)")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command("scheduled", cmd_scheduled, "run the scheduled-upload notebook with papermill")
    p.add_argument("--practice", **practice)
    p.add_argument("--store", required=True, help=STORE_HELP)
    p.add_argument("--spine", required=True, help="Spine base URL")
    p.add_argument("--session", required=True, help="session file from scr-nb login")
    p.add_argument("--ods", default=None, help=ODS_HELP)
    p.add_argument("--mode", required=True, choices=[m.value for m in Mode])
    p.add_argument("--report-dir", default="reports", help="where reports go (default reports/)")
    add_job_options(p)
    add_tls_options(p)

    p = command("preflight", cmd_preflight, "check everything a run needs, sending nothing")
    p.add_argument("--practice", **practice)
    p.add_argument("--spine", required=True, help="Spine base URL")
    p.add_argument("--session", required=True, help="session file from scr-nb login")
    p.add_argument("--identity", help="identity provider base URL (default: the session's)")
    add_job_options(p)
    add_tls_options(p)
    p.add_argument("--json", action="store_true")

    p = command("stop", cmd_stop, "stop the job running on a store, from anywhere")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--close", action="store_true", help="Stop and Close")
    which.add_argument("--cancel", action="store_true", help="Cancel")
    p.add_argument("--store", required=True, help=STORE_HELP)
    p.add_argument("--ods", default=None, help=ODS_HELP)
    p.add_argument("--session", help="who asks (default: this machine's account)")
    p.add_argument("--wait", type=float, default=900.0,
                   help="seconds to wait for the job to stop (default 900)")

    p = command("break-lock", cmd_break_lock, "remove the lock of a job that is gone")
    p.add_argument("--store", required=True, help=STORE_HELP)
    p.add_argument("--ods", default=None, help=ODS_HELP)
    p.add_argument("--session", help="who breaks it (default: this machine's account)")

    p = command("report", cmd_report, "an HTML report of a store")
    p.add_argument("--store", required=True, help=STORE_HELP)
    p.add_argument("--ods", default=None, help=ODS_HELP)
    p.add_argument("--out", default="reports", help="directory to write to (default reports/)")
    p.add_argument("--show-nhs-numbers", action="store_true",
                   help="for support use only: show NHS numbers in full")

    p = command("status", cmd_status, "state of a store")
    p.add_argument("--store", required=True, help=STORE_HELP)
    p.add_argument("--ods", default=None, help=ODS_HELP)
    p.add_argument("--json", action="store_true")

    p = command("log", cmd_log, "the practice log")
    p.add_argument("--store", required=True, help=STORE_HELP)
    p.add_argument("--ods", default=None, help=ODS_HELP)
    p.add_argument("--json", action="store_true")

    from scr_nb.ui.fleet_cli import add_fleet_parser   # many practices at once (SPEC 12)
    add_fleet_parser(sub)
    return parser


def _check_connection_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """TLS settings and service URLs, checked before anything happens (exit 2 when unusable)."""
    try:
        if hasattr(args, "ca_bundle"):
            args.tls = tls_settings(args)
        for option in ("spine", "identity"):
            if getattr(args, option, None) is not None:
                check_url(getattr(args, option), f"--{option}")
        if args.command == "spine-sim":
            args.server_tls = _server_tls(args)
    except OptionError as err:
        parser.error(str(err))


def _server_tls(args: argparse.Namespace):
    if not (args.tls_cert or args.tls_key or args.client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        raise OptionError("--tls-cert and --tls-key go together (and --client-ca needs both)")
    from scr_nb.sim.spine_sim import ServerTls

    server_tls = ServerTls(args.tls_cert, args.tls_key, args.client_ca)
    server_tls.context()   # every file readable and usable, before serving
    return server_tls


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(words[0] if words and not words[0].startswith("-") else None)
    args = parser.parse_args(argv)
    _check_connection_options(parser, args)
    if args.command in ("upload", "scheduled", "preflight"):
        try:   # the one check of a job's options (JobOptions), before anything happens
            args.schedule = Schedule(**{
                name: parse_local(getattr(args, name), f"--{name.replace('_', '-')}")
                for name in ("start_at", "stop_at", "pause_at", "resume_at")
                if getattr(args, name)})
            args.options = JobOptions(
                mode=Mode(getattr(args, "mode", None) or "run"), group=args.group,
                concurrency=args.concurrency, rate_limit=args.rate_limit,
                ack_timeout=args.ack_timeout, dissent=args.dissent,
                skip_acknowledged=args.skip_acknowledged, sender_asid=getattr(args, "asid", None),
                practice_ods=getattr(args, "ods", None), schedule=args.schedule)
        except ValueError as err:
            parser.error(str(err))
    try:
        return args.func(args)
    except OptionError as err:
        print(f"scr-nb {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ScrNbError as err:
        print(f"scr-nb {args.command}: {err}", file=sys.stderr)
        return EXIT_REFUSED if isinstance(err, (RefusedError, ExtractError)) else EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_STOPPED


if __name__ == "__main__":
    sys.exit(main())
