"""Numbers for analysts: pandas frames over one or more practice stores (SPEC 9, the monitor).

Every function takes one store or a list of them, each an SQLite file's path or a PostgreSQL
practice (``postgresql://host/db?ods=CODE``, or a ``Location``), and opens each read-only, so it can
be called while a job is writing to it. Every frame starts with ``store`` (the path, or the URL
without its password) and ``practice`` (a short label for plots and tables) so frames from many
practices stack, group and plot together; an empty list of stores gives an empty frame with the
same columns. Times are pandas UTC timestamps. NHS numbers are masked (``943 *** 5919``) unless
``show_nhs=True``.

A patient "failed" here as in ``Store.status()``: its latest attempt failed. Failures a later job
resolved are only in the per-job counts (``jobs``, ``failures_by_job``) and in ``messages``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable

import pandas as pd

from scr_nb.constants import category, explain
from scr_nb.errors import StoreError
from scr_nb.extract.nhs_number import mask
from scr_nb.store import queries
from scr_nb.store.database import Location, practice_url, redact
from scr_nb.store.practice_store import Store
from scr_nb.store.states import NOT_REQUIRED_REASONS, PatientState, counters

StoreName = str | os.PathLike | Location
Stores = StoreName | Iterable[StoreName]

# The moments in a message's life counted by ``throughput``, and the column each is read from.
EVENTS = {"queued": "queued_at", "transmitted": "transmitted_at",
          "acknowledged": "acknowledged_at", "failed": "failed_at"}
PERCENTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99}
# The per-job counters a finished job keeps in its totals (``this_job`` of the engine's statistics).
JOB_COUNTERS = ("to_send", "queued", "transmitted", "acknowledged", "failed")

_LABELS = ["store", "practice"]
TEXT, TIME = "object", "datetime64[us, UTC]"   # column types, so that empty frames are typed too


# --- opening stores -------------------------------------------------------------------------------

def store_locations(stores: Stores) -> list[Location]:
    """The stores as locations: one store (an SQLite file's path, a ``postgresql://...?ods=CODE``
    URL or a ``Location``), or any iterable of them."""
    if isinstance(stores, (str, os.PathLike, Location)):
        stores = [stores]
    return [Location.of(store) for store in stores]


def store_name(location: Location) -> str:
    """How a frame's ``store`` column names a store: the SQLite file's path, or the one string
    naming a PostgreSQL practice (``postgresql://host/db?ods=CODE``, never the password)."""
    if location.path is not None:
        return str(location.path)
    return practice_url(redact(location.url), location.ods)


def practice_labels(locations: list[Location]) -> dict[Location, str]:
    """A short, distinct label per store, as people name practices: "Fulford Grange (B82001)" from
    the practice details its latest job ran with, else its ODS code, else the store's file name
    (with its folder in front when two share a name, as every practice's store may be called
    practice.sqlite)."""
    stems = [loc.path.stem for loc in locations if loc.path is not None]
    labels: dict[Location, str] = {}
    for location in locations:
        label, path = _named(location), location.path
        if label is None and path is not None:
            label = path.stem if stems.count(path.stem) == 1 else f"{path.parent.name}/{path.stem}"
        if label is None:          # a PostgreSQL practice that cannot be read: its name as given
            label = store_name(location)
        elif label in labels.values():
            label = f"{label} [{store_name(location)}]"
        labels[location] = label
    return labels


def _named(location: Location) -> str | None:
    try:
        with queries.reading(location) as store:
            ods, name = queries.practice_identity(store)
    except StoreError:
        return None
    if ods and name:
        return f"{name} ({ods})"
    return ods or name


def _empty(columns: dict[str, str]) -> pd.DataFrame:
    """A frame with no rows and the given columns (after the labels), each of its type."""
    return pd.DataFrame({c: pd.Series(dtype=t)
                         for c, t in {**dict.fromkeys(_LABELS, TEXT), **columns}.items()})


def _columns(frame: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    return frame[_LABELS + list(columns)].reset_index(drop=True)


def _collect(stores: Stores, read: Callable[[Store], pd.DataFrame],
             columns: dict[str, str]) -> pd.DataFrame:
    """Call ``read(store)`` (a frame) on every store, opened read-only, and stack the results
    with their labels."""
    locations = store_locations(stores)
    labels = practice_labels(locations)
    frames = []
    for location in locations:
        with queries.reading(location) as store:
            frame = read(store)
        frame.insert(0, "practice", labels[location])
        frame.insert(0, "store", store_name(location))
        frames.append(frame)
    frames = [f for f in frames if not f.empty]
    if not frames:
        return _empty(columns)
    return _columns(pd.concat(frames, ignore_index=True), columns)


def _frame(table: queries.Table) -> pd.DataFrame:
    columns, rows = table
    return pd.DataFrame.from_records(rows, columns=columns)


def _utc(values: pd.Series) -> pd.Series:
    """ISO 8601 text from the store as UTC timestamps (missing ones as NaT)."""
    return pd.to_datetime(values, utc=True, format="ISO8601").astype(TIME)


def _ratio(numerator: pd.Series, denominator: pd.Series) -> pd.Series:
    num, den = numerator.astype("float64"), denominator.astype("float64")
    return (num / den).where(den > 0)


# --- the store as a whole -------------------------------------------------------------------------

COMPLETION_COLUMNS = dict.fromkeys(["patients", "eligible", "unprocessed", "sending", "sent",
                                    "failed", "not_required", "transmitted", "acknowledged"],
                                   "int64")


def completion(stores: Stores) -> pd.DataFrame:
    """One row per store: Vision's five counters (unprocessed, sending, sent = acknowledged, failed,
    not_required) as ``Store.status()`` gives them, with patients, eligible patients, and
    transmitted (waiting for an ack) beside acknowledged."""
    def read(store):
        states = {s.value: 0 for s in PatientState}
        states.update(queries.state_counts(store))
        row = {"patients": sum(states.values()), "eligible": queries.eligible_count(store),
               **counters(states),
               "transmitted": states[PatientState.TRANSMITTED.value],
               "acknowledged": states[PatientState.ACKNOWLEDGED.value]}
        return pd.DataFrame([row])
    return _collect(stores, read, COMPLETION_COLUMNS)


NOT_REQUIRED_COLUMNS = {"reason": TEXT, "patients": "int64"}


def not_required(stores: Stores) -> pd.DataFrame:
    """Patients not required, by reason, per store: every reason of SPEC 4 in its order (zeros
    included, as ``Store.status()`` lists them), then any other reason the store holds."""
    def read(store):
        found = queries.not_required_counts(store)
        rows = [(r, found.pop(r, 0)) for r in NOT_REQUIRED_REASONS]
        rows += sorted(found.items(), key=lambda item: str(item[0]))
        return pd.DataFrame(rows, columns=list(NOT_REQUIRED_COLUMNS))
    return _collect(stores, read, NOT_REQUIRED_COLUMNS)


# --- jobs -----------------------------------------------------------------------------------------

JOB_COLUMNS = {"job_id": "int64", "resumes": "Int64", "mode": TEXT, "group": TEXT, "status": TEXT,
               "reason": TEXT, "user_id": TEXT, "user_name": TEXT, "started_at": TIME,
               "ended_at": TIME, "duration_s": "float64", "eligible_in_scope": "Int64",
               **dict.fromkeys(JOB_COUNTERS, "Int64"), "success_rate": "float64",
               "acknowledged_of_eligible": "float64", "counted_from": TEXT}


def jobs(stores: Stores) -> pd.DataFrame:
    """One row per job. The counters are the job's own (what it queued, transmitted, got
    acknowledged or failed), from the totals it stored when it ended; a job still running (or one
    that crashed) has none yet, so its counters are read from the messages it holds
    (``counted_from`` says which). ``success_rate`` is acknowledged / (acknowledged + failed);
    ``acknowledged_of_eligible`` is acknowledged over the eligible patients in the job's scope.
    ``duration_s`` runs to now for a job that has not ended."""
    def read(store):
        rows = _frame(queries.job_rows(store))
        if rows.empty:
            return rows
        live = queries.live_job_counts(store)
        records = []
        for row in rows.to_dict("records"):
            totals = json.loads(row.pop("totals") or "{}")
            this_job = totals.get("this_job")
            if this_job:
                counts = {k: this_job.get(k) for k in JOB_COUNTERS}
                eligible, source = totals.get("qualifying_patients"), "totals"
            else:
                mine = live.get(row["job_id"], {})
                counts = {k: int(mine.get(k) or 0) for k in JOB_COUNTERS}
                counts["to_send"] = None    # known only when the job ends
                eligible, source = queries.eligible_count(store, row["group"]), "messages"
            chain = row.pop("chain_id")
            records.append({**row, "resumes": chain if chain != row["job_id"] else None,
                            "eligible_in_scope": eligible, **counts, "counted_from": source})
        frame = pd.DataFrame.from_records(records)
        for column in ("eligible_in_scope", *JOB_COUNTERS):
            frame[column] = frame[column].astype("Int64")
        frame["resumes"] = frame["resumes"].astype("Int64")
        started, ended = _utc(frame["started_at"]), _utc(frame["ended_at"])
        frame["started_at"], frame["ended_at"] = started, ended
        until = ended.fillna(pd.Timestamp.now(tz="UTC"))
        frame["duration_s"] = (until - started).dt.total_seconds()
        frame["success_rate"] = _ratio(frame["acknowledged"],
                                       frame["acknowledged"] + frame["failed"])
        frame["acknowledged_of_eligible"] = _ratio(frame["acknowledged"],
                                                   frame["eligible_in_scope"])
        return frame
    return _collect(stores, read, JOB_COLUMNS)


# --- messages, throughput and ack latency ---------------------------------------------------------

MESSAGE_COLUMNS = {"message_id": TEXT, "job_id": "int64", "patient_id": TEXT, "state": TEXT,
                   "size": "int64", "post_attempts": "int64", "queued_at": TIME,
                   "transmitted_at": TIME, "acked_at": TIME, "acknowledged_at": TIME,
                   "failed_at": TIME, "ack_type": TEXT, "code": TEXT, "current": "bool"}

def messages(stores: Stores) -> pd.DataFrame:
    """One row per message the kit built: its job, state, size and the moments it was queued,
    transmitted, answered by an ack of any type (``acked_at``), acknowledged (AA) or failed.
    ``current`` is true while it is its patient's latest message. No NHS numbers, no content."""
    def read(store):
        frame = _frame(queries.message_rows(store))
        for column in ("queued_at", "transmitted_at", "acked_at", "acknowledged_at", "failed_at"):
            frame[column] = _utc(frame[column])
        frame["current"] = frame["current"].astype(bool)
        return frame
    return _collect(stores, read, MESSAGE_COLUMNS)


THROUGHPUT_COLUMNS = {"period": TIME, **dict.fromkeys(EVENTS, "int64")}
# For freq="auto": the first of these that cuts the whole span into at most AUTO_PERIODS periods.
AUTO_FREQS = ("1s", "10s", "1min", "10min", "1h", "6h", "1D", "7D")
AUTO_PERIODS = 120


def throughput(stores: Stores, freq: str = "1min") -> pd.DataFrame:
    """Messages queued, transmitted, acknowledged and failed per period, per store, with empty
    periods as zeros. ``freq`` is a fixed pandas frequency (``"10s"``, ``"1min"``, ``"1h"``) or
    ``"auto"``: a round one that gives at most 120 periods over the stores' whole span."""
    found = messages(stores)
    stamps = pd.concat([found[_LABELS].assign(event=event, at=found[column])
                        for event, column in EVENTS.items()]).dropna(subset=["at"])
    if stamps.empty:
        return _empty(THROUGHPUT_COLUMNS)
    if freq == "auto":
        span = stamps["at"].max() - stamps["at"].min()
        freq = next((f for f in AUTO_FREQS if span / pd.Timedelta(f) <= AUTO_PERIODS),
                    AUTO_FREQS[-1])
    stamps["period"] = stamps["at"].dt.floor(freq)
    frames = []
    for (store, practice), group in stamps.groupby(_LABELS, sort=False):
        table = group.pivot_table(index="period", columns="event", aggfunc="size", fill_value=0)
        periods = pd.date_range(table.index.min(), table.index.max(), freq=freq)
        table = table.reindex(index=periods, columns=list(EVENTS), fill_value=0).astype("int64")
        table = table.rename_axis(index="period", columns=None).reset_index()
        frames.append(table.assign(store=store, practice=practice))
    return _columns(pd.concat(frames, ignore_index=True), THROUGHPUT_COLUMNS)


ACK_LATENCY_COLUMNS = {"job_id": "int64", "message_id": TEXT, "ack_type": TEXT,
                       "transmitted_at": TIME, "acked_at": TIME, "latency_s": "float64"}


def ack_latency(stores: Stores) -> pd.DataFrame:
    """Seconds from transmission (the Spine's 202) to the application ack, per acked message;
    ``ack_type`` AA is a success, AE/AR an error ack."""
    frame = messages(stores)
    frame = frame[frame["transmitted_at"].notna() & frame["acked_at"].notna()].copy()
    frame["latency_s"] = (frame["acked_at"] - frame["transmitted_at"]).dt.total_seconds()
    return _columns(frame, ACK_LATENCY_COLUMNS)


LATENCY_PERCENTILE_COLUMNS = {"job_id": "int64", "acks": "int64",
                              **dict.fromkeys([*PERCENTILES, "max"], "float64")}


def ack_latency_percentiles(stores: Stores) -> pd.DataFrame:
    """Per job: how many acks, and the p50, p90, p99 and maximum ack latency in seconds."""
    latency = ack_latency(stores)
    if latency.empty:
        return _empty(LATENCY_PERCENTILE_COLUMNS)
    by_job = latency.groupby(_LABELS + ["job_id"], sort=False)["latency_s"]
    frame = by_job.agg(acks="size", **{name: (lambda s, q=q: s.quantile(q))
                                       for name, q in PERCENTILES.items()}, max="max")
    return _columns(frame.reset_index(), LATENCY_PERCENTILE_COLUMNS)


# --- failures -----------------------------------------------------------------------------------

FAILURE_COLUMNS = {"patient_id": TEXT, "nhs_number": TEXT, "code": TEXT, "words": TEXT,
                   "category": TEXT, "job_id": "Int64", "message_id": TEXT, "ack_type": TEXT,
                   "failed_at": TIME}


def failures(stores: Stores, show_nhs: bool = False) -> pd.DataFrame:
    """One row per patient whose latest attempt failed: the failure code in plain words and its
    category, the job and message, and when. NHS numbers masked unless ``show_nhs``."""
    def read(store):
        frame = _frame(queries.failure_rows(store))
        if not show_nhs:
            frame["nhs_number"] = frame["nhs_number"].map(mask)
        frame["code"] = frame["code"].fillna("").astype(str)
        frame["words"] = frame["code"].map(explain)
        frame["category"] = frame["code"].map(category)
        frame["job_id"] = frame["job_id"].astype("Int64")
        frame["failed_at"] = _utc(frame["failed_at"])
        return frame
    return _collect(stores, read, FAILURE_COLUMNS)


BY_CODE_COLUMNS = {"code": TEXT, "words": TEXT, "category": TEXT, "patients": "int64"}
BY_CATEGORY_COLUMNS = {"category": TEXT, "patients": "int64"}


def failures_by_code(stores: Stores) -> pd.DataFrame:
    """Failed patients per store and code, most frequent first, with plain words and category
    (the ``failed_by_code`` of ``Store.status()``)."""
    return _count(failures(stores), ["code", "words", "category"], BY_CODE_COLUMNS)


def failures_by_category(stores: Stores) -> pd.DataFrame:
    """Failed patients per store and category (data, access, duplicate, transport, kit, other)."""
    return _count(failures(stores), ["category"], BY_CATEGORY_COLUMNS)


def _count(frame: pd.DataFrame, keys: list[str], columns: dict[str, str]) -> pd.DataFrame:
    if frame.empty:
        return _empty(columns)
    counted = frame.groupby(_LABELS + keys, sort=False).size().rename("patients").reset_index()
    counted = counted.sort_values(["store", "patients", keys[0]], ascending=[True, False, True],
                                  kind="stable")
    return _columns(counted, columns)


BY_JOB_COLUMNS = {"job_id": "int64", "mode": TEXT, "code": TEXT, "words": TEXT,
                  "category": TEXT, "failed": "int64"}


def failures_by_job(stores: Stores) -> pd.DataFrame:
    """The failures each job met, by code (including those a later job resolved): from the totals
    a job stored when it ended, or from its messages while it runs."""
    def read(store):
        rows = []
        live, jobs_totals = queries.job_failure_rows(store)
        for job_id, mode, totals in jobs_totals:
            this_job = json.loads(totals or "{}").get("this_job")
            by_code = this_job.get("failed_by_code", {}) if this_job else live.get(job_id, {})
            for code, n in sorted(by_code.items(), key=lambda item: (-item[1], item[0])):
                rows.append((job_id, mode, code, explain(code), category(code), n))
        return pd.DataFrame(rows, columns=list(BY_JOB_COLUMNS))
    return _collect(stores, read, BY_JOB_COLUMNS)


__all__ = [
    "completion", "not_required", "jobs", "messages", "throughput", "ack_latency",
    "ack_latency_percentiles", "failures", "failures_by_code", "failures_by_category",
    "failures_by_job", "store_locations", "store_name", "practice_labels",
]
