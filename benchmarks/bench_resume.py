"""Time from Resume to the first message on a large store (SPEC 11). Prints one JSON object.

A Run over a synthetic practice is stopped after its first messages; then a Resume is started and
the time until its first message reaches the simulator (its first POST) is measured, with the
phases: reading the extract and eligibility, bringing the store in line, planning the work.

    .venv/bin/python benchmarks/bench_resume.py --patients 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from scr_nb.job.engine import Engine
from scr_nb.job.options import JobControl, JobOptions
from scr_nb.sim.spine_sim import SimConfig, SimulatorThread
from scr_nb.sim.synth import write_practice
from scr_nb.spine import session as sessions
from scr_nb.store.practice_store import Store
from scr_nb.store.states import Mode

USER = {"user_id": "555000000001", "passcode": "bench", "name": "Bench Mark",
        "role_profile_id": "555000001001", "activities": ["B0062"], "session_hours": 10}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument("--first", type=int, default=200, help="messages the Run sends first")
    args = parser.parse_args()
    report: dict = {"benchmark": "resume_to_first_message", "patients": args.patients,
                    "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp, SimulatorThread(SimConfig(users=[USER])) as spine:
        root = Path(tmp)
        started = time.monotonic()
        write_practice(root / "practice", args.patients, seed=7)
        report["write_extract_s"] = round(time.monotonic() - started, 1)
        session = sessions.login(spine.url, USER["user_id"], USER["passcode"])

        control = JobControl()
        store = Store(root / "store.sqlite")
        first = Engine(store, session, spine.url, root / "practice", control=control,
                       on_progress=lambda p: control.stop() if p.acknowledged >= args.first
                       else None)
        started = time.monotonic()
        run = first.run(JobOptions(mode=Mode.RUN, concurrency=8))
        report["run_until_stopped_s"] = round(time.monotonic() - started, 1)
        report["run_status"] = [run.job.status, run.job.reason]
        store.close()

        requests_before = spine.simulator.stats()["requests"]
        marks: dict[str, float] = {}

        def first_message(progress) -> None:
            if "first" not in marks and spine.simulator.stats()["requests"] > requests_before:
                marks["first"] = time.monotonic()
                control_two.stop()

        control_two = JobControl()
        store = Store(root / "store.sqlite")
        second = Engine(store, session, spine.url, root / "practice", control=control_two,
                        on_progress=first_message)
        started = time.monotonic()
        resumed = second.run(JobOptions(mode=Mode.RESUME, concurrency=8))
        store.close()
        report["resume_status"] = [resumed.job.status, resumed.job.reason]
        report["resume_to_first_message_s"] = (round(marks["first"] - started, 1)
                                               if "first" in marks else None)
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    report["loadavg_end"] = os.getloadavg()
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
