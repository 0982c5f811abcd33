"""The fleet demo (``bash scripts/demo.sh --fleet``): many small synthetic practices uploaded at
once on a local Dask cluster, under one rate limit for the whole fleet, to a Spine simulator that
limits the rate it accepts too.

Like the single-practice demo it uses the kit as a supplier's operator would, through ``scr-nb``
commands: synth (one per practice), spine-sim (its own process), login, ``fleet run``, ``fleet
status``. It ends with a completion report that checks the fleet against the Spine's own record:
the summaries the Spine holds against the fleet's acknowledged patients, duplicates, and the
fleet's busiest second against its rate limit. With ``--store postgresql://...`` the practices
share one PostgreSQL database; by default each has its own SQLite store.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from datetime import datetime

import httpx

from scr_nb.sim.demo import _capture, free_port, fresh_folder, login, start_simulator, step, stop
from scr_nb.ui import cli


def practice_codes(count: int) -> list[str]:
    """ODS codes of the demo's practices: Y90001, Y90002, ... (the Y9 prefix is unused by real
    GP practices' codes)."""
    return [f"Y9{n:04d}" for n in range(1, count + 1)]


def busiest_second(accepted_at: list[str]) -> int:
    """The most summaries the Spine accepted within any one second (a sliding window)."""
    times = sorted(datetime.fromisoformat(at).timestamp() for at in accepted_at)
    most, first = 0, 0
    for last, now in enumerate(times):
        while now - times[first] >= 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scr_nb.sim.demo_fleet", description=__doc__)
    parser.add_argument("--practices", type=int, default=12, help="practices (default 12)")
    parser.add_argument("--patients", type=int, default=250, help="patients each (default 250)")
    parser.add_argument("--max-practices", type=int, default=4)
    parser.add_argument("--rate-limit", type=float, default=60.0,
                        help="the fleet's one rate limit, messages a second (default 60)")
    parser.add_argument("--store", help="a PostgreSQL URL for the whole fleet (default: one "
                                        "SQLite store per practice)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="reports/demo-fleet")
    args = parser.parse_args(argv)

    out, session, users = fresh_folder(args.out)
    practices, stores = out / "practices", out / "stores"
    where = ["--store", args.store] if args.store else ["--stores", str(stores)]

    codes = practice_codes(args.practices)
    step(f"1. {len(codes)} synthetic practices of {args.patients} patients: "
         f"{codes[0]} to {codes[-1]}")
    for n, code in enumerate(codes):
        cli.main(["synth", "--patients", str(args.patients), "--seed", str(args.seed + n),
                  "--ods", code, "--out", str(practices / code)])

    step("2. The Spine simulator on loopback (20 ms ack delay, 1% transient faults, accepting "
         f"at most {args.rate_limit * 1.5:g} messages a second)")
    port = free_port()
    spine = f"http://127.0.0.1:{port}"
    simulator = start_simulator(users, port, ["--seed", str(args.seed), "--ack-delay-ms", "20",
                                              "--transient-rate", "0.01",
                                              "--rate-limit", f"{args.rate_limit * 1.5:g}"])
    print(f"Spine simulator at {spine}")
    try:
        step("3. Smartcard login: one operator's session for every practice")
        if not login(spine, session):
            return 1

        step(f"4. Fleet run: a local Dask cluster, at most {args.max_practices} practices at "
             f"once, {args.rate_limit:g} messages a second for the whole fleet")
        command = [sys.executable, "-m", "scr_nb", "fleet", "run", "--practices", str(practices),
                   *where, "--spine", spine, "--session", str(session),
                   "--max-practices", str(args.max_practices),
                   "--rate-limit", f"{args.rate_limit:g}", "--progress-every", "5"]
        print("$ scr-nb " + " ".join(command[3:]), flush=True)
        code = subprocess.run(command).returncode
        if code not in (0, 4):
            return code

        step("5. Fleet status, and the Spine's own record")
        status_text = _capture(["fleet", "status", *where, "--json"])
        (out / "fleet-status.json").write_text(status_text)
        status = json.loads(status_text)
        spine_stats = httpx.get(f"{spine}/_admin/stats", timeout=10).json()
        summaries = httpx.get(f"{spine}/_admin/summaries", timeout=30).json()
        report = _report(status, spine_stats, summaries, args.rate_limit)
        (out / "completion-report.txt").write_text(report + "\n")
        print(report)
        print(f"\nSummary: {out / 'completion-report.txt'}\nFleet status: "
              f"{out / 'fleet-status.json'}\nMonitor it: notebooks/fleet_monitor.ipynb with "
              + (f"store = {args.store!r}" if args.store else f"stores_dir = {str(stores)!r}"))
        agree = len(summaries) == status["totals"]["sent"]
        return 0 if agree and code == 0 else 1
    finally:
        stop(simulator)


def _report(status: dict, spine_stats: dict, summaries: list[dict], limit: float) -> str:
    totals = status["totals"]
    by_status = Counter(practice["status"] for practice in status["practices"])
    busiest = busiest_second([s["accepted_at"] for s in summaries])
    lines = [
        "SCR GP Summary Initial Upload: fleet completion report",
        f"Practices: {len(status['practices'])} ("
        + ", ".join(f"{n} {name}" for name, n in sorted(by_status.items())) + ")",
        f"Unprocessed {totals['unprocessed']}  Sending {totals['sending']}  Sent "
        f"{totals['sent']}  Failed {totals['failed']}  Not Required {totals['not_required']}",
        f"The Spine holds {len(summaries)} summaries; the fleet has {totals['sent']} "
        f"acknowledged ({'they agree' if len(summaries) == totals['sent'] else 'MISMATCH'}).",
        f"Spine: {spine_stats.get('requests')} requests, {spine_stats.get('duplicates')} "
        f"duplicates eliminated, rejected {spine_stats.get('rejected_by_code') or 'none'}, "
        f"transient faults injected {spine_stats.get('transient_faults_injected')}",
        f"Busiest second at the Spine: {busiest} summaries accepted (the fleet's limit: "
        f"{limit:g} a second).",
    ]
    shared = (spine_stats.get("rejected_by_code") or {}).get("30134", 0)
    if shared:
        lines.append(f"{shared} patients are in two practices' extracts (the synthetic practices "
                     "draw NHS numbers from one range): the Spine already held the first "
                     "practice's summary and answered the second with 30134, so that practice "
                     "counts them Not Required (existing_summary_at_spine), not failed.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
