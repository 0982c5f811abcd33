"""The extract read by columns (SPEC 3-4, issue 11): the eligibility dry run, the same counts as
``summarise(decide(load_practice(...)))``, and a job's extract index (``fill_index``), the same rows
and decisions as ``prepared``'s row-at-a-time build, read with pyarrow's CSV reader and decided with
masks.

The row-at-a-time reader stays the definition. This path only takes files it can read exactly as
that reader would (plain UTF-8 CSV whose quotes are whole quoted fields, one field count per row,
fields of sane size); for anything else, and for every file-level problem, it hands the whole
extract to the row reader (``load_practice``, or the index's row-at-a-time build), so errors are the
row reader's own ``ExtractError`` word for word.

Each file is cut into pieces at record boundaries (line breaks with an even count of quotes before
them), and the pieces are checked, parsed and judged on a few threads at once: numpy and pyarrow
let go of the GIL, and pyarrow alone parses a file whose quoted fields hold line breaks on one
thread. Everything about a patient row except duplicates, problems charged from other files and
dissent is decided within its piece; those three are put in once every piece is read. Values that
decide a row are few and repeat, so each distinct value is judged once by the row reader's own
functions, except dates of the plain ``YYYY-MM-DD`` shape, which numpy reads directly.
"""

from __future__ import annotations

import csv
import json
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from functools import lru_cache, partial
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
from scr_nb.store.extract_index import IndexWriter
from scr_nb.store.states import NOT_REQUIRED_REASONS

_BOM = b"\xef\xbb\xbf"
# What str.strip() removes among ASCII characters (the non-ASCII ones send a file to the row reader).
_ASCII_WHITESPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
_COMMA, _LF, _CR, _QUOTE, _BACKSLASH = b",\n\r\"\\"
# The row reader names a patient row with a blank id like this; a real id of that shape could
# collide with it, so such an extract goes to the row reader.
_BLANK_ID_PREFIX = "(blank id, line"

_PIECE = 1 << 23   # bytes of records read, checked and parsed as one piece
_BLOCK = 1 << 20   # bytes of a piece scanned by numpy at a time
# Threads working on pieces: beyond a few, the reading in the main thread is what waits.
_WORKERS = min(os.cpu_count() or 1, 4)
_AHEAD = 2 * _WORKERS   # pieces in flight at once: what bounds memory

_REASON = {reason: i for i, reason in enumerate(NOT_REQUIRED_REASONS)}
_ELIGIBLE = len(NOT_REQUIRED_REASONS)   # the reason index of a row no reason applies to


class Fallback(Exception):
    """This extract holds something only the row-at-a-time reader reads exactly."""


def dry_run(directory: str | Path, policy: Policy) -> dict:
    """The dry-run figures of ``scr-nb eligibility``: exactly ``summarise``'s shape and counts.

    Raises the row reader's ExtractError for a file-level problem. Example:
    ``dry_run("practice/", Policy(today=date.today()))``.
    """
    root = Path(directory)
    try:
        if not root.is_dir():
            raise Fallback
        load_details(root)
        return _dry_run(root, policy)
    except Fallback:
        return summarise(decide(load_practice(root, today=policy.today), policy))


def _dry_run(root: Path, policy: Policy) -> dict:
    pool = ThreadPoolExecutor(_WORKERS)
    try:
        # patients.csv first, so that its duplicates are found while the other files are read.
        patients = [rows for _, rows in _in_order(pool, _tasks(root, (
            ("patients.csv", _PATIENT_COLUMNS, partial(_patient_piece, policy=policy)),)))]
        duplicates = pool.submit(_duplicates, patients)
        charged: set[str] = set()
        consent = []
        for name, (charges, rows) in _in_order(pool, _tasks(root, _OTHER_FILES)):
            charged |= charges
            if name == "consent.csv":
                consent.append(rows)
        return _summary(patients, *duplicates.result(), charged, _dissenting(consent), policy)
    finally:
        pool.shutdown(cancel_futures=True)


def _tasks(root: Path, files: tuple, numbered: bool = False) -> Iterator[tuple[str, Callable]]:
    """(file name, the work on one of its pieces) for each (name, columns read, work) given.
    ``numbered``: the work is also given each record's line number, as the row reader counts."""
    for name, columns, work in files:
        path = root / name
        if name == "groups.csv" and not path.exists():   # the one optional file
            continue
        pieces = _pieces(path)
        header = _header(next(pieces), REQUIRED_COLUMNS[name])
        first_line = 2   # the header is line 1, and holds no line break of its own
        for piece in pieces:
            if numbered:
                yield name, partial(_numbered_piece, piece, header, columns, work, first_line)
                first_line += piece.count(b"\n")
            else:
                yield name, partial(_piece, piece, header, columns, work)


def _in_order(pool: ThreadPoolExecutor, tasks: Iterator[tuple[str, Callable]]):
    """(name, result) of every task, in order, with at most _AHEAD of them in flight."""
    pending: deque = deque()
    for name, task in tasks:
        pending.append((name, pool.submit(task)))
        if len(pending) >= _AHEAD:
            name, future = pending.popleft()
            yield name, future.result()
    while pending:
        name, future = pending.popleft()
        yield name, future.result()


# --- reading ----------------------------------------------------------------------------------------

def _pieces(path: Path) -> Iterator[bytes]:
    """The file's header line, then its records in pieces of about _PIECE bytes, each ending at a
    line break outside quotes (the last at the end of the file)."""
    try:
        f = open(path, "rb")
    except OSError:
        raise Fallback from None
    with f:
        header = f.readline(_PIECE)
        if not header.endswith(b"\n") and f.read(1):
            raise Fallback   # a header line longer than a piece
        yield header.removeprefix(_BOM).removesuffix(b"\n")
        carry = b""   # the start of a record that the last block cut short
        while True:
            block = f.read(_PIECE)
            if not block:
                if carry:
                    yield carry
                return
            cut = block.rfind(b"\n") + 1
            # An odd count of quotes before the cut puts it inside a quoted field: cut earlier.
            odd = (carry.count(b'"') + _count(np.frombuffer(block, np.uint8, cut), _QUOTE)) % 2
            while cut and odd:
                earlier = block.rfind(b"\n", 0, cut - 1) + 1
                odd ^= block.count(b'"', earlier, cut) % 2
                cut = earlier
            if cut:
                yield b"".join((carry, memoryview(block)[:cut]))
                carry = block[cut:]
            elif len(carry) + len(block) > _PIECE:
                raise Fallback   # one record longer than a piece
            else:
                carry += block


def _header(line: bytes, required: tuple[str, ...]) -> list[str]:
    """The header's column names, when it is a plain line naming the required columns once each."""
    line = line.removesuffix(b"\r")
    if not line.strip() or any(c in line for c in (_QUOTE, _CR, 0)):
        raise Fallback   # no header, or one the csv module would read its own way
    try:
        header = [h.strip() for h in next(csv.reader([line.decode("utf-8")]))]
    except (UnicodeDecodeError, csv.Error, StopIteration):
        raise Fallback from None
    if len(set(header)) != len(header) or any(c not in header for c in required):
        raise Fallback
    return header


def _piece(piece: bytes, header: list[str], columns: tuple[str, ...], work: Callable):
    """``work`` over the named columns of one piece of records."""
    return work(_records(piece, header, columns)[0])


def _numbered_piece(piece: bytes, header: list[str], columns: tuple[str, ...], work: Callable,
                    first_line: int):
    """``work`` over the named columns of one piece and the line each of its records starts on,
    the piece starting on ``first_line``."""
    found, lines = _records(piece, header, columns)
    return work(found, lines + first_line)


def _records(piece: bytes, header: list[str],
             columns: tuple[str, ...]) -> tuple[dict[str, pa.Array], np.ndarray]:
    """The named columns of a piece of records as strings, when pyarrow reads them exactly as the
    row reader does: UTF-8 without NUL bytes, line breaks LF or CRLF, quotes only around whole
    fields, no field over the row reader's limit. Anything else is Fallback. With them, how many
    line breaks come before each record in the piece."""
    if not piece.isascii():
        try:
            pa.Array.from_buffers(pa.large_string(), 1, [
                None, pa.array([0, len(piece)], pa.int64()).buffers()[1], pa.py_buffer(piece),
            ]).validate(full=True)
        except pa.ArrowInvalid:
            raise Fallback from None
    if piece.find(b"\x00") >= 0:
        raise Fallback
    chars = np.frombuffer(piece, dtype=np.uint8)
    marks = _marks(chars)
    kind = chars.take(marks)
    returns = np.flatnonzero(kind == _CR)
    if len(returns) and (returns[-1] == len(marks) - 1 or not (
            (marks.take(returns + 1) == marks.take(returns) + 1)
            & (kind.take(returns + 1) == _LF)).all()):
        raise Fallback   # a carriage return that is not part of a CRLF
    is_quote, line_break = kind == _QUOTE, kind == _LF
    if is_quote.any():
        _check_quotes(chars, marks[is_quote])
        # A line break with an odd count of quotes before it is inside a quoted field.
        line_break_inside = line_break & np.logical_xor.accumulate(is_quote)
        line_break &= ~line_break_inside
        newlines_in_values = bool(line_break_inside.any())
    else:
        newlines_in_values = False
    ends = marks[line_break]
    # A record no longer than the limit holds no field longer than it (a character is a byte or
    # more); a longer one has every column read and measured.
    measure = np.diff(ends, prepend=-1, append=len(chars)).max() - 1 > MAX_FIELD_CHARS
    names = [f"c{i}" for i in range(len(header))]
    by_name = dict(zip(header, names))
    try:
        table = pacsv.read_csv(
            pa.BufferReader(piece),
            read_options=pacsv.ReadOptions(column_names=names, use_threads=False),
            parse_options=pacsv.ParseOptions(newlines_in_values=newlines_in_values),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names}, strings_can_be_null=False,
                quoted_strings_can_be_null=False, check_utf8=False,
                include_columns=names if measure else [by_name[c] for c in columns]))
    except pa.ArrowException:
        raise Fallback from None   # ragged rows...
    if measure:
        for column in table.columns:
            if len(column) and pc.max(pc.utf8_length(column)).as_py() > MAX_FIELD_CHARS:
                raise Fallback   # the row reader cuts the field and makes its row malformed
    # pyarrow and the row reader both skip empty lines (an LF, or a CRLF, alone).
    starts = np.concatenate(([0], ends + 1))
    length = np.append(ends, len(chars)) - starts
    empty = (length == 0) | ((length == 1) & (chars.take(np.minimum(starts, len(chars) - 1)) == _CR))
    starts = starts[~empty]
    if len(starts) != table.num_rows:
        raise Fallback
    lines = np.searchsorted(marks[kind == _LF], starts)
    return {c: _one_chunk(table.column(by_name[c])) for c in columns}, lines


# numpy goes over a piece a block at a time, so that its temporaries stay in the processor's
# cache: twice as fast as over the whole piece at once.

def _count(chars: np.ndarray, byte: int) -> int:
    return sum(int(np.count_nonzero(chars[start:start + _BLOCK] == byte))
               for start in range(0, len(chars), _BLOCK))


def _marks(chars: np.ndarray) -> np.ndarray:
    """Where the line breaks, carriage returns and quotes are."""
    found = [np.zeros(0, dtype=np.intp)]
    for start in range(0, len(chars), _BLOCK):
        block = chars[start:start + _BLOCK]
        found.append(np.flatnonzero((block == _LF) | (block == _CR) | (block == _QUOTE)) + start)
    return np.concatenate(found)


def _check_quotes(chars: np.ndarray, quotes: np.ndarray) -> None:
    """Fallback unless every quote opens a field, closes one, or is half of a doubled quote
    inside one. Quotes alternate opening and closing, a doubled quote being a close and an open
    side by side; the piece starts at a record boundary."""
    if len(quotes) % 2:
        raise Fallback   # the file ends inside a quoted field
    opens, closes = quotes[0::2], quotes[1::2]
    before = chars[np.maximum(opens - 1, 0)]
    opened = (opens == 0) | (before == _COMMA) | (before == _LF)
    opened[1:] |= opens[1:] - 1 == closes[:-1]
    after = chars[np.minimum(closes + 1, len(chars) - 1)]
    closed = (closes == len(chars) - 1) | (after == _COMMA) | (after == _LF) | (after == _CR)
    closed[:-1] |= closes[:-1] + 1 == opens[1:]
    if not (opened.all() and closed.all()):
        raise Fallback


def _one_chunk(column: pa.ChunkedArray) -> pa.Array:
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _stripped(column: pa.Array) -> pa.Array:
    """``str.strip()`` over a column; ASCII only, since pyarrow's idea of Unicode whitespace is
    not Python's."""
    if len(column) and not pc.all(pc.string_is_ascii(column)).as_py():
        raise Fallback
    return pc.utf8_trim(column, characters=_ASCII_WHITESPACE)


def _judged(column: pa.Array, judge: Callable[[str], object], dtype) -> np.ndarray:
    """``judge(value)`` for every row, computed once per distinct value."""
    if len(column) == 0:
        return np.zeros(0, dtype=dtype)
    encoded = pc.dictionary_encode(column)
    verdicts = np.array([judge(value) for value in encoded.dictionary.to_pylist()], dtype=dtype)
    return verdicts[encoded.indices.to_numpy()]


def _fixed_width(column: pa.Array, width: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(the rows whose value is ``width`` bytes long, the j-th byte of each of those values for
    every j below ``width``)."""
    _, offsets, data = column.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int32)[column.offset:column.offset + len(column) + 1]
    rows = np.flatnonzero(np.diff(offsets) == width)
    if len(rows) == 0:
        return rows, [np.zeros(0, dtype=np.uint8)] * width
    chars = np.frombuffer(data, dtype=np.uint8)
    if offsets[-1] - offsets[0] == width * len(rows):   # the other values are blank
        values = chars[offsets[0]:offsets[-1]].reshape(len(rows), width)
        return rows, [values[:, j] for j in range(width)]
    starts = offsets.take(rows)
    return rows, [chars.take(starts + j) for j in range(width)]


def _digits(chars: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(whether every byte given is an ASCII digit, their values), row by row."""
    values = [c - np.uint8(ord("0")) for c in chars]   # below "0" wraps round to over 9
    digits = np.ones(len(chars[0]), dtype=bool)
    for value in values:
        digits &= value <= 9
    return digits, [v.astype(np.int32) for v in values]


# --- the row reader's checks, over columns ----------------------------------------------------------

@lru_cache(maxsize=65536)   # the same few thousand dates come back in every piece
def _date_ordinal(raw: str) -> int:
    """The date's ordinal; 0 when blank, -1 when it does not parse."""
    text = raw.strip()
    if not text:
        return 0
    parsed = parse_date(text)
    return -1 if parsed is None else parsed.toordinal()


# The proleptic Gregorian calendar of ``date.toordinal``: the days before each year (1 to 9999) and
# before each month (1 to 12; 0 stands for any month that is not one) in plain and leap years.
_YEARS = np.arange(10_000, dtype=np.int64)
_LEAP = ((_YEARS % 4 == 0) & ((_YEARS % 100 != 0) | (_YEARS % 400 == 0))).astype(np.int32)
_BEFORE_YEAR = (_YEARS - 1) * 365 + (_YEARS - 1) // 4 - (_YEARS - 1) // 100 + (_YEARS - 1) // 400
_MONTH_DAYS = np.array([[0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31],
                        [0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]], dtype=np.int64)
_BEFORE_MONTH = np.cumsum(_MONTH_DAYS, axis=1) - _MONTH_DAYS


def _date_ordinals(column: pa.Array) -> np.ndarray:
    """``_date_ordinal`` for every row. A value of exactly the shape 0000-00-00 in ASCII digits is
    what ``parse_date`` reads with ``date.fromisoformat``: numpy reads it the same way (a real day
    of the years 1 to 9999, or -1); the few other non-blank values go to ``_date_ordinal``."""
    ordinal = np.zeros(len(column), dtype=np.int64)
    rows, chars = _fixed_width(column, 10)
    shaped, (y1, y2, y3, y4, m1, m2, d1, d2) = _digits([chars[j] for j in (0, 1, 2, 3, 5, 6, 8, 9)])
    shaped &= (chars[4] == ord("-")) & (chars[7] == ord("-"))
    year = np.where(shaped, ((y1 * 10 + y2) * 10 + y3) * 10 + y4, 0)
    month = m1 * 10 + m2
    month = np.where(shaped & (month <= 12), month, 0)
    day = d1 * 10 + d2
    calendar = _LEAP.take(year) * _MONTH_DAYS.shape[1] + month
    real = shaped & (year >= 1) & (day >= 1) & (day <= _MONTH_DAYS.take(calendar))
    ordinal[rows] = np.where(real, _BEFORE_YEAR.take(year) + _BEFORE_MONTH.take(calendar) + day, -1)
    other = np.diff(np.frombuffer(column.buffers()[1], dtype=np.int32)[
        column.offset:column.offset + len(column) + 1]) > 0
    other[rows[shaped]] = False
    if other.any():
        rest = np.flatnonzero(other)
        ordinal[rest] = _judged(column.take(pa.array(rest)), _date_ordinal, np.int64)
    return ordinal


def _date_problem(column: pa.Array, *, required: bool = False,
                  today: date | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(problem per row, ordinal per row: 0 blank, -1 not a date), as ``_Row.date`` sees them."""
    ordinal = _date_ordinals(column)
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


def _kind_problem(column: pa.Array, kinds: frozenset[str]) -> np.ndarray:
    return _judged(column, lambda raw: raw.strip().lower() not in kinds, np.bool_)


def _charged(columns: dict[str, pa.Array], problem: np.ndarray) -> set[str]:
    """The patient ids the problem rows of another file are charged to."""
    if not problem.any():
        return set()
    bad = columns["patient_id"].filter(pa.array(problem))
    return {pid.strip() for pid in bad.to_pylist()}


def _nothing(columns: dict[str, pa.Array]) -> tuple[set[str], None]:
    return set(), None


def _medication_checks(columns: dict[str, pa.Array]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(each row has a problem, the date ordinals of each date column)."""
    problem = _kind_problem(columns["kind"], MEDICATION_KINDS)
    ordinals = {}
    for name in ("prescribed_on", "repeat_until", "discontinued_on"):
        bad, ordinals[name] = _date_problem(columns[name], required=name == "prescribed_on")
        problem |= bad
    return problem, ordinals


def _medication_piece(columns: dict[str, pa.Array]) -> tuple[set[str], None]:
    return _charged(columns, _medication_checks(columns)[0]), None


def _allergy_checks(columns: dict[str, pa.Array]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(each row has a problem, recorded_on's date ordinal, negative's flag)."""
    problem = _kind_problem(columns["kind"], ALLERGY_KINDS)
    bad, recorded = _date_problem(columns["recorded_on"])
    negative = _judged(columns["negative"], _flag, np.int8)
    return problem | bad | (negative < 0), recorded, negative


def _allergy_piece(columns: dict[str, pa.Array]) -> tuple[set[str], None]:
    return _charged(columns, _allergy_checks(columns)[0]), None


def _consent_checks(columns: dict[str, pa.Array]) -> tuple[np.ndarray, np.ndarray]:
    """(each row has a problem, recorded_on's date ordinal)."""
    bad_code = _judged(columns["code"], lambda raw: normalise_consent_code(raw) not in CONSENT_CODES,
                       np.bool_)
    bad_date, ordinal = _date_problem(columns["recorded_on"], required=True)
    return bad_code | bad_date, ordinal


def _consent_code(raw: str) -> str:
    """The code a consent entry stands for: normalised, legacy codes mapped."""
    code = normalise_consent_code(raw)
    return LEGACY_CONSENT.get(code, code)


def _consent_piece(columns: dict[str, pa.Array]) -> tuple[set[str], tuple]:
    """The ids of consent rows with problems, and (id, date ordinal, is dissent) per row."""
    problem, ordinal = _consent_checks(columns)
    dissent = _judged(columns["code"], lambda raw: _consent_code(raw) == CONSENT_DISSENT, np.bool_)
    return _charged(columns, problem), (_stripped(columns["patient_id"]), ordinal, dissent)


def _latest(pids: pa.Array, ordinal: np.ndarray) -> np.ndarray:
    """The position of each id's latest consent entry: by recorded_on, an entry without a date
    losing to any dated one, then the later row."""
    pid_index = pc.dictionary_encode(pids).indices.to_numpy()
    order = np.lexsort((np.arange(len(pid_index)), np.maximum(ordinal, 0), pid_index))
    last = np.ones(len(order), dtype=bool)
    last[:-1] = pid_index[order][1:] != pid_index[order][:-1]
    return order[last]


def _dissenting(pieces: list[tuple]) -> pa.Array:
    """The ids whose latest consent entry is dissent."""
    pids = pa.concat_arrays([p[0] for p in pieces]) if pieces else pa.array([], pa.string())
    if len(pids) == 0:
        return pids
    dissent = np.concatenate([p[2] for p in pieces])
    latest = _latest(pids, np.concatenate([p[1] for p in pieces]))
    return pids.take(pa.array(latest[dissent[latest]]))


# The files whose rows are charged to patients, in the row reader's order (groups.csv only for its
# file-level problems).
_OTHER_FILES = (
    ("consent.csv", ("patient_id", "code", "recorded_on"), _consent_piece),
    ("medications.csv", ("patient_id", "kind", "prescribed_on", "repeat_until", "discontinued_on"),
     _medication_piece),
    ("allergies.csv", ("patient_id", "kind", "recorded_on", "negative"), _allergy_piece),
    ("groups.csv", ("patient_id",), _nothing),
)


# --- deciding ---------------------------------------------------------------------------------------

def _valid_numbers(numbers: pa.Array) -> np.ndarray:
    """Modulus 11 over a column of normalised numbers. ``is_valid`` normalises them once more,
    which can only strip whitespace left at their ends once their spaces and dashes are gone."""
    rows, chars = _fixed_width(pc.utf8_trim(numbers, characters=_ASCII_WHITESPACE), 10)
    shaped, digits = _digits(chars)
    check = 11 - sum(d * w for d, w in zip(digits, _WEIGHTS)) % 11
    check[check == 11] = 0
    valid = np.zeros(len(numbers), dtype=bool)
    valid[rows] = shaped & (check == digits[9])
    return valid


def _first_reason(reason: np.ndarray, masks: dict[str, np.ndarray]) -> None:
    """Give each row the first reason in SPEC order among the one it has and those that apply."""
    for name, mask in masks.items():
        np.minimum(reason, np.where(mask, _REASON[name], _ELIGIBLE), out=reason)


_PATIENT_COLUMNS = tuple(c for c in REQUIRED_COLUMNS["patients.csv"]
                         if c not in ("family_name", "given_name", "sex"))
_PATIENT_DATES = ("birth_date", "registered_on", "left_on", "deceased_on")


@dataclass
class _PatientRows:
    """What a piece of patients.csv says of its rows, columns of one value per row: the id
    (stripped) and whether it is blank, the normalised NHS number and whether it is valid, the
    date ordinal of each date column, each flag's truth, and the first reason among those that
    need no other row or file."""

    pids: pa.Array
    blank: np.ndarray
    numbers: pa.Array
    valid: np.ndarray
    dates: dict[str, np.ndarray]
    flags: dict[str, np.ndarray]
    reason: np.ndarray


def _patient_rows(columns: dict[str, pa.Array], policy: Policy) -> _PatientRows:
    today = policy.today
    pids = _stripped(columns["patient_id"])
    n = len(pids)
    if n and pc.any(pc.starts_with(pids, _BLANK_ID_PREFIX)).as_py():
        raise Fallback
    blank = pc.equal(pids, "").to_numpy(zero_copy_only=False)
    malformed = blank.copy()
    dates = {}
    for name in _PATIENT_DATES:
        problem, dates[name] = _date_problem(columns[name], required=name == "birth_date",
                                             today=today)
        malformed |= problem
    flags = {}
    for name in ("fp69", "sensitive", "pds_synchronised", "has_national_summary"):
        value = _judged(columns[name], _flag, np.int8)
        malformed |= value < 0
        flags[name] = value == 1
    numbers = pc.replace_substring(pc.replace_substring(
        _stripped(columns["nhs_number"]), " ", ""), "-", "")
    valid = _valid_numbers(numbers)
    permanent = _judged(columns["registration_type"], lambda raw: raw.strip().lower() == "permanent",
                        np.bool_)
    days, registered = policy.update_existing_after_days, dates["registered_on"]
    may_update = np.zeros(n, dtype=bool) if days is None else (
        (registered > 0) & (registered + days < today.toordinal()))
    reason = np.full(n, _ELIGIBLE, dtype=np.int8)
    _first_reason(reason, {
        "malformed_record": malformed,
        "no_nhs_number": pc.equal(numbers, "").to_numpy(zero_copy_only=False),
        "invalid_nhs_number": ~valid,
        "not_permanent": ~permanent,
        "left_practice": dates["left_on"] != 0,
        "deceased": dates["deceased_on"] != 0,
        "fp69": flags["fp69"],
        "sensitive": flags["sensitive"],
        "not_pds_synchronised": ~flags["pds_synchronised"],
        "existing_summary": flags["has_national_summary"] & ~may_update,
    })
    return _PatientRows(pids, blank, numbers, valid, dates, flags, reason)


def _patient_piece(columns: dict[str, pa.Array], policy: Policy) -> tuple:
    """Each row's first reason among those that need no other row or file, with what the rest
    need: (id, normalised number, number is valid, id is blank, reason)."""
    rows = _patient_rows(columns, policy)
    return rows.pids, rows.numbers, rows.valid, rows.blank, rows.reason


def _counts(index: np.ndarray) -> np.ndarray:
    """How many rows share each row's value (given as an index into the distinct values)."""
    return np.bincount(index)[index] if len(index) else np.zeros(0, dtype=np.int64)


def _duplicates(pieces: list[tuple]) -> tuple[pa.Array, np.ndarray]:
    """(every patient id, whether the row shares its id or its valid number with another row)."""
    if not pieces:
        return pa.array([], pa.string()), np.zeros(0, dtype=bool)
    pids, numbers = (pa.concat_arrays([p[i] for p in pieces]) for i in (0, 1))
    valid, blank = (np.concatenate([p[i] for p in pieces]) for i in (2, 3))
    # Rows with a blank id are each their own patient in the row reader (never duplicates).
    duplicate = (_counts(pc.dictionary_encode(pids).indices.to_numpy()) > 1) & ~blank
    if valid.any():
        duplicate[valid] |= _counts(pc.dictionary_encode(numbers.filter(pa.array(valid)))
                                    .indices.to_numpy()) > 1
    return pids, duplicate


def _summary(pieces: list[tuple], pids: pa.Array, duplicate: np.ndarray, charged: set[str],
             dissenting: pa.Array, policy: Policy) -> dict:
    """``summarise``'s figures, once the reasons that need the whole extract are put in."""
    reason = np.concatenate([p[4] for p in pieces]) if pieces else np.zeros(0, dtype=np.int8)
    charged_rows = np.zeros(len(pids), dtype=bool)
    if charged:
        charged_rows = pc.is_in(pids, value_set=pa.array(sorted(charged), pa.string())).to_numpy(
            zero_copy_only=False)
    dissent = np.zeros(len(pids), dtype=bool)
    if policy.dissent == "exclude" and len(dissenting):
        dissent = pc.is_in(pids, value_set=dissenting).to_numpy(zero_copy_only=False)
    _first_reason(reason, {"malformed_record": charged_rows, "duplicate_record": duplicate,
                           "dissent": dissent})
    by_reason = np.bincount(reason, minlength=_ELIGIBLE + 1)
    return {
        "total": len(pids),
        "eligible": int(by_reason[_ELIGIBLE]),
        "not_required_by_reason": {r: int(by_reason[i]) for i, r in enumerate(NOT_REQUIRED_REASONS)},
    }


# --- the extract index ------------------------------------------------------------------------------
# A job's index (``prepared.build``) holds every row's values as the row reader parses them. Here
# they are read by columns and written in bulk; a row with a problem keeps its parsed values, but
# its problems are told only by the row reader (nothing reads them from the index: such a row is
# never sent).

_ROW_PROBLEM = json.dumps(["this row has a problem: the row reader (scr-nb's load_practice) "
                           "names it"])
_REASON_NAMES = [*NOT_REQUIRED_REASONS, None]


def fill_index(root: Path, policy: Policy, writer: IndexWriter) -> date | None:
    """Write every row of the extract into ``writer`` exactly as ``prepared``'s row-at-a-time
    build does (but for the words of a broken row's problems), and return the earliest day after
    today on which a decision would change (``prepared._Turns``). Fallback for anything only the
    row reader reads exactly; the writer then holds part of the extract."""
    pool = ThreadPoolExecutor(_WORKERS)
    try:
        charged: set[str] = set()
        consent = []
        groups: dict[str, dict[str, None]] = {}   # as ``load_groups`` reads them
        for name, (charges, rows) in _in_order(pool, _tasks(root, _INDEXED_FILES, numbered=True)):
            charged |= charges
            if name == "consent.csv":
                consent.append(rows)
            elif name == "groups.csv":
                for group, pid in _rows(rows):
                    if group and pid:
                        groups.setdefault(group, {})[pid] = None
            else:
                writer.insert(name.removesuffix(".csv"), _rows(rows))
        writer.add_groups({group: list(members) for group, members in groups.items()})
        work = partial(_indexed_patients, policy=policy, charged=pa.array(sorted(charged), pa.string()),
                       latest=_latest_entries(consent))
        turn = None
        for _, (day, rows) in _in_order(pool, _tasks(
                root, (("patients.csv", REQUIRED_COLUMNS["patients.csv"], work),), numbered=True)):
            writer.insert("patients", _rows(rows))
            if day is not None and (turn is None or day < turn):
                turn = day
        return date.fromordinal(turn) if turn is not None else None
    finally:
        pool.shutdown(cancel_futures=True)


def _rows(columns: list[pa.Array | np.ndarray]) -> Iterator[tuple]:
    """Rows of Python values from columns. Made here, in the thread that writes them, rather than
    in the workers: a worker holding the GIL in Python code would hold up the writer, which lets
    go of it for every row."""
    return zip(*(c.to_pylist() if isinstance(c, pa.Array) else c.tolist() for c in columns))


def _trimmed(column: pa.Array) -> pa.Array:
    """``str.strip()`` of every value."""
    if len(column) and not pc.all(pc.string_is_ascii(column)).as_py():
        return pa.array([value.strip() for value in column.to_pylist()], pa.string())
    return pc.utf8_trim(column, characters=_ASCII_WHITESPACE)


def _mapped(column: pa.Array, judge: Callable[[str], str]) -> pa.Array:
    """``judge(value)`` of every value, computed once per distinct value."""
    encoded = pc.dictionary_encode(column)
    verdicts = pa.array([judge(value) for value in encoded.dictionary.to_pylist()], pa.string())
    return verdicts.take(encoded.indices)


def _lower(raw: str) -> str:
    return raw.strip().lower()


# --- the index's JSON ``data`` built by pyarrow: each value as ``json.dumps`` would write it.

def _json_strings(column: pa.Array) -> pa.Array:
    """Each value as a JSON string; a null as null. numpy finds which bytes need escaping (a
    backslash, a quote, a control character) so that pyarrow replaces only those."""
    data = column.buffers()[2]
    chars = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    special = set(np.unique(chars[(chars < 32) | (chars == _QUOTE) | (chars == _BACKSLASH)]).tolist())
    if _BACKSLASH in special:   # first, so that the backslashes put in below stay single
        column = pc.replace_substring(column, "\\", "\\\\")
    if _QUOTE in special:
        column = pc.replace_substring(column, '"', '\\"')
    for code in sorted(special - {_BACKSLASH, _QUOTE}):
        column = pc.replace_substring(column, chr(code), f"\\u{code:04x}")
    return pc.fill_null(pc.binary_join_element_wise('"', column, '"', ""), "null")


def _json_dates(ordinal: np.ndarray) -> pa.Array:
    """The ISO date of each ordinal as a JSON string: what the index keeps of a parsed date; null
    for a blank (0) or a value that is not a date (-1)."""
    days, index = np.unique(ordinal, return_inverse=True)
    text = [json.dumps(date.fromordinal(day).isoformat() if day > 0 else None)
            for day in days.tolist()]
    return pa.array(text, pa.string()).take(pa.array(index.reshape(-1)))


def _json_choice(mask: np.ndarray, no: str, yes: str) -> pa.Array:
    """``yes`` where the mask holds, else ``no`` (JSON texts)."""
    return pa.array([no, yes], pa.string()).take(pa.array(mask.astype(np.int8)))


def _json_arrays(values: list[pa.Array]) -> pa.Array:
    """Row by row, the JSON array of the values given (each already JSON)."""
    return pc.binary_join_element_wise("[", pc.binary_join_element_wise(*values, ","), "]", "")


def _json_lines(lines: np.ndarray) -> pa.Array:
    return pa.array(lines).cast(pa.string())


def _runs(pids: pa.Array, lines: np.ndarray, records: pa.Array) -> list:
    """(id, first line, JSON array of the records) per run of records of one patient in a row:
    an extract lists a patient's medications together, so a few index rows hold them all."""
    if len(pids) == 0:
        return [pids, lines, records]
    changed = pc.not_equal(pids.slice(1), pids.slice(0, len(pids) - 1)).to_numpy(
        zero_copy_only=False)
    starts = np.flatnonzero(np.concatenate(([True], changed)))
    runs = pa.ListArray.from_arrays(pa.array(np.append(starts, len(pids)), pa.int32()), records)
    data = pc.binary_join_element_wise("[", pc.binary_join(runs, ","), "]", "")
    return [pids.take(pa.array(starts)), lines[starts], data]


def _indexed_medications(columns: dict[str, pa.Array], lines: np.ndarray) -> tuple[set[str], list]:
    """The ids charged with a problem, and the rows of the index's medications table."""
    problem, dates = _medication_checks(columns)
    records = _json_arrays([
        _json_lines(lines), _json_strings(_trimmed(columns["medication_id"])),
        _json_strings(_mapped(columns["kind"], _lower)),
        _json_strings(_trimmed(columns["dmd_code"])),
        *(_json_strings(columns[name]) for name in ("drug", "dosage", "quantity")),
        *(_json_dates(dates[name]) for name in ("prescribed_on", "repeat_until", "discontinued_on")),
    ])
    return _charged(columns, problem), _runs(_trimmed(columns["patient_id"]), lines, records)


def _indexed_allergies(columns: dict[str, pa.Array], lines: np.ndarray) -> tuple[set[str], list]:
    """The ids charged with a problem, and the rows of the index's allergies table."""
    problem, recorded, negative = _allergy_checks(columns)
    records = _json_arrays([
        _json_lines(lines), _json_strings(_trimmed(columns["allergy_id"])),
        _json_strings(_mapped(columns["kind"], _lower)),
        _json_strings(_trimmed(columns["snomed_code"])),
        _json_strings(columns["description"]),
        _json_dates(recorded),
        _json_choice(negative == 1, "0", "1"),
    ])
    return _charged(columns, problem), _runs(_trimmed(columns["patient_id"]), lines, records)


def _indexed_consent(columns: dict[str, pa.Array], lines: np.ndarray) -> tuple[set[str], tuple]:
    """The ids charged with a problem, and (id, date ordinal, code) per row."""
    problem, ordinal = _consent_checks(columns)
    codes = _mapped(columns["code"], _consent_code)
    return _charged(columns, problem), (_stripped(columns["patient_id"]), ordinal, codes)


def _indexed_groups(columns: dict[str, pa.Array], lines: np.ndarray) -> tuple[set[str], list]:
    """(group name, patient id) columns."""
    return set(), [_trimmed(columns["group_name"]), _trimmed(columns["patient_id"])]


def _latest_entries(pieces: list[tuple]) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """(ids, the code of each one's latest consent entry, that entry's date ordinal)."""
    if not pieces:
        return pa.array([], pa.string()), pa.array([], pa.string()), np.zeros(0, dtype=np.int64)
    pids = pa.concat_arrays([p[0] for p in pieces])
    ordinal = np.concatenate([p[1] for p in pieces])
    latest = _latest(pids, ordinal) if len(pids) else np.zeros(0, dtype=np.int64)
    codes = pa.concat_arrays([p[2] for p in pieces]).take(pa.array(latest))
    return pids.take(pa.array(latest)), codes, ordinal[latest]


def _indexed_patients(columns: dict[str, pa.Array], lines: np.ndarray, policy: Policy,
                      charged: pa.Array, latest: tuple) -> tuple[int | None, list]:
    """(the earliest ordinal after today on which a decision of these rows would change, the rows
    of the index's patients table)."""
    rows = _patient_rows(columns, policy)
    reason, n = rows.reason, len(rows.pids)
    if len(charged):
        _first_reason(reason, {"malformed_record": pc.is_in(rows.pids, value_set=charged)
                               .to_numpy(zero_copy_only=False)})
    latest_pids, latest_codes, latest_on = latest
    entry = pc.index_in(rows.pids, value_set=latest_pids).fill_null(-1).to_numpy(
        zero_copy_only=False).astype(np.int64)
    entry[rows.blank] = -1   # a blank id is read as "(blank id, line N)": nobody's consent
    has_entry = entry >= 0
    codes = latest_codes.take(pa.array(entry, mask=~has_entry))
    consent_on = np.zeros(n, dtype=np.int64)
    consent_on[has_entry] = latest_on[entry[has_entry]]
    pids = rows.pids
    if rows.blank.any():
        pids = pc.replace_with_mask(pids, pa.array(rows.blank), pa.array(
            [f"{_BLANK_ID_PREFIX} {line})" for line in lines[rows.blank].tolist()], pa.string()))
    data = _json_arrays([
        _json_strings(columns["family_name"]), _json_strings(columns["given_name"]),
        _json_dates(rows.dates["birth_date"]), _json_strings(_trimmed(columns["sex"])),
        _json_strings(_mapped(columns["registration_type"], _lower)),
        *(_json_dates(rows.dates[name]) for name in _PATIENT_DATES[1:]),
        *(_json_choice(rows.flags[name], "0", "1")
          for name in ("fp69", "sensitive", "pds_synchronised", "has_national_summary")),
        _json_choice(reason == _REASON["malformed_record"], "[]", _ROW_PROBLEM),
        _json_dates(consent_on),
    ])
    reasons = pa.array(_REASON_NAMES, pa.string()).take(pa.array(reason))
    return _turn(rows, policy), [lines, pids, rows.numbers, rows.valid.astype(np.int8), reasons,
                                 codes, data]


def _turn(rows: _PatientRows, policy: Policy) -> int | None:
    """``prepared._Turns`` over a piece: the earliest date after today in a date column, or day on
    which a national summary becomes old enough to update."""
    today = policy.today.toordinal()
    days = [dates[dates > today] for dates in rows.dates.values()]
    if policy.update_existing_after_days is not None:
        registered = rows.dates["registered_on"]
        updatable = registered[rows.flags["has_national_summary"] & (registered > 0)] + (
            policy.update_existing_after_days + 1)
        if len(updatable) and (updatable.max() > date.max.toordinal() or updatable.min() < 1):
            raise Fallback   # the row reader's date arithmetic overflows: its error is the answer
        days.append(updatable[updatable > today])
    later = np.concatenate(days)
    return int(later.min()) if len(later) else None


# The files read before patients.csv, in the row reader's order, with the index's work on each.
_INDEXED_FILES = (
    ("consent.csv", REQUIRED_COLUMNS["consent.csv"], _indexed_consent),
    ("medications.csv", REQUIRED_COLUMNS["medications.csv"], _indexed_medications),
    ("allergies.csv", REQUIRED_COLUMNS["allergies.csv"], _indexed_allergies),
    ("groups.csv", REQUIRED_COLUMNS["groups.csv"], _indexed_groups),
)
