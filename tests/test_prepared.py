"""A job's extract (issue 11): read into the extract index a piece at a time, with exactly the
answers of the whole-practice reader, and read again only when the files or settings change."""

from __future__ import annotations

import dataclasses
import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scr_nb.errors import ExtractError
from scr_nb.extract.eligibility import Policy, decide, summarise
from scr_nb.extract import columnar
from scr_nb.extract.columnar import fill_index
from scr_nb.extract.prepared import _build, build, decisions, prepare
from scr_nb.extract.reader import load_practice
from scr_nb.spine.content import Windows, select_content
from scr_nb.spine.gp_summary import Author, build_message
from scr_nb.sim.synth import write_practice
from scr_nb.store.extract_index import ExtractIndex
from tests.handmade import ago, edge_case_practice, nhs, patient, write
from tests.test_columnar import TODAY, hostile_extract, write_extract


def oracle(directory, policy):
    decided = decide(load_practice(directory, today=policy.today), policy)
    rows = [(d.key, d.patient.patient_id, d.patient.nhs_number, d.patient.row, d.reason,
             d.dissent) for d in decided]
    return rows, summarise(decided)


def assert_agrees(directory, index_file, policy):
    prepared = prepare(directory, index_file, policy)
    rows, summary = oracle(directory, policy)
    assert list(decisions(prepared.index, policy)) == rows
    assert prepared.summary == summary
    prepared.index.close()


@pytest.mark.parametrize("dissent", ["exclude", "blank"])
def test_synthetic_practice_agrees_with_the_whole_practice_reader(tmp_path, today, dissent):
    write_practice(tmp_path / "p", 3000, seed=8, today=today)
    assert_agrees(tmp_path / "p", tmp_path / "index", Policy(today=today, dissent=dissent))


def test_every_reason_consent_rule_and_broken_row_agrees(tmp_path, today):
    rows = [
        patient("OK", 1), patient("MAL", 2, birth_date="", fp69="true"),
        patient("DUP", 3), patient("DUP", 4, nhs_number=""),
        patient("NUM1", 5), patient("NUM2", 6, nhs_number=nhs(5)),
        patient("TEMP", 9, registration_type="temporary"), patient("HAS", 16,
                                                                  has_national_summary="true",
                                                                  registered_on=ago(today, 900)),
        patient("DISS", 17), patient("UNDATED", 18), patient("LEG", 19), patient("MEDBAD", 20),
        patient("", 21), patient("FUTURE", 22, birth_date=ago(today, -3)),
    ]
    consent = [
        {"patient_id": "DISS", "code": "9Ndo.00", "recorded_on": "2020-01-01"},
        {"patient_id": "DISS", "code": "9Ndn", "recorded_on": "2019-01-01"},
        {"patient_id": "UNDATED", "code": "9Ndo", "recorded_on": ""},      # malformed, undated
        {"patient_id": "UNDATED", "code": "9Ndn", "recorded_on": ""},
        {"patient_id": "LEG", "code": "93C3.", "recorded_on": "2021-01-01"},
        {"patient_id": "LEG", "code": "93C3", "recorded_on": "2021-01-01"},
    ]
    medications = [{"patient_id": "MEDBAD", "medication_id": "M1", "kind": "sometimes",
                    "prescribed_on": ago(today, 3)}]
    directory = write(tmp_path / "p", rows, consent=consent, medications=medications)
    for dissent in ("exclude", "blank"):
        for update in (None, 365):
            assert_agrees(directory, tmp_path / "index",
                          Policy(today=today, dissent=dissent, update_existing_after_days=update))


def test_messages_built_from_the_index_are_the_whole_readers_messages(tmp_path, today):
    directory = edge_case_practice(tmp_path / "p", today)
    policy = Policy(today=today, dissent="blank")
    practice = load_practice(directory, today=today)
    prepared = prepare(directory, tmp_path / "index", policy)
    windows = Windows(today=today)
    author = Author(user_id="555000000001", name="Admin", role_profile_id="555000001001")
    created = datetime(2026, 11, 29, 9, 0, tzinfo=timezone.utc)
    decided = [d for d in decide(practice, policy) if d.eligible]
    found = prepared.index.patients([d.patient.row for d in decided])
    medications, allergies = prepared.index.clinical([d.patient.patient_id for d in decided])
    assert decided
    for n, d in enumerate(decided):
        pid = d.patient.patient_id
        patient_row, consent_on = found[d.patient.row]
        assert patient_row == d.patient
        assert medications.get(pid, []) == practice.medications.get(pid, [])
        assert allergies.get(pid, []) == practice.allergies.get(pid, [])
        ids = {"message_id": f"{n:08d}-0000-4000-8000-000000000000",
               "event_id": f"{n:08d}-0000-4000-8000-000000000001"}
        entries = [e for e in practice.consent.get(pid, []) if e.recorded_on]
        expected_on = max(entries, key=lambda e: (e.recorded_on, e.row)).recorded_on \
            if d.dissent else None
        assert (consent_on if d.dissent else None) == expected_on
        ours = build_message(patient_row, select_content(medications.get(pid, ()),
                                                         allergies.get(pid, ()), windows),
                             author=author, created=created, dissent=d.dissent,
                             dissent_on=consent_on if d.dissent else None, **ids)
        theirs = build_message(d.patient, select_content(practice.medications.get(pid, ()),
                                                         practice.allergies.get(pid, ()),
                                                         windows),
                               author=author, created=created, dissent=d.dissent,
                               dissent_on=expected_on, **ids)
        assert ours.body == theirs.body


def test_the_index_is_used_again_only_while_files_and_settings_are_unchanged(tmp_path, today):
    directory = write(tmp_path / "p", [patient("A", 1), patient("B", 2)])
    policy = Policy(today=today)
    first = prepare(directory, tmp_path / "index", policy)
    assert first.read
    again = prepare(directory, tmp_path / "index", policy, known=first.fingerprint)
    assert not again.read and again.summary == first.summary
    # The store was last brought in line with another extract: read again.
    assert prepare(directory, tmp_path / "index", policy, known=None).read
    assert prepare(directory, tmp_path / "index", Policy(today=today, dissent="blank"),
                   known=first.fingerprint).read
    stamp = prepare(directory, tmp_path / "index", policy).fingerprint
    os.utime(directory / "medications.csv", ns=(1, 1))
    changed = prepare(directory, tmp_path / "index", policy, known=stamp)
    assert changed.read and changed.fingerprint != stamp


def test_a_broken_file_raises_the_readers_error_and_keeps_the_last_index(tmp_path, today):
    directory = write(tmp_path / "p", [patient("A", 1)])
    policy = Policy(today=today)
    prepare(directory, tmp_path / "index", policy).index.close()
    (directory / "allergies.csv").write_bytes(b"patient_id,allergy_id\nA,\xff\n")
    with pytest.raises(ExtractError) as caught:
        prepare(directory, tmp_path / "index", policy)
    with pytest.raises(ExtractError) as expected:
        load_practice(directory, today=today)
    assert str(caught.value) == str(expected.value)
    assert not (tmp_path / "index.partial").exists()
    kept = ExtractIndex.open(tmp_path / "index")
    assert kept is not None and [r[1] for r in kept.rows()] == ["A"]
    kept.close()


def test_the_index_is_private_to_its_owner(tmp_path, today):
    directory = write(tmp_path / "p", [patient("A", 1)])
    prepare(directory, tmp_path / "index", Policy(today=today)).index.close()
    assert (tmp_path / "index").stat().st_mode & 0o077 == 0


def test_a_later_day_uses_the_index_until_a_decision_would_change(tmp_path, today):
    directory = write(tmp_path / "p", [
        patient("A", 1), patient("SOON", 2, registered_on=ago(today, -5)),
        patient("OLD", 3, has_national_summary="true", registered_on=ago(today, 360))])
    policy = Policy(today=today, update_existing_after_days=365)
    first = prepare(directory, tmp_path / "index", policy)
    assert first.summary["eligible"] == 1   # SOON is malformed, OLD not yet updatable
    for days, read in ((1, False), (4, False), (5, True)):
        later = Policy(today=today + timedelta(days=days), update_existing_after_days=365)
        again = prepare(directory, tmp_path / "index", later, known=first.fingerprint)
        assert again.read is read, days
        assert again.summary == oracle(directory, later)[1]
        again.index.close()
        if read:   # read anew, the index is the later day's: it turns at OLD's update day
            first = prepare(directory, tmp_path / "index", later)
            assert first.summary["eligible"] == 2
    yesterday = Policy(today=today - timedelta(days=1), update_existing_after_days=365)
    assert prepare(directory, tmp_path / "index", yesterday, known=first.fingerprint).read


# --- the columnar build against the row-at-a-time build -----------------------------------------------

def build_both(directory, tmp_path, policy, *, fast_only=True):
    """(columnar index, row-at-a-time index). ``fast_only``: the columnar reader must not hand the
    extract over, so the test knows it was the one checked."""
    stamp = {"files": "any"}
    if fast_only:
        fast = _build(Path(directory), tmp_path / "columns", policy, stamp, fill_index)[0]
    else:
        fast = build(directory, tmp_path / "columns", policy, stamp)[0]
    slow = build(directory, tmp_path / "rows", policy, stamp, by_rows=True)[0]
    return fast, slow


def assert_same_index(directory, tmp_path, policy, *, fast_only=True):
    """Everything a job reads from the index is the row path's: every decision, the summary, the
    day a decision turns, the groups, and each eligible patient's row, consent date, medications
    and allergies. Other rows keep the same values; only the words of their problems differ."""
    fast, slow = build_both(directory, tmp_path, policy, fast_only=fast_only)
    decided = list(decisions(slow, policy))
    assert list(decisions(fast, policy)) == decided
    for key in ("summary", "turns", "decided_on", "fingerprint", "version"):
        assert fast.meta(key) == slow.meta(key), key
    assert list(fast.groups().items()) == list(slow.groups().items())
    eligible = [d for d in decided if d[4] is None]
    rows, pids = [d[3] for d in eligible], [d[1] for d in eligible]
    assert fast.patients(rows) == slow.patients(rows)
    assert fast.clinical(pids) == slow.clinical(pids)
    every = [d[3] for d in decided]

    def told(found):
        return {row: (dataclasses.replace(p, problems=bool(p.problems)), on)
                for row, (p, on) in found.items()}
    assert told(fast.patients(every)) == told(slow.patients(every))
    assert fast.clinical([d[1] for d in decided]) == slow.clinical([d[1] for d in decided])
    fast.close()
    slow.close()
    return decided


@pytest.mark.parametrize("patients,seed", [(0, 1), (1, 2), (3000, 4)])
def test_columnar_build_is_the_row_builds_on_synthetic_practices(tmp_path, today, patients, seed):
    write_practice(tmp_path / "p", patients, seed=seed, today=today)
    for policy in (Policy(today=today), Policy(today=today, dissent="blank",
                                                update_existing_after_days=365)):
        assert_same_index(tmp_path / "p", tmp_path, policy)


def test_columnar_build_numbers_rows_across_pieces_blank_lines_and_quoted_line_breaks(
        tmp_path, today, monkeypatch):
    """Small pieces, quoted line breaks in medications.csv and empty lines (which both readers
    skip, but count) leave every row number where the row reader puts it."""
    directory = tmp_path / "p"
    write_practice(directory, 800, seed=9, today=today)
    for name in ("patients.csv", "medications.csv", "consent.csv"):
        path = directory / name
        lines = path.read_bytes().split(b"\n")
        lines[5:5] = [b"", b"\r"]
        lines[-20:-20] = [b""]
        path.write_bytes(b"\n".join(lines))
    assert re.search(rb'"[^"]*\n[^"]*"', (directory / "medications.csv").read_bytes())
    monkeypatch.setattr(columnar, "_PIECE", 4096)
    decided = assert_same_index(directory, tmp_path, Policy(today=today, dissent="blank"))
    assert decided[-1][3] > 800


def test_columnar_build_of_every_reason_and_edge_case(tmp_path, today):
    rows = [
        patient("OK", 1), patient("MAL", 2, birth_date="", fp69="true"),
        patient("DUP", 3), patient("DUP", 4, nhs_number=""), patient("NUM1", 5),
        patient("NUM2", 6, nhs_number=nhs(5)), patient("TEMP", 9, registration_type=" Temporary"),
        patient("HAS", 16, has_national_summary="true", registered_on=ago(today, 300)),
        patient("DISS", 17), patient("UNDATED", 18), patient("LEG", 19), patient("MEDBAD", 20),
        patient("", 21), patient("", 22), patient("FUTURE", 23, left_on=ago(today, -3)),
        patient(" SP ", 24, sex=" M ", family_name="  Lee ", nhs_number=" 999-000 0" + nhs(24)[4:]),
    ]
    consent = [
        {"patient_id": "DISS", "code": "9Ndo.00", "recorded_on": "2020-01-01"},
        {"patient_id": "DISS", "code": "9Ndn", "recorded_on": "2019-01-01"},
        {"patient_id": "UNDATED", "code": "9Ndo", "recorded_on": ""},
        {"patient_id": "LEG", "code": "93C3.", "recorded_on": " 2021-01-01 "},
        {"patient_id": "", "code": "9Ndo", "recorded_on": "2021-01-01"},
    ]
    medications = [{"patient_id": "MEDBAD", "medication_id": "M1", "kind": "sometimes",
                    "prescribed_on": ago(today, 3)},
                   {"patient_id": " SP", "medication_id": " M2\u00a0", "kind": " Repeat ",
                    "prescribed_on": ago(today, 3), "drug": "  spaced \\ \"x\" ",
                    "dosage": "a\nb\r\n\tc\x1f", "quantity": "\u00e9\u2028"}]
    groups = [{"group_name": "G", "patient_id": "OK"}, {"group_name": "H", "patient_id": "SP"},
              {"group_name": " G ", "patient_id": " OK"}, {"group_name": "H", "patient_id": ""},
              {"group_name": "G", "patient_id": "SP"}]
    directory = write(tmp_path / "p", rows, consent=consent, medications=medications,
                      groups=groups)
    for dissent in ("exclude", "blank"):
        for update in (None, 0, 365):
            assert_same_index(directory, tmp_path, Policy(today=today, dissent=dissent,
                                                          update_existing_after_days=update))
    directory = edge_case_practice(tmp_path / "edge", today)
    assert_same_index(directory, tmp_path, Policy(today=today, dissent="blank"))
    for name in ("medications.csv", "allergies.csv"):   # files of a header and blank lines
        (directory / name).write_bytes((directory / name).read_bytes().split(b"\n")[0]
                                       + b"\n\n\r\n\n")
    assert_same_index(directory, tmp_path, Policy(today=today))


@pytest.mark.parametrize("breakage", ["not_utf8", "missing_column", "bad_quotes", "missing_file",
                                      "ragged", "not_a_directory"])
def test_columnar_build_hands_broken_files_to_the_row_reader(tmp_path, today, breakage):
    directory = write(tmp_path / "p", [patient("A", 1)], medications=[
        {"patient_id": "A", "medication_id": "M", "kind": "acute", "prescribed_on": "2020-01-01"}])
    meds = directory / "medications.csv"
    if breakage == "not_utf8":
        meds.write_bytes(meds.read_bytes() + b"A,\xff\n")
    elif breakage == "missing_column":
        meds.write_text(meds.read_text().replace("dosage", "dose"))
    elif breakage == "bad_quotes":
        meds.write_bytes(meds.read_bytes() + b'"A"x,M\n')
    elif breakage == "missing_file":
        meds.unlink()
    elif breakage == "ragged":   # a readable file the row reader alone reads exactly
        meds.write_bytes(meds.read_bytes() + b"A,M2,acute\r\n")
    elif breakage == "not_a_directory":
        directory = meds
    policy = Policy(today=today)
    if breakage == "ragged":
        assert_same_index(directory, tmp_path, policy, fast_only=False)
        return
    errors = []
    for by_rows in (False, True):
        with pytest.raises(ExtractError) as caught:
            build(directory, tmp_path / "index", policy, {}, by_rows=by_rows)
        errors.append((str(caught.value), caught.value.line, caught.value.column))
    assert errors[0] == errors[1]
    assert not (tmp_path / "index.partial").exists() and not (tmp_path / "index").exists()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=hostile_extract(), crlf=st.booleans(), dissent=st.sampled_from(["exclude", "blank"]),
       update_after=st.sampled_from([None, 0, 365]), piece=st.sampled_from([512, 1 << 23]))
def test_columnar_build_of_hostile_extracts_is_the_row_builds(tmp_path_factory, files, crlf,
                                                              dissent, update_after, piece):
    directory = write_extract(tmp_path_factory.mktemp("hostile"), files, crlf)
    policy = Policy(today=TODAY, dissent=dissent, update_existing_after_days=update_after)
    with mock.patch.object(columnar, "_PIECE", piece):
        assert_same_index(directory, tmp_path_factory.mktemp("index"), policy)
