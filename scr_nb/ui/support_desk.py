"""The support engineer's desk (SPEC 9, ``investigate_errors.ipynb``): why patients failed, what was
sent and what the Spine answered, and reprocessing the ones support has put right.

Reading never changes the store: a store given by path is opened read-only, so looking at a
practice's store while its upload runs is safe. Only ``mark_resolved`` (a kit group) and
``reprocess`` (a Failed job through the engine, as the CLI runs it) write.
"""

from __future__ import annotations

import re
import sqlite3
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import date, datetime, time, timedelta
from pathlib import Path
from urllib.parse import quote

import ipywidgets as widgets
import pandas as pd
from lxml import etree

from scr_nb.spine import session as sessions
from scr_nb.constants import category, explain
from scr_nb.job.engine import Engine, JobOptions, JobResult
from scr_nb.errors import RefusedError, StoreError
from scr_nb.spine.mime import Part, parse_related
from scr_nb.extract.nhs_number import mask, normalise
from scr_nb.store.states import Mode, PatientState
from scr_nb.store.practice_store import Store

StoreLike = str | Path | Store
When = date | datetime | str | None

FAILED_COLUMNS = ["pkey", "patient_id", "nhs_number", "failure_code", "explanation", "category",
                  "failed_at", "job_id", "message_id", "ack_codes", "source_row"]
TIMELINE_COLUMNS = ["message_id", "job_id", "gp_summary_id", "replaces_summary_id", "created_at",
                    "time", "kind", "http_status", "detail", "ack_type", "ack_codes",
                    "message_state", "failure_code", "explanation"]
ALL = ""   # the filter widgets' "no filter" choice

_PRETTY = etree.XMLParser(remove_blank_text=True, resolve_entities=False, no_network=True)
_START = re.compile(r'start\s*=\s*"?<?([^">;]+)>?"?', re.IGNORECASE)


# --- reading the store ----------------------------------------------------------------------------

@contextmanager
def _reading(store: StoreLike) -> Iterator[sqlite3.Connection]:
    """A connection to read ``store`` through: the Store's own (its deferred writes flushed first),
    or a read-only one to the file, which must already be an scr-nb store."""
    if isinstance(store, Store):
        store.flush()
        yield store.db
        return
    if not str(store):
        raise StoreError("no store given: set it to the practice's store file (the one "
                         "scr-nb upload --store wrote)")
    path = Path(store)
    if not path.is_file():
        raise StoreError(f"no store at {path}: give the practice's store file (the one "
                         "scr-nb upload --store wrote)")
    db = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, timeout=30)
    try:
        try:
            db.execute("SELECT 1 FROM patients LIMIT 1")
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{path}: not an scr-nb store ({err})") from None
        yield db
    finally:
        db.close()


@contextmanager
def _writing(store: StoreLike) -> Iterator[Store]:
    """The Store to write through; one given by path (checked by ``_reading`` first) is closed
    after."""
    if isinstance(store, Store):
        yield store
        return
    opened = Store(store)
    try:
        yield opened
    finally:
        opened.close()


def _frame(db: sqlite3.Connection, sql: str, args: Iterable[object] = ()) -> pd.DataFrame:
    cur = db.execute(sql, tuple(args))
    return pd.DataFrame(cur.fetchall(), columns=[c[0] for c in cur.description])


def _times(column: pd.Series) -> pd.Series:
    return pd.to_datetime(column, utc=True, format="ISO8601")


def _bound(value: When, end: bool) -> tuple[pd.Timestamp, bool] | None:
    """A filter bound as (UTC instant, inclusive). A date, or a string holding only a date, means
    that whole local day; naive date-times are local time, as in the CLI's schedule options."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip()
        value = date.fromisoformat(text) if len(text) == 10 else datetime.fromisoformat(text)
    if isinstance(value, pd.Timestamp):
        value = value.to_pydatetime()
    if not isinstance(value, datetime):
        day = value + timedelta(days=1) if end else value
        return pd.Timestamp(datetime.combine(day, time.min).astimezone()), not end
    return pd.Timestamp(value if value.tzinfo else value.astimezone()), True


def nothing_to_investigate(store: str | Path | None) -> str | None:
    """Why there is nothing to look at (no store given, no such file, not a store), or None."""
    try:
        with _reading(store or ""):
            return None
    except StoreError as err:
        return f"Nothing to investigate: {err}."


def failure_codes(store: StoreLike) -> dict[str, int]:
    """Failure code -> failed patients, most frequent first (the code filter's choices)."""
    with _reading(store) as db:
        return dict(db.execute("SELECT reason, COUNT(*) FROM patients WHERE state = 'failed' "
                               "GROUP BY reason ORDER BY COUNT(*) DESC, reason"))


def overview(store: StoreLike) -> str:
    """One paragraph for the top of the desk: how many patients failed, by code, in plain words."""
    codes = failure_codes(store)
    name = store.path if isinstance(store, Store) else store
    if not codes:
        return f"No failed patients in {name}: nothing to investigate."
    lines = [f"{sum(codes.values())} failed patients in {name}:"]
    lines += [f"  {code}: {n} ({explain(code)}; {category(code)})" for code, n in codes.items()]
    return "\n".join(lines)


def _group_names(db: sqlite3.Connection) -> list[str]:
    return [r[0] for r in db.execute("SELECT DISTINCT group_name FROM groups ORDER BY group_name")]


def group_names(store: StoreLike) -> list[str]:
    """The Patient Groups of the extract and of the kit (e.g. the ones support made)."""
    with _reading(store) as db:
        return _group_names(db)


def failed_patients(store: StoreLike, code: str | None = None, since: When = None,
                    until: When = None, job_id: int | None = None, group: str | None = None,
                    show_nhs: bool = True) -> pd.DataFrame:
    """Patients whose latest attempt failed, in extract order, with the code in plain words.

    ``since``/``until`` bound the time of failure (dates are whole local days); ``job_id`` is the
    job that sent the failed message; ``group`` a Patient Group of the extract or the kit. Support
    sees NHS numbers in full unless ``show_nhs`` is False."""
    where, args = ["p.state = 'failed'"], []
    if code:
        where.append("p.reason = ?")
        args.append(str(code))
    if job_id is not None:
        where.append("m.job_id = ?")
        args.append(int(job_id))
    with _reading(store) as db:
        if group:
            names = _group_names(db)
            if group not in names:
                raise ValueError(f"there is no Patient Group called {group!r} "
                                 f"(groups: {', '.join(names) or 'none'})")
            where.append("p.patient_id IN (SELECT patient_id FROM groups WHERE group_name = ?)")
            args.append(group)
        frame = _frame(db, f"""
            SELECT p.pkey, p.patient_id, p.nhs_number, p.reason AS failure_code,
                   COALESCE(m.acked_at, p.updated_at) AS failed_at, m.job_id, p.message_id,
                   m.ack_codes, p.source_row
            FROM patients AS p LEFT JOIN messages AS m ON m.message_id = p.message_id
            WHERE {' AND '.join(where)} ORDER BY p.source_row, p.pkey""", args)
    frame["failed_at"] = _times(frame["failed_at"])
    frame["job_id"] = frame["job_id"].astype("Int64")
    for bound, end in ((_bound(since, False), False), (_bound(until, True), True)):
        if bound is not None:
            instant, inclusive = bound
            if end:
                keep = frame["failed_at"] <= instant if inclusive else frame["failed_at"] < instant
            else:
                keep = frame["failed_at"] >= instant
            frame = frame[keep]
    frame = frame.assign(explanation=frame["failure_code"].map(explain, na_action="ignore"),
                         category=frame["failure_code"].map(category, na_action="ignore"))
    if not show_nhs:
        frame["nhs_number"] = frame["nhs_number"].map(mask)
    return frame[FAILED_COLUMNS].reset_index(drop=True)


def find_patient(store: StoreLike, who: str | None = None) -> str | None:
    """The store key of a patient named by key, patient id or NHS number; with no name, the first
    failed patient in extract order (None when nobody failed)."""
    with _reading(store) as db:
        if who is None or str(who).strip() == "":
            row = db.execute("SELECT pkey FROM patients WHERE state = 'failed' "
                             "ORDER BY source_row, pkey LIMIT 1").fetchone()
            return row[0] if row else None
        who = str(who).strip()
        row = db.execute("SELECT pkey FROM patients WHERE pkey = ? OR patient_id = ? "
                         "OR nhs_number = ? ORDER BY pkey != ?, source_row LIMIT 1",
                         (who, who, normalise(who), who)).fetchone()
    if row is None:
        raise ValueError(f"no patient {who!r} in the store (give a patient id, a store key or "
                         "an NHS number)")
    return row[0]


def timeline(store: StoreLike, pkey: str) -> pd.DataFrame:
    """Every message sent for one patient, oldest first, with each HTTP exchange it took: when, a
    POST or a poll, the HTTP status, what came back, and the ack's type and codes on the poll that
    brought the ack. A message no request went out for (e.g. over the size limit) has one row."""
    with _reading(store) as db:
        if db.execute("SELECT 1 FROM patients WHERE pkey = ?", (pkey,)).fetchone() is None:
            raise ValueError(f"no patient with store key {pkey!r}")
        frame = _frame(db, """
            SELECT m.message_id, m.job_id, m.event_id AS gp_summary_id,
                   m.prior_event_id AS replaces_summary_id, m.created_at, a.at AS time, a.kind,
                   a.http_status, a.detail, m.ack_type, m.ack_codes, m.state AS message_state,
                   m.failure_code
            FROM messages AS m LEFT JOIN attempts AS a ON a.message_id = m.message_id
            WHERE m.pkey = ? ORDER BY m.created_at, m.rowid, a.at, a.id""", (pkey,))
    frame["created_at"] = _times(frame["created_at"])
    frame["time"] = _times(frame["time"])
    brought_ack = (frame["kind"] == "poll") & (frame["http_status"] == 200)
    frame["http_status"] = frame["http_status"].astype("Int64")
    for column in ("ack_type", "ack_codes"):
        frame[column] = frame[column].where(brought_ack, None)
    frame["explanation"] = frame["failure_code"].map(explain, na_action="ignore")
    return frame[TIMELINE_COLUMNS]


def last_sent_message(store: StoreLike, pkey: str) -> str | None:
    """The newest message of the patient whose text was kept (None when none was: a message over
    the size limit is never kept or sent)."""
    with _reading(store) as db:
        row = db.execute("SELECT message_id FROM messages WHERE pkey = ? AND body IS NOT NULL "
                         "ORDER BY created_at DESC, rowid DESC LIMIT 1", (pkey,)).fetchone()
    return row[0] if row else None


# --- the XML --------------------------------------------------------------------------------------

def pretty_xml(xml: bytes) -> str:
    """Indented XML for reading; text that is not well-formed XML is shown as it is."""
    try:
        root = etree.fromstring(xml.strip(), _PRETTY)
    except etree.XMLSyntaxError:
        return xml.decode("utf-8", "replace")
    return etree.tostring(root, pretty_print=True, encoding="unicode")


def _is_envelope(part: Part) -> bool:
    head = part.body.lstrip()[:600]
    return re.search(rb"<([A-Za-z0-9_-]+:)?Envelope[\s>]", head) is not None


def _split(body: bytes, content_type: str | None) -> tuple[Part | None, Part]:
    """(ebXML header part, HL7 part) of an ebXML multipart message. The header is the part the
    Content-Type's ``start`` names, else the SOAP envelope; a single-part body is all payload."""
    parts = parse_related(body, content_type)
    if len(parts) == 1:
        return None, parts[0]
    start = _START.search(content_type or "")
    header = next((p for p in parts if start and p.content_id == start.group(1).strip()), None)
    if header is None:
        header = next((p for p in parts if _is_envelope(p)), None)
    payload = next((p for p in parts if p is not header), parts[0])
    return header, payload


def _message_body(store: StoreLike, message_id: str) -> tuple[bytes, str]:
    with _reading(store) as db:
        row = db.execute("SELECT body, content_type, failure_code FROM messages "
                         "WHERE message_id = ?", (message_id,)).fetchone()
    if row is None:
        raise ValueError(f"no message {message_id} in the store")
    if row[0] is None:
        raise ValueError(f"the text of message {message_id} was not kept: the kit did not send it "
                         f"({row[2]}: {explain(row[2] or '')})")
    return zlib.decompress(row[0]), row[1] or ""


def message_xml(store: StoreLike, message_id: str) -> str:
    """The HL7 GP Summary (REPC_IN150016SM05) the kit sent under ``message_id``, indented."""
    _, payload = _split(*_message_body(store, message_id))
    return pretty_xml(payload.body)


def ebxml_header(store: StoreLike, message_id: str) -> str:
    """The ebXML (SOAP) header the message went with: From, To, CPA, MessageId, indented."""
    header, _ = _split(*_message_body(store, message_id))
    return pretty_xml(header.body) if header is not None else ""


def ack_xml(store: StoreLike, message_id: str) -> str | None:
    """The Spine's application ack (MCCI_IN010000UK13) for ``message_id``, indented.

    None when no ack body was kept: AA acks are not kept (every AA says the same, and the store
    records its type), and a message that timed out or was never sent has none."""
    with _reading(store) as db:
        row = db.execute("SELECT ack_body FROM messages WHERE message_id = ?",
                         (message_id,)).fetchone()
    if row is None:
        raise ValueError(f"no message {message_id} in the store")
    body = zlib.decompress(row[0]) if row[0] is not None else b""
    if not body.strip():
        return None
    _, payload = _split(body, None)
    return pretty_xml(payload.body)


# --- putting things right -------------------------------------------------------------------------

def mark_resolved(store: StoreLike, patient_ids: Iterable[str], group_name: str) -> int:
    """Put patients whose errors support has resolved in a kit group, for ``reprocess``.

    Refuses (and adds nobody) when any of them is not currently failed: Failed would not send it,
    and a group should say what support did. Returns how many were new to the group."""
    ids = list(dict.fromkeys(str(p) for p in patient_ids))
    if not group_name or not str(group_name).strip():
        raise ValueError("give the group a name, e.g. 'Resolved by support'")
    with _reading(store) as db:
        states: dict[str, set[str]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            for pid, state in db.execute(
                    f"SELECT patient_id, state FROM patients WHERE patient_id IN "
                    f"({', '.join('?' * len(chunk))})", chunk):
                states.setdefault(pid, set()).add(state)
    wrong = [f"{pid} ({', '.join(sorted(states[pid])) if pid in states else 'not in this store'})"
             for pid in ids if PatientState.FAILED.value not in states.get(pid, set())]
    if wrong:
        raise RefusedError(f"not marked resolved: {', '.join(wrong)} "
                           f"{'is' if len(wrong) == 1 else 'are'} not failed; only failed "
                           "patients can be reprocessed. Nobody was added to "
                           f"{group_name!r}.")
    with _writing(store) as writable:
        return writable.add_to_group(group_name, ids)


def reprocess(store_path: str | Path, practice_dir: str | Path, spine_url: str,
              session_path: str | Path, group_name: str, **options: object) -> JobResult:
    """Run a Failed job over ``group_name`` through the engine, as ``scr-nb upload failed --group``
    does. ``options`` are JobOptions fields (concurrency, rate_limit, ack_timeout...), plus
    ``on_progress`` and ``control`` for the engine."""
    session = sessions.load(session_path)
    engine_args = {k: options.pop(k) for k in ("on_progress", "control") if k in options}
    store = Store(store_path)
    try:
        engine = Engine(store, session, spine_url, practice_dir, **engine_args)
        return engine.run(JobOptions(mode=Mode.FAILED, group=group_name, **options))
    finally:
        store.close()


# --- the widgets ----------------------------------------------------------------------------------

def table_html(frame: pd.DataFrame, empty: str = "No failed patients match.") -> str:
    """The failed-patients table as the filter widget shows it, with a count above it."""
    if frame.empty:
        return f"<p>{empty}</p>"
    return (f"<p>{len(frame)} failed patient{'s' if len(frame) != 1 else ''}</p>"
            + frame.to_html(index=False, na_rep="", escape=True))


class FailedPatientsFilter(widgets.VBox):
    """A code dropdown, a 'failed since' date picker and a group dropdown over the failed-patients
    table; setting any of their ``value``s re-renders the table (``frame`` holds what it shows)."""

    def __init__(self, store: StoreLike, show_nhs: bool = True):
        self.store, self.show_nhs = store, show_nhs
        codes = failure_codes(store)
        self.code = widgets.Dropdown(
            description="Code", value=ALL,
            options=[(f"All codes ({sum(codes.values())})", ALL)]
            + [(f"{c} {explain(c)} ({n})", c) for c, n in codes.items()])
        self.since = widgets.DatePicker(description="Failed since")
        self.group = widgets.Dropdown(description="Group", value=ALL,
                                      options=[("Whole list", ALL)]
                                      + [(g, g) for g in group_names(store)])
        self.table = widgets.HTML()
        self.frame = pd.DataFrame(columns=FAILED_COLUMNS)
        for control in (self.code, self.since, self.group):
            control.observe(self.refresh, names="value")
        super().__init__([widgets.HBox([self.code, self.since, self.group]), self.table])
        self.refresh()

    def refresh(self, change: object = None) -> None:
        self.frame = failed_patients(self.store, code=self.code.value or None,
                                     since=self.since.value, group=self.group.value or None,
                                     show_nhs=self.show_nhs)
        self.table.value = table_html(self.frame)


def filter_widgets(store: StoreLike, show_nhs: bool = True) -> FailedPatientsFilter:
    """The desk's filter: drive it with ``.code.value``, ``.since.value`` and ``.group.value``."""
    return FailedPatientsFilter(store, show_nhs=show_nhs)


__all__ = ["failed_patients", "timeline", "message_xml", "ebxml_header", "ack_xml",
           "mark_resolved", "reprocess", "filter_widgets", "FailedPatientsFilter", "find_patient",
           "last_sent_message", "overview", "nothing_to_investigate", "failure_codes",
           "group_names"]
