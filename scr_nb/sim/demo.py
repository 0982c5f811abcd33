"""The demo the README runs: a synthetic practice uploaded to the local Spine simulator.

It uses the kit exactly as an administrator would, through the ``scr-nb`` commands: synth,
spine-sim (in its own process), login, eligibility, upload run, upload failed, status. It ends with
the completion statistics, a summary and the HTML report in the output directory, and checks the
Spine's own count of accepted summaries against the store's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from scr_nb.ui import cli

DEMO_USER = {"user_id": "555000000001", "passcode": "demo-passcode", "name": "Dr Alex Morgan",
             "role_profile_id": "555000001001", "activities": ["B0062", "B0068"],
             "session_hours": 10}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_simulator(users: Path, port: int, extra: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "scr_nb", "spine-sim", "--host", "127.0.0.1",
               "--port", str(port), "--users", str(users), *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    deadline = time.monotonic() + 30
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the Spine simulator exited: {process.stdout.read()}")
        try:
            httpx.get(f"{url}/_admin/stats", timeout=1)
            return process
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the Spine simulator did not start within 30 s")


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def fresh_folder(out_dir: str) -> tuple[Path, Path, Path]:
    """The demo's output folder, emptied, with the demo user's file (owner-only): (the folder,
    the session file to write, the users file)."""
    out = Path(out_dir).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    users = out / "users.json"
    users.write_text(json.dumps([DEMO_USER], indent=2))
    os.chmod(users, 0o600)
    return out, out / "session.json", users


def login(spine: str, session: Path) -> bool:
    """``scr-nb login`` as the demo user, the passcode from the environment as a user's would be."""
    os.environ["SCR_NB_PASSCODE"] = DEMO_USER["passcode"]
    return cli.main(["login", "--identity", spine, "--user", DEMO_USER["user_id"],
                     "--session", str(session)]) == 0


def stop(simulator: subprocess.Popen) -> None:
    simulator.terminate()
    try:
        simulator.wait(timeout=10)
    except subprocess.TimeoutExpired:
        simulator.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scr_nb.sim.demo", description=__doc__)
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="reports/demo")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)

    out, session, users = fresh_folder(args.out)
    practice, store = out / "practice", out / "practice.sqlite"

    step(f"1. A synthetic practice of {args.patients} patients")
    cli.main(["synth", "--patients", str(args.patients), "--seed", str(args.seed),
              "--out", str(practice)])

    step("2. The Spine simulator on loopback (20 ms ack delay, 1% transient faults, "
         "0.5% access-control rejections)")
    port = free_port()
    spine = f"http://127.0.0.1:{port}"
    simulator = start_simulator(users, port, ["--seed", str(args.seed), "--ack-delay-ms", "20",
                                              "--transient-rate", "0.01",
                                              "--reject", "30418=0.005"])
    print(f"Spine simulator at {spine}")
    try:
        step("3. Smartcard login")
        if not login(spine, session):
            return 1

        step("4. Dry run: who is eligible")
        cli.main(["eligibility", "--practice", str(practice)])

        common = ["--practice", str(practice), "--store", str(store), "--spine", spine,
                  "--session", str(session), "--concurrency", str(args.concurrency)]
        step("5. Run: the initial upload")
        code = cli.main(["upload", "run", *common])
        if code not in (0, 4):
            return code

        status = json.loads(_capture(["status", "--store", str(store), "--json"]))
        if status["counters"]["failed"]:
            step("6. Failed: reprocess the patients whose upload failed")
            code = cli.main(["upload", "failed", *common])

        step("7. Completion")
        status_text = _capture(["status", "--store", str(store), "--json"])
        (out / "status.json").write_text(status_text)
        status = json.loads(status_text)
        spine_stats = httpx.get(f"{spine}/_admin/stats", timeout=10).json()
        held = len(httpx.get(f"{spine}/_admin/summaries", timeout=30).json())
        report = _report(status, spine_stats, held)
        (out / "completion-report.txt").write_text(report + "\n")
        print(report)
        step("8. The HTML report (NHS numbers masked)")
        cli.main(["report", "--store", str(store), "--out", str(out)])
        print(f"\nSummary: {out / 'completion-report.txt'}\nStore: {store}\n"
              f"Log: {store}.log.jsonl")
        return 0 if held == status["counters"]["sent"] else 1
    finally:
        stop(simulator)


def _capture(argv: list[str]) -> str:
    from contextlib import redirect_stdout
    from io import StringIO

    buffer = StringIO()
    with redirect_stdout(buffer):
        cli.main(argv)
    return buffer.getvalue()


def _report(status: dict, spine_stats: dict, held: int) -> str:
    c = status["counters"]
    job = status["latest_job"]
    lines = [
        "SCR GP Summary Initial Upload: completion report",
        f"Latest job: {job['id']} {job['mode']} ({job['group'] or 'whole list'}), {job['status']}",
        f"Unprocessed {c['unprocessed']}  Sending {c['sending']}  Sent {c['sent']}  "
        f"Failed {c['failed']}  Not Required {c['not_required']}",
        "Not required by reason:",
        *(f"  {reason:<22} {n}" for reason, n in status["not_required_by_reason"].items() if n),
        "Failed by code:" if status["failed_by_code"] else "Failed by code: none",
        *(f"  {code:<22} {n}" for code, n in status["failed_by_code"].items()),
        f"The Spine holds {held} summaries; the store has {c['sent']} acknowledged "
        f"({'they agree' if held == c['sent'] else 'MISMATCH'}).",
        f"Spine: {spine_stats.get('requests')} requests, {spine_stats.get('duplicates')} "
        f"duplicates eliminated, transient faults injected {spine_stats.get('transient_faults_injected')}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
