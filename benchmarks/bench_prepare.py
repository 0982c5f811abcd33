"""A job's extract read into its index (issue 11): ``prepared.build`` by columns against the
row-at-a-time build it falls back to.

Each build runs in a fresh process that does nothing else, so its peak RSS (ru_maxrss) and its CPU
seconds on all its threads are its own; the wall clock is there too, but on a machine others are
using, CPU seconds tell the work done. The row build runs only at the sizes given to
``--rows-at`` (it takes minutes at 1,000,000 patients). Practices are the ones
``bench_dry_run.py --keep DIR`` writes and reuses (``DIR/practice-<patients>``), written there if
missing. Each build's summary is checked against the synthesiser's design. Prints one JSON object.

Example: .venv/bin/python benchmarks/bench_prepare.py --patients 200000 --keep /tmp/bench200k
         .venv/bin/python benchmarks/bench_prepare.py --patients 1000000 --keep /tmp/bench1m
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from bench_dry_run import practice, print_sizes

from scr_nb.extract.eligibility import Policy
from scr_nb.extract.prepared import build


def child(directory: Path, today: date, by_rows: bool) -> dict:
    """One build, in this process: its seconds, CPU seconds, peak RSS and what it decided."""
    with tempfile.TemporaryDirectory(prefix="bench-prepare-",
                                     dir=os.environ.get("BENCH_DIR")) as work:
        index_file = Path(work) / "index"
        wall, cpu = time.perf_counter(), time.process_time()
        index, _, summary = build(directory, index_file, Policy(today=today), {}, by_rows=by_rows)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        index.close()
        index_mb = index_file.stat().st_size / 1e6
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
            "peak_rss_mb": round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1),
            "index_mb": round(index_mb, 1), "summary": summary}


def in_fresh_process(directory: Path, today: date, by_rows: bool) -> dict:
    command = [sys.executable, __file__, "--child", str(directory), "--today", today.isoformat()]
    out = subprocess.run(command + (["--by-rows"] if by_rows else []), check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout)


def measure(patients: int, work: Path, rows_at: list[int]) -> dict:
    synth = practice(patients, work)
    designed = {"eligible": synth.expected_eligible,
                "not_required_by_reason": synth.expected_reasons}
    load = [round(x, 2) for x in os.getloadavg()]
    result: dict = {"patients": patients, "load_average_before": load}
    for path in ("columnar", "rows") if patients in rows_at else ("columnar",):
        run = in_fresh_process(synth.out_dir, synth.today, by_rows=path == "rows")
        summary = run.pop("summary")
        run["counts_as_designed"] = (summary["eligible"] == designed["eligible"] and
                                     summary["not_required_by_reason"]
                                     == designed["not_required_by_reason"])
        result[path] = run
    if "rows" in result:
        result["columnar_over_rows"] = {
            key: round(result["columnar"][key] / result["rows"][key], 3)
            for key in ("seconds", "cpu_seconds")}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, nargs="+", default=[200_000])
    parser.add_argument("--keep", type=Path, help="where the practices are kept (and reused)")
    parser.add_argument("--rows-at", type=int, nargs="*", default=[200_000],
                        help="sizes at which the row-at-a-time build is timed too")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--today", type=date.fromisoformat, help=argparse.SUPPRESS)
    parser.add_argument("--by-rows", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.today, args.by_rows)))
        return
    print_sizes("prepare", args.keep, args.patients,
                lambda patients, work: measure(patients, work, args.rows_at))

if __name__ == "__main__":
    main()
