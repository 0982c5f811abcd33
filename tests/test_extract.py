"""Reading practice extracts: file-level errors name file, line and column; rows are never lost."""

from __future__ import annotations

import pytest

from scr_nb.errors import ExtractError
from scr_nb.extract.reader import load_practice
from tests.handmade import nhs, patient, write


def test_quoted_commas_newlines_and_a_byte_order_mark(tmp_path, today):
    d = write(tmp_path / "p", [patient("P1", 1, family_name="O'Brien, \"Junior\"\nthe second")],
              medications=[{"patient_id": "P1", "medication_id": "M1", "kind": "acute",
                            "drug": "Co-codamol 30mg/500mg, tablets", "prescribed_on": "2026-01-02"}],
              bom=True)
    practice = load_practice(d, today=today)
    [p] = practice.patients
    assert p.patient_id == "P1"
    assert p.family_name == "O'Brien, \"Junior\"\nthe second"
    assert practice.medications["P1"][0].drug == "Co-codamol 30mg/500mg, tablets"
    assert p.problems == ()


def test_missing_file_is_named(tmp_path, today):
    d = write(tmp_path / "p", [patient("P1", 1)])
    (d / "consent.csv").unlink()
    with pytest.raises(ExtractError) as caught:
        load_practice(d, today=today)
    assert "consent.csv" in str(caught.value) and "missing" in str(caught.value)


def test_groups_file_is_optional(tmp_path, today):
    d = write(tmp_path / "p", [patient("P1", 1)])
    (d / "groups.csv").unlink()
    assert load_practice(d, today=today).groups == {}


def test_missing_required_column_names_file_line_and_column(tmp_path, today):
    d = write(tmp_path / "p", [patient("P1", 1)])
    text = (d / "patients.csv").read_text().replace("birth_date", "dob")
    (d / "patients.csv").write_text(text)
    with pytest.raises(ExtractError) as caught:
        load_practice(d, today=today)
    err = caught.value
    assert err.path.endswith("patients.csv") and err.line == 1 and err.column == "birth_date"
    assert "patients.csv, line 1, column 'birth_date'" in str(err)


def test_not_utf8_names_the_line(tmp_path, today):
    d = write(tmp_path / "p", [patient("P1", 1), patient("P2", 2)])
    raw = (d / "patients.csv").read_bytes().replace(b"Jo,", "Zoë,".encode("latin-1"), 2)
    (d / "patients.csv").write_bytes(raw)
    with pytest.raises(ExtractError) as caught:
        load_practice(d, today=today)
    assert caught.value.line == 2 and "UTF-8" in str(caught.value)


def test_binary_file_is_not_csv(tmp_path, today):
    d = write(tmp_path / "p", [patient("P1", 1)])
    (d / "allergies.csv").write_bytes(b"patient_id\x00\x01\x02")
    with pytest.raises(ExtractError) as caught:
        load_practice(d, today=today)
    assert "allergies.csv" in str(caught.value)


def test_unterminated_quote_is_a_csv_error_with_line(tmp_path, today):
    d = write(tmp_path / "p", [patient("P1", 1)])
    with open(d / "medications.csv", "a") as f:
        f.write('P1,M1,acute,123,"Aspirin 75mg\n')
    with pytest.raises(ExtractError) as caught:
        load_practice(d, today=today)
    assert "medications.csv" in str(caught.value) and caught.value.line == 2


def test_row_problems_keep_the_row_and_its_line(tmp_path, today):
    d = write(tmp_path / "p", [patient("P1", 1), patient("P2", 2, birth_date="31/02/1980"),
                               patient("P3", 3, registered_on="2999-01-01"),
                               patient("P4", 4, fp69="perhaps")],
              medications=[{"patient_id": "P1", "medication_id": "M1", "kind": "acute",
                            "prescribed_on": "yesterday"}])
    practice = load_practice(d, today=today)
    by_id = {p.patient_id: p for p in practice.patients}
    assert len(by_id) == 4
    assert by_id["P2"].row == 3 and "birth_date" in by_id["P2"].problems[0]
    assert "future" in by_id["P3"].problems[0]
    assert "fp69" in by_id["P4"].problems[0]
    assert any("medications.csv line 2" in p for p in by_id["P1"].problems)


def test_nhs_number_spaces_and_dashes_are_ignored(tmp_path, today):
    d = write(tmp_path / "p", [patient("P1", 1, nhs_number=" " + nhs(1)[:3] + "-" + nhs(1)[3:6] + " " + nhs(1)[6:] + " ")])
    assert load_practice(d, today=today).patients[0].nhs_number == nhs(1)


def test_a_huge_field_is_a_problem_of_its_row_never_of_the_practice(tmp_path, today):
    """A medication text of 200,000 characters (the csv module's own limit is 131,072) makes that
    patient malformed, with the file and line; everyone else is read as usual."""
    from scr_nb.extract.eligibility import Policy, decide, summarise

    huge = "Paracetamol " * 16_667
    write(tmp_path, [patient("P1", 1), patient("P2", 2)],
          medications=[{"patient_id": "P1", "medication_id": "M1", "kind": "acute",
                        "drug": huge, "prescribed_on": today.isoformat()},
                       {"patient_id": "P2", "medication_id": "M2", "kind": "acute",
                        "drug": "Aspirin", "prescribed_on": today.isoformat()}])
    practice = load_practice(tmp_path, today=today)
    first, second = practice.patients
    assert any("medications.csv line 2: drug: 200,004 characters" in p for p in first.problems)
    assert second.problems == ()
    assert len(practice.medications["P1"][0].drug) == 10_000
    counts = summarise(decide(practice, Policy(today)))
    assert counts["eligible"] == 1 and counts["not_required_by_reason"]["malformed_record"] == 1


def test_practice_json_gives_the_practice_details_and_a_wrong_one_is_named(tmp_path, today):
    write(tmp_path, [patient("P1", 1)])
    assert load_practice(tmp_path, today=today).details.ods_code is None   # optional
    (tmp_path / "practice.json").write_text(
        '{"ods_code": "B82001", "name": "Fulford Grange", "asid": "200000000123"}')
    details = load_practice(tmp_path, today=today).details
    assert (details.ods_code, details.name, details.asid) == \
        ("B82001", "Fulford Grange", "200000000123")
    (tmp_path / "practice.json").write_text('{"ods_code": "B82001", "asid": "12AB"}')
    with pytest.raises(ExtractError) as caught:
        load_practice(tmp_path, today=today)
    assert "practice.json" in str(caught.value) and "asid" in str(caught.value)
    (tmp_path / "practice.json").write_text('{"ods_code": ')
    with pytest.raises(ExtractError, match="practice.json.*line 1"):
        load_practice(tmp_path, today=today)
