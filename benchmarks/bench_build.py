"""Eligibility and message-build rate (SPEC 11): how fast the kit turns an extract into messages.

For each size, a synthetic practice is written once into a temporary directory (not timed); then
load_practice + decide are timed together (patients/s), and select_content + build_message for every
eligible patient (messages/s, mean message bytes). Peak memory is the process's ru_maxrss, so sizes are
best run one per process when their peaks are to be compared (the larger size's peak includes the
smaller's only if it was larger). Prints one JSON object.

Example: .venv/bin/python benchmarks/bench_build.py --patients 100000 1000000
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from scr_nb.extract.eligibility import Policy, decide
from scr_nb.extract.reader import load_practice
from scr_nb.sim.synth import write_practice
from scr_nb.spine.content import Windows, select_content
from scr_nb.spine.gp_summary import Author, build_message, new_id

SEED = 20240611


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def bench_size(patients: int, workdir: Path) -> dict:
    today = datetime.now().date()
    practice_dir = workdir / f"practice-{patients}"
    started = time.perf_counter()
    summary = write_practice(practice_dir, patients, seed=SEED, today=today)
    write_s = time.perf_counter() - started
    extract_bytes = sum(f.stat().st_size for f in practice_dir.iterdir())
    rss_before = peak_rss_mb()
    load_before = os.getloadavg()[0]

    gc.collect()
    started = time.perf_counter()
    practice = load_practice(practice_dir, today=today)
    loaded = time.perf_counter()
    decisions = decide(practice, Policy(today=today))
    decided = time.perf_counter()
    eligible = [d for d in decisions if d.eligible]
    load_s, decide_s = loaded - started, decided - loaded

    author = Author(user_id="555000000001", name="Dr Alex Morgan", role_profile_id="555000001001")
    windows = Windows(today=today)
    created = datetime.now(timezone.utc)
    meds, allergies = practice.medications, practice.allergies
    total_bytes = largest = 0
    started = time.perf_counter()
    for decision in eligible:
        patient = decision.patient
        content = select_content(meds.get(patient.patient_id, ()),
                                 allergies.get(patient.patient_id, ()), windows)
        message = build_message(patient, content, author=author, message_id=new_id(),
                                event_id=new_id(), created=created, dissent=decision.dissent)
        size = len(message.body)
        total_bytes += size
        largest = max(largest, size)
    build_s = time.perf_counter() - started

    rows = len(practice.patients)
    result = {
        "patients": patients,
        "extract": {"write_s": round(write_s, 2), "bytes": extract_bytes,
                    "rows": summary.rows, "expected_eligible": summary.expected_eligible},
        "eligibility": {
            "patient_rows": rows, "eligible": len(eligible),
            "load_practice_s": round(load_s, 3), "decide_s": round(decide_s, 3),
            "seconds": round(load_s + decide_s, 3),
            "patients_per_s": round(rows / (load_s + decide_s)) if rows else None,
        },
        "build": {
            "messages": len(eligible), "seconds": round(build_s, 3),
            "messages_per_s": round(len(eligible) / build_s) if eligible else None,
            "mean_message_bytes": round(total_bytes / len(eligible)) if eligible else None,
            "largest_message_bytes": largest,
        },
        "peak_rss_mb_before": rss_before,
        "peak_rss_mb": peak_rss_mb(),
        "loadavg_1min_at_start": round(load_before, 2),
        "loadavg_1min_at_end": round(os.getloadavg()[0], 2),
    }
    del practice, decisions, eligible
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, nargs="+", default=[100_000],
                        help="practice sizes (patient rows), each written and measured in turn "
                             "(default 100000)")
    parser.add_argument("--keep", metavar="DIR", help="write the practices here and keep them")
    args = parser.parse_args(argv)
    if any(n <= 0 for n in args.patients):
        parser.error("--patients must be positive")

    report = {"benchmark": "build", "started_at": datetime.now(timezone.utc).isoformat(),
              "machine": machine(), "seed": SEED, "sizes": []}
    with tempfile.TemporaryDirectory(prefix="scr-nb-bench-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for n in args.patients:
            report["sizes"].append(bench_size(n, workdir))
    report["machine"]["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
