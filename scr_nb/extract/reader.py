"""Reading a practice extract (SPEC 3): a directory of UTF-8 CSV files.

File-level problems (a missing file or required column, bytes that are not UTF-8, text that is not
CSV) raise ``ExtractError`` naming the file, line and column before anything is sent. Row-level
problems never drop a row: they are kept on the patient (``Patient.problems``) so eligibility makes
that patient ``malformed_record`` and support can find the line.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from datetime import date
from functools import lru_cache
from pathlib import Path

from scr_nb.constants import CONSENT_CODES
from scr_nb.errors import ExtractError
from scr_nb.extract.nhs_number import normalise
from scr_nb.extract.records import (
    Allergy, ConsentEntry, Medication, Patient, Practice, PracticeDetails,
)

# file -> required columns. groups.csv is optional (the Patient Group option); the others are
# required because a missing consent, medication or allergy file would silently send summaries
# without dissent checks or without clinical content.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "patients.csv": (
        "patient_id", "nhs_number", "family_name", "given_name", "birth_date", "sex",
        "registration_type", "registered_on", "left_on", "deceased_on", "fp69", "sensitive",
        "pds_synchronised", "has_national_summary",
    ),
    "consent.csv": ("patient_id", "code", "recorded_on"),
    "medications.csv": (
        "patient_id", "medication_id", "kind", "dmd_code", "drug", "dosage", "quantity",
        "prescribed_on", "repeat_until", "discontinued_on",
    ),
    "allergies.csv": (
        "patient_id", "allergy_id", "kind", "snomed_code", "description", "recorded_on", "negative",
    ),
    "groups.csv": ("group_name", "patient_id"),
}
OPTIONAL_FILES = frozenset({"groups.csv"})
MEDICATION_KINDS = frozenset({"acute", "repeat"})
ALLERGY_KINDS = frozenset({"allergy", "intolerance", "adverse_reaction"})
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TRUE = frozenset({"true", "t", "yes", "y", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "0", ""})
EARLIEST_DATE = date(1900, 1, 1)
# No sane extract holds a field longer than this (a drug name, a dosage, an allergy's words): a
# longer one makes its row malformed (SPEC 3), cut to this length so it is not carried around.
MAX_FIELD_CHARS = 10_000
# The csv module refuses fields over 128 KiB for the whole file; the limit above is per row.
csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))


class _Row:
    """One CSV record with its starting line, and the problems found while reading it."""

    __slots__ = ("values", "line", "problems")

    def __init__(self, values: dict[str, str], line: int):
        self.values, self.line, self.problems = values, line, []

    def text(self, column: str) -> str:
        value = self.values.get(column)
        return "" if value is None else value.strip()

    def date(self, column: str, *, required: bool = False, today: date | None = None) -> date | None:
        raw = self.text(column)
        if not raw:
            if required:
                self.problems.append(f"{column}: blank")
            return None
        parsed = parse_date(raw)
        if parsed is None:
            self.problems.append(f"{column}: '{raw}' is not a date (YYYY-MM-DD)")
        elif today is not None and (parsed > today or parsed < EARLIEST_DATE):
            self.problems.append(f"{column}: {raw} is in the future or before 1900")
        return parsed

    def flag(self, column: str) -> bool:
        raw = self.text(column).lower()
        if raw in _TRUE:
            return True
        if raw not in _FALSE:
            self.problems.append(f"{column}: '{self.text(column)}' is not true or false")
        return False


@lru_cache(maxsize=65536)   # an extract repeats a few thousand dates over millions of rows
def parse_date(raw: str) -> date | None:
    if not _ISO_DATE.match(raw):
        return None
    try:
        return date.fromisoformat(raw)
    except ValueError:
        return None


def normalise_consent_code(raw: str) -> str:
    """``9Ndo.00`` and ``9Ndo.`` -> ``9Ndo``: the Read term suffix and trailing dot are dropped."""
    return raw.strip().split(".", 1)[0].strip()


def _check_text(path: Path, chunk_bytes: int = 1 << 20) -> None:
    """Raise ExtractError (with the line) for bytes that are not UTF-8 or for NUL bytes, reading
    the file a chunk at a time so a large extract is never held whole."""
    name_line = 1
    offset = 0
    carried = b""
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(chunk_bytes)
            data = carried + chunk
            if not data:
                return
            try:
                data.decode("utf-8")
                usable = len(data)
            except UnicodeDecodeError as err:
                truncated = err.reason == "unexpected end of data" and err.end == len(data)
                if not (truncated and chunk):
                    line = name_line + data.count(b"\n", 0, err.start)
                    raise ExtractError(path, f"is not UTF-8 (byte 0x{data[err.start]:02x} at "
                                             f"offset {offset + err.start}); save it as UTF-8 "
                                             "CSV and try again", line=line) from None
                usable = err.start   # a character cut by the chunk's end: read on
            nul = data.find(b"\x00", 0, usable)
            if nul >= 0:
                raise ExtractError(path, "is not a CSV text file (it contains NUL bytes)",
                                   line=name_line + data.count(b"\n", 0, nul))
            name_line += data.count(b"\n", 0, usable)
            offset += usable
            carried = data[usable:]


def read_rows(path: Path, required: tuple[str, ...]) -> Iterator[_Row]:
    """Yield the records of one CSV file, raising ExtractError for file-level problems. The file
    is checked, then read, a piece at a time: memory does not grow with its size."""
    name = path.name
    try:
        _check_text(path)
        handle = path.open(encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise ExtractError(path, "file is missing: the extract must contain "
                                 f"{name} with columns {', '.join(required)}") from None
    except OSError as err:
        raise ExtractError(path, f"cannot be read ({err.strerror})") from None
    with handle:
        yield from _records(path, handle, required)


def _records(path: Path, handle: io.TextIOBase, required: tuple[str, ...]) -> Iterator[_Row]:
    reader = csv.reader(handle, strict=True)
    try:
        header = next(reader, None)
    except csv.Error as err:
        raise ExtractError(path, f"is not valid CSV: {err}", line=reader.line_num) from None
    if not header or not any(h.strip() for h in header):
        raise ExtractError(path, "has no header row; the first line must name the columns "
                                 f"({', '.join(required)})", line=1)
    header = [h.strip() for h in header]
    for column in required:
        if column not in header:
            raise ExtractError(path, f"required column is missing (header has: {', '.join(header)})",
                               line=1, column=column)
    previous_end = reader.line_num
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise ExtractError(path, f"is not valid CSV: {err}", line=previous_end + 1) from None
        start = previous_end + 1
        previous_end = reader.line_num
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue  # blank line
        row = _Row(dict(zip(header, fields)), start)
        for column, value in row.values.items():
            if len(value) > MAX_FIELD_CHARS:
                row.problems.append(f"{column}: {len(value):,} characters, more than any extract "
                                    f"field holds ({MAX_FIELD_CHARS:,} at most)")
                row.values[column] = value[:MAX_FIELD_CHARS]
        if len(fields) < len(header):
            missing = header[len(fields)]
            row.problems.append(f"{missing}: missing (the row has {len(fields)} of "
                                f"{len(header)} fields)")
        yield row


_ODS_CODE = re.compile(r"[A-Z0-9]{3,10}")
_ASID = re.compile(r"[0-9]{12}")


def load_details(directory: str | Path) -> PracticeDetails:
    """``practice.json`` (optional): the practice's ODS code, name and ASID. A file that is there but
    wrong is an ExtractError naming the field, since every message would carry the mistake."""
    path = Path(directory) / "practice.json"
    if not path.exists():
        return PracticeDetails()
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        line = getattr(err, "lineno", None)
        raise ExtractError(path, f"is not a JSON object of ods_code, name and asid ({err})",
                           line=line) from None
    if not isinstance(data, dict):
        raise ExtractError(path, "must be a JSON object such as {\"ods_code\": \"A12345\", "
                                 "\"name\": \"...\", \"asid\": \"200000000001\"}")
    values: dict[str, str | None] = {}
    for key, pattern, what in (("ods_code", _ODS_CODE, "an ODS code such as A12345"),
                               ("name", None, "the practice's name"),
                               ("asid", _ASID, "a 12-digit ASID")):
        value = data.get(key)
        if value is None:
            values[key] = None
            continue
        text = str(value).strip() if isinstance(value, (str, int)) else None
        if not text or (pattern is not None and not pattern.fullmatch(text)):
            raise ExtractError(path, f"{value!r} is not {what}", column=key)
        values[key] = text
    return PracticeDetails(**values)


def load_groups(directory: str | Path) -> dict[str, list[str]]:
    """The Patient Groups of an extract (groups.csv, optional): name -> patient ids."""
    groups: dict[str, list[str]] = {}
    path = Path(directory) / "groups.csv"
    if path.exists():
        for row in read_rows(path, REQUIRED_COLUMNS["groups.csv"]):
            name, pid = row.text("group_name"), row.text("patient_id")
            if name and pid:
                members = groups.setdefault(name, [])
                if pid not in members:
                    members.append(pid)
    return groups


def read_consent(root: Path) -> Iterator[tuple[ConsentEntry, list[str]]]:
    """consent.csv's entries, each with the problems of its row."""
    for row in read_rows(root / "consent.csv", REQUIRED_COLUMNS["consent.csv"]):
        code = normalise_consent_code(row.text("code"))
        if code not in CONSENT_CODES:
            row.problems.append(f"code: '{row.text('code')}' is not a known consent code "
                                f"({', '.join(CONSENT_CODES)})")
        entry = ConsentEntry(row.text("patient_id"), code, row.date("recorded_on", required=True),
                             row.line)
        yield entry, row.problems


def read_medications(root: Path) -> Iterator[tuple[Medication, list[str]]]:
    """medications.csv's rows, each with the problems of its row."""
    for row in read_rows(root / "medications.csv", REQUIRED_COLUMNS["medications.csv"]):
        kind = row.text("kind").lower()
        if kind not in MEDICATION_KINDS:
            row.problems.append(f"kind: '{row.text('kind')}' is not acute or repeat")
        med = Medication(
            patient_id=row.text("patient_id"), medication_id=row.text("medication_id"), kind=kind,
            dmd_code=row.text("dmd_code"), drug=row.values.get("drug") or "",
            dosage=row.values.get("dosage") or "", quantity=row.values.get("quantity") or "",
            prescribed_on=row.date("prescribed_on", required=True),
            repeat_until=row.date("repeat_until"), discontinued_on=row.date("discontinued_on"),
            row=row.line)
        yield med, row.problems


def read_allergies(root: Path) -> Iterator[tuple[Allergy, list[str]]]:
    """allergies.csv's rows, each with the problems of its row."""
    for row in read_rows(root / "allergies.csv", REQUIRED_COLUMNS["allergies.csv"]):
        kind = row.text("kind").lower()
        if kind not in ALLERGY_KINDS:
            row.problems.append(f"kind: '{row.text('kind')}' is not allergy, intolerance or "
                                "adverse_reaction")
        allergy = Allergy(
            patient_id=row.text("patient_id"), allergy_id=row.text("allergy_id"), kind=kind,
            snomed_code=row.text("snomed_code"), description=row.values.get("description") or "",
            recorded_on=row.date("recorded_on"), negative=row.flag("negative"), row=row.line)
        yield allergy, row.problems


def read_patients(root: Path, today: date,
                  charged: dict[str, list[str]]) -> Iterator[Patient]:
    """patients.csv's rows; ``charged`` holds the problems the other files found for a patient id
    (a broken medication row makes its patient's record malformed)."""
    for row in read_rows(root / "patients.csv", REQUIRED_COLUMNS["patients.csv"]):
        pid = row.text("patient_id")
        if not pid:
            row.problems.append("patient_id: blank")
        yield Patient(
            patient_id=pid or f"(blank id, line {row.line})",
            nhs_number=normalise(row.text("nhs_number")),
            family_name=row.values.get("family_name") or "",
            given_name=row.values.get("given_name") or "",
            birth_date=row.date("birth_date", required=True, today=today),
            sex=row.text("sex"),
            registration_type=row.text("registration_type").lower(),
            registered_on=row.date("registered_on", today=today),
            left_on=row.date("left_on", today=today),
            deceased_on=row.date("deceased_on", today=today),
            fp69=row.flag("fp69"), sensitive=row.flag("sensitive"),
            pds_synchronised=row.flag("pds_synchronised"),
            has_national_summary=row.flag("has_national_summary"),
            row=row.line,
            problems=tuple(row.problems) + tuple(charged.get(pid, ())),
        )


def charge(charged: dict[str, list[str]], file: str, patient_id: str, line: int,
           problems: list[str]) -> None:
    """Keep a row's problems against its patient id, naming the file and line."""
    if problems:
        charged.setdefault(patient_id, []).extend(f"{file} line {line}: {p}" for p in problems)


def check_directory(directory: str | Path) -> Path:
    root = Path(directory)
    if not root.is_dir():
        raise ExtractError(root, "is not a directory: give the folder holding patients.csv, "
                                 "consent.csv, medications.csv, allergies.csv (and groups.csv)")
    return root


def load_practice(directory: str | Path, today: date | None = None) -> Practice:
    """Read and check a whole extract into memory (the support desk, preflight, tests: a job reads
    it through ``extract.index`` instead). Raises ExtractError before anything is sent."""
    today = today or date.today()
    root = check_directory(directory)
    practice = Practice(directory=str(root), details=load_details(root))
    # Problems found in the other files are charged to the patient they belong to.
    charged: dict[str, list[str]] = {}
    for entry, problems in read_consent(root):
        charge(charged, "consent.csv", entry.patient_id, entry.row, problems)
        practice.consent.setdefault(entry.patient_id, []).append(entry)
    for med, problems in read_medications(root):
        charge(charged, "medications.csv", med.patient_id, med.row, problems)
        practice.medications.setdefault(med.patient_id, []).append(med)
    for allergy, problems in read_allergies(root):
        charge(charged, "allergies.csv", allergy.patient_id, allergy.row, problems)
        practice.allergies.setdefault(allergy.patient_id, []).append(allergy)
    practice.groups = load_groups(root)
    practice.patients.extend(read_patients(root, today, charged))
    return practice
