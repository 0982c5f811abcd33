"""The eligibility dry run against one plain csv pass (issue 11, SPEC 11).

A synthetic practice is written into a temporary directory (not timed), or into ``--keep DIR``,
where one written earlier for the same size and seed is reused with the date it was written for.
Then, in the same run and alternating, the columnar dry run (``scr_nb.extract.columnar.dry_run``)
and one plain Python ``csv.reader`` pass over every CSV file of the extract are timed (best of
``--repeat``); the ratio is dry run over csv pass. Peak RSS is the dry run's alone, measured in a
fresh subprocess that does nothing else (ru_maxrss), with the CPU seconds the dry run took there on
all its threads: on a machine others are using, CPU seconds tell the work done when the wall clock
cannot. The load average is taken before the timings. The dry run's counts are checked against the
synthesiser's design. Prints one JSON object.

Example: .venv/bin/python benchmarks/bench_dry_run.py --patients 200000
         .venv/bin/python benchmarks/bench_dry_run.py --patients 1000000 --repeat 1 --keep /tmp/bench1m
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import date, datetime, timezone
from pathlib import Path

from scr_nb.extract.columnar import dry_run
from scr_nb.extract.eligibility import Policy
from scr_nb.sim.synth import SynthSummary, write_practice

SEED = 20240611
# The targets: ratio and MB at 200,000 patients; seconds and MB at 1,000,000.
TARGETS = {200_000: {"max_ratio": 1.5, "max_peak_rss_mb": 400},
           1_000_000: {"max_seconds": 5.0, "max_peak_rss_mb": 1024}}


def csv_pass(directory: Path) -> int:
    """One plain csv.reader pass over every CSV file: the floor a Python reader cannot beat."""
    rows = 0
    for path in sorted(directory.glob("*.csv")):
        with open(path, newline="", encoding="utf-8-sig") as f:
            for _ in csv.reader(f):
                rows += 1
    return rows


def peak_rss_mb_of_dry_run(directory: Path, today: date) -> tuple[float, float, float]:
    """(peak RSS in MB, seconds, CPU seconds) of a dry run in a fresh process."""
    code = (
        "import json, resource, sys, time\n"
        "from datetime import date\n"
        "from scr_nb.extract.columnar import dry_run\n"
        "from scr_nb.extract.eligibility import Policy\n"
        "t, cpu = time.perf_counter(), time.process_time()\n"
        f"dry_run({str(directory)!r}, Policy(today=date.fromisoformat({today.isoformat()!r})))\n"
        "t, cpu = time.perf_counter() - t, time.process_time() - cpu\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps([peak / (1024 * 1024 if sys.platform == 'darwin' else 1024), t, cpu]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    peak, seconds, cpu = json.loads(out.stdout)
    return round(peak, 1), round(seconds, 3), round(cpu, 3)


def practice(patients: int, work: Path) -> SynthSummary:
    """The practice of this size in ``work``: the one written there before, if its summary (saved
    last, so only a complete practice has one) says so, or a new one. A practice written on an
    earlier day keeps that day as its today, so its designed counts still hold."""
    directory = work / f"practice-{patients}"
    saved = directory / "synth.json"
    if saved.exists():
        known = json.loads(saved.read_text())
        if known["patients"] == patients and known["seed"] == SEED:
            return SynthSummary(**{**known, "out_dir": directory,
                                   "today": date.fromisoformat(known["today"])})
        saved.unlink()
    synth = write_practice(directory, patients, SEED, today=date.today())
    saved.write_text(json.dumps({**asdict(synth), "out_dir": str(directory),
                                 "today": synth.today.isoformat()}))
    return synth


def measure(patients: int, repeat: int, work: Path) -> dict:
    synth = practice(patients, work)
    directory, today = synth.out_dir, synth.today
    policy = Policy(today=today)
    load = [round(x, 2) for x in os.getloadavg()]
    dry, plain = [], []
    summary = None
    for _ in range(repeat):
        t = time.perf_counter()
        csv_pass(directory)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        summary = dry_run(directory, policy)
        dry.append(time.perf_counter() - t)
    peak, fresh_seconds, fresh_cpu = peak_rss_mb_of_dry_run(directory, today)
    result = {
        "patients": patients,
        "extract_mb": round(sum(p.stat().st_size for p in directory.glob("*.csv")) / 1e6, 1),
        "dry_run_s": round(min(dry), 3),
        "csv_pass_s": round(min(plain), 3),
        "ratio": round(min(dry) / min(plain), 2),
        "dry_run_s_fresh_process": fresh_seconds,
        "dry_run_cpu_s_fresh_process": fresh_cpu,
        "peak_rss_mb": peak,
        "counts_as_designed": (summary["not_required_by_reason"] == synth.expected_reasons
                               and summary["eligible"] == synth.expected_eligible),
        "eligible": summary["eligible"],
        "load_average_before": load,
    }
    target = TARGETS.get(patients)
    if target:
        met = result["peak_rss_mb"] <= target["max_peak_rss_mb"]
        if "max_ratio" in target:
            met = met and result["ratio"] <= target["max_ratio"]
        if "max_seconds" in target:
            met = met and result["dry_run_s"] <= target["max_seconds"]
        result["target"], result["target_met"] = target, met
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, nargs="+", default=[200_000])
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds; the best is kept")
    parser.add_argument("--keep", type=Path, help="write practices here and reuse them between runs")
    args = parser.parse_args()
    print_sizes("dry_run", args.keep, args.patients,
                lambda patients, work: measure(patients, args.repeat, work))


def print_sizes(benchmark: str, keep: Path | None, sizes: list[int],
                measure_one: Callable[[int, Path], dict]) -> None:
    """Measure each practice size in ``keep`` (practices written there are reused) or in a
    temporary folder, and print the JSON report with the machine's load."""
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
        results = [measure_one(n, keep) for n in sizes]
    else:
        with tempfile.TemporaryDirectory(prefix=f"bench-{benchmark.replace('_', '-')}-",
                                         dir=os.environ.get("BENCH_DIR")) as work:
            results = [measure_one(n, Path(work)) for n in sizes]
    print(json.dumps({
        "benchmark": benchmark,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average": [round(x, 2) for x in os.getloadavg()]},
        "results": results,
    }, indent=2))

if __name__ == "__main__":
    main()
