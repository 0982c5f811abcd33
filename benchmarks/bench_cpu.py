"""CPU per acknowledged message of a whole ``scr-nb upload run`` process (issue 11, item 5).

Target: at most 500 microseconds of CPU (user + system) per acknowledged message for the whole
``scr-nb upload run`` process (interpreter start, imports, extract read, eligibility, store sync,
sending and tracking, exit), against a zero-latency simulator with ``--concurrency 32``, while the
kit's POST rate stays at least 0.8 of a raw HTTP load's in the same run.

In one run:

1. A synthetic practice is written (not timed) and a Spine simulator is started in its own process
   (``python -m scr_nb spine-sim``) on a free loopback port, zero latency, zero ack delay, its
   default poll Retry-After of 100 ms. ``scr-nb login`` gets a session.
2. **kit**: ``python -m scr_nb upload run --practice DIR --store FILE --spine URL --session FILE
   --concurrency C --quiet --json`` is a child process; its own user + system CPU comes from
   ``os.wait4`` (the resource usage of exactly that process, reaped). Acknowledged patients come
   from ``scr-nb status --json`` on the store. The POST rate is the store's POST attempts over the
   time from the first to the last POST (the send phase); the end-to-end rate is acknowledged
   messages over the process's wall time.
3. **raw**: a fresh simulator; the same number of messages, built before the clock starts, sent by
   this process with plain aiohttp by C senders with the kit's headers, each 202 followed by a poll
   task that waits the Retry-After and polls until the ack (the engine's shape, as in
   bench_upload.py). Its CPU per ack (this process's, during the load only) is the floor for two
   HTTP requests per message with aiohttp on this machine; its POST rate is the one the kit's is
   compared with.
4. **startup**: the CPU of a child that only starts Python and imports what ``upload run``
   imports (``python -c "import scr_nb.ui.cli, scr_nb.job.engine, ..."``), via ``os.wait4``.

Prints one JSON object. ``--cprofile FILE`` runs the kit under ``python -m cProfile -o FILE`` (its
CPU is then inflated; use it to see where the time goes, not for the target).

Example: .venv/bin/python benchmarks/bench_cpu.py --patients 20000 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp  # noqa: E402

from bench_upload import (  # noqa: E402  (benchmarks/ is not a package)
    SEED,
    USER,
    cpu_seconds,
    loadavg,
    prebuild,
    raw_load,
    sim_stats_sync,
    simulator,
)
from scr_nb.sim.synth import write_practice  # noqa: E402
from scr_nb.spine import session as sessions  # noqa: E402
from scr_nb.spine.gp_summary import OutboundMessage  # noqa: E402

TARGET_US_PER_ACK = 500.0
TARGET_RATE_RATIO = 0.8
# What `upload run` imports before it reads anything (the startup child imports the same).
UPLOAD_IMPORTS = ("scr_nb.ui.cli", "scr_nb.job.runner", "scr_nb.job.engine", "scr_nb.job.pipeline",
                  "scr_nb.spine.client", "scr_nb.spine.acks", "scr_nb.sim.spine_sim")


def python() -> str:
    return sys.executable


def source() -> dict:
    """Which scr_nb the children run (the one imported from this working directory) and its
    commit; ``modified_files`` counts files of scr_nb/ that differ from that commit."""
    where = subprocess.run([python(), "-c", "import scr_nb; print(scr_nb.__file__)"], check=True,
                           capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout
    package = Path(where.strip()).resolve().parent
    found = {"scr_nb": str(package)}
    try:
        found["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=package,
                                         capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=package,
                                 capture_output=True, text=True, check=True).stdout
        found["modified_files"] = len(changed.splitlines())
    except (OSError, subprocess.CalledProcessError):
        pass
    return found


def run_child(command: list[str], timeout: float, stdout, env: dict | None = None,
              ) -> tuple[int, float, float, float, float]:
    """Run ``command``; (exit code, user s, system s, wall s, peak RSS MB) of exactly that child,
    from ``os.wait4``. Terminated (then killed) after ``timeout`` seconds."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE if stdout is None
                            else subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def stop() -> None:
        try:
            proc.terminate()
            time.sleep(10)
            proc.kill()
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, stop)
    timer.daemon = True
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)   # reaped here, not by Popen
    return proc.returncode, usage.ru_utime, usage.ru_stime, wall, usage.ru_maxrss / 1024


def login(url: str, session_file: Path) -> None:
    env = {**os.environ, "SCR_NB_PASSCODE": USER["passcode"]}
    subprocess.run([python(), "-m", "scr_nb", "login", "--identity", url, "--user",
                    USER["user_id"], "--session", str(session_file)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)


def status_json(store: Path) -> dict:
    out = subprocess.run([python(), "-m", "scr_nb", "status", "--store", str(store), "--json"],
                         check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return json.loads(out.stdout)


def _iso(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def store_timings(store: Path) -> dict:
    """POSTs and polls recorded in the store's attempts, and the send phase's span."""
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        rows = {kind: (n, first, last) for kind, n, first, last in db.execute(
            "SELECT kind, COUNT(*), MIN(at), MAX(at) FROM attempts GROUP BY kind")}
        acked = db.execute("SELECT COUNT(*), MIN(acked_at), MAX(acked_at) FROM messages "
                           "WHERE ack_type = 'AA'").fetchone()
    finally:
        db.close()
    posts, first_post, last_post = rows.get("post", (0, None, None))
    polls = rows.get("poll", (0, None, None))[0]
    post_span = _iso(last_post) - _iso(first_post) if posts > 1 else None
    send_span = _iso(acked[2]) - _iso(first_post) if acked[0] and first_post else None
    return {"posts": posts, "polls": polls, "post_span_s": round(post_span, 3) if post_span else None,
            "post_per_s": round((posts - 1) / post_span, 1) if post_span else None,
            "send_phase_s": round(send_span, 3) if send_span else None,
            "ack_per_s_send_phase": round(acked[0] / send_span, 1) if send_span else None}


# --- the kit -----------------------------------------------------------------------------------------

def run_kit(url: str, practice: Path, workdir: Path, session_file: Path,
            args: argparse.Namespace) -> dict:
    store = workdir / "practice.sqlite"
    command = [python()]
    if args.cprofile:
        command += ["-m", "cProfile", "-o", str(Path(args.cprofile).resolve())]
    command += ["-m", "scr_nb", "upload", "run", "--practice", str(practice), "--store",
                str(store), "--spine", url, "--session", str(session_file), "--concurrency",
                str(args.concurrency), "--quiet", "--json"]
    output = workdir / "kit.out"
    load_start = loadavg()
    with open(output, "wb") as out:
        code, user, system, wall, rss = run_child(command, args.timeout, out)
    load_end = loadavg()
    status = status_json(store)
    acknowledged = status["counters"]["sent"]
    cpu = user + system
    timings = store_timings(store)
    text = output.read_text(errors="replace")
    return {
        "exit_code": code,
        "job_status": (status.get("latest_job") or {}).get("status"),
        "acknowledged": acknowledged,
        "failed": status["counters"]["failed"],
        "failed_by_code": status["failed_by_code"],
        "not_required": status["counters"]["not_required"],
        "cpu_user_s": round(user, 3),
        "cpu_system_s": round(system, 3),
        "cpu_s": round(cpu, 3),
        "us_per_ack": round(1e6 * cpu / acknowledged, 1) if acknowledged else None,
        "wall_s": round(wall, 3),
        "cpu_over_wall": round(cpu / wall, 3) if wall else None,
        "peak_rss_mb": round(rss, 1),
        "end_to_end_ack_per_s": round(acknowledged / wall, 1) if wall else None,
        "polls_per_ack": round(timings["polls"] / acknowledged, 3) if acknowledged else None,
        **{f"store_{k}": v for k, v in timings.items()},
        "prepare_s": round(wall - timings["send_phase_s"], 3) if timings["send_phase_s"] else None,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "output_tail": text[-600:] if code != 0 else None,
        "cprofile": str(Path(args.cprofile).resolve()) if args.cprofile else None,
    }


# --- the raw load ------------------------------------------------------------------------------------

def run_raw(url: str, messages: list[OutboundMessage], args: argparse.Namespace) -> dict:
    token = sessions.login(url, USER["user_id"], USER["passcode"]).token
    load_start = loadavg()
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = asyncio.run(raw_load(url, token, messages, args.concurrency, None, args.timeout))
    after = resource.getrusage(resource.RUSAGE_SELF)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    acked = result["acknowledged"]
    result["ack_per_s"] = result.pop("per_s")
    return {**result, "messages": len(messages),
            "polls_per_ack": round(result["polls"] / acked, 3) if acked else None,
            "cpu_user_s": round(user, 3), "cpu_system_s": round(system, 3),
            "cpu_s": round(user + system, 3),
            "us_per_ack": round(1e6 * (user + system) / acked, 1) if acked else None,
            "us_per_request": round(1e6 * (user + system) / (result["posts"] + result["polls"]), 1)
                              if result["posts"] else None,
            "loadavg_start": load_start, "loadavg_end": loadavg()}


# --- startup -----------------------------------------------------------------------------------------

def run_startup(repeat: int) -> dict:
    """CPU of a bare interpreter and of one that imports what ``upload run`` imports (best of)."""
    bare, imports = [], []
    statement = "import " + ", ".join(UPLOAD_IMPORTS)
    for _ in range(repeat):
        code, user, system, _, _ = run_child([python(), "-c", "pass"], 60, subprocess.DEVNULL)
        bare.append(user + system)
        code, user, system, _, _ = run_child([python(), "-c", statement], 60, subprocess.DEVNULL)
        if code != 0:
            raise RuntimeError(f"{statement!r} failed with exit {code}")
        imports.append(user + system)
    return {"python_bare_cpu_s": round(min(bare), 3), "python_upload_imports_cpu_s": round(min(imports), 3),
            "imports": list(UPLOAD_IMPORTS)}


# --- the run -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=20000, help="practice size (default 20000)")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="messages in transit at once, kit and raw load alike (default 32)")
    parser.add_argument("--poll-retry-after-ms", type=int, default=100,
                        help="simulator's Retry-After on 202 answers (default 100, its own default)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds each phase may take before it is abandoned (default 900)")
    parser.add_argument("--skip-raw", action="store_true", help="measure the kit only")
    parser.add_argument("--startup-repeat", type=int, default=3,
                        help="start-up children to run, best taken (default 3; 0 skips)")
    parser.add_argument("--cprofile", metavar="FILE",
                        help="run the kit under cProfile, writing FILE (its CPU is then inflated)")
    parser.add_argument("--keep", metavar="DIR",
                        help="work in DIR and keep it (practice, store, session, logs)")
    args = parser.parse_args(argv)
    if args.patients <= 0 or args.concurrency <= 0:
        parser.error("--patients and --concurrency must be positive")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report: dict = {
        "benchmark": "cpu", "started_at": datetime.now(timezone.utc).isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "aiohttp": aiohttp.__version__,
                    "source": source(),
                    "loadavg_1_5_15_at_start": loadavg()},
        "settings": {"patients": args.patients, "concurrency": args.concurrency,
                     "latency_ms": 0, "ack_delay_ms": 0,
                     "poll_retry_after_ms": args.poll_retry_after_ms, "seed": SEED,
                     "simulator": "separate process (scr-nb spine-sim) on 127.0.0.1",
                     "cprofile": bool(args.cprofile)},
        "target": {"us_per_ack_at_most": TARGET_US_PER_ACK,
                   "post_rate_over_raw_at_least": TARGET_RATE_RATIO},
    }
    sim_args = argparse.Namespace(poll_retry_after_ms=args.poll_retry_after_ms, latency_ms=0.0,
                                  rate_limit=None, limit_at="both")
    temporary = None if args.keep else tempfile.TemporaryDirectory(prefix="scr-nb-bench-cpu-")
    try:
        workdir = Path(args.keep) if args.keep else Path(temporary.name)
        workdir.mkdir(parents=True, exist_ok=True)
        users_file = workdir / "users.json"
        users_file.write_text(json.dumps([USER]), encoding="utf-8")
        practice = workdir / "practice"
        synth = write_practice(practice, args.patients, seed=SEED)
        report["settings"]["eligible"] = synth.expected_eligible
        store = workdir / "practice.sqlite"
        for leftover in workdir.glob("practice.sqlite*"):
            leftover.unlink()

        if args.startup_repeat:
            report["startup"] = run_startup(args.startup_repeat)

        with simulator(workdir, "sim-kit", users_file, sim_args) as sim:
            session_file = workdir / "session.json"
            login(sim.url, session_file)
            sim_cpu = sim.cpu_seconds()
            kit = run_kit(sim.url, practice, workdir, session_file, args)
            kit["simulator_cpu_s"] = round(sim.cpu_seconds() - sim_cpu, 2)
            kit["simulator_us_per_ack"] = round(1e6 * kit["simulator_cpu_s"] / kit["acknowledged"], 1) \
                if kit["acknowledged"] else None
            kit["simulator"] = sim_stats_sync(sim.url)
        report["kit"] = kit

        if not args.skip_raw:
            messages = prebuild(practice, kit["acknowledged"] or synth.expected_eligible)
            with simulator(workdir, "sim-raw", users_file, sim_args) as sim:
                sim_cpu = sim.cpu_seconds()
                raw = run_raw(sim.url, messages, args)
                raw["simulator_cpu_s"] = round(sim.cpu_seconds() - sim_cpu, 2)
                raw["simulator_us_per_ack"] = round(1e6 * raw["simulator_cpu_s"] / raw["acknowledged"], 1) \
                    if raw["acknowledged"] else None
                raw["simulator"] = sim_stats_sync(sim.url)
            report["raw"] = raw
    finally:
        if temporary is not None:
            temporary.cleanup()

    kit = report["kit"]
    verdict: dict = {"us_per_ack": kit["us_per_ack"],
                     "cpu_met": kit["us_per_ack"] is not None
                     and kit["us_per_ack"] <= TARGET_US_PER_ACK}
    if "raw" in report:
        raw = report["raw"]
        if raw["post_per_s"] and kit["store_post_per_s"]:
            verdict["kit_post_rate_over_raw"] = round(kit["store_post_per_s"] / raw["post_per_s"], 3)
            verdict["rate_met"] = verdict["kit_post_rate_over_raw"] >= TARGET_RATE_RATIO
        if raw["ack_per_s"] and kit["end_to_end_ack_per_s"]:
            verdict["kit_end_to_end_over_raw_ack_rate"] = round(
                kit["end_to_end_ack_per_s"] / raw["ack_per_s"], 3)
        if raw["us_per_ack"] and kit["us_per_ack"]:
            verdict["kit_cpu_over_raw_cpu"] = round(kit["us_per_ack"] / raw["us_per_ack"], 2)
        verdict["met"] = bool(verdict["cpu_met"] and verdict.get("rate_met"))
    report["verdict"] = verdict
    report["machine"]["loadavg_1_5_15_at_end"] = loadavg()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
