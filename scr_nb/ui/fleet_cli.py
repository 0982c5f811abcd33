"""``scr-nb fleet``: many practices at once on Dask (SPEC 12). ``add_fleet_parser`` adds the
command and its sub-commands to the ``scr-nb`` parser; each sub-command's handler is below.

Exit codes over the fleet, as ``upload``'s over one practice: 0 every practice completed, 4 some
practice stopped and can be resumed, 3 refused, 1 an error, 2 bad usage (before anything runs).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from scr_nb.errors import StoreError
from scr_nb.job.runner import EXIT_ERROR, EXIT_OK, EXIT_REFUSED

MODES = ("run", "resume", "rerun", "failed")
FLEET_HELP = """Many practices at once on Dask: one job per practice (the mode's rules per
practice), at most --max-practices at once, under one --rate-limit for the whole fleet, on a local
cluster or an existing one (--scheduler). Stores: one PostgreSQL database (--store URL) or a
folder of SQLite stores, one <ODS>.sqlite a practice (--stores DIR).

Exit codes over the fleet: 0 every practice completed, 4 some practice stopped and can be
resumed, 3 refused, 1 an error, 2 bad usage (before anything runs)."""
COUNTERS = ("unprocessed", "sending", "sent", "failed", "not_required")


def add_fleet_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``fleet`` and its sub-commands (run, resume, rerun, failed, status, stop) to the
    ``scr-nb`` sub-command parsers."""
    from scr_nb.ui.cli import add_command, add_tls_options

    fleet = subparsers.add_parser("fleet", help="many practices at once, on Dask (SPEC 12)",
                                  description=FLEET_HELP,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = fleet.add_subparsers(dest="fleet_command", required=True)

    def command(name: str, func, help_text: str) -> argparse.ArgumentParser:
        return add_command(commands, name, func, help_text)

    def add_stores(p: argparse.ArgumentParser) -> None:
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--store", metavar="URL",
                           help="the fleet's PostgreSQL store (postgresql://...)")
        where.add_argument("--stores", metavar="DIR",
                           help="a folder of SQLite stores, one <ODS>.sqlite per practice")

    for mode in MODES:
        p = command(mode, cmd_fleet_upload, f"one {mode} job per practice")
        p.set_defaults(fleet_mode=mode)
        p.add_argument("--practices", required=True, metavar="DIR",
                       help="one sub-folder per practice extract")
        add_stores(p)
        p.add_argument("--spine", required=True, help="Spine base URL")
        who = p.add_mutually_exclusive_group(required=True)
        who.add_argument("--session", metavar="FILE", help="one session for every practice")
        who.add_argument("--sessions", metavar="DIR", help="a session per practice: DIR/<ODS>.json")
        p.add_argument("--scheduler", metavar="ADDRESS",
                       help="an existing Dask scheduler (default: a local cluster)")
        p.add_argument("--max-practices", type=int, default=4, metavar="N",
                       help="practice jobs at once, at most (default 4)")
        p.add_argument("--workers", type=int, metavar="N",
                       help="the local cluster's worker processes (default: one per practice "
                            "job at once, up to the machine's cores)")
        p.add_argument("--rate-limit", type=float, metavar="TPS",
                       help="messages a second for the whole fleet, whichever worker sends")
        p.add_argument("--concurrency", type=int, default=8,
                       help="messages in transit at once, per practice (default 8)")
        p.add_argument("--ack-timeout", type=float, default=600.0, metavar="SECONDS",
                       help="seconds to wait for an ack (default 600)")
        p.add_argument("--dissent", choices=("exclude", "blank"), default="exclude",
                       help="patients who dissent: leave out (default) or send a blank summary")
        p.add_argument("--skip-acknowledged", action="store_true",
                       help="rerun: only patients without an acknowledged summary")
        p.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                       help="seconds between the fleet's summary lines (default 10)")
        p.add_argument("--json", action="store_true",
                       help="print every practice's outcome as JSON at the end")
        add_tls_options(p)

    p = command("status", cmd_fleet_status, "the state of every practice of a fleet")
    add_stores(p)
    p.add_argument("--json", action="store_true")

    p = command("stop", cmd_fleet_stop, "stop every practice job of a fleet, from anywhere")
    add_stores(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--close", action="store_true", help="Stop and Close")
    which.add_argument("--cancel", action="store_true", help="Cancel")
    p.add_argument("--session", help="who asks (default: this machine's account)")
    p.add_argument("--wait", type=float, default=900.0,
                   help="seconds to wait for the jobs to stop (default 900)")
    return fleet


def cmd_fleet_upload(args: argparse.Namespace) -> int:
    """Run one job per practice (the mode's rules, per practice) on a Dask cluster: a local one,
    or an existing one with --scheduler. Prints a line as each practice ends and a summary of
    the fleet every --progress-every seconds. Ctrl-C or SIGTERM asks every running practice to
    Stop and Close (a second: Cancel) and starts no more.

    Example: scr-nb fleet run --practices practices/ --stores stores/ \\
                 --spine https://spine.example --session session.json --max-practices 8 \\
                 --rate-limit 50
    """
    from scr_nb.fleet.coordinator import FleetControl, FleetOptions, run_fleet
    from scr_nb.fleet.plan import find_practices
    from scr_nb.job.options import JobOptions
    from scr_nb.spine.tls import TlsSettings
    from scr_nb.store.states import Mode
    from scr_nb.ui.cli import who_asks

    tls = getattr(args, "tls", None)
    if tls is None:
        from scr_nb.ui.cli import tls_settings

        tls = tls_settings(args)
    # the workers read them wherever they run, whatever their working folder
    tls = TlsSettings(*(str(Path(p).resolve()) if p else None
                        for p in (tls.ca_bundle, tls.client_cert, tls.client_key)))
    job = JobOptions(mode=Mode(args.fleet_mode), concurrency=args.concurrency,
                     ack_timeout=args.ack_timeout, dissent=args.dissent,
                     skip_acknowledged=args.skip_acknowledged)
    options = FleetOptions(job=job, spine=args.spine, tls=tls, max_practices=args.max_practices,
                           rate_limit=args.rate_limit, scheduler=args.scheduler,
                           workers=args.workers, progress_every=args.progress_every)
    practices = find_practices(args.practices, store=args.store, stores_dir=args.stores,
                               session=args.session, sessions_dir=args.sessions)
    who = who_asks(argparse.Namespace(session=args.session))
    control = FleetControl()

    def on_signal(signum: int, frame: object) -> None:
        if control.request is None:
            print("\nStopping the fleet: every running practice finishes the messages in transit "
                  "(Ctrl-C again to cancel)...", file=sys.stderr)
            control.ask("close")
        else:
            control.ask("cancel")

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signum: signal.signal(signum, on_signal)
                    for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        outcome = run_fleet(practices, options, control=control, who=who,
                            say=lambda line: print(line, flush=True))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if args.json:
        print(json.dumps(outcome.to_json(), indent=2, default=str))
    print(outcome.message, file=sys.stderr if outcome.exit_code else sys.stdout)
    return outcome.exit_code


def cmd_fleet_status(args: argparse.Namespace) -> int:
    """The state of every practice of a fleet: its status, Vision's five counters and its latest
    job, and the fleet's totals.

    Example: scr-nb fleet status --stores stores/ --json
    """
    from scr_nb.fleet.status import fleet_status

    status = fleet_status(store=args.store, stores_dir=args.stores)
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return EXIT_OK
    print(f"{'practice':<10} {'status':<12} " + " ".join(f"{name:>12}" for name in COUNTERS))
    for practice in status["practices"]:
        line = f"{practice['ods_code']:<10} {str(practice.get('status') or '-'):<12} "
        if practice.get("counters") is None:   # a store that could not be read says why
            print(line + str(practice.get("error") or ""))
            continue
        print(line + " ".join(f"{practice['counters'].get(name, 0):>12}" for name in COUNTERS))
    totals = status.get("totals") or {}
    print(f"{'total':<10} {'':<12} " + " ".join(f"{totals.get(name, 0):>12}" for name in COUNTERS))
    return EXIT_OK


def cmd_fleet_stop(args: argparse.Namespace) -> int:
    """Ask every practice job running on a fleet's stores, whichever worker runs it, to Stop
    (default), Stop and Close (--close) or Cancel (--cancel); wait until they have stopped. The
    fleet's coordinator then starts no more practices. Exit 0 when something stopped, 3 when
    nothing was running.

    Example: scr-nb fleet stop --store postgresql://scr@db.example/scr --close
    """
    from scr_nb.fleet.stop import stop_fleet
    from scr_nb.ui.cli import who_asks

    request = "cancel" if args.cancel else "close" if args.close else "stop"
    try:
        stopped, running = stop_fleet(args.store, args.stores, request=request,
                                      who=who_asks(args),
                                      wait=args.wait,
                                      say=lambda line: print(line, file=sys.stderr))
    except StoreError as err:
        print(f"scr-nb fleet stop: {err}: so no practice job runs there: nothing to stop.",
              file=sys.stderr)
        return EXIT_REFUSED
    if not stopped and not running:
        print("scr-nb fleet stop: no practice job is running on these stores: nothing to stop.",
              file=sys.stderr)
        return EXIT_REFUSED
    if running:
        print(f"scr-nb fleet stop: {len(running)} job(s) have not stopped within {args.wait:g} s "
              f"({', '.join(a.ods for a in running)}); the requests stand.", file=sys.stderr)
        return EXIT_ERROR
    print(f"{len(stopped)} practice job(s) stopped.")
    return EXIT_OK


__all__ = ["add_fleet_parser", "cmd_fleet_status", "cmd_fleet_stop", "cmd_fleet_upload"]
