"""Eligibility (SPEC 4): exactly one reason per excluded patient, the first in SPEC order."""

from __future__ import annotations

from scr_nb.extract.eligibility import Policy, decide, summarise
from scr_nb.extract.nhs_number import is_valid, mask
from scr_nb.extract.reader import load_practice
from scr_nb.sim.synth import write_practice
from scr_nb.store.states import NOT_REQUIRED_REASONS
from tests.handmade import ago, nhs, patient, write


def reasons(directory, today, **policy):
    practice = load_practice(directory, today=today)
    return {d.key: (d.reason, d.dissent) for d in decide(practice, Policy(today=today, **policy))}


def test_modulus_11():
    assert is_valid("943 476 5919") and is_valid("943-476-5919")
    assert not is_valid("9434765918")           # wrong check digit
    assert not is_valid("94347659")             # too short
    assert not is_valid("94347659AB")
    assert not is_valid("943476591\u00b2") and not is_valid("\uff19434765919"[:10])
    assert is_valid(nhs(5))
    assert mask("9434765919") == "943 *** 5919"


def test_each_reason_and_its_order(tmp_path, today):
    rows = [
        patient("OK", 1),
        patient("MAL", 2, birth_date="", fp69="true"),                 # malformed beats fp69
        patient("DUP", 3), patient("DUP", 4),                          # same patient_id twice
        patient("NUM1", 5), patient("NUM2", 6, nhs_number=nhs(5)),     # same NHS number
        patient("NONE", 7, nhs_number=""),
        patient("BAD", 8, nhs_number=nhs(8)[:9] + str((int(nhs(8)[9]) + 1) % 10)),
        patient("TEMP", 9, registration_type="temporary", fp69="true"),
        patient("APPL", 10, registration_type="applied"),
        patient("LEFT", 11, left_on=ago(today, 10), deceased_on=ago(today, 5)),
        patient("DEAD", 12, deceased_on=ago(today, 5)),
        patient("FP69", 13, fp69="TRUE", sensitive="true"),
        patient("SENS", 14, sensitive="true", pds_synchronised="false"),
        patient("PDS", 15, pds_synchronised="false", has_national_summary="true"),
        patient("HAS", 16, has_national_summary="true"),
        patient("DISS", 17), patient("CONS", 18), patient("LEG", 19),
        patient("OLDBAD", 20, birth_date="1850-01-01"),
        patient("FUTURE", 21, birth_date=ago(today, -3)),
    ]
    consent = [
        {"patient_id": "DISS", "code": "9Ndl", "recorded_on": "2019-01-01"},
        {"patient_id": "DISS", "code": "9Ndo.00", "recorded_on": "2020-01-01"},
        {"patient_id": "CONS", "code": "9Ndo.", "recorded_on": "2019-01-01"},
        {"patient_id": "CONS", "code": "9Ndn", "recorded_on": "2021-01-01"},
        {"patient_id": "LEG", "code": "93C3", "recorded_on": "2021-01-01"},
    ]
    got = reasons(write(tmp_path / "p", rows, consent=consent), today)
    assert got == {
        "OK": (None, False),
        "MAL": ("malformed_record", False),
        "DUP (line 4)": ("duplicate_record", False),
        "DUP (line 5)": ("duplicate_record", False),
        "NUM1": ("duplicate_record", False), "NUM2": ("duplicate_record", False),
        "NONE": ("no_nhs_number", False),
        "BAD": ("invalid_nhs_number", False),
        "TEMP": ("not_permanent", False), "APPL": ("not_permanent", False),
        "LEFT": ("left_practice", False),
        "DEAD": ("deceased", False),
        "FP69": ("fp69", False),
        "SENS": ("sensitive", False),
        "PDS": ("not_pds_synchronised", False),
        "HAS": ("existing_summary", False),
        "DISS": ("dissent", False),
        "CONS": (None, False),
        "LEG": ("dissent", False),
        "OLDBAD": ("malformed_record", False),
        "FUTURE": ("malformed_record", False),
    }


def test_blank_dissent_policy_sends_a_dissent_summary(tmp_path, today):
    d = write(tmp_path / "p", [patient("DISS", 1)],
              consent=[{"patient_id": "DISS", "code": "9Ndo", "recorded_on": "2020-01-01"}])
    assert reasons(d, today, dissent="blank") == {"DISS": (None, True)}


def test_existing_summaries_may_be_updated_after_n_days(tmp_path, today):
    d = write(tmp_path / "p", [patient("OLD", 1, has_national_summary="true",
                                       registered_on=ago(today, 400)),
                               patient("NEW", 2, has_national_summary="true",
                                       registered_on=ago(today, 20))])
    assert reasons(d, today, update_existing_after_days=365) == {
        "OLD": (None, False), "NEW": ("existing_summary", False)}


def test_summary_lists_every_reason(tmp_path, today):
    d = write(tmp_path / "p", [patient("OK", 1), patient("NONE", 2, nhs_number="")])
    practice = load_practice(d, today=today)
    summary = summarise(decide(practice, Policy(today=today)))
    assert summary["total"] == 2 and summary["eligible"] == 1
    assert list(summary["not_required_by_reason"]) == list(NOT_REQUIRED_REASONS)
    assert summary["not_required_by_reason"]["no_nhs_number"] == 1


def test_synthetic_practice_matches_its_design(tmp_path, today):
    """The generator says which reason it designed for each patient; eligibility must agree."""
    summary = write_practice(tmp_path / "p", 3000, seed=5, today=today)
    practice = load_practice(tmp_path / "p", today=today)
    got = summarise(decide(practice, Policy(today=today)))
    assert got["total"] == summary.patients
    assert got["eligible"] == summary.expected_eligible
    expected = {r: summary.expected_reasons.get(r, 0) for r in NOT_REQUIRED_REASONS}
    assert got["not_required_by_reason"] == expected
    assert all(expected[r] > 0 for r in NOT_REQUIRED_REASONS)
