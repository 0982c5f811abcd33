"""The analyst's report: one self-contained HTML file per store (SPEC 9 and 10, ``scr-nb report``).

The numbers come from ``Store.status()`` (the completion statistics) and ``frames`` (jobs,
throughput, ack latency, errors), the pictures from ``charts``; this module only lays them out.
The page is a Jinja2 template (``templates/report.html.j2``) with autoescaping: every value is
escaped. The report holds no clinical text, and NHS numbers are masked unless ``show_nhs``.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scr_nb import __version__
from scr_nb.constants import category, explain, next_step
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
from scr_nb.store import queries
from scr_nb.store.database import Location
from scr_nb.store.words import (
    MISSING, MODE_WORDS, NOT_REQUIRED_WORDS, VISION_COUNTERS, job_words, words,
)

FAILED_PATIENTS_SHOWN = 200   # the report lists at most this many failed patients


# --- the HTML report ------------------------------------------------------------------------------

def write_report(store: str | Path | Location, out_dir: str | Path, show_nhs: bool = False,
                 refusal: str | None = None, *, ods: str | None = None) -> Path:
    """Write ``report-<store stem or ODS code>-<UTC time>.html`` under ``out_dir`` (made if
    missing) and return its path. ``store`` is an SQLite file or a PostgreSQL URL with the
    practice in ``ods`` (or in the URL as ``?ods=CODE``). NHS numbers are masked unless
    ``show_nhs``."""
    location = Location.of(store, ods)
    now = datetime.now(timezone.utc)
    text = render_report(location, show_nhs=show_nhs, now=now, refusal=refusal)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"report-{_short_name(location)}-{now:%Y%m%dT%H%M%SZ}"
    path, n = out_dir / f"{stem}.html", 1
    while path.exists():          # two reports in one second: keep both
        path, n = out_dir / f"{stem}-{n}.html", n + 1
    return write_private(path, text)   # patient ids, even with NHS numbers masked


def _short_name(location: Location) -> str:
    """The store in a file name: the SQLite file's stem, or the PostgreSQL practice's ODS code."""
    return location.path.stem if location.path is not None else str(location.ods)


class Table(NamedTuple):
    headers: list[str]
    rows: list[list[object]]


_TEMPLATES = Environment(loader=PackageLoader("scr_nb.reporting", "templates"),
                         autoescape=select_autoescape(["html", "j2"]), trim_blocks=True,
                         lstrip_blocks=True, undefined=StrictUndefined)


def render_report(store: str | Path | Location, show_nhs: bool = False,
                  now: datetime | None = None, refusal: str | None = None, *,
                  ods: str | None = None) -> str:
    """The report's HTML text (``write_report`` saves it). ``refusal``: the words of a run that was
    refused, said at the top so older jobs' figures are not read as that run's."""
    location = Location.of(store, ods)
    now = now or datetime.now(timezone.utc)
    with queries.reading(location) as reader:
        status = reader.status()
        code, name = queries.practice_identity(reader)
    jobs = frames.jobs(location)
    by_code = frames.failures_by_code(location)
    by_category = frames.failures_by_category(location)
    failed = frames.failures(location, show_nhs=show_nhs)
    not_required = frames.not_required(location)
    percentiles = frames.ack_latency_percentiles(location)
    throughput = frames.throughput(location, freq="auto")
    shown = failed.head(FAILED_PATIENTS_SHOWN)
    latest = status["latest_job"]
    context = {
        "practice": {"label": f"{name} ({code})" if name and code else (name or code
                                                                       or _short_name(location)),
                     "name": name, "ods": code},
        "store": frames.store_name(location),
        "latest": _latest(latest, jobs) if latest else None,
        "generated": _when(now),
        "masking": ("NHS numbers are shown in full." if show_nhs
                    else "NHS numbers are masked (943 *** 5919)."),
        "refusal": refusal,
        "counters": {label: status["counters"][key] for label, key in VISION_COUNTERS},
        "statistics": _statistics(status),
        "not_required": Table(["Reason", "Patients"],
                              [[words(r, NOT_REQUIRED_WORDS), n]
                               for r, n in status["not_required_by_reason"].items() if n]),
        "failed_by_code": Table(["Code", "Plain words", "Category", "Patients", "What to do"],
                                [[c, explain(c), category(c), n, next_step(c)]
                                 for c, n in status["failed_by_code"].items()]),
        "jobs": _jobs_table(jobs),
        "throughput_note": _throughput_note(throughput),
        "latency": Table(["Job", "Acks", "p50 (s)", "p90 (s)", "p99 (s)", "max (s)"],
                         [[j, n, *(_seconds(v) for v in vs)] for j, n, *vs in percentiles[
                             ["job_id", "acks", *frames.PERCENTILES, "max"]].itertuples(
                             index=False)]),
        "failures_by_job": Table(
            ["Job", "Mode", "Code", "Plain words", "Category", "Failed"],
            [[j, words(m, MODE_WORDS), c, w, k, n] for j, m, c, w, k, n in
             frames.failures_by_job(location)[
                 ["job_id", "mode", "code", "words", "category", "failed"]].itertuples(
                 index=False)]),
        "failed_note": (f"The first {len(shown)} of {len(failed)} failed patients; "
                        "frames.failures() lists them all." if len(failed) > len(shown) else ""),
        "failed": Table(["Patient", "NHS number", "Code", "Plain words", "Job", "Message id",
                         "Failed at"],
                        [[f.patient_id, f.nhs_number, f.code, f.words, _value(f.job_id),
                          f.message_id, _when(f.failed_at)]
                         for f in shown.itertuples(index=False)]),
        "charts": {
            "success_rate": _chart(plot_success_rate, jobs),
            "throughput": _chart(plot_throughput, throughput, height=3.4),
            "ack_latency": _chart(plot_ack_latency, percentiles),
            "failures_by_code": _chart(plot_failures_by_code, by_code,
                                       height=max(2.2, 0.5 + 0.4 * len(by_code))),
            "failures_by_category": _chart(plot_failures_by_category, by_category),
            "not_required": _chart(plot_not_required, not_required, height=3.4),
        },
        "version": __version__,
        "MISSING": MISSING,
        "NOTHING_TO_SHOW": NOTHING_TO_SHOW,
    }
    return _TEMPLATES.get_template("report.html.j2").render(**context)


def _latest(latest: dict, jobs: pd.DataFrame) -> dict:
    row = jobs[jobs["job_id"] == latest["id"]]
    user = row["user_name"].iloc[0] if not row.empty else None
    return {"id": latest["id"], "mode_words": words(latest["mode"], MODE_WORDS),
            "scope": f"Patient Group {latest['group']}" if latest["group"] else "the whole list",
            "status_words": job_words(latest["status"], latest["reason"]),
            "user": f"{user} ({latest['user_id']})" if user else latest["user_id"],
            "started": _when(latest["started_at"]), "ended": _when(latest["ended_at"])}


def _statistics(status: dict) -> Table:
    counters, states = status["counters"], status["states"]
    patients = sum(states.values())
    rows = [["Patients in the store", patients],
            ["Qualifying patients", patients - counters["not_required"]],
            ["Transmitted, waiting for the ack", states["transmitted"]],
            ["Acknowledged", states["acknowledged"]]]
    holder = status.get("running")
    if holder:
        rows.append(["Running now", f"{holder['user_name']} ({holder['user_id']}) on "
                     f"{holder['host']}, process {holder['pid']}, since {holder['since']}"])
    return Table(["", ""], rows)


def _jobs_table(jobs: pd.DataFrame) -> Table:
    rows = [[j.job_id, words(j.mode, MODE_WORDS), j.group or "whole list",
             job_words(j.status, None if _missing(j.reason) else j.reason), _value(j.user_name),
             _when(j.started_at), _duration(j.duration_s), _value(j.to_send),
             _value(j.acknowledged), _value(j.failed), _percent(j.success_rate)]
            for j in jobs.itertuples(index=False)]
    return Table(["Job", "Mode", "Scope", "Outcome", "User", "Started", "Duration", "To send",
                  "Acknowledged", "Failed", "Success rate"], rows)


def _throughput_note(throughput: pd.DataFrame) -> str:
    if len(throughput) < 2:
        return ""
    step = throughput["period"].iloc[1] - throughput["period"].iloc[0]
    return f"Messages per {_duration(step.total_seconds())}."


# --- values -----------------------------------------------------------------------------------------

def _missing(value: object) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and math.isnan(value)


def _value(value: object) -> object:
    """A cell's value: None (shown as the one missing marker) for every kind of missing."""
    if _missing(value):
        return None
    return int(value) if hasattr(value, "is_integer") and float(value).is_integer() else value


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


def _chart(plot: Callable[[Axes, pd.DataFrame], Axes], frame: pd.DataFrame,
           height: float = 3.0) -> dict | None:
    """One chart as PNG data (base64) with its title, or None when there is nothing to draw."""
    if frame.empty:
        return None
    figure = Figure(figsize=(8, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    ax = plot(figure.add_subplot(), frame)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return {"data": base64.b64encode(buffer.getvalue()).decode("ascii"),
            "title": ax.get_title() or "chart"}


__all__ = [
    "write_report", "render_report", "plot_success_rate", "plot_throughput", "plot_ack_latency",
    "plot_failures_by_code", "plot_failures_by_category", "plot_not_required",
]
