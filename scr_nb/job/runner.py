"""One upload job from start to outcome, as the CLI, the scheduled notebook and the control panel
run it: the exit code and the plain words for what happened and what to do next (SPEC 10)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from scr_nb.constants import explain
from scr_nb.errors import ExtractError, OptionError, RefusedError
from scr_nb.job.engine import Engine
from scr_nb.job.options import JobControl, JobOptions, Progress
from scr_nb.spine import session as sessions
from scr_nb.spine.pacing import SendGate
from scr_nb.spine.tls import TlsSettings, check_url
from scr_nb.store.practice_store import Store
from scr_nb.store.states import StopReason

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REFUSED, EXIT_STOPPED = 0, 1, 2, 3, 4
# Stops that are not about the patients: when the job had transmitted nothing yet, they are a
# refusal at the start (exit 3), not a stop part-way (exit 4).
REFUSING_STOPS = frozenset({StopReason.ACCESS_DENIED.value, StopReason.TLS_FAILURE.value})


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    message: str                  # what happened and which mode to use next
    job: dict | None = None       # the job as `status --json` shows it
    statistics: dict | None = None

    @property
    def refused(self) -> bool:
        return self.exit_code == EXIT_REFUSED

    def to_json(self) -> dict:
        return {"exit_code": self.exit_code, "message": self.message, "job": self.job,
                "statistics": self.statistics}


def next_modes(use_mode: str | None) -> str:
    if not use_mode:
        return ""
    return " Next: " + " or ".join(f"scr-nb upload {m} ..." for m in use_mode.split(" or "))


def run_upload(practice: str | Path, store: str | Path, spine: str,
               session_path: str | Path, options: JobOptions, *, ods: str | None = None,
               gate: SendGate | None = None,
               on_progress: Callable[[Progress], None] | None = None,
               control: JobControl | None = None, tls: TlsSettings | None = None) -> Outcome:
    """Run one job; refusals and stops come back as an Outcome, never as an exception. ``store``
    is an SQLite file or a PostgreSQL URL, with the practice's ODS code in ``ods`` (SPEC 10).
    ``gate``, a fleet's one rate limit, is waited on before every POST. ``tls`` defaults to the
    environment's settings (SCR_NB_CA_BUNDLE, SCR_NB_CLIENT_CERT, SCR_NB_CLIENT_KEY); a setting or
    Spine URL that cannot be used is exit 2, before anything."""
    mode = options.mode.value
    tls = tls if tls is not None else TlsSettings.from_options()
    try:
        check_url(spine)
        tls.check()
    except OptionError as err:
        return Outcome(EXIT_USAGE, f"upload {mode}: {err}")
    try:
        session = sessions.load(session_path)
    except RefusedError as err:
        return Outcome(EXIT_REFUSED, f"upload {mode} refused: {err}")
    opened = Store(store, ods)
    try:
        engine = Engine(opened, session, spine, practice, on_progress=on_progress,
                        control=control, tls=tls, gate=gate)
        result = engine.run(options)
    except (RefusedError, ExtractError) as err:
        return Outcome(EXIT_REFUSED, f"upload {mode} refused: {err}"
                       + next_modes(getattr(err, "use_mode", None)))
    finally:
        opened.close()
    job = result.job.to_json()
    if result.completed:
        return Outcome(EXIT_OK, f"upload {mode} completed: every patient in scope is "
                                "acknowledged or failed.", job, result.statistics)
    because = f": {engine.stop_detail}" if engine.stop_detail else ""
    if result.job.reason in REFUSING_STOPS and not result.progress.transmitted:
        return Outcome(EXIT_REFUSED, f"upload {mode} refused{because}. This job transmitted "
                                     "nothing and no patient was failed; once that is put "
                                     "right, continue with Resume (scr-nb upload resume ...)", job,
                       result.statistics)
    return Outcome(EXIT_STOPPED, f"upload {mode} {result.job.status} ({result.job.reason})"
                                 f"{because}; continue it with Resume (scr-nb upload resume ...)",
                   job, result.statistics)


def format_statistics(stats: dict) -> str:
    """Completion statistics for people (SPEC 8)."""
    c = stats["counters"]
    lines = [
        f"Job {stats['job_id']} ({stats['mode']}, {stats['group'] or 'whole list'})",
        f"  Qualifying patients: {stats['qualifying_patients']} of {stats['patients_in_scope']}"
        + (f" in Patient Group {stats['group']}; the figures below are the whole store's"
           if stats["group"] else ""),
        f"  Unprocessed: {c['unprocessed']}  Sending: {c['sending']}  Sent: {c['sent']}  "
        f"Failed: {c['failed']}  Not Required: {c['not_required']}",
        f"  Transmitted, waiting for ack: {stats['states'].get('transmitted', 0)}",
    ]
    not_required = {k: v for k, v in stats["not_required_by_reason"].items() if v}
    if not_required:
        lines.append("  Not required by reason: " + ", ".join(f"{k} {v}" for k, v in not_required.items()))
    for code, n in stats["failed_by_code"].items():
        lines.append(f"  Failed {code}: {n} ({explain(code)})")
    avg = stats["average_seconds_per_patient"]
    lines.append(f"  Elapsed: {stats['elapsed_seconds']:.1f} s, "
                 f"{stats['rate_per_second']:.1f} messages/s"
                 + (f", {avg:.4f} s per patient" if avg else ""))
    return "\n".join(lines)
