"""The analysts' monitor (``notebooks/monitor.ipynb``): the frames filtered by practice, date range
and job, laid out for reading (practice names, plain words, one marker for missing values), one
small throughput chart per practice, and every table exportable to CSV.

The notebook only calls these; ``Monitor`` is the same with widgets for the filters.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

import ipywidgets as widgets
from IPython.display import HTML
import pandas as pd
from matplotlib import dates as mdates
from matplotlib.figure import Figure

from scr_nb.constants import next_step
from scr_nb.reporting import frames
from scr_nb.store.words import (
    MISSING, VISION_COUNTERS, MODE_WORDS, NOT_REQUIRED_WORDS, job_words, words,
)

SMALL_MULTIPLES = 12        # at most this many practices get a throughput chart of their own
SUPPORT_DESK = "investigate_errors.ipynb"


@dataclass(frozen=True)
class Filters:
    """Which practices (their labels), which days (inclusive, local dates) and which jobs."""

    practices: tuple[str, ...] = ()
    since: date | None = None
    until: date | None = None
    jobs: tuple[int, ...] = ()

    def keep(self, frame: pd.DataFrame, when: str | None = None) -> pd.DataFrame:
        """The rows of a frame (with the ``practice`` column) that pass the filters; ``when``
        names its time column, if it has one."""
        keep = pd.Series(True, index=frame.index)
        if self.practices:
            keep &= frame["practice"].isin(self.practices)
        if self.jobs and "job_id" in frame:
            keep &= frame["job_id"].isin(self.jobs)
        if when is not None and when in frame:
            stamps = frame[when]
            if self.since is not None:
                keep &= stamps >= _local_midnight(self.since)
            if self.until is not None:
                keep &= stamps < _local_midnight(self.until + timedelta(days=1))
        return frame[keep.fillna(False)].reset_index(drop=True)


def _local_midnight(day: date) -> pd.Timestamp:
    return pd.Timestamp(datetime.combine(day, time.min).astimezone())


# --- tables for people ----------------------------------------------------------------------------

def _cell(value: object) -> object:
    if value is None or value is pd.NA or value is pd.NaT:
        return MISSING
    if isinstance(value, float) and math.isnan(value):
        return MISSING
    return value


def readable(frame: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """The named columns only, renamed to their words, every missing value shown as one marker."""
    shown = frame[[c for c in columns if c in frame]].rename(columns=columns)
    return shown.astype(object).map(_cell) if not shown.empty else shown


def jobs_table(jobs: pd.DataFrame) -> pd.DataFrame:
    shown = jobs.assign(
        mode=jobs["mode"].map(lambda m: words(m, MODE_WORDS)),
        outcome=[job_words(s, None if pd.isna(r) else r)
                 for s, r in zip(jobs["status"], jobs["reason"])],
        success=jobs["success_rate"].map(lambda r: None if pd.isna(r) else f"{r:.1%}"),
        started=jobs["started_at"].dt.strftime("%Y-%m-%d %H:%M"),
        group=jobs["group"].fillna("whole list"))
    return readable(shown, {"practice": "Practice", "job_id": "Job", "mode": "Mode",
                            "group": "Scope", "outcome": "Outcome", "user_name": "User",
                            "started": "Started", "to_send": "To send",
                            "acknowledged": "Acknowledged", "failed": "Failed",
                            "success": "Success rate"})


def completion_table(completion: pd.DataFrame) -> pd.DataFrame:
    """Vision's five counters per practice, with patients and eligible patients."""
    return readable(completion, {"practice": "Practice", "patients": "Patients",
                                 "eligible": "Eligible", **{key: label for label, key in
                                                           VISION_COUNTERS}})


def latency_table(percentiles: pd.DataFrame) -> pd.DataFrame:
    """Ack latency per job in seconds: how many acks, p50, p90, p99 and the longest."""
    return readable(percentiles.round(3), {"practice": "Practice", "job_id": "Job",
                                           "acks": "Acks", "p50": "p50 (s)", "p90": "p90 (s)",
                                           "p99": "p99 (s)", "max": "max (s)"})


def failures_by_job_table(by_job: pd.DataFrame) -> pd.DataFrame:
    """The failures each job met, by code, including those a later job resolved."""
    shown = by_job.assign(mode=by_job["mode"].map(lambda m: words(m, MODE_WORDS)))
    return readable(shown, {"practice": "Practice", "job_id": "Job", "mode": "Mode",
                            "code": "Code", "words": "Plain words", "failed": "Failed"})


def not_required_by_practice(not_required: pd.DataFrame) -> pd.DataFrame:
    """Practices across, reasons (in words) down: who was not sent, and why."""
    if not_required.empty:
        return pd.DataFrame()
    table = not_required.assign(reason=not_required["reason"].map(
        lambda r: words(r, NOT_REQUIRED_WORDS))).pivot_table(
        index="reason", columns="practice", values="patients", aggfunc="sum", fill_value=0,
        sort=False)
    table = table[(table.T != 0).any()]
    return table.rename_axis(index="Reason", columns=None)


def errors_table(by_code: pd.DataFrame) -> pd.DataFrame:
    """Failed patients per code across the practices, with what to do and where to look."""
    if by_code.empty:
        return pd.DataFrame()
    total = by_code.groupby(["code", "words"], sort=False)["patients"].sum().reset_index()
    total = total.sort_values("patients", ascending=False, kind="stable")
    total["next"] = total["code"].map(next_step)
    total["desk"] = [f"{SUPPORT_DESK} with code = \"{c}\"" for c in total["code"]]
    return readable(total, {"code": "Code", "words": "Plain words", "patients": "Patients",
                            "next": "What to do", "desk": "Patients in the support desk"})


def csv_link(frame: pd.DataFrame, name: str) -> str:
    """An HTML link that downloads the table as ``name``.csv, in a notebook, Voila or an exported
    HTML page alike (the data travels in the link)."""
    data = base64.b64encode(frame.to_csv(index=not isinstance(frame.index, pd.RangeIndex))
                            .encode("utf-8")).decode("ascii")
    return (f'<a download="{html.escape(name)}.csv" href="data:text/csv;base64,{data}">'
            f"Download {html.escape(name)}.csv</a>")


def show(table: pd.DataFrame, name: str, empty: str = "Nothing to show yet.") -> HTML:
    """A table as people read it (no row numbers, no cut text, the one missing marker) with its
    CSV download link under it."""
    if table.empty:
        return HTML(f"<p>{html.escape(empty)}</p>")
    keep_index = not isinstance(table.index, pd.RangeIndex)
    with pd.option_context("display.max_colwidth", None):
        body = table.to_html(index=keep_index, escape=True, na_rep=MISSING, border=0)
    return HTML(body + f"<p>{csv_link(table, name)}</p>")


# --- small multiples ------------------------------------------------------------------------------

def throughput_by_practice(throughput: pd.DataFrame) -> Figure:
    """One small chart of acknowledged and failed messages per period for each practice (the
    busiest first, at most SMALL_MULTIPLES), sharing one time axis."""
    totals = (throughput.groupby("practice", sort=False)["acknowledged"].sum()
              .sort_values(ascending=False))
    shown = list(totals.index[:SMALL_MULTIPLES]) or [None]
    columns = min(3, len(shown))
    rows = math.ceil(len(shown) / columns)
    figure = Figure(figsize=(4.2 * columns, 2.3 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, sharex=True, squeeze=False).ravel()
    for ax, practice in zip(axes, shown):
        if practice is None:
            ax.text(0.5, 0.5, "Nothing to show yet", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_axis_off()
            continue
        data = throughput[throughput["practice"] == practice]
        periods = data["period"].dt.tz_convert(None)
        ax.plot(periods, data["acknowledged"], color="tab:green", label="acknowledged")
        ax.plot(periods, data["failed"], color="tab:red", label="failed")
        ax.set_title(practice if len(practice) <= 40 else practice[:39] + "\u2026", fontsize=9)
        ax.tick_params(labelsize=7)
        locator = mdates.AutoDateLocator(minticks=2, maxticks=4)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    for ax in axes[len(shown):]:
        ax.set_axis_off()
    axes[0].legend(fontsize=7)
    figure.supylabel("messages per period", fontsize=8)
    return figure


# --- the widget -------------------------------------------------------------------------------------

class Monitor(widgets.VBox):
    """Filters (practices, from and to dates, jobs) over the monitor's tables, each with its CSV;
    setting any filter's ``value`` redraws them. ``tables`` holds what is shown."""

    def __init__(self, stores: frames.Stores, freq: str = "auto"):
        self.stores, self.freq = frames.store_locations(stores), freq
        self.all_jobs = frames.jobs(self.stores)
        practices = sorted(self.all_jobs["practice"].unique()) if not self.all_jobs.empty else []
        self.practices = widgets.SelectMultiple(options=practices, description="Practices",
                                                rows=min(6, max(2, len(practices))))
        self.since = widgets.DatePicker(description="From")
        self.until = widgets.DatePicker(description="To")
        self.jobs = widgets.SelectMultiple(
            options=[(f"{p}: #{j}", int(j)) for p, j in
                     zip(self.all_jobs.get("practice", []), self.all_jobs.get("job_id", []))],
            description="Jobs", rows=4)
        self.output = widgets.HTML()
        self.tables: dict[str, pd.DataFrame] = {}
        for control in (self.practices, self.since, self.until, self.jobs):
            control.observe(self.refresh, names="value")
        hint = widgets.HTML("<i>No selection means all. Dates are whole local days.</i>")
        super().__init__([widgets.HBox([self.practices, self.jobs]),
                          widgets.HBox([self.since, self.until]), hint, self.output])
        self.refresh()

    @property
    def filters(self) -> Filters:
        return Filters(tuple(self.practices.value), self.since.value, self.until.value,
                       tuple(self.jobs.value))

    def refresh(self, change: object = None) -> None:
        chosen = self.filters
        jobs = chosen.keep(self.all_jobs, "started_at")
        failures = chosen.keep(frames.failures(self.stores), "failed_at")
        by_code = (failures.groupby(["practice", "code", "words"], sort=False).size()
                   .rename("patients").reset_index())
        self.tables = {
            "jobs": jobs_table(jobs),
            "errors": errors_table(by_code),
            "not_required": not_required_by_practice(chosen.keep(
                frames.not_required(self.stores))),
        }
        parts = []
        for name, table in self.tables.items():
            parts.append(f"<h4>{html.escape(name.replace('_', ' ').capitalize())}</h4>")
            if table.empty:
                parts.append("<p>Nothing matches.</p>")
                continue
            parts.append(show(table, name).data)
        self.output.value = "".join(parts)


__all__ = ["Filters", "MISSING", "Monitor", "completion_table", "csv_link", "errors_table",
           "failures_by_job_table", "jobs_table", "latency_table",
           "not_required_by_practice", "readable", "show", "throughput_by_practice"]
