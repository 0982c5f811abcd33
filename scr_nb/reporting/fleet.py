"""The fleet monitor (SPEC 12, ``notebooks/fleet_monitor.ipynb``): progress and success rate per
practice, errors by code across the fleet, the slowest practices, and two figures, from one
reading of every practice's store (``scr_nb.fleet.status.read_fleet``).

Every frame is built from the same list of readings, so one refresh shows one moment of the fleet.
Only counts are shown: no NHS number, no clinical text. ``FleetMonitor`` redraws them every few
seconds while a notebook shows it, and draws once when nobody watches (papermill).
"""

from __future__ import annotations

import base64
import html
import io
import math
import threading
from collections import Counter
from datetime import datetime, timezone

import ipywidgets as widgets
import pandas as pd
from IPython.display import HTML
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from scr_nb.constants import explain
from scr_nb.fleet.status import (COUNTERS, STATUSES, UNREADABLE, PracticeReading, read_fleet,
                                 totals)
from scr_nb.reporting.monitor import readable, show
from scr_nb.store.words import REASON_WORDS, VISION_COUNTERS, words

TEXT = "object"
FIGURE_WIDTH = 12.8         # inches at 100 dpi: 1280 px, the width a monitor is read at
FIGURE_DPI = 100
BEHIND_SHOWN = 25           # practices in the progress figure: those furthest from done
CODES_SHOWN = 15            # failure codes in the errors figure: the most frequent
SLOWEST_SHOWN = 10
REFRESH_SECONDS = 5.0
NOTHING_TO_MONITOR = ("Nothing to monitor: set <code>store</code> to the fleet's "
                      "<code>postgresql://</code> URL, or <code>stores_dir</code> to its folder of "
                      "<code>&lt;ODS&gt;.sqlite</code> stores (one of them, not both).")

PROGRESS_COLUMNS = {"ods_code": TEXT, "status": TEXT, "reason": TEXT, "eligible": "Int64",
                    "acknowledged": "Int64", "failed": "Int64", "remaining": "Int64",
                    "done": "float64", "success_rate": "float64", "error": TEXT}
ERROR_COLUMNS = {"code": TEXT, "meaning": TEXT, "patients": "int64", "practices": "int64",
                 "most_affected": TEXT}
RATE_COLUMNS = {"ods_code": TEXT, "status": TEXT, "job_id": "Int64", "mode": TEXT,
                "elapsed_s": "float64", "finished": "Int64", "messages_per_s": "float64",
                "remaining": "Int64", "eta_s": "float64"}


def _frame(rows: list[dict], columns: dict[str, str]) -> pd.DataFrame:
    """The rows as a frame of the given columns and types (an empty one typed too)."""
    return pd.DataFrame(rows, columns=list(columns)).astype(columns)


# --- frames ---------------------------------------------------------------------------------------

def progress(readings: list[PracticeReading]) -> pd.DataFrame:
    """One row per practice, with its status and the reason its latest job gave for ending (a
    stop time, a session ended...). ``eligible``: patients eligible by the extract (those the Spine
    already held included); ``remaining``: eligible patients not yet acknowledged or failed
    (Unprocessed + Sending); ``done``: the share of the eligible no longer remaining;
    ``success_rate``: acknowledged / (acknowledged + failed), empty before any outcome. A
    practice whose store could not be read has only its status and ``error``."""
    rows = []
    for reading in readings:
        if reading.counters is None:
            rows.append({"ods_code": reading.ods_code, "status": reading.status,
                         "error": reading.error})
            continue
        counts = reading.counters
        acknowledged, failed = counts["sent"], counts["failed"]
        remaining = counts["unprocessed"] + counts["sending"]
        eligible = reading.eligible
        if eligible is None:   # read without details: those sent, failed or still to send
            eligible = acknowledged + failed + remaining
        eligible = max(eligible, remaining)
        rows.append({"ods_code": reading.ods_code, "status": reading.status,
                     "reason": (reading.latest_job or {}).get("reason"), "eligible": eligible,
                     "acknowledged": acknowledged, "failed": failed, "remaining": remaining,
                     "done": (eligible - remaining) / eligible if eligible else math.nan,
                     "success_rate": (acknowledged / (acknowledged + failed)
                                      if acknowledged + failed else math.nan),
                     "error": None})
    return _frame(rows, PROGRESS_COLUMNS)


def errors_by_code(readings: list[PracticeReading]) -> pd.DataFrame:
    """Failed patients (their latest attempt failed) per code across the fleet, most first: the
    code, its meaning in plain words, the patients, how many practices have any, and the practice
    with the most."""
    patients: Counter[str] = Counter()
    where: dict[str, Counter[str]] = {}
    for reading in readings:
        for code, count in reading.failed_by_code.items():
            if count:
                patients[str(code)] += int(count)
                where.setdefault(str(code), Counter())[reading.ods_code] += int(count)
    most_first = lambda item: (-item[1], item[0])  # noqa: E731 - then by code or ODS code
    rows = [{"code": code, "meaning": explain(code), "patients": count,
             "practices": len(where[code]),
             "most_affected": sorted(where[code].items(), key=most_first)[0][0]}
            for code, count in sorted(patients.items(), key=most_first)]
    return _frame(rows, ERROR_COLUMNS)


def rates(readings: list[PracticeReading]) -> pd.DataFrame:
    """Per practice with a job, the pace of its latest job: the messages it finished (acknowledged
    or failed) over the seconds since it started (to its end once it ended, else to the moment the
    practice was read), and at that pace the seconds its remaining patients need (``eta_s``, only
    while it runs). Needs readings with details (``read_fleet(..., details=True)``)."""
    rows = []
    for reading in readings:
        job = reading.latest_job
        if job is None or reading.counters is None:
            continue
        started = _when(job.get("started_at"))
        ended = _when(job.get("ended_at")) or reading.read_at
        elapsed = (ended - started).total_seconds() if started is not None else math.nan
        counts = reading.latest_job_counts or {}
        finished = int(counts.get("acknowledged", 0)) + int(counts.get("failed", 0))
        pace = finished / elapsed if elapsed and elapsed > 0 else math.nan
        remaining = reading.counters["unprocessed"] + reading.counters["sending"]
        running = reading.status == "running"
        rows.append({"ods_code": reading.ods_code, "status": reading.status, "job_id": job["id"],
                     "mode": job.get("mode"), "elapsed_s": elapsed, "finished": finished,
                     "messages_per_s": pace, "remaining": remaining,
                     "eta_s": remaining / pace if running and pace and pace > 0 else math.nan})
    return _frame(rows, RATE_COLUMNS)


def slowest(readings: list[PracticeReading], count: int = SLOWEST_SHOWN) -> pd.DataFrame:
    """The practices that still have patients to send, slowest first by the messages a second
    of their latest job (``rates``); a job that finished nothing yet comes first, and among equal
    paces the one with more remaining."""
    paced = rates(readings)
    paced = paced[paced["remaining"] > 0]
    order = paced.assign(_pace=paced["messages_per_s"].fillna(0.0))
    order = order.sort_values(["_pace", "remaining", "ods_code"], ascending=[True, False, True],
                              kind="stable")
    return order.drop(columns="_pace").head(count).reset_index(drop=True)


def _when(stamp: object) -> datetime | None:
    if not stamp:
        return None
    moment = datetime.fromisoformat(str(stamp))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


# --- figures --------------------------------------------------------------------------------------

def progress_figure(frame: pd.DataFrame) -> Figure:
    """Left: the practices furthest from done (at most ``BEHIND_SHOWN``), each bar its eligible
    patients split into acknowledged, failed, done otherwise (the Spine already held a summary)
    and remaining. Right: how many practices are in each tenth of done, and done."""
    readable_rows = frame[frame["eligible"].notna() & (frame["eligible"] > 0)]
    behind = readable_rows.sort_values(["done", "remaining", "ods_code"],
                                       ascending=[True, False, True], kind="stable")
    behind = behind.head(BEHIND_SHOWN).iloc[::-1]
    height = max(4.5, 0.28 * len(behind) + 1.6)
    figure = Figure(figsize=(FIGURE_WIDTH, height), dpi=FIGURE_DPI, layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=[3, 2])
    if behind.empty:
        _nothing(left)
        _nothing(right)
        return figure
    eligible = behind["eligible"].astype(float)
    parts = {
        "acknowledged": (behind["acknowledged"].astype(float), "tab:green"),
        "failed": (behind["failed"].astype(float), "tab:red"),
        "done otherwise": ((behind["eligible"] - behind["acknowledged"] - behind["failed"]
                            - behind["remaining"]).clip(lower=0).astype(float), "tab:olive"),
        "remaining": (behind["remaining"].astype(float), "lightgray"),
    }
    labels = [f"{code} ({status})" for code, status in zip(behind["ods_code"], behind["status"])]
    start = pd.Series(0.0, index=behind.index)
    for name, (values, colour) in parts.items():
        share = values / eligible * 100
        left.barh(labels, share, left=start, color=colour, label=name)
        start = start + share
    for y, done in enumerate(behind["done"]):
        left.text(101, y, f"{done:.0%}", va="center", fontsize=9)
    left.set_xlim(0, 110)
    left.set_xlabel("% of the practice's eligible patients")
    left.set_title(f"Furthest from done ({len(behind)} of {len(readable_rows)} practices)")
    left.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=4,
                frameon=False)
    left.tick_params(axis="y", labelsize=9)

    tenths = [f"{i * 10}-{i * 10 + 10}%" for i in range(9)] + ["90-99%", "100%"]
    done = readable_rows["done"].clip(0, 1)
    which = (done * 10).astype(int).clip(upper=9).where(done < 1, 10)
    counts = which.value_counts().reindex(range(11), fill_value=0)
    bars = right.bar(tenths, counts.to_numpy(), color="tab:blue")
    right.bar_label(bars, fontsize=9)
    right.yaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_ylabel("practices")
    right.set_xlabel("share of eligible patients done")
    right.set_title("Practices by progress")
    right.tick_params(axis="x", labelrotation=45, labelsize=9)
    return figure


def errors_figure(frame: pd.DataFrame) -> Figure:
    """The most frequent failure codes across the fleet (at most ``CODES_SHOWN``), each bar its
    failed patients, labelled with the practices affected."""
    shown = frame.head(CODES_SHOWN).iloc[::-1]
    figure = Figure(figsize=(FIGURE_WIDTH, max(3.5, 0.4 * len(shown) + 1.5)), dpi=FIGURE_DPI,
                    layout="constrained")
    ax = figure.subplots()
    if shown.empty:
        _nothing(ax, "No failed patients")
        return figure
    labels = [f"{code}: {_shorten(meaning, 60)}" for code, meaning in
              zip(shown["code"], shown["meaning"])]
    bars = ax.barh(labels, shown["patients"].to_numpy(), color="tab:red")
    ax.bar_label(bars, labels=[f"{p} patients, {n} practice{'s' * (n != 1)}" for p, n in
                               zip(shown["patients"], shown["practices"])], fontsize=9, padding=3)
    ax.set_xlim(0, shown["patients"].max() * 1.35)
    ax.set_xlabel("failed patients")
    ax.set_title("Failures by code across the fleet")
    ax.tick_params(axis="y", labelsize=9)
    return figure


def _nothing(ax, words: str = "Nothing to show yet") -> None:
    ax.text(0.5, 0.5, words, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def png(figure: Figure) -> str:
    """A figure as an HTML image that travels with the page (a notebook, its HTML export)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img style="max-width:100%" src="data:image/png;base64,{data}"/>'


# --- one rendering of the fleet -------------------------------------------------------------------

def progress_table(frame: pd.DataFrame) -> pd.DataFrame:
    shown = frame.assign(done=frame["done"].map(_percent),
                         success_rate=frame["success_rate"].map(_percent))
    shown["reason"] = [words(reason, REASON_WORDS) if isinstance(reason, str) else None
                       for reason in shown["reason"]]
    columns = {"ods_code": "Practice", "status": "Status", "reason": "Why it ended",
               "eligible": "Eligible", "acknowledged": "Acknowledged", "failed": "Failed",
               "remaining": "Remaining", "done": "Done", "success_rate": "Success rate",
               "error": "Error"}
    for name in ("reason", "error"):   # shown only when some practice has one
        if shown[name].isna().all():
            del columns[name]
    return readable(shown, columns)


def errors_table(frame: pd.DataFrame) -> pd.DataFrame:
    return readable(frame, {"code": "Code", "meaning": "Plain words", "patients": "Patients",
                            "practices": "Practices", "most_affected": "Most affected"})


def slowest_table(frame: pd.DataFrame) -> pd.DataFrame:
    shown = frame.assign(messages_per_s=frame["messages_per_s"].round(2),
                         elapsed=frame["elapsed_s"].map(_duration),
                         eta=frame["eta_s"].map(_duration))
    return readable(shown, {"ods_code": "Practice", "status": "Status", "job_id": "Job",
                            "mode": "Mode", "elapsed": "Since start",
                            "finished": "Messages finished", "messages_per_s": "Messages/s",
                            "remaining": "Remaining", "eta": "Time to finish"})


def _percent(value: float) -> str | None:
    return None if pd.isna(value) else f"{value:.1%}"


def _duration(seconds: float) -> str | None:
    if pd.isna(seconds):
        return None
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def render(readings: list[PracticeReading], read_at: datetime | None = None) -> str:
    """Everything the fleet monitor shows for one reading, as one HTML block: the fleet's
    counters and statuses, practices that could not be read, progress per practice, errors by
    code, the slowest practices, and the two figures."""
    read_at = read_at or max((r.read_at for r in readings), default=datetime.now(timezone.utc))
    states = Counter(r.status for r in readings)
    said = ", ".join(f"{states[s]} {s}" for s in STATUSES if states[s]) or "No practices"
    summed = totals(readings)
    counters = pd.DataFrame([[summed[key] for key in COUNTERS]],
                            columns=[label for label, _ in VISION_COUNTERS])
    parts = [f"<h3>Fleet: {len(readings)} practice{'s' * (len(readings) != 1)}</h3>",
             f"<p>{html.escape(said)}. Read at {read_at:%Y-%m-%d %H:%M:%S} UTC.</p>",
             counters.to_html(index=False, border=0)]
    unreadable = [r for r in readings if r.status == UNREADABLE]
    if unreadable:
        items = "".join(f"<li><b>{html.escape(r.ods_code)}</b>: {html.escape(r.error or '')}</li>"
                        for r in unreadable)
        parts.append(f"<p style='color:#b00'><b>{len(unreadable)} store"
                     f"{'s' * (len(unreadable) != 1)} could not be read:</b></p><ul>{items}</ul>")
    rows = progress(readings)
    errors = errors_by_code(readings)
    parts += ["<h4>Progress and success rate per practice</h4>",
              "<p><i>Done: eligible patients acknowledged, failed or already held by the Spine. "
              "Success rate: acknowledged / (acknowledged + failed).</i></p>",
              png(progress_figure(rows)),
              f"<div style='max-height:420px;overflow:auto'>"
              f"{show(progress_table(rows), 'fleet_progress', 'No practices.').data}</div>",
              "<h4>Errors by code across the fleet</h4>",
              png(errors_figure(errors)),
              show(errors_table(errors), "fleet_errors", "No failed patients.").data,
              "<h4>Slowest practices</h4>",
              "<p><i>Practices with patients still to send, by the messages a second their "
              "latest job finished (acknowledged or failed) since it started, slowest first; "
              "time to finish at that pace while it runs.</i></p>",
              show(slowest_table(slowest(readings)), "fleet_slowest",
                   "No practice has patients left to send.").data]
    return "".join(parts)


# --- live in a notebook ---------------------------------------------------------------------------

class FleetMonitor:
    """The fleet's rendering in an ipywidgets ``Output``, read again every ``refresh_seconds``
    while a notebook front end shows it (its view count), so a headless run (papermill) keeps
    the one rendering it drew. ``refresh()`` reads and draws now; ``close()`` stops the
    refreshing. Threads only set the widget's outputs (they never print)."""

    def __init__(self, store: str | None = None, stores_dir: str | None = None,
                 refresh_seconds: float = REFRESH_SECONDS, live: bool = True):
        self.store, self.stores_dir = store, stores_dir
        self.refresh_seconds = float(refresh_seconds or 0)
        self.output = widgets.Output()
        self.output._view_count = 0   # counted by the front end: 0 while nobody shows it
        self.html = ""
        self.refreshes = 0
        self._closed = threading.Event()
        self.refresh()
        if live and self.refresh_seconds > 0:
            threading.Thread(target=self._tick, name="scr-nb-fleet-monitor", daemon=True).start()

    def refresh(self) -> None:
        try:
            readings = read_fleet(self.store, self.stores_dir, details=True)
            self.html = render(readings)
        except Exception as err:   # noqa: BLE001 - the fleet unreachable: said, tried again
            self.html = (f"<p style='color:#b00'><b>The fleet could not be read</b>: "
                         f"{html.escape(str(err))}</p>")
        self.refreshes += 1
        self.output.outputs = ({"output_type": "display_data", "metadata": {},
                                "data": {"text/html": self.html,
                                         "text/plain": "SCR fleet monitor"}},)

    @property
    def watched(self) -> bool:
        """Whether a front end shows the widget now (none does in a papermill run)."""
        return bool(self.output._view_count)

    def tick(self) -> bool:
        """One beat of the live view: read and draw again if someone watches; True if it did."""
        if self.watched:
            self.refresh()
            return True
        return False

    def _tick(self) -> None:
        while not self._closed.wait(self.refresh_seconds):
            self.tick()

    def close(self) -> None:
        self._closed.set()

    def _repr_mimebundle_(self, **kwargs) -> dict:
        """Live, the widget; in an exported page or a papermill run, the rendering it drew."""
        bundle = self.output._repr_mimebundle_(**kwargs)
        bundle["text/html"] = self.html
        return bundle


def monitor(store: str | None = None, stores_dir: str | None = None,
            refresh_seconds: float = REFRESH_SECONDS) -> FleetMonitor | HTML:
    """What the fleet notebook shows: the live monitor of the fleet named by exactly one of
    ``store`` and ``stores_dir``, or a message saying what to set."""
    if bool(store) == bool(stores_dir):
        return HTML(f"<p><b>{NOTHING_TO_MONITOR}</b></p>")
    return FleetMonitor(store or None, stores_dir or None, refresh_seconds)


__all__ = ["FleetMonitor", "NOTHING_TO_MONITOR", "errors_by_code", "errors_figure", "monitor",
           "png", "progress", "progress_figure", "rates", "render", "slowest"]
