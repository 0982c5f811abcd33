"""The columnar dry run (issue 11) gives exactly the row reader's answers: the same counts per reason,
the same ExtractError for a broken file. The row-at-a-time reader is the oracle."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from datetime import date, timedelta
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scr_nb.errors import ExtractError
from scr_nb.extract import columnar
from scr_nb.extract.columnar import dry_run
from scr_nb.extract.eligibility import Policy, decide, summarise
from scr_nb.extract.nhs_number import is_valid, normalise
from scr_nb.extract.reader import REQUIRED_COLUMNS, load_practice
from scr_nb.sim.synth import write_practice
from scr_nb.ui import cli
from tests.handmade import ago, edge_case_practice, nhs, patient, write

TODAY = date(2026, 6, 15)
POLICIES = (
    Policy(today=TODAY),
    Policy(today=TODAY, dissent="blank"),
    Policy(today=TODAY, update_existing_after_days=365),
)


def oracle(directory: Path, policy: Policy) -> dict:
    return summarise(decide(load_practice(directory, today=policy.today), policy))


def fast(directory: Path, policy: Policy) -> dict:
    """The columnar path itself, refusing the fallback (so a test knows it was the one checked)."""
    return columnar._dry_run(Path(directory), policy)


@pytest.mark.parametrize("patients,seed", [(0, 1), (1, 2), (400, 3), (3000, 4), (6000, 5)])
def test_synthetic_practices_agree_with_the_row_reader(tmp_path, patients, seed):
    directory = tmp_path / "p"
    write_practice(directory, patients, seed, today=TODAY)
    for policy in POLICIES:
        expected = oracle(directory, policy)
        assert fast(directory, policy) == expected
    assert dry_run(directory, policy) == expected   # the public entry, with the last policy


def test_pieces_cut_at_record_boundaries_agree_with_the_row_reader(tmp_path, monkeypatch):
    """Files are cut into pieces read on several threads; a piece never ends inside a quoted field,
    and a broken row in a late piece sends the whole extract to the row reader."""
    directory = tmp_path / "p"
    write_practice(directory, 1500, 8, today=TODAY)
    medications = directory / "medications.csv"
    assert b'"' in medications.read_bytes()
    monkeypatch.setattr(columnar, "_PIECE", 4096)
    pieces = list(columnar._pieces(medications))[1:]
    assert len(pieces) > 50 and all(p.count(b'"') % 2 == 0 for p in pieces)
    assert any(b'\n' in field for p in pieces for field in re.findall(rb'"[^"]*"', p))
    for policy in POLICIES:
        assert fast(directory, policy) == oracle(directory, policy)
    medications.write_bytes(medications.read_bytes() + b"P9,M9,acute\r\n")   # a short row
    with pytest.raises(columnar.Fallback):
        fast(directory, POLICIES[0])
    assert dry_run(directory, POLICIES[0]) == oracle(directory, POLICIES[0])


def test_dates_read_by_numpy_are_the_row_readers():
    """Every month and day from 00 to 13 and 32 in years around the calendar's edges, and values of
    other shapes, read as ``parse_date`` reads them; contiguous and gathered values alike."""
    years = ["0000", "0001", "0004", "0100", "0400", "1582", "1899", "1900", "2000", "2023",
             "2024", "2100", "9999"]
    values = [f"{y}-{m:02d}-{d:02d}" for y in years for m in range(14) for d in range(33)]
    odd = ["", " ", "2020-1-01", " 2020-01-01", "2020-01-01 ", "2020/01/01", "2020-01-0a",
           "\u0662\u0660\u0662\u0660-01-01", "20200101", "2020-01-011", "+020-01-01", "2020-W01-1"]
    for sample in (values + [""] * 50, values + odd, odd):
        for column in (pa.array(sample), pa.array(["x"] * 7 + sample).slice(7)):
            expected = [columnar._date_ordinal(v) for v in sample]
            assert columnar._date_ordinals(column).tolist() == expected


_NUMBER_TEXT = st.one_of(
    st.text(alphabet="0123456789 -\tx", max_size=14),
    st.builds(lambda number, pads: pads[0] + number[:3] + pads[1] + number[3:] + pads[2],
              st.integers(1, 5000).map(nhs), st.lists(st.sampled_from(["", " ", "-", "\t", "- \t"]),
                                                      min_size=3, max_size=3)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_NUMBER_TEXT, max_size=30))
def test_numbers_checked_by_numpy_are_is_valid(raws):
    """Modulus 11 over columns says what ``is_valid`` says of each normalised number."""
    normalised = [normalise(r) for r in raws]
    got = columnar._valid_numbers(pa.array(normalised, pa.string()))
    assert got.tolist() == [is_valid(n) for n in normalised]


def test_edge_case_practice_agrees_with_the_row_reader(tmp_path):
    directory = edge_case_practice(tmp_path / "p", TODAY)
    for policy in POLICIES:
        assert dry_run(directory, policy) == oracle(directory, policy)


def test_each_reason_and_the_consent_rules_agree(tmp_path):
    rows = [
        patient("OK", 1),
        patient("MAL", 2, birth_date="", fp69="true"),
        patient("DUP", 3), patient("DUP", 4),
        patient("NUM1", 5), patient("NUM2", 6, nhs_number=nhs(5)),
        patient("SPACED", 40, nhs_number=" " + nhs(40)[:3] + " " + nhs(40)[3:6] + "-" + nhs(40)[6:]),
        patient("NONE", 7, nhs_number=""),
        patient("BAD", 8, nhs_number=nhs(8)[:9] + str((int(nhs(8)[9]) + 1) % 10)),
        patient("TEMP", 9, registration_type="Temporary"),
        patient("LEFT", 11, left_on=ago(TODAY, 10)),
        patient("DEAD", 12, deceased_on=ago(TODAY, 5)),
        patient("FP69", 13, fp69=" TRUE "), patient("SENS", 14, sensitive="yes"),
        patient("PDS", 15, pds_synchronised="0"),
        patient("HAS", 16, has_national_summary="true", registered_on=ago(TODAY, 400)),
        patient("HAS2", 17, has_national_summary="true", registered_on=ago(TODAY, 10)),
        patient("DISS", 18), patient("CONS", 19), patient("LEG", 20), patient("UNDATED", 21),
        patient("BADCODE", 22), patient("BADMED", 23), patient("BADALLERGY", 24),
        patient("FLAG", 25, fp69="maybe"), patient("", 26),
        patient("OLD", 27, birth_date="1899-12-31"), patient("FUTURE", 28, left_on=ago(TODAY, -1)),
        patient("FEB30", 29, registered_on="2021-02-30"),
    ]
    consent = [
        {"patient_id": "DISS", "code": "9Ndl", "recorded_on": "2019-01-01"},
        {"patient_id": "DISS", "code": "9Ndo.00", "recorded_on": "2020-01-01"},
        {"patient_id": "CONS", "code": "9Ndo.", "recorded_on": "2021-01-01"},
        {"patient_id": "CONS", "code": "9Ndn", "recorded_on": "2021-01-01"},
        {"patient_id": "LEG", "code": " 93C3.00 ", "recorded_on": "2021-01-01"},
        {"patient_id": "UNDATED", "code": "9Ndo", "recorded_on": "2021-01-01"},
        {"patient_id": "UNDATED", "code": "9Ndl", "recorded_on": ""},
        {"patient_id": "BADCODE", "code": "XYZ", "recorded_on": "2021-01-01"},
    ]
    medications = [{"patient_id": "BADMED", "medication_id": "M1", "kind": "sometimes",
                    "prescribed_on": "2021-01-01"}]
    allergies = [{"patient_id": " BADALLERGY", "allergy_id": "A1", "kind": "allergy",
                  "recorded_on": "2021-13-01", "negative": "false"}]
    directory = write(tmp_path / "p", rows, consent, medications, allergies)
    for policy in POLICIES:
        got = fast(directory, policy)
        assert got == oracle(directory, policy)
    counts = fast(directory, POLICIES[0])["not_required_by_reason"]
    assert counts["malformed_record"] == 10 and counts["duplicate_record"] == 4
    assert counts["dissent"] == 2 and counts["existing_summary"] == 2


def test_awkward_files_fall_back_to_the_same_answers(tmp_path):
    """CRLF or LF, a BOM, a quoted line break and a record longer than any field may be are read
    fast; a blank line, a ragged row, a huge field, a stray quote go to the row reader. Either way
    the counts are the oracle's."""
    rows = [patient("A", 1), patient("B", 2, family_name='Smith, "Jr"'), patient("C", 3)]
    base = write(tmp_path / "base", rows, bom=True)

    def variant(name: str, edit) -> Path:
        directory = tmp_path / name
        shutil.copytree(base, directory)
        path = directory / "patients.csv"
        path.write_bytes(edit(path.read_bytes()))
        return directory

    for name, edit in {
        "crlf": lambda b: b,   # the handmade files are CRLF
        "lf": lambda b: b.replace(b"\r\n", b"\n"),
        "quoted_newline": lambda b: b.replace(b'Jr""', b'Jr""\n', 1),
        "long_record": lambda b: b.replace(b"Smith", b"S" * 6_000, 1).replace(b"Jo", b"J" * 6_000, 1),
    }.items():
        directory = variant(name, edit)
        for policy in POLICIES:
            assert fast(directory, policy) == oracle(directory, policy), name
    for name, edit in {
        "blank_line": lambda b: b.replace(b"\nB,", b"\n   \r\nB,"),
        "ragged": lambda b: b.replace(b"\nC,", b"\nC,extra,", 1),
        "short": lambda b: b.rstrip(b"\r\n").rsplit(b",", 3)[0] + b"\r\n",
        "bare_cr": lambda b: b.replace(b"\r\nC,", b"\rC,", 1),
        "huge": lambda b: b.replace(b"Smith", b"S" * 10_001, 1),
        "stray_quote": lambda b: b.replace(b"Jo", b'J"o', 1),
        "huge_over_lines": lambda b: b.replace(b'Jr""', b'Jr""' + (b"x" * 99 + b"\n") * 110, 1),
    }.items():
        directory = variant(name, edit)
        with pytest.raises(columnar.Fallback):
            fast(directory, POLICIES[0])
        for policy in POLICIES:
            assert dry_run(directory, policy) == oracle(directory, policy), name


def error_of(call) -> tuple:
    with pytest.raises(ExtractError) as caught:
        call()
    err = caught.value
    return str(err), err.path, err.line, err.column


@pytest.mark.parametrize("breakage", [
    "missing_file", "missing_column", "not_utf8", "nul_byte", "no_header", "bad_quotes",
    "not_a_directory", "bad_practice_json", "broken_groups",
])
def test_file_level_problems_raise_the_row_readers_error(tmp_path, breakage):
    directory = write(tmp_path / "p", [patient("A", 1)],
                      consent=[{"patient_id": "A", "code": "9Ndl", "recorded_on": "2020-01-01"}])
    if breakage == "missing_file":
        (directory / "allergies.csv").unlink()
    elif breakage == "missing_column":
        text = (directory / "patients.csv").read_text()
        (directory / "patients.csv").write_text(text.replace("fp69", "fp_69", 1))
    elif breakage == "not_utf8":
        (directory / "consent.csv").write_bytes(b"patient_id,code,recorded_on\nA,9Ndl\xff,2020-01-01\n")
    elif breakage == "nul_byte":
        (directory / "medications.csv").write_bytes(
            (directory / "medications.csv").read_bytes() + b"A,M1,acute\x00\n")
    elif breakage == "no_header":
        (directory / "consent.csv").write_bytes(b"\nA,9Ndl,2020-01-01\n")
    elif breakage == "bad_quotes":
        (directory / "consent.csv").write_bytes(b'patient_id,code,recorded_on\n"A"x,9Ndl,2020-01-01\n')
    elif breakage == "not_a_directory":
        directory = directory / "patients.csv"
    elif breakage == "bad_practice_json":
        (directory / "practice.json").write_text('{"ods_code": "not valid!"}')
    elif breakage == "broken_groups":
        (directory / "groups.csv").write_text("group_name\nx\n")
    policy = POLICIES[0]
    assert error_of(lambda: dry_run(directory, policy)) == error_of(lambda: oracle(directory, policy))


# --- hostile extracts, generated --------------------------------------------------------------------

def _date_text():
    def shift(days: int) -> str:
        return (TODAY + timedelta(days=days)).isoformat()
    return st.one_of(
        st.integers(-40_000, -1).map(shift),                     # valid, past (some before 1900)
        st.integers(0, 400).map(shift),                          # today and the future
        st.sampled_from(["", "  ", "1899-12-31", "1900-01-01", "2021-02-29", "2020-02-29",
                         "2021-13-01", "20210101", "2021-1-1", " 2020-05-05 ", "0000-01-01",
                         "not a date", "2020-05-05x"]),
    )


_IDS = st.sampled_from(["P1", "P2", "P3", "P4", "P5", " P1", "P1 ", "", "p1", "P,6", 'P"7'])
_NUMBERS = st.one_of(
    st.integers(1, 6).map(nhs),
    st.integers(1, 6).map(lambda s: nhs(s)[:3] + " " + nhs(s)[3:6] + "-" + nhs(s)[6:]),
    st.sampled_from(["", " ", "123", "9990000009", "99900000AB", "-", " 9990000018 "]),
)
_FLAGS = st.sampled_from(["true", "false", "", "TRUE", " yes ", "0", "1", "maybe", "F"])
_CODES = st.sampled_from(["9Ndl", "9Ndm", "9Ndn", "9Ndo", "93C2", "93C3", "9Ndo.00", "9Ndo.",
                          " 93C3.00 ", "93C2.", "9NDO", "", "XYZ", "9Ndo,x"])
_TEXT = st.sampled_from(["Smith", "O'Brien, Jr", "a \"quoted\" word", "", "é", ",", "x" * 50])


@st.composite
def hostile_extract(draw) -> dict[str, list[dict]]:
    patients = draw(st.lists(st.fixed_dictionaries({
        "patient_id": _IDS, "nhs_number": _NUMBERS, "family_name": _TEXT, "given_name": _TEXT,
        "birth_date": _date_text(), "sex": st.sampled_from(["M", "F", "U", ""]),
        "registration_type": st.sampled_from(["permanent", "Permanent ", "applied", "temporary", ""]),
        "registered_on": _date_text(),
        "left_on": st.one_of(st.just(""), _date_text()),
        "deceased_on": st.one_of(st.just(""), _date_text()),
        "fp69": _FLAGS, "sensitive": _FLAGS, "pds_synchronised": _FLAGS,
        "has_national_summary": _FLAGS,
    }), max_size=12))
    consent = draw(st.lists(st.fixed_dictionaries({
        "patient_id": _IDS, "code": _CODES, "recorded_on": _date_text()}), max_size=10))
    medications = draw(st.lists(st.fixed_dictionaries({
        "patient_id": _IDS, "medication_id": st.just("M"), "kind": st.sampled_from(
            ["acute", "repeat", "Repeat", "", "other"]),
        "drug": _TEXT, "dosage": _TEXT, "prescribed_on": _date_text(),
        "repeat_until": st.one_of(st.just(""), _date_text()),
        "discontinued_on": st.one_of(st.just(""), _date_text()),
    }), max_size=6))
    allergies = draw(st.lists(st.fixed_dictionaries({
        "patient_id": _IDS, "allergy_id": st.just("A"),
        "kind": st.sampled_from(["allergy", "intolerance", "adverse_reaction", "food"]),
        "description": _TEXT, "recorded_on": st.one_of(st.just(""), _date_text()),
        "negative": _FLAGS,
    }), max_size=6))
    return {"patients.csv": patients, "consent.csv": consent, "medications.csv": medications,
            "allergies.csv": allergies}


def write_extract(directory: Path, files: dict[str, list[dict]], crlf: bool) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(REQUIRED_COLUMNS[name]), restval="",
                                lineterminator="\r\n" if crlf else "\n")
        writer.writeheader()
        writer.writerows(rows)
        (directory / name).write_bytes(out.getvalue().encode("utf-8"))
    return directory


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=hostile_extract(), crlf=st.booleans(), dissent=st.sampled_from(["exclude", "blank"]),
       update_after=st.sampled_from([None, 0, 365]), piece=st.sampled_from([512, 1 << 23]))
def test_hostile_extracts_agree_with_the_row_reader(tmp_path_factory, files, crlf, dissent,
                                                    update_after, piece):
    """Small pieces put a patient's rows, duplicates and consent entries in different pieces."""
    directory = write_extract(tmp_path_factory.mktemp("hostile"), files, crlf)
    policy = Policy(today=TODAY, dissent=dissent, update_existing_after_days=update_after)
    expected = oracle(directory, policy)
    with mock.patch.object(columnar, "_PIECE", piece):
        assert fast(directory, policy) == expected
        assert dry_run(directory, policy) == expected


def test_the_eligibility_command_prints_the_oracles_figures(tmp_path, capsys):
    directory = tmp_path / "p"
    write_practice(directory, 500, 7)
    today = date.today()
    assert cli.main(["eligibility", "--practice", str(directory), "--json", "--dissent", "blank"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == oracle(directory, Policy(today=today, dissent="blank"))
    assert set(printed) == {"total", "eligible", "not_required_by_reason"}
    (directory / "consent.csv").write_text("patient_id,recorded_on\n")
    assert cli.main(["eligibility", "--practice", str(directory), "--json"]) == cli.EXIT_REFUSED
    err = capsys.readouterr().err
    assert "consent.csv" in err and "column 'code'" in err


_JUNK = st.sampled_from([b'"', b'""', b",", b"\n", b"\r", b"\r\n", b" ", b"x", b"\xc3\xa9", b"\xff",
                         b"\x00", b'"\n"', b'",', b'\t', b"\xef\xbb\xbf"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=hostile_extract(), crlf=st.booleans(),
       name=st.sampled_from(["patients.csv", "consent.csv", "medications.csv", "allergies.csv"]),
       edits=st.lists(st.tuples(st.floats(0, 1), _JUNK), min_size=1, max_size=3),
       piece=st.sampled_from([64, 512, 1 << 23]))
def test_damaged_bytes_never_give_other_answers(tmp_path_factory, files, crlf, name, edits, piece):
    """Stray quotes, bare carriage returns, NUL and broken UTF-8 anywhere in a file: the fast path
    gives the row reader's counts or hands over to it, and never counts what the row reader
    refuses to read."""
    directory = write_extract(tmp_path_factory.mktemp("damaged"), files, crlf)
    path = directory / name
    data = path.read_bytes()
    for where, junk in edits:
        cut = int(where * len(data))
        data = data[:cut] + junk + data[cut:]
    path.write_bytes(data)
    policy = Policy(today=TODAY)
    with mock.patch.object(columnar, "_PIECE", piece):
        try:
            expected = oracle(directory, policy)
        except ExtractError:
            assert error_of(lambda: dry_run(directory, policy)) == error_of(
                lambda: oracle(directory, policy))
            with pytest.raises(columnar.Fallback):
                fast(directory, policy)
            return
        assert dry_run(directory, policy) == expected
        try:
            assert fast(directory, policy) == expected
        except columnar.Fallback:
            pass
