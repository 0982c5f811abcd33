"""A fleet of many small practices against the simulator (SPEC 11 and 12, issue 12): practices and
patients a second, the fleet rate limit's efficiency, and peak memory per Dask worker, on SQLite
stores and on one PostgreSQL store.

In one run, for each kind of store (``--kinds``) and each scenario:

- **unlimited**: ``scr-nb fleet run`` with no ``--rate-limit``: how fast the fleet goes on this
  machine (practices a second and acknowledged patients a second, launch to exit);
- **limited**: ``scr-nb fleet run --rate-limit L``: POSTs a second at the Spine from the first to
  the last over L (the efficiency), and the busiest second against L (never above it).

Each scenario has a fresh ``scr-nb spine-sim`` process (no limit of its own, so only the fleet's
limit paces it) and fresh stores: ``--practices`` synthetic practices of ``--patients`` each,
written once. The fleet runs on a Dask cluster this benchmark starts (``LocalCluster``: processes,
127.0.0.1, ``--workers`` workers of ``--threads`` threads), given to the command with
``--scheduler``, as an existing cluster would be; afterwards each worker's peak RSS is read from
the worker itself (``getrusage``). Rates come from the simulator's own record (``/_admin/traffic``,
``/_admin/stats``, ``/_admin/summaries``); the stores' counts from ``scr-nb fleet status --json``;
every run checks that the Spine holds exactly the fleet's acknowledged patients.

PostgreSQL is the server at ``--postgres URL`` (a database is made there per run), else a
throwaway cluster started here as the test suite does (Debian's postgresql). Prints one JSON
object.

Example: .venv/bin/python benchmarks/bench_fleet.py --practices 200 --patients 60 --rate 150
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_rate import KIT, USER, admin, loadavg, per_second, post_rate, simulator  # noqa: E402

from scr_nb.sim.synth import write_practice  # noqa: E402


def worker_peak_rss_mb() -> float:
    """This process's peak resident memory in MB (run on each worker)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def practices(root: Path, count: int, patients: int) -> Path:
    folder = root / "practices"
    for n in range(count):
        ods = f"Y{8 + n // 10000}{n % 10000:04d}"
        write_practice(folder / ods, patients, seed=1000 + n, ods_code=ods)
    return folder


def fleet_run(url: str, folder: Path, where: list[str], scheduler: str, session: Path,
              options: list[str], log: Path, timeout: float) -> dict:
    started = time.monotonic()
    with open(log, "wb") as out:
        code = subprocess.run([*KIT, "fleet", "run", "--practices", str(folder), *where,
                               "--spine", url, "--session", str(session), "--scheduler",
                               scheduler, "--progress-every", "10", *options], stdout=out,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              timeout=timeout).returncode
    seconds = time.monotonic() - started
    status = json.loads(subprocess.run([*KIT, "fleet", "status", *where, "--json"], check=True,
                                       capture_output=True, timeout=300).stdout)
    return {"exit_code": code, "seconds": seconds, "status": status}


def scenario(kind: str, name: str, folder: Path, work: Path, where: list[str],
             args: argparse.Namespace) -> dict:
    from distributed import Client, LocalCluster

    options = ["--max-practices", str(args.max_practices), "--concurrency",
               str(args.concurrency)]
    if name == "limited":
        options += ["--rate-limit", f"{args.rate:g}"]
    with simulator(work, f"{kind}-{name}", []) as url, \
            LocalCluster(n_workers=args.workers, threads_per_worker=args.threads,
                         processes=True, host="127.0.0.1", dashboard_address=None) as cluster, \
            Client(cluster) as client:
        session = work / f"{kind}-{name}-session.json"
        subprocess.run([*KIT, "login", "--identity", url, "--user", USER["user_id"],
                        "--session", str(session)], check=True, capture_output=True, timeout=60,
                       env={**os.environ, "SCR_NB_PASSCODE": USER["passcode"]})
        load_before = loadavg()
        run = fleet_run(url, folder, where, cluster.scheduler_address, session, options,
                        work / f"{kind}-{name}-fleet.log", args.timeout)
        peaks = client.run(worker_peak_rss_mb)
        stats, traffic = admin(url, "stats"), admin(url, "traffic")
        held = len(admin(url, "summaries"))
    totals = run["status"]["totals"]
    practices_done = sum(p["status"] == "completed" for p in run["status"]["practices"])
    seconds = run["seconds"]
    busiest = max((row[0] for row in per_second(traffic)), default=0)
    result = {
        "exit_code": run["exit_code"],
        "practices": len(run["status"]["practices"]), "practices_completed": practices_done,
        "acknowledged": totals["sent"], "failed": totals["failed"],
        "not_required": totals["not_required"],
        "launch_to_exit_s": round(seconds, 1),
        "practices_per_s": round(practices_done / seconds, 2),
        "patients_acknowledged_per_s": round(totals["sent"] / seconds, 1),
        "spine_posts_per_s_first_to_last": _round(post_rate(traffic)),
        "spine_busiest_second_posts": busiest,
        "spine_requests": stats["requests"], "spine_duplicates": stats["duplicates"],
        "spine_429": stats.get("rate_limited", 0),
        "spine_holds": held, "spine_agrees_with_stores": held == totals["sent"],
        "worker_peak_rss_mb": sorted(round(mb, 1) for mb in peaks.values()),
        "loadavg_before": load_before, "loadavg_after": loadavg(),
    }
    if name == "limited":
        rate = post_rate(traffic)
        result["rate_limit"] = args.rate
        result["efficiency"] = _round(rate / args.rate if rate else None, 3)
        result["never_above_limit"] = busiest <= args.rate
    return result


def _round(value: float | None, places: int = 1) -> float | None:
    return round(value, places) if value is not None else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--practices", type=int, default=200)
    parser.add_argument("--patients", type=int, default=60, help="patients a practice")
    parser.add_argument("--rate", type=float, default=150.0, help="the fleet's rate limit")
    parser.add_argument("--max-practices", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8, help="per practice")
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes")
    parser.add_argument("--threads", type=int, default=4, help="threads a worker")
    parser.add_argument("--kinds", default="sqlite,postgresql")
    parser.add_argument("--scenarios", default="unlimited,limited")
    parser.add_argument("--postgres", metavar="URL",
                        help="a PostgreSQL server to make the fleet's databases on (default: a "
                             "throwaway one started here)")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--keep", metavar="DIR", help="work here and keep it")
    args = parser.parse_args(argv)

    with ExitStack() as stack:
        work = Path(args.keep) if args.keep else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="bench-fleet-")))
        work.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        folder = practices(work, args.practices, args.patients)
        written_s = time.monotonic() - started
        server = None
        results: dict[str, dict] = {}
        for kind in args.kinds.split(","):
            for name in args.scenarios.split(","):
                if kind == "sqlite":
                    where = ["--stores", str(work / f"stores-{name}")]
                else:
                    if server is None and not args.postgres:
                        from tests.pgserver import PostgresServer
                        server = PostgresServer()
                        server.start()
                        stack.callback(server.stop)
                    database = f"fleet_{name}_{uuid.uuid4().hex[:8]}"
                    url = _database(args.postgres, server, database)
                    where = ["--store", url]
                results[f"{kind}/{name}"] = scenario(kind, name, folder, work, where, args)
                print(json.dumps({f"{kind}/{name}": results[f"{kind}/{name}"]}),
                      file=sys.stderr, flush=True)
        print(json.dumps({
            "benchmark": "bench_fleet",
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "practices": args.practices, "patients_per_practice": args.patients,
            "max_practices": args.max_practices, "workers": args.workers,
            "threads_per_worker": args.threads, "concurrency": args.concurrency,
            "extracts_written_s": round(written_s, 1),
            "results": results,
        }, indent=2))
    return 0


def _database(server_url: str | None, server, name: str) -> str:
    """A new database on the given server (or the throwaway one) and its URL."""
    if server is not None:
        server.create_database(name)
        return server.url(name)
    import psycopg
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = server_url.rpartition("/")
    return f"{base}/{name}"


if __name__ == "__main__":
    sys.exit(main())
