"""The analyst's report: one self-contained HTML file per store (SPEC 9 and 10, ``scr-nb report``).

The numbers come from ``Store.status()`` (the completion statistics) and ``frames`` (jobs,
throughput, ack latency, errors), the pictures from ``charts``; this module only lays them out. The report holds no clinical text, and NHS numbers are
masked unless ``show_nhs``. Every value is escaped before it goes into the HTML.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scr_nb import __version__
from scr_nb.constants import category, explain
from scr_nb.errors import StoreError
from scr_nb.private_files import write_private
from scr_nb.reporting import frames
from scr_nb.reporting.charts import (
    NOTHING_TO_SHOW,
    plot_ack_latency,
    plot_failures_by_category,
    plot_failures_by_code,
    plot_not_required,
    plot_success_rate,
    plot_throughput,
)
from scr_nb.store.practice_store import Store

FAILED_PATIENTS_SHOWN = 200   # the report lists at most this many failed patients
# Vision's completion screen, in its order, with the keys of Store.status()["counters"].
VISION_COUNTERS = (("Unprocessed", "unprocessed"), ("Sending", "sending"), ("Sent", "sent"),
                   ("Failed", "failed"), ("Not Required", "not_required"))


# --- the HTML report ------------------------------------------------------------------------------

def write_report(store_path: str | Path, out_dir: str | Path, show_nhs: bool = False) -> Path:
    """Write ``report-<store stem>-<UTC time>.html`` under ``out_dir`` (made if missing) and
    return its path. NHS numbers are masked unless ``show_nhs``."""
    store_path = Path(store_path)
    now = datetime.now(timezone.utc)
    text = render_report(store_path, show_nhs=show_nhs, now=now)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"report-{store_path.stem}-{now:%Y%m%dT%H%M%SZ}"
    path, n = out_dir / f"{stem}.html", 1
    while path.exists():          # two reports in one second: keep both
        path, n = out_dir / f"{stem}-{n}.html", n + 1
    return write_private(path, text)   # patient ids, even with NHS numbers masked


def render_report(store_path: str | Path, show_nhs: bool = False,
                  now: datetime | None = None) -> str:
    """The report's HTML text (``write_report`` saves it)."""
    store_path = Path(store_path)
    if not store_path.is_file():
        raise StoreError(f"{store_path}: no such store")
    now = now or datetime.now(timezone.utc)
    store = Store(store_path, readonly=True)
    try:
        status = store.status()
    finally:
        store.close()
    jobs = frames.jobs(store_path)
    by_code = frames.failures_by_code(store_path)
    by_category = frames.failures_by_category(store_path)
    failed = frames.failures(store_path, show_nhs=show_nhs)
    not_required = frames.not_required(store_path)
    percentiles = frames.ack_latency_percentiles(store_path)
    throughput = frames.throughput(store_path, freq="auto")

    masking = ("NHS numbers are shown in full." if show_nhs
               else "NHS numbers are masked (943 *** 5919).")
    parts = [
        f"<h1>SCR GP Summary upload: {_e(store_path.stem)}</h1>",
        f'<p class="meta">Store {_e(store_path)} &middot; generated {_e(_when(now))} '
        f"&middot; {_e(masking)} No clinical content.</p>",
        "<h2>Completion statistics</h2>",
        _completion(status),
        "<h3>Not required, by reason</h3>",
        _table(["Reason", "Patients"],
               [(r, n) for r, n in status["not_required_by_reason"].items()],
               empty="No patient is marked not required."),
        "<h3>Failed, by code</h3>",
        _table(["Code", "Plain words", "Category", "Patients"],
               [(c, explain(c), category(c), n) for c, n in status["failed_by_code"].items()],
               empty="No failed patients."),
        "<h2>Jobs</h2>",
        _jobs_table(jobs),
        _chart(plot_success_rate, jobs),
        "<h2>Throughput</h2>",
        _throughput_note(throughput),
        _chart(plot_throughput, throughput, height=3.4),
        "<h2>Ack latency</h2>",
        _table(["Job", "Acks", "p50 (s)", "p90 (s)", "p99 (s)", "max (s)"],
               [(j, n, *(_seconds(v) for v in vs)) for j, n, *vs in percentiles[
                   ["job_id", "acks", *frames.PERCENTILES, "max"]].itertuples(index=False)],
               empty="No acknowledgements yet."),
        _chart(plot_ack_latency, percentiles),
        "<h2>Errors</h2>",
        _chart(plot_failures_by_code, by_code, height=max(2.2, 0.5 + 0.4 * len(by_code))),
        _chart(plot_failures_by_category, by_category),
        "<h3>Failures each job met (including those resolved later)</h3>",
        _table(["Job", "Mode", "Code", "Plain words", "Category", "Failed"],
               frames.failures_by_job(store_path)[
                   ["job_id", "mode", "code", "words", "category", "failed"]].itertuples(
                   index=False),
               empty="No job met a failure."),
        "<h3>Failed patients</h3>",
        _failed_patients(failed),
        "<h2>Not required</h2>",
        _chart(plot_not_required, not_required, height=3.4),
        f'<p class="meta">scr-nb {_e(__version__)}</p>',
    ]
    return _PAGE.format(title=_e(f"scr-nb report: {store_path.stem}"), body="\n".join(parts))


def _completion(status: dict) -> str:
    counters, states = status["counters"], status["states"]
    vision = _table([label for label, _ in VISION_COUNTERS],
                    [[counters[key] for _, key in VISION_COUNTERS]], css="counters")
    patients = sum(states.values())
    more = [("Patients in the store", patients),
            ("Qualifying patients", patients - counters["not_required"]),
            ("Transmitted, waiting for the ack", states["transmitted"]),
            ("Acknowledged", states["acknowledged"])]
    latest = status.get("latest_job")
    if latest:
        more.append(("Latest job", f"#{latest['id']} {latest['mode']} "
                     f"({latest['group'] or 'whole list'}): {latest['status']}"
                     + (f", {latest['reason']}" if latest["reason"] else "")))
    holder = status.get("running")
    if holder:
        more.append(("Running now", f"{holder['user_name']} ({holder['user_id']}) on "
                     f"{holder['host']}, pid {holder['pid']}, since {holder['since']}"))
    return vision + _table(["", ""], more, header=False)


def _jobs_table(jobs: pd.DataFrame) -> str:
    rows = [(j.job_id, j.mode, j.group or "whole list", j.status, j.reason, j.user_name,
             _when(j.started_at), _when(j.ended_at), _duration(j.duration_s),
             j.eligible_in_scope, j.to_send, j.transmitted, j.acknowledged, j.failed,
             _percent(j.success_rate), _percent(j.acknowledged_of_eligible))
            for j in jobs.itertuples(index=False)]
    return _table(["Job", "Mode", "Scope", "Status", "Reason", "User", "Started", "Ended",
                   "Duration", "Eligible in scope", "To send", "Transmitted", "Acknowledged",
                   "Failed", "Success rate", "Acknowledged of eligible"], rows,
                  empty="No jobs have run on this store.")


def _throughput_note(throughput: pd.DataFrame) -> str:
    if len(throughput) < 2:
        return ""
    step = throughput["period"].iloc[1] - throughput["period"].iloc[0]
    return f'<p class="meta">Messages per {_e(_duration(step.total_seconds()))}.</p>'


def _failed_patients(failed: pd.DataFrame) -> str:
    shown = failed.head(FAILED_PATIENTS_SHOWN)
    rows = [(f.patient_id, f.nhs_number, f.code, f.words, f.category, f.job_id, f.message_id,
             _when(f.failed_at)) for f in shown.itertuples(index=False)]
    note = ""
    if len(failed) > len(shown):
        note = (f'<p class="meta">The first {len(shown)} of {len(failed)} failed patients; '
                "frames.failures() lists them all.</p>")
    return note + _table(["Patient", "NHS number", "Code", "Plain words", "Category", "Job",
                          "Message id", "Failed at"], rows, empty="No failed patients.")


# --- HTML pieces ----------------------------------------------------------------------------------

def _missing(value: object) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and math.isnan(value)


def _e(value: object) -> str:
    """A value as escaped HTML text; missing values as a dash."""
    return "&ndash;" if _missing(value) else html.escape(str(value), quote=True)


def _when(value: object) -> str | None:
    if _missing(value):
        return None
    return pd.Timestamp(value).tz_convert("UTC").strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: object) -> str | None:
    if _missing(seconds):
        return None
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.3g} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _seconds(value: object) -> str | None:
    return None if _missing(value) else f"{float(value):.3f}"


def _percent(value: object) -> str | None:
    return None if _missing(value) else f"{float(value) * 100:.1f}%"


def _table(headers: list[str], rows, empty: str = "", css: str = "", header: bool = True) -> str:
    rows = [list(r) for r in rows]
    if not rows and empty:
        return f'<p class="empty">{_e(empty)}</p>'
    head = ("<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr></thead>"
            if header else "")
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in rows)
    cls = f' class="{_e(css)}"' if css else ""
    return f"<table{cls}>{head}<tbody>{body}</tbody></table>"


def _chart(plot: Callable[[Axes, pd.DataFrame], Axes], frame: pd.DataFrame,
           height: float = 3.0) -> str:
    """One chart as an embedded PNG, or a line saying there is nothing to draw."""
    if frame.empty:
        return f'<p class="empty">{_e(NOTHING_TO_SHOW)}.</p>'
    figure = Figure(figsize=(8, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    ax = plot(figure.add_subplot(), frame)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(ax.get_title() or "chart")}">'


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 70em; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
th {{ background: #f2f2f2; }}
table.counters td {{ font-size: 1.4em; text-align: center; }}
.meta, .empty {{ color: #666; font-size: 0.9em; }}
img {{ max-width: 100%; display: block; margin: 0.5em 0 1em; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""


__all__ = [
    "write_report", "render_report", "plot_success_rate", "plot_throughput", "plot_ack_latency",
    "plot_failures_by_code", "plot_failures_by_category", "plot_not_required",
]
