"""The support engineer's desk (SPEC 9, ``investigate_errors.ipynb``): why patients failed, what was
sent and what the Spine answered, and reprocessing the ones support has put right.

A store is an SQLite file, a PostgreSQL URL with the practice's ODS code (``ods=``, or ``?ods=CODE``
in the URL), a ``Location`` or an open ``Store``. Reading never changes the store: one named is
opened read-only, so looking at a practice's store while its upload runs is safe. Only
``mark_resolved`` (a kit group) and ``reprocess`` (a Failed job through the engine, as the CLI runs
it) write.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import date, datetime, time, timedelta
from html import escape as html_text
from pathlib import Path

import ipywidgets as widgets
import pandas as pd
from lxml import etree

from scr_nb.constants import EMPTY_SECTION_TEXT, category, explain, next_step
from scr_nb.errors import RefusedError, StoreError
from scr_nb.extract.nhs_number import mask, normalise
from scr_nb.job.options import JobControl, JobOptions, Progress
from scr_nb.job.runner import Outcome, run_upload
from scr_nb.spine.mime import Part, parse_related
from scr_nb.store import queries
from scr_nb.store.database import Location
from scr_nb.store.practice_store import Store
from scr_nb.store.states import Mode, PatientState

StoreLike = queries.StoreLike
When = date | datetime | str | None

FAILED_COLUMNS = ["pkey", "patient_id", "nhs_number", "failure_code", "explanation", "next_step",
                  "category",
                  "failed_at", "job_id", "message_id", "ack_codes", "source_row"]
TIMELINE_COLUMNS = ["message_id", "job_id", "gp_summary_id", "replaces_summary_id", "created_at",
                    "time", "kind", "http_status", "what_happened", "detail", "ack_type",
                    "ack_codes",
                    "message_state", "failure_code", "explanation"]
ALL = ""   # the filter widgets' "no filter" choice

_PRETTY = etree.XMLParser(remove_blank_text=True, resolve_entities=False, no_network=True)
_START = re.compile(r'start\s*=\s*"?<?([^">;]+)>?"?', re.IGNORECASE)


# --- reading the store ----------------------------------------------------------------------------

@contextmanager
def _writing(store: StoreLike, ods: str | None) -> Iterator[Store]:
    """The Store to write through; one named by path or URL is closed after."""
    if isinstance(store, Store):
        yield store
        return
    opened = Store(store, ods=ods)
    try:
        yield opened
    finally:
        opened.close()


def _frame(table: queries.Table) -> pd.DataFrame:
    columns, rows = table
    return pd.DataFrame(rows, columns=columns)


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


def nothing_to_investigate(store: StoreLike | None, ods: str | None = None) -> str | None:
    """Why there is nothing to look at (no store given, no such file or database, not a store),
    or None."""
    try:
        with queries.reading(store or "", ods):
            return None
    except StoreError as err:
        return f"Nothing to investigate: {err}."


def failure_codes(store: StoreLike, ods: str | None = None) -> dict[str, int]:
    """Failure code -> failed patients, most frequent first (the code filter's choices)."""
    with queries.reading(store, ods) as reader:
        return queries.failure_codes(reader)


def overview(store: StoreLike, ods: str | None = None) -> str:
    """One paragraph for the top of the desk: how many patients failed, by code, in plain words."""
    with queries.reading(store, ods) as reader:
        codes, name = queries.failure_codes(reader), reader.label
    if not codes:
        return f"No failed patients in {name}: nothing to investigate."
    lines = [f"{sum(codes.values())} failed patients in {name}:"]
    for code, n in codes.items():
        lines += [f"  {code}: {n} ({explain(code)}; {category(code)})",
                  textwrap.fill(f"Next: {next_step(code)}", width=96, initial_indent="      ",
                                subsequent_indent="            ")]
    return "\n".join(lines)


def group_names(store: StoreLike, ods: str | None = None) -> list[str]:
    """The Patient Groups of the extract and of the kit (e.g. the ones support made)."""
    with queries.reading(store, ods) as reader:
        return reader.group_names()


def failed_patients(store: StoreLike, code: str | None = None, since: When = None,
                    until: When = None, job_id: int | None = None, group: str | None = None,
                    show_nhs: bool = False, ods: str | None = None) -> pd.DataFrame:
    """Patients whose latest attempt failed, in extract order, with the code in plain words.

    ``since``/``until`` bound the time of failure (dates are whole local days); ``job_id`` is the
    job that sent the failed message; ``group`` a Patient Group of the extract or the kit. Support
    sees NHS numbers masked (``943 *** 5919``) unless ``show_nhs``."""
    with queries.reading(store, ods) as reader:
        if group:
            names = reader.group_names()
            if group not in names:
                raise ValueError(f"there is no Patient Group called {group!r} "
                                 f"(groups: {', '.join(names) or 'none'})")
        frame = _frame(queries.failed_patient_rows(reader, code, job_id, group))
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
                         next_step=frame["failure_code"].map(next_step, na_action="ignore"),
                         category=frame["failure_code"].map(category, na_action="ignore"))
    if not show_nhs:
        frame["nhs_number"] = frame["nhs_number"].map(mask)
    return frame[FAILED_COLUMNS].reset_index(drop=True)


def find_patient(store: StoreLike, who: str | None = None, ods: str | None = None) -> str | None:
    """The store key of a patient named by key, patient id or NHS number; with no name, the first
    failed patient in extract order (None when nobody failed)."""
    with queries.reading(store, ods) as reader:
        if who is None or str(who).strip() == "":
            return queries.first_failed_patient(reader)
        who = str(who).strip()
        found = queries.find_patient(reader, who, normalise(who))
    if found is None:
        raise ValueError(f"no patient {who!r} in the store (give a patient id, a store key or "
                         "an NHS number)")
    return found


def timeline(store: StoreLike, pkey: str, ods: str | None = None) -> pd.DataFrame:
    """Every message sent for one patient, oldest first, with each HTTP exchange it took: when, a
    POST or a poll, the HTTP status, what came back, and the ack's type and codes on the poll that
    brought the ack. A message no request went out for (e.g. over the size limit) has one row."""
    with queries.reading(store, ods) as reader:
        if not queries.has_patient(reader, pkey):
            raise ValueError(f"no patient with store key {pkey!r}")
        frame = _frame(queries.timeline_rows(reader, pkey))
    frame["created_at"] = _times(frame["created_at"])
    frame["time"] = _times(frame["time"])
    brought_ack = (frame["kind"] == "poll") & (frame["http_status"] == 200)
    frame["http_status"] = frame["http_status"].astype("Int64")
    for column in ("ack_type", "ack_codes"):
        frame[column] = frame[column].where(brought_ack, None)
    frame["explanation"] = frame["failure_code"].map(explain, na_action="ignore")
    frame["what_happened"] = [_what_happened(k, s, d, c) for k, s, d, c in
                              zip(frame["kind"], frame["http_status"], frame["detail"],
                                  frame["failure_code"])]
    return frame[TIMELINE_COLUMNS]


_TRANSIENT = {500, 502, 503, 504}


def _what_happened(kind: object, status: object, detail: object, failure: object) -> str:
    """One timeline row in words, whatever the Spine answered (or did not)."""
    said = "" if pd.isna(detail) or not str(detail).strip() else f" ({str(detail).strip()})"
    if pd.isna(kind):
        code = "" if pd.isna(failure) else str(failure)
        return f"No request was sent: {explain(code)}" if code else "Built, not sent yet"
    status = None if pd.isna(status) else int(status)
    if kind == "post":
        if status is None:
            return f"No answer from the Spine{said}; tried again with the same message id"
        if status == 202:
            return f"Taken by the Spine for processing; its ack is polled for{said}"
        if status == 429:
            return "Rate limited by the Spine (429); tried again after the wait it asked for"
        if status in _TRANSIENT:
            return f"The Spine was briefly unavailable (HTTP {status}{said}); tried again"
        if status == 401:
            return "The Spine rejected the Smartcard session: the job stopped; log in and Resume"
        if status == 403:
            return "The Spine refused the user (no B0062 on its side): the job stopped"
        return f"Refused by the Spine: HTTP {status}{said}"
    if status is None:
        return f"No answer to the poll{said}; polled again"
    if status == 200:
        return f"Acknowledgement received{said}"
    if status == 202:
        return "Not ready yet; polled again"
    return f"Unexpected answer to the poll: HTTP {status}{said}"


def last_sent_message(store: StoreLike, pkey: str, ods: str | None = None) -> str | None:
    """The newest message of the patient whose text was kept (None when none was: a message over
    the size limit is never kept or sent)."""
    with queries.reading(store, ods) as reader:
        return queries.last_kept_message(reader, pkey)


# --- the XML --------------------------------------------------------------------------------------

_NHS_LIKE = re.compile(r"(?<![0-9])[0-9]{10}(?![0-9])")
HIDDEN = "[hidden: clinical text, shown with show_nhs=True]"
# Where a GP Summary holds the patient's clinical words: the presentation text's cells, an
# uncoded item's original text, dosage and other plain values, and a drug's or allergy's name.
_CLINICAL_TEXT = {"td", "originalText", "value"}
_NAMED_BY_PATIENT_DATA = {"manufacturedManufacturedMaterial", "UKCT_MT144053UK02.Allergy"}


def _mask_numbers(text: str) -> str:
    return _NHS_LIKE.sub(lambda m: mask(m.group(0)), text)


def _masked(root: etree._Element) -> etree._Element:
    """The document with every NHS number masked and the clinical words hidden (SPEC 9): what
    support may see by default. Ids, codes and structure stay, which is what support reads."""
    for element in root.iter():
        if not isinstance(element.tag, str):
            continue
        name = etree.QName(element).localname
        if element.text and element.text.strip():
            if name in _CLINICAL_TEXT and element.text.strip() != EMPTY_SECTION_TEXT:
                element.text = HIDDEN
            else:
                element.text = _mask_numbers(element.text)
        if element.tail and element.tail.strip():
            element.tail = _mask_numbers(element.tail)
        for key, value in element.attrib.items():
            if key == "displayName" and etree.QName(element.getparent()).localname in \
                    _NAMED_BY_PATIENT_DATA:
                element.set(key, HIDDEN)
            else:
                element.set(key, _mask_numbers(value))
    return root


def pretty_xml(xml: bytes, show_nhs: bool = False) -> str:
    """Indented XML for reading, masked unless ``show_nhs``; text that is not well-formed XML is
    shown as it is (its NHS numbers masked unless ``show_nhs``)."""
    try:
        root = etree.fromstring(xml.strip(), _PRETTY)
    except etree.XMLSyntaxError:
        text = xml.decode("utf-8", "replace")
        return text if show_nhs else _mask_numbers(text)
    if not show_nhs:
        root = _masked(root)
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


def _message_body(store: StoreLike, message_id: str, ods: str | None) -> tuple[bytes, str]:
    with queries.reading(store, ods) as reader:
        found = queries.message_text(reader, message_id)
    if found is None:
        raise ValueError(f"no message {message_id} in the store")
    body, content_type, failure_code = found
    if body is None:
        raise ValueError(f"the text of message {message_id} was not kept: the kit did not send it "
                         f"({failure_code}: {explain(failure_code or '')})")
    return body, content_type


def message_xml(store: StoreLike, message_id: str, show_nhs: bool = False,
                ods: str | None = None) -> str:
    """The HL7 GP Summary (REPC_IN150016SM05) the kit sent under ``message_id``, indented; the NHS
    number masked and the clinical words hidden unless ``show_nhs``."""
    _, payload = _split(*_message_body(store, message_id, ods))
    return pretty_xml(payload.body, show_nhs)


def ebxml_header(store: StoreLike, message_id: str, show_nhs: bool = False,
                 ods: str | None = None) -> str:
    """The ebXML (SOAP) header the message went with: From, To, CPA, MessageId, indented."""
    header, _ = _split(*_message_body(store, message_id, ods))
    return pretty_xml(header.body, show_nhs) if header is not None else ""


def ack_xml(store: StoreLike, message_id: str, show_nhs: bool = False,
            ods: str | None = None) -> str | None:
    """The Spine's application ack (MCCI_IN010000UK13) for ``message_id``, indented, NHS numbers
    masked unless ``show_nhs``.

    None when no ack body was kept: AA acks are not kept (every AA says the same, and the store
    records its type), and a message that timed out or was never sent has none."""
    with queries.reading(store, ods) as reader:
        body = queries.ack_text(reader, message_id)
    if body is None:
        raise ValueError(f"no message {message_id} in the store")
    if not body.strip():
        return None
    _, payload = _split(body, None)
    return pretty_xml(payload.body, show_nhs)


# --- putting things right -------------------------------------------------------------------------

def mark_resolved(store: StoreLike, patient_ids: Iterable[str], group_name: str,
                  ods: str | None = None) -> int:
    """Put patients whose errors support has resolved in a kit group, for ``reprocess``.

    Refuses (and adds nobody) when any of them is not currently failed: Failed would not send it,
    and a group should say what support did. Returns how many were new to the group."""
    ids = list(dict.fromkeys(str(p) for p in patient_ids))
    if not group_name or not str(group_name).strip():
        raise ValueError("give the group a name, e.g. 'Resolved by support'")
    with queries.reading(store, ods) as reader:
        states = queries.patient_states(reader, ids)
    wrong = [f"{pid} ({', '.join(sorted(states[pid])) if pid in states else 'not in this store'})"
             for pid in ids if PatientState.FAILED.value not in states.get(pid, set())]
    if wrong:
        raise RefusedError(f"not marked resolved: {', '.join(wrong)} "
                           f"{'is' if len(wrong) == 1 else 'are'} not failed; only failed "
                           "patients can be reprocessed. Nobody was added to "
                           f"{group_name!r}.")
    with _writing(store, ods) as writable:
        return writable.add_to_group(group_name, ids)


def reprocess(store_path: str | Path | Location, practice_dir: str | Path, spine_url: str,
              session_path: str | Path, group_name: str, *,
              on_progress: Callable[[Progress], None] | None = None,
              control: JobControl | None = None, ods: str | None = None,
              **options: object) -> Outcome:
    """Run a Failed job over ``group_name`` with the runner, exactly as ``scr-nb upload failed
    --group`` does. ``options`` are JobOptions fields (concurrency, rate_limit, ack_timeout...).
    A refusal comes back as an Outcome with exit code 3 and the reason, never as an exception."""
    return run_upload(practice_dir, Location.of(store_path, ods), spine_url, session_path,
                      JobOptions(mode=Mode.FAILED, group=group_name, **options),
                      on_progress=on_progress, control=control)


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

    def __init__(self, store: StoreLike, show_nhs: bool = False, ods: str | None = None):
        self.store, self.show_nhs = (store if isinstance(store, Store)
                                     else Location.of(store, ods)), show_nhs
        codes = failure_codes(self.store)
        self.code = widgets.Dropdown(
            description="Code", value=ALL,
            options=[(f"All codes ({sum(codes.values())})", ALL)]
            + [(f"{c} {explain(c)} ({n})", c) for c, n in codes.items()])
        self.since = widgets.DatePicker(description="Failed since")
        self.group = widgets.Dropdown(description="Group", value=ALL,
                                      options=[("Whole list", ALL)]
                                      + [(g, g) for g in group_names(self.store)])
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

    def static_html(self) -> str:
        """The filter as it stands, in words, with its table: what an exported page shows."""
        chosen = [("Code", self.code.label), ("Failed since", str(self.since.value or "any day")),
                  ("Group", self.group.label)]
        said = "; ".join(f"{name}: {html_text(value)}" for name, value in chosen)
        return f"<p><b>Filter</b> ({said})</p>{self.table.value}"

    def _repr_mimebundle_(self, **kwargs):
        """Live, the widgets; in an exported page or a papermill run, the filter and its table."""
        bundle = super()._repr_mimebundle_(**kwargs)
        bundle["text/html"] = self.static_html()
        return bundle


def filter_widgets(store: StoreLike, show_nhs: bool = False,
                   ods: str | None = None) -> FailedPatientsFilter:
    """The desk's filter: drive it with ``.code.value``, ``.since.value`` and ``.group.value``."""
    return FailedPatientsFilter(store, show_nhs=show_nhs, ods=ods)


__all__ = ["failed_patients", "timeline", "message_xml", "ebxml_header", "ack_xml",
           "mark_resolved", "reprocess", "filter_widgets", "FailedPatientsFilter", "find_patient",
           "last_sent_message", "overview", "nothing_to_investigate", "failure_codes",
           "group_names"]
