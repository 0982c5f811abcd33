"""The eligibility dry run over columns (SPEC 4, issue 11): the same counts as
``summarise(decide(load_practice(...)))``, read with pyarrow's CSV reader and decided with masks.

The row-at-a-time reader stays the definition. This path only takes files it can read exactly as
that reader would (plain UTF-8 CSV whose quotes are whole quoted fields, one field count per row,
fields of sane size); for anything else, and for every file-level problem, it hands the whole
extract to ``load_practice``, so errors are the row reader's own ``ExtractError`` word for word.
Values that decide a row (dates, flags, codes, kinds) are few and repeat, so each distinct value
is judged once by the row reader's own functions and the verdicts are spread back over the rows.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from datetime import date
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import csv as pacsv

from scr_nb.constants import CONSENT_CODES, CONSENT_DISSENT, LEGACY_CONSENT
from scr_nb.extract.eligibility import Policy, decide, summarise
from scr_nb.extract.reader import (
    _FALSE, _TRUE, ALLERGY_KINDS, EARLIEST_DATE, MAX_FIELD_CHARS, MEDICATION_KINDS,
    REQUIRED_COLUMNS, load_details, load_practice, normalise_consent_code, parse_date,
)
from scr_nb.extract.nhs_number import _WEIGHTS
from scr_nb.store.states import NOT_REQUIRED_REASONS

_BOM = b"\xef\xbb\xbf"
# What str.strip() removes among ASCII characters (the non-ASCII ones send a file to the row reader).
_ASCII_WHITESPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
# A quoted field: an opening quote, anything with quotes doubled, a closing quote; it must sit between
# commas or line breaks to be a whole field.
_QUOTED_FIELD = re.compile(rb'"[^"]*(?:""[^"]*)*"')
_FIELD_START = np.frombuffer(b",\n", dtype=np.uint8)
_FIELD_END = np.frombuffer(b",\r\n", dtype=np.uint8)
# The row reader names a patient row with a blank id like this; a real id of that shape could
# collide with it, so such an extract goes to the row reader.
_BLANK_ID_PREFIX = "(blank id, line"


class _Fallback(Exception):
    """This extract holds something only the row-at-a-time reader reads exactly."""


def dry_run(directory: str | Path, policy: Policy) -> dict:
    """The dry-run figures of ``scr-nb eligibility``: exactly ``summarise``'s shape and counts.

    Raises the row reader's ExtractError for a file-level problem. Example:
    ``dry_run("practice/", Policy(today=date.today()))``.
    """
    root = Path(directory)
    try:
        if not root.is_dir():
            raise _Fallback
        load_details(root)
        return _dry_run(root, policy)
    except _Fallback:
        return summarise(decide(load_practice(root, today=policy.today), policy))


def _dry_run(root: Path, policy: Policy) -> dict:
    # The files in the row reader's order, so the first broken one is the one it would name.
    charged: set[str] = set()
    dissenting = _dissenting(_read(root / "consent.csv", ("patient_id", "code", "recorded_on")),
                             charged)
    for batch in _batches(root / "medications.csv", _MEDICATION_COLUMNS):
        charged |= _charged(batch, _medication_problems(batch))
    for batch in _batches(root / "allergies.csv", _ALLERGY_COLUMNS):
        charged |= _charged(batch, _allergy_problems(batch))
    if (root / "groups.csv").exists():
        for _ in _batches(root / "groups.csv", ()):
            pass   # only its file-level problems matter here
    patients = _read(root / "patients.csv", _PATIENT_COLUMNS)
    return _decide(patients, policy, charged, dissenting)


_MEDICATION_COLUMNS = ("patient_id", "kind", "prescribed_on", "repeat_until", "discontinued_on")
_ALLERGY_COLUMNS = ("patient_id", "kind", "recorded_on", "negative")
_PATIENT_COLUMNS = tuple(c for c in REQUIRED_COLUMNS["patients.csv"]
                         if c not in ("family_name", "given_name", "sex"))


# --- reading ----------------------------------------------------------------------------------------

_CHUNK = 1 << 22   # bytes checked at a time, so memory does not grow with the file
_BLOCK = 1 << 22   # bytes pyarrow parses at a time


class _Plain:
    """What a scan of a file found: its header, whether a quoted field holds a line break, and
    whether a record is long enough to hold a field over the row reader's limit (then every
    column is read and measured)."""

    def __init__(self, header: list[str], newlines_in_values: bool, long_lines: bool):
        self.header, self.newlines_in_values, self.long_lines = header, newlines_in_values, long_lines


def _pieces(path: Path):
    """The file's bytes in pieces that end at a line break outside quotes (the last one may not)."""
    try:
        f = open(path, "rb")
    except OSError:
        raise _Fallback from None
    with f:
        carry = b""
        while True:
            block = f.read(_CHUNK)
            if not block:
                if carry:
                    yield carry
                return
            data = carry + block
            cut = data.rfind(b"\n") + 1
            # An odd count of quotes before the cut puts it inside a quoted field: cut earlier.
            while cut and data.count(b'"', 0, cut) % 2:
                cut = data.rfind(b"\n", 0, cut - 1) + 1
            carry = data[cut:]
            if cut:
                yield data[:cut]


def _scan(path: Path) -> _Plain:
    """Check, a piece at a time, that pyarrow will read this file exactly as the row reader does:
    UTF-8 without NUL bytes, line breaks LF or CRLF, quotes only around whole fields, a plain
    header naming the required columns once each. Anything else is _Fallback."""
    required = REQUIRED_COLUMNS[path.name]
    header = None
    newlines_in_values = long_lines = False
    for piece in _pieces(path):
        if header is None:
            if piece.startswith(_BOM):
                piece = piece[len(_BOM):]
            first = piece.split(b"\n", 1)[0].rstrip(b"\r")
            if not first.strip() or b'"' in first:
                raise _Fallback
            try:
                header = [h.strip() for h in next(csv.reader([first.decode("utf-8")]))]
            except (UnicodeDecodeError, csv.Error, StopIteration):
                raise _Fallback from None
            if len(set(header)) != len(header) or any(c not in header for c in required):
                raise _Fallback
        if b"\x00" in piece or (b"\r" in piece and piece.count(b"\r") != piece.count(b"\r\n")):
            raise _Fallback
        try:
            pa.Array.from_buffers(pa.string(), 1, [
                None, pa.array([0, len(piece)], pa.int32()).buffers()[1], pa.py_buffer(piece),
            ]).validate(full=True)
        except pa.ArrowInvalid:
            raise _Fallback from None
        if b'"' in piece:
            # Each quoted field becomes one NUL (the file has none), then its neighbours are checked.
            rest = _QUOTED_FIELD.sub(b"\x00", piece)
            if b'"' in rest:
                raise _Fallback
            chars = np.frombuffer(rest, dtype=np.uint8)
            fields = np.flatnonzero(chars == 0)
            before = chars[fields[fields > 0] - 1]
            after = chars[fields[fields < len(chars) - 1] + 1]
            if not (np.isin(before, _FIELD_START).all() and np.isin(after, _FIELD_END).all()):
                raise _Fallback
            newlines_in_values = newlines_in_values or rest.count(b"\n") != piece.count(b"\n")
            del rest
        # A record no longer than the limit holds no field longer than it (a character is a byte
        # or more); records end at the line breaks with an even count of quotes before them.
        chars = np.frombuffer(piece, dtype=np.uint8)
        breaks = np.flatnonzero(chars == 10)
        if newlines_in_values:
            quotes = np.flatnonzero(chars == 34)
            breaks = breaks[np.searchsorted(quotes, breaks) % 2 == 0]
        bounds = np.concatenate(([-1], breaks, [len(piece)]))
        if np.diff(bounds).max() - 1 > MAX_FIELD_CHARS:
            long_lines = True
    if header is None:
        raise _Fallback   # an empty file: the row reader says it has no header
    return _Plain(header, newlines_in_values, long_lines)


def _batches(path: Path, columns: tuple[str, ...] | None = None, *, whole: bool = False):
    """The file's columns as strings, as record batches (or one table when ``whole``); ``columns``
    None reads them all. A field over the row reader's limit is _Fallback."""
    plain = _scan(path)
    names = [f"c{i}" for i in range(len(plain.header))]
    by_name = dict(zip(plain.header, names))
    measure = plain.long_lines
    wanted = plain.header if columns is None or measure else list(columns)
    options = dict(
        read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, block_size=_BLOCK),
        parse_options=pacsv.ParseOptions(newlines_in_values=plain.newlines_in_values),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names}, strings_can_be_null=False,
            quoted_strings_can_be_null=False, include_columns=[by_name[c] for c in wanted]),
    )
    try:
        if whole:
            batches = [pacsv.read_csv(path, **options)]
        else:
            batches = pacsv.open_csv(path, **options)
        for batch in batches:
            if measure:
                for column in batch.columns:
                    if len(column) and pc.max(pc.utf8_length(column)).as_py() > MAX_FIELD_CHARS:
                        raise _Fallback   # the row reader cuts the field and makes its row malformed
            yield {c: batch.column(by_name[c]) for c in (columns or plain.header)}
    except pa.ArrowException:
        raise _Fallback from None   # ragged rows, broken quotes...


def _read(path: Path, columns: tuple[str, ...] | None = None) -> dict[str, pa.ChunkedArray]:
    """A whole file's columns (or the ones named) as strings."""
    return next(_batches(path, columns, whole=True))


def _stripped(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """``str.strip()`` over a column; ASCII only, since pyarrow's idea of Unicode whitespace is
    not Python's."""
    if len(column) and not pc.all(pc.string_is_ascii(column)).as_py():
        raise _Fallback
    return pc.utf8_trim(column, characters=_ASCII_WHITESPACE)


def _judged(column: pa.ChunkedArray, judge: Callable[[str], object], dtype) -> np.ndarray:
    """``judge(value)`` for every row, computed once per distinct value."""
    if len(column) == 0:
        return np.zeros(0, dtype=dtype)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()   # one dictionary for the whole column
    encoded = pc.dictionary_encode(column)
    verdicts = np.array([judge(value) for value in encoded.dictionary.to_pylist()], dtype=dtype)
    return verdicts[encoded.indices.to_numpy()]


# --- the row reader's checks, one distinct value at a time ------------------------------------------

@lru_cache(maxsize=65536)   # the same few thousand dates come back in every batch
def _date_ordinal(raw: str) -> int:
    """The date's ordinal; 0 when blank, -1 when it does not parse."""
    text = raw.strip()
    if not text:
        return 0
    parsed = parse_date(text)
    return -1 if parsed is None else parsed.toordinal()


def _date_problem(column: pa.ChunkedArray, *, required: bool = False,
                  today: date | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(problem per row, ordinal per row: 0 blank, -1 not a date), as ``_Row.date`` sees them."""
    ordinal = _judged(column, _date_ordinal, np.int64)
    problem = ordinal < 0
    if required:
        problem |= ordinal == 0
    if today is not None:
        problem |= (ordinal > today.toordinal()) | ((ordinal > 0) & (ordinal < EARLIEST_DATE.toordinal()))
    return problem, ordinal


def _flag(raw: str) -> int:
    """1 true, 0 false, -1 neither (a problem), as ``_Row.flag`` reads it."""
    text = raw.strip().lower()
    return 1 if text in _TRUE else 0 if text in _FALSE else -1


def _kind_problem(column: pa.ChunkedArray, kinds: frozenset[str]) -> np.ndarray:
    return _judged(column, lambda raw: raw.strip().lower() not in kinds, np.bool_)


def _medication_problems(columns: dict[str, pa.ChunkedArray]) -> np.ndarray:
    problem = _kind_problem(columns["kind"], MEDICATION_KINDS)
    problem |= _date_problem(columns["prescribed_on"], required=True)[0]
    problem |= _date_problem(columns["repeat_until"])[0]
    problem |= _date_problem(columns["discontinued_on"])[0]
    return problem


def _allergy_problems(columns: dict[str, pa.ChunkedArray]) -> np.ndarray:
    problem = _kind_problem(columns["kind"], ALLERGY_KINDS)
    problem |= _date_problem(columns["recorded_on"])[0]
    problem |= _judged(columns["negative"], _flag, np.int8) < 0
    return problem


def _charged(columns: dict[str, pa.ChunkedArray], problem: np.ndarray) -> set[str]:
    """The patient ids the problem rows of another file are charged to."""
    if not problem.any():
        return set()
    bad = pc.filter(columns["patient_id"], pa.array(problem))
    return {pid.strip() for pid in bad.to_pylist()}


def _dissenting(columns: dict[str, pa.ChunkedArray], charged: set[str]) -> pa.Array:
    """The ids whose latest consent entry (by recorded_on, then file order) is dissent; the ids of
    consent rows with problems are added to ``charged``."""
    dissent_code = _judged(columns["code"], lambda raw: LEGACY_CONSENT.get(
        normalise_consent_code(raw), normalise_consent_code(raw)) == CONSENT_DISSENT, np.bool_)
    bad_code = _judged(columns["code"], lambda raw: normalise_consent_code(raw) not in CONSENT_CODES,
                       np.bool_)
    bad_date, ordinal = _date_problem(columns["recorded_on"], required=True)
    charged |= _charged(columns, bad_code | bad_date)
    pids = _stripped(columns["patient_id"])
    if len(pids) == 0:
        return pa.array([], pa.string())
    distinct = pc.unique(pids)
    pid_index = pc.index_in(pids, value_set=distinct).to_numpy()
    # An entry without a date loses to any dated one; among equals the later row wins.
    order = np.lexsort((np.arange(len(pid_index)), np.maximum(ordinal, 0), pid_index))
    last = np.ones(len(order), dtype=bool)
    last[:-1] = pid_index[order][1:] != pid_index[order][:-1]
    latest = order[last]
    return pc.take(pids, pa.array(latest[dissent_code[latest]]))


# --- deciding ---------------------------------------------------------------------------------------

def _valid_numbers(numbers: pa.ChunkedArray) -> np.ndarray:
    """Modulus 11 over a column of normalised numbers (``is_valid`` normalises once more)."""
    again = pc.replace_substring(pc.replace_substring(
        pc.utf8_trim(numbers, characters=_ASCII_WHITESPACE), " ", ""), "-", "")
    shaped = pc.match_substring_regex(again, r"^[0-9]{10}$").to_numpy(zero_copy_only=False)
    value = np.zeros(len(shaped), dtype=np.int64)
    if shaped.any():
        value[shaped] = pc.cast(pc.filter(again, pa.array(shaped)), pa.int64()).to_numpy()
    total = np.zeros(len(shaped), dtype=np.int64)
    for place, weight in enumerate(_WEIGHTS):
        total += (value // 10 ** (9 - place)) % 10 * weight
    check = 11 - total % 11
    check[check == 11] = 0
    return shaped & (check != 10) & (check == value % 10)


def _counts(index: np.ndarray) -> np.ndarray:
    """How many rows share each row's value (given as an index into the distinct values)."""
    return np.bincount(index)[index] if len(index) else np.zeros(0, dtype=np.int64)


def _decide(columns: dict[str, pa.ChunkedArray], policy: Policy, charged: set[str],
            dissenting: pa.Array) -> dict:
    today = policy.today
    pids = _stripped(columns["patient_id"])
    n = len(pids)
    if n and pc.any(pc.starts_with(pids, _BLANK_ID_PREFIX)).as_py():
        raise _Fallback
    blank_id = pc.equal(pids, "").to_numpy(zero_copy_only=False) if n else np.zeros(0, bool)

    malformed = blank_id.copy()
    for name in ("birth_date", "registered_on", "left_on", "deceased_on"):
        problem, ordinal = _date_problem(columns[name], required=name == "birth_date", today=today)
        malformed |= problem
        if name == "registered_on":
            registered = ordinal
        elif name == "left_on":
            left = ordinal != 0
        elif name == "deceased_on":
            deceased = ordinal != 0
    flags = {}
    for name in ("fp69", "sensitive", "pds_synchronised", "has_national_summary"):
        value = _judged(columns[name], _flag, np.int8)
        malformed |= value < 0
        flags[name] = value == 1
    if charged and n:
        malformed |= pc.is_in(pids, value_set=pa.array(sorted(charged), pa.string())).to_numpy(
            zero_copy_only=False)

    # Rows with a blank id are each their own patient in the row reader (never duplicates).
    id_index = pc.index_in(pids, value_set=pc.unique(pids)).to_numpy() if n else np.zeros(0, np.int64)
    duplicate = (_counts(id_index) > 1) & ~blank_id
    numbers = _stripped(columns["nhs_number"])
    numbers = pc.replace_substring(pc.replace_substring(numbers, " ", ""), "-", "")
    valid = _valid_numbers(numbers) if n else np.zeros(0, bool)
    if valid.any():
        valid_numbers = pc.filter(numbers, pa.array(valid))
        number_index = pc.index_in(valid_numbers, value_set=pc.unique(valid_numbers)).to_numpy()
        duplicate[valid] |= _counts(number_index) > 1
    no_number = pc.equal(numbers, "").to_numpy(zero_copy_only=False) if n else np.zeros(0, bool)
    permanent = _judged(columns["registration_type"], lambda raw: raw.strip().lower() == "permanent",
                        np.bool_)
    days = policy.update_existing_after_days
    may_update = np.zeros(n, dtype=bool) if days is None else (
        (registered > 0) & (registered + days < today.toordinal()))
    dissent = np.zeros(n, dtype=bool)
    if policy.dissent == "exclude" and len(dissenting) and n:
        dissent = pc.is_in(pids, value_set=dissenting).to_numpy(zero_copy_only=False)

    conditions = [
        malformed, duplicate, no_number, ~valid, ~permanent, left, deceased, flags["fp69"],
        flags["sensitive"], ~flags["pds_synchronised"], flags["has_national_summary"] & ~may_update,
        dissent,
    ]
    reason = np.select(conditions, list(range(len(NOT_REQUIRED_REASONS))), default=-1) if n else \
        np.zeros(0, dtype=np.int64)
    by_reason = np.bincount(reason[reason >= 0], minlength=len(NOT_REQUIRED_REASONS))
    return {
        "total": n,
        "eligible": int((reason < 0).sum()),
        "not_required_by_reason": {r: int(by_reason[i]) for i, r in enumerate(NOT_REQUIRED_REASONS)},
    }
