"""The analysts' charts, shared by ``notebooks/monitor.ipynb``, the scheduled report and the HTML
report: each draws one frame of ``frames`` on a matplotlib ``Axes`` it is given.

Callers draw on ``Figure`` objects with the Agg canvas, never through pyplot, so a report does not
touch the backend of a notebook that imports it.
"""

from __future__ import annotations

import math

import pandas as pd
from matplotlib import dates as mdates
from matplotlib.axes import Axes

from scr_nb.constants import explain
from scr_nb.reporting import frames
from scr_nb.store.words import NOT_REQUIRED_WORDS, words

NOTHING_TO_SHOW = "Nothing to show yet"


def _nothing(ax: Axes) -> Axes:
    ax.text(0.5, 0.5, NOTHING_TO_SHOW, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    return ax


def _job_labels(frame: pd.DataFrame) -> list[str]:
    """``#3 failed``, with the practice in front when the frame holds several practices."""
    several = frame["practice"].nunique() > 1
    modes = frame["mode"] if "mode" in frame else [""] * len(frame)
    return [(f"{p}: " * several + f"#{j} {m}").rstrip()
            for p, j, m in zip(frame["practice"], frame["job_id"], modes)]


def plot_success_rate(ax: Axes, jobs: pd.DataFrame) -> Axes:
    """Each job's success rate (acknowledged / (acknowledged + failed)) as a dot with its value,
    from ``frames.jobs``, on an axis that starts just below the lowest rate, so 98% and 100% look
    different."""
    jobs = jobs[jobs["success_rate"].notna()] if not jobs.empty else jobs
    if jobs.empty:
        return _nothing(ax)
    rates = jobs["success_rate"].to_numpy(dtype=float) * 100
    labels = _job_labels(jobs)
    ax.vlines(labels, 0, rates, color="tab:green", alpha=0.35, linewidth=6)
    ax.plot(labels, rates, "o", color="tab:green")
    for x, rate in zip(labels, rates):
        ax.annotate(f"{rate:.1f}%", (x, rate), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=8)
    low = max(0.0, math.floor(min(rates) / 5) * 5 - 5)
    ax.set_ylim(low, 101.5)
    ax.set_ylabel("success rate (%)")
    ax.set_title("Success rate per job" + (f" (axis from {low:.0f}%)" if low else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    return ax


def plot_throughput(ax: Axes, throughput: pd.DataFrame) -> Axes:
    """Lines of messages per period for each event (queued, transmitted, acknowledged, failed),
    from ``frames.throughput``; one set per practice when there are several."""
    if throughput.empty:
        return _nothing(ax)
    several = throughput["practice"].nunique() > 1
    for practice, rows in throughput.groupby("practice", sort=False):
        periods = rows["period"].dt.tz_convert(None)
        for event in frames.EVENTS:
            if rows[event].any():
                ax.plot(periods, rows[event], marker=".",
                        label=f"{practice}: " * several + event)
    locator = mdates.AutoDateLocator(minticks=3, maxticks=8)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(
        locator, formats=["%Y", "%b", "%d %b", "%H:%M", "%H:%M:%S", "%H:%M:%S.%f"]))
    ax.set_ylabel("messages per period")
    ax.set_xlabel("time (UTC)")
    ax.set_title("Throughput")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    return ax


def plot_ack_latency(ax: Axes, percentiles: pd.DataFrame) -> Axes:
    """Grouped bars of p50, p90 and p99 ack latency per job, from
    ``frames.ack_latency_percentiles``."""
    if percentiles.empty:
        return _nothing(ax)
    labels = _job_labels(percentiles)
    width = 0.8 / len(frames.PERCENTILES)
    for i, name in enumerate(frames.PERCENTILES):
        ax.bar([x + i * width for x in range(len(labels))], percentiles[name], width, label=name)
    ax.set_xticks([x + width for x in range(len(labels))], labels)
    ax.set_ylabel("seconds from 202 to ack")
    ax.set_title("Ack latency per job")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    return ax


def plot_failures_by_code(ax: Axes, by_code: pd.DataFrame) -> Axes:
    """Horizontal bars of failed patients per code, with its plain words, summed over the stores
    of ``frames.failures_by_code``."""
    if by_code.empty:
        return _nothing(ax)
    counts = by_code.groupby("code", sort=False)["patients"].sum().sort_values()
    labels = [f"{code}: {_shorten(explain(code), 48)}" for code in counts.index]
    bars = ax.barh(labels, counts.to_numpy(), color="tab:red")
    ax.bar_label(bars, fontsize=8)
    ax.set_xlabel("failed patients")
    ax.set_title("Failures by code")
    ax.tick_params(axis="y", labelsize=8)
    return ax


def plot_failures_by_category(ax: Axes, by_category: pd.DataFrame) -> Axes:
    """Bars of failed patients per category, summed over the stores of
    ``frames.failures_by_category``."""
    if by_category.empty:
        return _nothing(ax)
    counts = by_category.groupby("category", sort=False)["patients"].sum()
    counts = counts.sort_values(ascending=False)
    bars = ax.bar(counts.index.astype(str), counts.to_numpy(), color="tab:orange")
    ax.bar_label(bars, fontsize=8)
    ax.set_ylabel("failed patients")
    ax.set_title("Failures by category")
    return ax


def plot_not_required(ax: Axes, not_required: pd.DataFrame) -> Axes:
    """Horizontal bars of patients not required per reason, summed over the stores of
    ``frames.not_required``."""
    counts = (not_required.groupby("reason", sort=False)["patients"].sum()
              if not not_required.empty else pd.Series(dtype="int64"))
    counts = counts[counts > 0]
    if counts.empty:
        return _nothing(ax)
    labels = [words(str(r), NOT_REQUIRED_WORDS) for r in counts.index]
    bars = ax.barh(labels[::-1], counts.to_numpy()[::-1], color="tab:gray")
    ax.bar_label(bars, fontsize=8)
    ax.set_xlabel("patients")
    ax.set_title("Not required, by reason")
    ax.tick_params(axis="y", labelsize=8)
    return ax


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


__all__ = ["NOTHING_TO_SHOW", "plot_ack_latency", "plot_failures_by_category",
           "plot_failures_by_code", "plot_not_required", "plot_success_rate", "plot_throughput"]
