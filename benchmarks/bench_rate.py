"""The kit's pace against a Spine that limits or delays it (SPEC 11, issue 11): `scr-nb upload run`
against `scr-nb spine-sim`, each in its own process, measured by what the simulator saw.

Scenarios, each with a fresh simulator on a free 127.0.0.1 port, a fresh store and a fresh
session (`scr-nb login`), over one synthetic practice:

- **adaptive**: the simulator limits POSTs to R a second (`--rate-limit R`, a token bucket), the
  kit is given no rate limit: its adaptive pacer has to find R. Reported over the whole run and
  over the part after the first `--settle` seconds: accepted POSTs a second / R, and the share of
  all requests (POSTs and polls) answered 429.
- **fixed**: the simulator limits at L and the kit runs with `--rate-limit L`: POSTs a second
  from the first accepted POST to the last / L, and the 429s (there should be none).
- **fixed-burst-1**: the same against a simulator whose token bucket holds one token
  (`--rate-limit-burst 1`), the strictest Spine limiting at L: any two POSTs arriving closer than
  1/L apart draw a 429, so the transit jitter shows.
- **latency**: the simulator answers each POST after `--latency-ms` (100), the kit runs with
  `--concurrency` (16): POSTs a second from the first to the last / (concurrency / latency).
- **latency-lean**: the same against `lean_spine.py`, a stand-in that does nothing but wait the
  latency and answer (202, then an AA): on this 2-core machine the simulator's own CPU (its checks,
  about 3 ms a request) delays its answers beyond the latency, so this shows the kit's part alone.

The rates come from the simulator's own record (`GET /_admin/traffic`: the times of the first and
last POST answered 202, and per second the POSTs answered 202, those answered 429 and the polls)
and its counters (`GET /_admin/stats`), not from the kit. A rate "from the first POST to the last"
is (n - 1) / (last - first) over the n POSTs answered 202. Prints one JSON object.

Example: .venv/bin/python benchmarks/bench_rate.py --patients 5000 --rate 100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_upload import serving  # noqa: E402  (benchmarks/ is not a package)

from scr_nb.sim.synth import write_practice  # noqa: E402

HOST = "127.0.0.1"
SEED = 20240611
USER = {"user_id": "555000000001", "passcode": "bench-passcode", "name": "Dr Alex Morgan",
        "role_profile_id": "555000001001", "activities": ["B0062"], "session_hours": 10}
KIT = [sys.executable, "-m", "scr_nb"]
SCENARIOS = ("adaptive", "fixed", "fixed-burst-1", "latency", "latency-lean")
COLUMNS = ("accepted_posts", "rate_limited_posts", "polls")   # of the simulator's traffic record


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@contextmanager
def simulator(workdir: Path, name: str, switches: list[str],
              start_timeout: float = 20.0) -> Iterator[str]:
    """A ``scr-nb spine-sim`` process on a free loopback port, its base URL; always stopped on the
    way out."""
    users = workdir / "users.json"
    users.write_text(json.dumps([USER]), encoding="utf-8")
    with serving(workdir, f"{name}-sim", lambda port: [
            *KIT, "spine-sim", "--host", HOST, "--port", str(port), "--users", str(users),
            "--seed", str(SEED), *switches], start_timeout) as (url, _):
        yield url


def admin(url: str, what: str) -> dict:
    with urllib.request.urlopen(f"{url}/_admin/{what}", timeout=10) as answer:
        return json.load(answer)


def upload(url: str, practice: Path, workdir: Path, name: str, kit_options: list[str],
           timeout: float, identity: str | None = None) -> dict:
    """``scr-nb login`` (at ``identity``, default the Spine's URL) then ``scr-nb upload run`` as
    subprocesses; the exit code, the seconds the upload took and the store's counters."""
    session, store = workdir / f"{name}-session.json", workdir / f"{name}.sqlite"
    environment = {**os.environ, "SCR_NB_PASSCODE": USER["passcode"]}
    subprocess.run([*KIT, "login", "--identity", identity or url, "--user", USER["user_id"],
                    "--session", str(session)], env=environment, check=True,
                   capture_output=True, timeout=60)
    started = time.monotonic()
    with open(workdir / f"{name}-upload.log", "wb") as log:
        code = subprocess.run([*KIT, "upload", "run", "--practice", str(practice),
                               "--store", str(store), "--spine", url, "--session", str(session),
                               *kit_options], stdout=log, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=timeout).returncode
    seconds = time.monotonic() - started
    status = json.loads(subprocess.run([*KIT, "status", "--store", str(store), "--json"],
                                       check=True, capture_output=True, timeout=60).stdout)
    return {"exit_code": code, "upload_s": round(seconds, 1),
            "acknowledged": status["counters"]["sent"], "failed": status["counters"]["failed"],
            "failed_by_code": status["failed_by_code"]}


def post_rate(traffic: dict) -> float | None:
    """POSTs answered 202 a second, from the first to the last."""
    posts = traffic["accepted_posts"]
    if posts["count"] < 2 or posts["last_s"] <= posts["first_s"]:
        return None
    return (posts["count"] - 1) / (posts["last_s"] - posts["first_s"])


def per_second(traffic: dict) -> list[list[int]]:
    """The simulator's seconds as rows of COLUMNS, every second from its first request to its
    last (a second without any request is all zeros)."""
    seconds = {row["second"]: [row[column] for column in COLUMNS]
               for row in traffic["per_second"]}
    if not seconds:
        return []
    return [seconds.get(second, [0] * len(COLUMNS))
            for second in range(min(seconds), max(seconds) + 1)]


def window(rows: list[list[int]], skip_s: float) -> dict:
    """Sums over the whole seconds from ``skip_s`` after the first second with a POST up to the
    last second with a POST, left out since the run ends inside it."""
    posting = [second for second, row in enumerate(rows) if row[0] or row[1]]
    kept = rows[posting[0] + math.ceil(skip_s):posting[-1]] if posting else []
    accepted, limited, polls = (sum(column) for column in zip(*kept)) if kept else (0, 0, 0)
    requests = accepted + limited + polls
    return {"seconds": len(kept), "accepted_posts": accepted, "posts_429": limited, "polls": polls,
            "accepted_posts_per_s": round(accepted / len(kept), 1) if kept else None,
            "share_of_requests_429": round(limited / requests, 4) if requests else None}


def scenario(name: str, practice: Path, workdir: Path, sim_switches: list[str],
             kit_options: list[str], timeout: float, lean_latency_ms: float | None = None) -> dict:
    """One upload against a fresh simulator, or (``lean_latency_ms``) against the lean Spine of
    ``lean_spine.py`` with that latency, the simulator only logging the user in."""
    load_start = loadavg()
    with simulator(workdir, name, sim_switches) as sim_url:
        with (serving(workdir, f"{name}-lean", lambda port: [
                sys.executable, str(Path(__file__).with_name("lean_spine.py")), "--port",
                str(port), "--latency-ms", f"{lean_latency_ms:g}"])
              if lean_latency_ms else nullcontext((sim_url, None))) as (url, _):
            kit = upload(url, practice, workdir, name, kit_options, timeout, identity=sim_url)
            traffic, stats = admin(url, "traffic"), admin(url, "stats")
    limited = stats["transient_faults_injected"].get("429", 0)
    requests = stats["requests"] + stats["polls"]
    rate = post_rate(traffic)
    return {"simulator": sim_switches, "kit": kit_options, **kit,
            "posts": stats["requests"], "accepted_posts": traffic["accepted_posts"]["count"],
            "polls": stats["polls"], "posts_429": limited,
            "share_of_requests_429": round(limited / requests, 4) if requests else None,
            "share_of_posts_429": round(limited / stats["requests"], 4)
                                  if stats["requests"] else None,
            "post_rate_first_to_last": round(rate, 2) if rate else None,
            "posts_seconds_first_to_last": round(traffic["accepted_posts"]["last_s"]
                                                 - traffic["accepted_posts"]["first_s"], 2)
                                           if rate else None,
            "per_second": {"columns": COLUMNS, "rows": per_second(traffic)},
            "loadavg_start": load_start, "loadavg_end": loadavg()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=5000,
                        help="practice size; about 78%% are eligible (default 5000)")
    parser.add_argument("--rate", type=float, default=100.0, metavar="TPS",
                        help="the simulator's limit R in the adaptive scenario and L in the fixed "
                             "one (default 100)")
    parser.add_argument("--settle", type=float, default=10.0, metavar="SECONDS",
                        help="adaptive: the seconds left out of the settled figures (default 10)")
    parser.add_argument("--latency-ms", type=float, default=100.0,
                        help="latency scenario: the simulator's delay on each POST (default 100)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="latency scenario: the kit's --concurrency (default 16)")
    parser.add_argument("--only", choices=SCENARIOS, action="append",
                        help="run only this scenario (repeatable)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds an upload may take before it is abandoned (default 900)")
    args = parser.parse_args(argv)
    if args.patients <= 0 or args.rate <= 0 or args.concurrency <= 0 or args.latency_ms <= 0:
        parser.error("--patients, --rate, --concurrency and --latency-ms must be positive")
    chosen = args.only or SCENARIOS

    # SIGTERM runs the finally blocks too, so no simulator outlives the benchmark.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rate, ideal = args.rate, args.concurrency / (args.latency_ms / 1000.0)
    report: dict = {
        "benchmark": "rate", "started_at": datetime.now(timezone.utc).isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "loadavg_1_5_15": loadavg()},
        "settings": {"patients": args.patients, "rate": rate, "settle_s": args.settle,
                     "latency_ms": args.latency_ms, "concurrency": args.concurrency,
                     "seed": SEED, "simulator": "scr-nb spine-sim in its own process",
                     "kit": "scr-nb upload run in its own process"},
    }
    with tempfile.TemporaryDirectory(prefix="scr-nb-bench-rate-") as tmp:
        workdir = Path(tmp)
        practice = workdir / "practice"
        report["settings"]["eligible"] = write_practice(practice, args.patients,
                                                        seed=SEED).expected_eligible
        results, ratios = {}, {}
        if "adaptive" in chosen:
            result = scenario("adaptive", practice, workdir, ["--rate-limit", f"{rate:g}"], [],
                              args.timeout)
            result["settled"] = window(result["per_second"]["rows"], args.settle)
            results["adaptive"] = result
            ratios["adaptive_rate_over_R"] = _ratio(result["post_rate_first_to_last"], rate)
            ratios["adaptive_settled_rate_over_R"] = _ratio(
                result["settled"].get("accepted_posts_per_s"), rate)
            ratios["adaptive_share_of_requests_429"] = result["share_of_requests_429"]
            ratios["adaptive_settled_share_of_requests_429"] = result["settled"].get(
                "share_of_requests_429")
        if "fixed" in chosen:
            result = scenario("fixed", practice, workdir, ["--rate-limit", f"{rate:g}"],
                              ["--rate-limit", f"{rate:g}"], args.timeout)
            results["fixed"] = result
            ratios["fixed_rate_over_L"] = _ratio(result["post_rate_first_to_last"], rate)
            ratios["fixed_posts_429"] = result["posts_429"]
        if "fixed-burst-1" in chosen:
            result = scenario("fixed-burst-1", practice, workdir,
                              ["--rate-limit", f"{rate:g}", "--rate-limit-burst", "1"],
                              ["--rate-limit", f"{rate:g}"], args.timeout)
            results["fixed-burst-1"] = result
            ratios["fixed_burst_1_rate_over_L"] = _ratio(result["post_rate_first_to_last"], rate)
            ratios["fixed_burst_1_posts_429"] = result["posts_429"]
        if "latency" in chosen:
            result = scenario("latency", practice, workdir,
                              ["--latency-ms", f"{args.latency_ms:g}"],
                              ["--concurrency", str(args.concurrency)], args.timeout)
            results["latency"] = result
            ratios["concurrency_over_latency_per_s"] = ideal
            ratios["latency_rate_over_ideal"] = _ratio(result["post_rate_first_to_last"], ideal)
        if "latency-lean" in chosen:
            result = scenario("latency-lean", practice, workdir, [],
                              ["--concurrency", str(args.concurrency)], args.timeout,
                              lean_latency_ms=args.latency_ms)
            results["latency-lean"] = result
            ratios["concurrency_over_latency_per_s"] = ideal
            ratios["latency_lean_rate_over_ideal"] = _ratio(result["post_rate_first_to_last"],
                                                            ideal)
    report["scenarios"] = results
    report["ratios"] = ratios
    report["machine"]["loadavg_1_5_15_at_end"] = loadavg()
    print(one_line_number_lists(json.dumps(report, indent=2)))
    return 0


def one_line_number_lists(text: str) -> str:
    """JSON as ``indent=2`` writes it, but with every list of numbers on one line, so a minute of
    per-second rows reads as a minute of rows."""
    return re.sub(r"\[\s+(-?[\d.]+(?:,\s+-?[\d.]+)*)\s+\]",
                  lambda match: "[" + " ".join(match.group(1).split()) + "]", text)


def _ratio(value: float | None, target: float) -> float | None:
    return round(value / target, 3) if value else None


if __name__ == "__main__":
    sys.exit(main())
