"""Upload rate (SPEC 11): the kit's engine against the Spine simulator, beside a raw HTTP load.

Two simulator processes are started in turn on free loopback ports (``scr-nb spine-sim``, so the
simulator never shares this process's GIL). Against the first, an Engine Run job uploads a synthetic
practice; the end-to-end rate is acknowledged messages per second. Against the second, a raw aiohttp
load sends the same number of pre-built messages (built before the clock starts) with the same
concurrency: POST /clinical, then polls after each Retry-After until the ack, as the engine does. The
kit/raw ratio is how much of the loopback Spine's capacity the kit's own work leaves unused.

With --rate-limit TPS the simulator enforces TPS (429 with Retry-After) and, unless --limit-at says
otherwise, the kit and the raw load are configured to pace themselves at TPS too; the report gives the
achieved rate as a fraction of TPS. With --latency-ms L the simulator delays each POST by L, and the
report gives the achieved rate as a fraction of concurrency / L. Prints one JSON object.

Example: .venv/bin/python benchmarks/bench_upload.py --patients 3000 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import aiohttp

from scr_nb.constants import SOAP_ACTION
from scr_nb.extract.eligibility import Policy, decide
from scr_nb.extract.reader import load_practice
from scr_nb.job.engine import Engine
from scr_nb.job.options import JobOptions
from scr_nb.sim.synth import write_practice
from scr_nb.spine import session as sessions
from scr_nb.spine.client import RateLimiter
from scr_nb.spine.content import Windows, select_content
from scr_nb.spine.gp_summary import Author, OutboundMessage, build_message, new_id
from scr_nb.store.practice_store import Store
from scr_nb.store.states import Mode

HOST = "127.0.0.1"
SEED = 20240611
USER = {"user_id": "555000000001", "passcode": "bench-passcode", "name": "Dr Alex Morgan",
        "role_profile_id": "555000001001", "activities": ["B0062"], "session_hours": 10}
ASID = "200000000001"


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- the simulator in its own process -------------------------------------------------------------

def cpu_seconds(pid: int | None = None) -> float | None:
    """User + system CPU time of this process, or of process ``pid`` (Linux /proc) if given."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Simulator:
    def __init__(self, url: str, pid: int):
        self.url, self.pid = url, pid

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.pid)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextmanager
def simulator(workdir: Path, name: str, users_file: Path, args: argparse.Namespace,
              start_timeout: float = 20.0) -> Iterator[Simulator]:
    """A ``scr-nb spine-sim`` process on a free loopback port; always stopped on the way out."""
    switches = ["--users", str(users_file), "--poll-retry-after-ms", str(args.poll_retry_after_ms)]
    if args.latency_ms:
        switches += ["--latency-ms", str(args.latency_ms)]
    if args.rate_limit and args.limit_at in ("both", "spine"):
        switches += ["--rate-limit", str(args.rate_limit)]
    with serving(workdir, name, lambda port: [
            sys.executable, "-m", "scr_nb.ui.cli", "spine-sim", "--host", HOST, "--port",
            str(port), *switches], start_timeout) as (url, pid):
        yield Simulator(url, pid)


@contextmanager
def serving(workdir: Path, name: str, command: Callable[[int], list[str]],
            start_timeout: float = 20.0) -> Iterator[tuple[str, int]]:
    """The server ``command(port)`` starts on a free loopback port, its output in
    ``workdir/<name>.log``: (its base URL, its pid) once it listens; always stopped on the way
    out."""
    port = free_port()
    output = open(workdir / f"{name}.log", "wb")
    proc = subprocess.Popen(command(port), stdout=output, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}: "
                                   f"{(workdir / f'{name}.log').read_text(errors='replace')[-2000:]}")
            try:
                socket.create_connection((HOST, port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not listen on {HOST}:{port} within "
                                       f"{start_timeout:.0f} s") from None
                time.sleep(0.05)
        yield f"http://{HOST}:{port}", proc.pid
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        output.close()


async def sim_stats(url: str) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.get(f"{url}/_admin/stats") as response:
            return await response.json()


def sim_stats_sync(url: str) -> dict:
    try:
        return asyncio.run(sim_stats(url))
    except Exception as err:   # a benchmark reports what it can
        return {"error": f"{type(err).__name__}: {err}"}


# --- the kit -----------------------------------------------------------------------------------------

def run_kit(url: str, practice_dir: Path, workdir: Path, args: argparse.Namespace) -> dict:
    session = sessions.login(url, USER["user_id"], USER["passcode"])
    store = Store(workdir / "practice.sqlite")
    marks: dict[str, float] = {}

    def on_progress(progress) -> None:
        now = time.perf_counter()
        marks.setdefault("first_progress", now)
        if progress.transmitted and "first_transmitted" not in marks:
            marks["first_transmitted"] = now

    rate_limit = args.rate_limit if args.rate_limit and args.limit_at in ("both", "kit") else None
    options = JobOptions(mode=Mode.RUN, concurrency=args.concurrency, rate_limit=rate_limit,
                         ack_timeout=min(600.0, args.timeout))
    load_start, cpu_start = loadavg(), cpu_seconds()
    try:
        engine = Engine(store, session, url, practice_dir, on_progress=on_progress)
        started = time.perf_counter()
        try:
            result = asyncio.run(asyncio.wait_for(engine.run_async(options), args.timeout))
            timed_out = False
        except asyncio.TimeoutError:
            result, timed_out = None, True
        ended = time.perf_counter()
        status = store.status()
    finally:
        store.close()
    acknowledged = status["counters"]["sent"]
    total_s = ended - started
    # The send phase starts at the engine's first progress report: extract read, eligibility decided,
    # store synced and the plan made.
    send_s = ended - marks.get("first_progress", started)
    return {
        "timed_out": timed_out,
        "job_status": result.job.status if result else status["latest_job"]["status"],
        "acknowledged": acknowledged,
        "failed": status["counters"]["failed"],
        "failed_by_code": status["failed_by_code"],
        "not_required": status["counters"]["not_required"],
        "seconds_total": round(total_s, 3),
        "seconds_prepare": round(total_s - send_s, 3),
        "seconds_send": round(send_s, 3),
        "end_to_end_per_s": round(acknowledged / total_s, 1) if total_s else None,
        "send_phase_per_s": round(acknowledged / send_s, 1) if send_s else None,
        "rate_limit_kit": rate_limit,
        "kit_cpu_s": cpu_delta(cpu_seconds(), cpu_start),
        "kit_cpu_ms_per_message": round(1000 * (cpu_seconds() - cpu_start) / acknowledged, 2)
                                  if acknowledged else None,
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
    }


# --- the raw load ------------------------------------------------------------------------------------

def prebuild(practice_dir: Path, count: int) -> list[OutboundMessage]:
    """The messages the kit sent (the eligible patients'), built with the same author and windows."""
    today = datetime.now().date()
    practice = load_practice(practice_dir, today=today)
    author = Author(user_id=USER["user_id"], name=USER["name"],
                    role_profile_id=USER["role_profile_id"], sender_asid=ASID,
                    practice_name="scr-nb demonstration practice")
    windows, created = Windows(today=today), datetime.now(timezone.utc)
    messages = []
    for decision in decide(practice, Policy(today=today)):
        if not decision.eligible:
            continue
        patient = decision.patient
        content = select_content(practice.medications.get(patient.patient_id, ()),
                                 practice.allergies.get(patient.patient_id, ()), windows)
        messages.append(build_message(patient, content, author=author, message_id=new_id(),
                                      event_id=new_id(), created=created,
                                      dissent=decision.dissent))
    return messages[:count]


def retry_after(response: aiohttp.ClientResponse, default: float) -> float:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")) / 1000.0)
    except ValueError:
        return default


async def raw_load(url: str, token: str, messages: list[OutboundMessage], concurrency: int,
                   rate: float | None, timeout: float) -> dict:
    """``concurrency`` senders POST; each accepted message is polled by its own task, as in the kit."""
    counts = {"acknowledged": 0, "ack_not_aa": 0, "posts": 0, "polls": 0, "http_429": 0,
              "errors": 0}
    base = {"Authorization": f"Bearer {token}", "NHSD-Session-URID": USER["role_profile_id"],
            "NHSD-Identity-UUID": USER["user_id"], "nhsd-asid": ASID}
    pacer = RateLimiter(rate) if rate else None
    pollers: set[asyncio.Task] = set()
    queue = iter(messages)
    deadline = time.monotonic() + timeout
    marks: dict[str, float] = {}   # the times of the first and the last POST

    def headers() -> dict[str, str]:
        return {**base, "NHSD-Request-ID": str(uuid.uuid4()).upper()}

    async def poll(http: aiohttp.ClientSession, location: str, wait: float) -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(wait)
            counts["polls"] += 1
            async with http.get(location, headers=headers()) as response:
                body = await response.read()
                if response.status == 200:
                    # No XML parse: a byte search for the AA type code is the raw floor.
                    counts["acknowledged" if b'typeCode="AA"' in body else "ack_not_aa"] += 1
                    return
                if response.status != 202:
                    counts["errors"] += 1
                    return
                wait = max(0.05, retry_after(response, 0.5))

    async def sender(http: aiohttp.ClientSession) -> None:
        for message in queue:
            while time.monotonic() < deadline:
                if pacer:
                    await pacer.acquire()
                counts["posts"] += 1
                marks.setdefault("first_post", time.perf_counter())
                marks["last_post"] = time.perf_counter()
                post_headers = {**headers(), "SOAPAction": SOAP_ACTION,
                                "Content-Type": message.content_type}
                async with http.post(f"{url}/clinical", data=message.body,
                                     headers=post_headers) as response:
                    await response.read()
                    if response.status == 202:
                        location = url + response.headers["Content-Location"]
                        task = asyncio.create_task(poll(http, location, retry_after(response, 0.5)))
                        pollers.add(task)
                        task.add_done_callback(pollers.discard)
                        break
                    if response.status == 429:
                        counts["http_429"] += 1
                        await asyncio.sleep(retry_after(response, 1.0))
                        continue
                    counts["errors"] += 1
                    break

    connector = aiohttp.TCPConnector(limit=concurrency * 2 + 4)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=30)) as http:
        started = time.perf_counter()
        senders = [asyncio.create_task(sender(http)) for _ in range(concurrency)]
        try:
            await asyncio.wait_for(asyncio.gather(*senders), max(1.0, deadline - time.monotonic()))
            while pollers:
                await asyncio.wait_for(asyncio.gather(*list(pollers)),
                                       max(1.0, deadline - time.monotonic()))
            timed_out = False
        except asyncio.TimeoutError:
            timed_out = True
        finally:
            for task in [*senders, *pollers]:
                task.cancel()
        seconds = time.perf_counter() - started
    post_span = marks.get("last_post", 0.0) - marks.get("first_post", 0.0)
    return {**counts, "timed_out": timed_out, "seconds": round(seconds, 3),
            "per_s": round(counts["acknowledged"] / seconds, 1) if seconds else None,
            "post_span_s": round(post_span, 3),
            "post_per_s": round((counts["posts"] - 1) / post_span, 1) if post_span > 0 else None}


def run_raw(url: str, messages: list[OutboundMessage], args: argparse.Namespace) -> dict:
    session = sessions.login(url, USER["user_id"], USER["passcode"])
    rate = args.rate_limit if args.rate_limit and args.limit_at in ("both", "kit") else None
    load_start, cpu_start = loadavg(), cpu_seconds()
    result = asyncio.run(raw_load(url, session.token, messages, args.concurrency, rate,
                                  args.timeout))
    used = cpu_seconds() - cpu_start
    return {**result, "messages": len(messages), "raw_cpu_s": round(used, 2),
            "raw_cpu_ms_per_message": round(1000 * used / result["acknowledged"], 2)
                                      if result["acknowledged"] else None,
            "loadavg_start": load_start,
            "loadavg_end": loadavg()}


def cpu_delta(end: float | None, start: float | None) -> float | None:
    return round(end - start, 2) if end is not None and start is not None else None


def profiled(function, top: int, *args) -> tuple[object, list[dict]]:
    """Call ``function`` under cProfile; its result and the ``top`` functions by own time."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    result = profile.runcall(function, *args)
    stats = pstats.Stats(profile)
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return result, [{"function": f"{Path(file).name}:{line}({name})", "calls": calls,
                     "tottime_s": round(tottime, 3), "cumtime_s": round(cumtime, 3)}
                    for (file, line, name), (_, calls, tottime, cumtime, _) in rows]


# --- the run -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=3000, help="practice size (default 3000)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="messages in transit at once, kit and raw load alike (default 8)")
    parser.add_argument("--rate-limit", type=float, default=None, metavar="TPS",
                        help="configure a rate limit of TPS POSTs a second")
    parser.add_argument("--limit-at", choices=("both", "spine", "kit"), default="both",
                        help="with --rate-limit: enforced by the simulator, paced by the kit (and "
                             "the raw load), or both (default)")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="simulator latency before answering each POST (default 0)")
    parser.add_argument("--poll-retry-after-ms", type=int, default=100,
                        help="simulator's Retry-After on 202 answers (default 100, its own default)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds each phase may take before it is abandoned (default 600)")
    parser.add_argument("--skip-raw", action="store_true", help="measure the kit only")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="run the kit under cProfile and report its N costliest functions "
                             "(slows the kit; its rates are then not comparable)")
    args = parser.parse_args(argv)
    if args.patients <= 0 or args.concurrency <= 0:
        parser.error("--patients and --concurrency must be positive")
    if args.rate_limit is not None and args.rate_limit <= 0:
        parser.error("--rate-limit must be positive")

    # SIGTERM runs the finally blocks too, so the simulators never outlive the benchmark.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report: dict = {
        "benchmark": "upload", "started_at": datetime.now(timezone.utc).isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "loadavg_1_5_15": loadavg()},
        "settings": {"patients": args.patients, "concurrency": args.concurrency,
                     "rate_limit": args.rate_limit,
                     "limit_at": args.limit_at if args.rate_limit else None,
                     "latency_ms": args.latency_ms, "ack_delay_ms": 0,
                     "poll_retry_after_ms": args.poll_retry_after_ms, "seed": SEED,
                     "simulator": "separate process (scr-nb spine-sim) on 127.0.0.1"},
    }
    with tempfile.TemporaryDirectory(prefix="scr-nb-bench-upload-") as tmp:
        workdir = Path(tmp)
        users_file = workdir / "users.json"
        users_file.write_text(json.dumps([USER]), encoding="utf-8")
        practice_dir = workdir / "practice"
        synth = write_practice(practice_dir, args.patients, seed=SEED)
        report["settings"]["eligible"] = synth.expected_eligible

        with simulator(workdir, "sim-kit", users_file, args) as sim:
            url, sim_cpu = sim.url, sim.cpu_seconds()
            if args.profile:
                kit, top = profiled(run_kit, args.profile, url, practice_dir, workdir, args)
                report["kit_profile_by_tottime"] = top
            else:
                kit = run_kit(url, practice_dir, workdir, args)
            kit["simulator"] = sim_stats_sync(url)
            kit["simulator_cpu_s"] = cpu_delta(sim.cpu_seconds(), sim_cpu)
        report["kit"] = kit

        if not args.skip_raw:
            messages = prebuild(practice_dir, kit["acknowledged"] or synth.expected_eligible)
            with simulator(workdir, "sim-raw", users_file, args) as sim:
                url, sim_cpu = sim.url, sim.cpu_seconds()
                raw = run_raw(url, messages, args)
                raw["simulator"] = sim_stats_sync(url)
                raw["simulator_cpu_s"] = cpu_delta(sim.cpu_seconds(), sim_cpu)
            report["raw"] = raw

    ratios: dict = {}
    if "raw" in report and report["raw"]["per_s"]:
        ratios["kit_end_to_end_over_raw"] = round(kit["end_to_end_per_s"] / report["raw"]["per_s"], 3)
        ratios["kit_send_phase_over_raw"] = round(kit["send_phase_per_s"] / report["raw"]["per_s"], 3)
    if args.rate_limit:
        ratios["kit_send_phase_over_rate_limit"] = round(kit["send_phase_per_s"] / args.rate_limit, 3)
        if "raw" in report:
            ratios["raw_over_rate_limit"] = round(report["raw"]["per_s"] / args.rate_limit, 3)
    if args.latency_ms:
        ideal = args.concurrency / (args.latency_ms / 1000.0)
        ratios["concurrency_over_latency_per_s"] = round(ideal, 1)
        ratios["kit_send_phase_over_ideal"] = round(kit["send_phase_per_s"] / ideal, 3)
        if "raw" in report:
            ratios["raw_over_ideal"] = round(report["raw"]["per_s"] / ideal, 3)
    report["ratios"] = ratios
    report["machine"]["loadavg_1_5_15_at_end"] = loadavg()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
