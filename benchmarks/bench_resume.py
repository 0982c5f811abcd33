"""Time from launching ``scr-nb upload resume`` to its first POST at the Spine (issue 11, item 3).
Prints one JSON object.

Everything runs as a user would run it, each in its own process: the simulator (``scr-nb
spine-sim`` on a free loopback port), ``scr-nb login``, ``scr-nb upload run`` over a synthetic
practice, stopped with ``scr-nb stop`` once it has had ``--first`` acknowledgements, then ``scr-nb
upload resume``. The first POST is seen at the simulator: its ``/_admin/stats`` ``requests``
(POSTs to /clinical) is read every few milliseconds from the moment Resume is launched. Once seen,
the Resume is stopped too. The Run's and Resume's peak RSS come from ``os.wait4``. Before Resume
is launched the file system is synced (``os.sync``): a Resume comes long after its Run, whose last
writes are on disk by then rather than queued for the Resume's first durable commit.

    .venv/bin/python benchmarks/bench_resume.py --patients 200000
    .venv/bin/python benchmarks/bench_resume.py --practice /tmp/bench1m    # an extract written before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_upload import USER, loadavg, simulator  # noqa: E402  (benchmarks/ is not a package)

from scr_nb.sim.synth import write_practice  # noqa: E402
from scr_nb.store.practice_store import read_status  # noqa: E402

KIT = [sys.executable, "-m", "scr_nb"]


def posts(url: str) -> int:
    with urllib.request.urlopen(f"{url}/_admin/stats", timeout=10) as answer:
        return json.load(answer)["requests"]


def reap(child: subprocess.Popen) -> dict:
    """Wait for a child; its exit code and peak RSS (MB) from the kernel's own accounting."""
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return {"exit": child.returncode, "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2)}


def stop(store: Path) -> None:
    subprocess.run([*KIT, "stop", "--store", str(store)], check=False, capture_output=True,
                   timeout=600)


def upload(mode: str, practice: Path, store: Path, url: str, session: Path,
           workdir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*KIT, "upload", mode, "--practice", str(practice), "--store", str(store), "--spine", url,
         "--session", str(session), "--concurrency", "8", "--quiet"],
        stdout=open(workdir / f"{mode}.out", "wb"), stderr=subprocess.STDOUT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=200_000)
    parser.add_argument("--practice", type=Path, help="an extract already written (not timed)")
    parser.add_argument("--first", type=int, default=500,
                        help="acknowledgements the Run gets before it is stopped")
    args = parser.parse_args()
    report: dict = {"benchmark": "resume_to_first_post", "loadavg_start": loadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        practice = args.practice or workdir / "practice"
        if args.practice is None:
            started = time.monotonic()
            write_practice(practice, args.patients, seed=7)
            report["write_extract_s"] = round(time.monotonic() - started, 1)
        report["extract"] = str(practice)
        report["patients_rows"] = sum(1 for _ in open(practice / "patients.csv", "rb")) - 1
        users = workdir / "users.json"
        users.write_text(json.dumps([USER]))
        sim_options = argparse.Namespace(poll_retry_after_ms=100, latency_ms=0, rate_limit=None,
                                         limit_at="both")
        with simulator(workdir, "spine", users, sim_options) as spine:
            session = workdir / "session.json"
            subprocess.run([*KIT, "login", "--identity", spine.url, "--user", USER["user_id"],
                            "--session", str(session)], check=True, capture_output=True,
                           env={**os.environ, "SCR_NB_PASSCODE": USER["passcode"]}, timeout=60)
            store = workdir / "store.sqlite"

            started = time.monotonic()
            run = upload("run", practice, store, spine.url, session, workdir)
            first_post = None
            while run.poll() is None:
                if first_post is None and posts(spine.url) > 0:
                    first_post = time.monotonic() - started
                if store.exists() and first_post is not None and \
                        read_status(store)["states"].get("acknowledged", 0) >= args.first:
                    stop(store)
                    break
                time.sleep(0.05)
            report["run"] = {"launch_to_first_post_s": round(first_post, 2) if first_post else None,
                             "until_stopped_s": round(time.monotonic() - started, 1), **reap(run)}

            # A Resume comes long after its Run: the Run's last writes (the extract index is written
            # without fsync) are on disk by then, not still queued for the Resume's first commit.
            os.sync()
            before = posts(spine.url)
            started = time.monotonic()
            resume = upload("resume", practice, store, spine.url, session, workdir)
            seen = None
            while resume.poll() is None and time.monotonic() - started < 600:
                if posts(spine.url) > before:
                    seen = time.monotonic() - started
                    break
                time.sleep(0.005)
            stop(store)
            report["resume"] = {"launch_to_first_post_s": round(seen, 3) if seen else None,
                                **reap(resume)}
            report["states_after"] = read_status(store)["states"]
    report["loadavg_end"] = loadavg()
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0 if report["resume"]["launch_to_first_post_s"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
