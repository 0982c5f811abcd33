"""The synthetic practice generator (SPEC 3): realistic, deterministic, and exact about its design.

The exactness tests recompute every row's outcome from the files alone (an oracle written here from
SPEC 4, independent of the generator's own bookkeeping) and compare it with the summary.
"""

from __future__ import annotations

import csv
import dataclasses
import re
from collections import Counter
from datetime import date

import pytest

from scr_nb.constants import TEST_NHS_NUMBER_RANGE
from scr_nb.extract.nhs_number import is_valid, normalise
from scr_nb.sim import synth
from scr_nb.store.states import NOT_REQUIRED_REASONS

TODAY = date(2025, 3, 31)      # a month end: six months back clamps to 30 September
SIX_MONTHS = date(2024, 9, 30)
TWELVE_MONTHS = date(2024, 3, 31)

# Written out from SPEC 3, not taken from the module, so a drift from the contract fails here.
SPEC_COLUMNS = {
    "patients.csv": [
        "patient_id", "nhs_number", "family_name", "given_name", "birth_date", "sex",
        "registration_type", "registered_on", "left_on", "deceased_on", "fp69", "sensitive",
        "pds_synchronised", "has_national_summary",
    ],
    "consent.csv": ["patient_id", "code", "recorded_on"],
    "medications.csv": [
        "patient_id", "medication_id", "kind", "dmd_code", "drug", "dosage", "quantity",
        "prescribed_on", "repeat_until", "discontinued_on",
    ],
    "allergies.csv": [
        "patient_id", "allergy_id", "kind", "snomed_code", "description", "recorded_on", "negative",
    ],
    "groups.csv": ["group_name", "patient_id"],
}
DISSENT = {"9Ndo", "93C3"}
ISO = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def read(directory) -> dict[str, list[dict[str, str]]]:
    files = {}
    for name, columns in SPEC_COLUMNS.items():
        with open(directory / name, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            assert next(reader) == columns, name
            files[name] = [dict(zip(columns, row, strict=True)) for row in reader]
    return files


def parse(text: str) -> date | None:
    if not ISO.match(text):
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None


def bad_date(text: str, today: date) -> bool:
    day = parse(text)
    return day is None or not date(1900, 1, 1) <= day <= today


def malformed(patient: dict[str, str], today: date = TODAY) -> bool:
    """SPEC 4: a blank birth date, or a date that does not parse, is in the future or before 1900."""
    return not patient["birth_date"] or any(
        patient[c] and bad_date(patient[c], today)
        for c in ("birth_date", "registered_on", "left_on", "deceased_on"))


def oracle(files, today: date) -> tuple[dict[str, int], int]:
    """Each row's outcome under SPEC 4 and the default policy, from the files alone."""
    patients = files["patients.csv"]
    ids = Counter(p["patient_id"] for p in patients)
    numbers = Counter(normalise(p["nhs_number"]) for p in patients if is_valid(p["nhs_number"]))
    latest: dict[str, tuple[date, str]] = {}
    for entry in files["consent.csv"]:
        day = date.fromisoformat(entry["recorded_on"])
        if entry["patient_id"] not in latest or day > latest[entry["patient_id"]][0]:
            latest[entry["patient_id"]] = (day, entry["code"].split(".")[0])
    reasons = Counter()
    for p in patients:
        number = normalise(p["nhs_number"])
        checks = [
            ("malformed_record", malformed(p, today)),
            ("duplicate_record", ids[p["patient_id"]] > 1 or (is_valid(number) and numbers[number] > 1)),
            ("no_nhs_number", not number),
            ("invalid_nhs_number", not is_valid(number)),
            ("not_permanent", p["registration_type"] != "permanent"),
            ("left_practice", bool(p["left_on"])),
            ("deceased", bool(p["deceased_on"])),
            ("fp69", p["fp69"] == "true"),
            ("sensitive", p["sensitive"] == "true"),
            ("not_pds_synchronised", p["pds_synchronised"] != "true"),
            ("existing_summary", p["has_national_summary"] == "true"),
            ("dissent", latest.get(p["patient_id"], (None, ""))[1] in DISSENT),
        ]
        reasons[next((reason for reason, applies in checks if applies), "eligible")] += 1
    eligible = reasons.pop("eligible", 0)
    return {reason: reasons.get(reason, 0) for reason in NOT_REQUIRED_REASONS}, eligible


@pytest.fixture(scope="module")
def practice(tmp_path_factory):
    out = tmp_path_factory.mktemp("practice")
    summary = synth.write_practice(out, 2000, seed=11, today=TODAY)
    return summary, read(out)


# --- determinism and format ----------------------------------------------------------------------

def test_same_seed_writes_identical_bytes_and_another_seed_does_not(tmp_path):
    one = synth.write_practice(tmp_path / "one", 400, seed=5, today=TODAY)
    two = synth.write_practice(tmp_path / "two", 400, seed=5, today=TODAY)
    other = synth.write_practice(tmp_path / "other", 400, seed=6, today=TODAY)
    for name in SPEC_COLUMNS:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert ((tmp_path / "one" / "patients.csv").read_bytes()
            != (tmp_path / "other" / "patients.csv").read_bytes())
    assert dataclasses.replace(one, out_dir=two.out_dir) == two
    assert other.expected_reasons == one.expected_reasons   # the design mix is per block, not per seed


def test_columns_encoding_and_counts(practice, tmp_path):
    summary, files = practice
    assert summary.patients == 2000 and summary.today == TODAY
    assert (summary.out_dir / "patients.csv").read_bytes().startswith(b"\xef\xbb\xbfpatient_id,")
    for name in SPEC_COLUMNS:
        assert summary.rows[name] == len(files[name]), name
        if name != "patients.csv":
            assert not (summary.out_dir / name).read_bytes().startswith(b"\xef\xbb\xbf"), name
    assert len(files["patients.csv"]) == 2000
    empty = synth.write_practice(tmp_path / "empty", 0, seed=1, today=TODAY)
    assert empty.expected_eligible == 0 and sum(empty.expected_reasons.values()) == 0
    assert read(tmp_path / "empty")["patients.csv"] == []


def test_today_defaults_to_the_current_date(tmp_path):
    summary = synth.write_practice(tmp_path, 5, seed=1)
    assert summary.today == date.today()


# --- patients ------------------------------------------------------------------------------------

def test_registration_types_sexes_and_flags(practice):
    patients = practice[1]["patients.csv"]
    assert {p["registration_type"] for p in patients} == {"permanent", "applied", "temporary"}
    assert {p["sex"] for p in patients} == {"M", "F", "U"}
    for flag in ("fp69", "sensitive", "pds_synchronised", "has_national_summary"):
        assert {p[flag] for p in patients} == {"true", "false"}, flag
    assert sum(1 for p in patients if p["left_on"]) < len(patients) * 0.1
    assert sum(1 for p in patients if p["deceased_on"]) < len(patients) * 0.1
    assert len({p["patient_id"] for p in patients}) > 1900
    assert all(re.fullmatch(r"P\d{6}", p["patient_id"]) for p in patients)


def test_nhs_numbers_valid_in_the_test_range_or_deliberately_invalid(practice):
    patients = practice[1]["patients.csv"]
    low, high = TEST_NHS_NUMBER_RANGE
    written = [p["nhs_number"] for p in patients]
    valid = [normalise(n) for n in written if is_valid(n)]
    assert valid and all(low <= int(n) <= high for n in valid)
    assert any(re.fullmatch(r"999 \d{3} \d{4}", n) and is_valid(n) for n in written)
    assert any(re.fullmatch(r"999-\d{3}-\d{4}", n) and is_valid(n) for n in written)
    invalid = [n for n in written if n and not is_valid(n)]
    assert len(invalid) >= 30
    assert any(len(normalise(n)) == 10 and normalise(n).isdigit() for n in invalid)   # wrong check digit
    assert "" in written


def test_duplicates_are_deliberate_pairs(practice):
    patients = practice[1]["patients.csv"]
    ids = Counter(p["patient_id"] for p in patients)
    numbers = Counter(normalise(p["nhs_number"]) for p in patients if is_valid(p["nhs_number"]))
    assert set(ids.values()) == {1, 2} and set(numbers.values()) == {1, 2}
    shared_number_ids = {p["patient_id"] for p in patients
                         if is_valid(p["nhs_number"]) and numbers[normalise(p["nhs_number"])] == 2}
    assert any(ids[pid] == 1 for pid in shared_number_ids)   # two patient_ids, one NHS number


def test_names_with_apostrophes_accents_and_xml_hostile_characters(practice):
    patients = practice[1]["patients.csv"]
    names = [p["family_name"] for p in patients] + [p["given_name"] for p in patients]
    assert any("'" in n for n in names)
    assert any(not n.isascii() for n in names)
    for character in "&<>\"":
        assert any(character in n for n in names), character
    assert any("," in n for n in names)


def test_dates_are_real_except_on_malformed_rows(practice):
    summary, files = practice
    patients = files["patients.csv"]
    bad = [p for p in patients if malformed(p)]
    assert len(bad) == summary.expected_reasons["malformed_record"]
    births = [p["birth_date"] for p in bad]
    assert "" in births
    assert any("/" in b for b in births)
    assert any(parse(b) and parse(b) > TODAY for b in births)
    assert any(parse(b) and parse(b).year < 1900 for b in births)
    assert any(p["registered_on"] and bad_date(p["registered_on"], TODAY) for p in bad)
    for p in patients:
        if p not in bad:
            assert parse(p["birth_date"]) <= parse(p["registered_on"]) <= TODAY
            for column in ("left_on", "deceased_on"):
                assert not p[column] or parse(p["registered_on"]) <= parse(p[column]) < TODAY


# --- consent -------------------------------------------------------------------------------------

def test_every_consent_code_and_form(practice):
    codes = [c["code"] for c in practice[1]["consent.csv"]]
    bases = {c.split(".")[0] for c in codes}
    assert bases == {"9Ndl", "9Ndm", "9Ndn", "9Ndo", "93C2", "93C3"}
    assert any(re.fullmatch(r"9Nd[lmno]\.00", c) for c in codes)
    assert any(re.fullmatch(r"9Nd[lmno]\.", c) for c in codes)
    assert "9Ndo.00" in codes and "9Ndo." in codes


def test_latest_consent_wins_in_both_directions(practice):
    summary, files = practice
    history: dict[str, list[tuple[date, bool]]] = {}
    for entry in files["consent.csv"]:
        history.setdefault(entry["patient_id"], []).append(
            (date.fromisoformat(entry["recorded_on"]), entry["code"].split(".")[0] in DISSENT))
    assert len(history) < len(files["patients.csv"]) * 0.4      # most patients: implied consent
    for entries in history.values():
        assert len({day for day, _ in entries}) == len(entries)    # no ties: the latest is clear
    ordered = [[dissent for _, dissent in sorted(entries)] for entries in history.values()]
    assert any(o[-1] and not o[0] for o in ordered)          # consent, later dissent: dissent
    assert any(not o[-1] and o[0] for o in ordered)          # dissent, later consent: not dissent
    unsorted = [[day for day, _ in entries] for entries in history.values()]
    assert any(days != sorted(days) for days in unsorted)    # file order is not date order


# --- clinical content ----------------------------------------------------------------------------

def test_medications_around_the_windows(practice):
    files = practice[1]
    meds = files["medications.csv"]
    ids = {p["patient_id"] for p in files["patients.csv"]}
    assert {m["patient_id"] for m in meds} <= ids
    assert {m["kind"] for m in meds} == {"acute", "repeat"}
    assert len({m["medication_id"] for m in meds}) == len(meds)
    per_patient = Counter(m["patient_id"] for m in meds)
    assert max(per_patient.values()) <= 8 and len(per_patient) < len(ids)
    assert all(m["dmd_code"].isdigit() for m in meds)
    assert all(re.fullmatch(r"\d+ [a-z -]+", m["quantity"]) for m in meds)
    assert any(m["drug"] == "Salbutamol 100micrograms/dose inhaler CFC free" for m in meds)
    assert all(parse(m["prescribed_on"]) and parse(m["prescribed_on"]) <= TODAY for m in meds)
    repeats = [m for m in meds if m["kind"] == "repeat"]
    acutes = [m for m in meds if m["kind"] == "acute"]
    issued = Counter(date.fromisoformat(m["prescribed_on"]) for m in repeats)
    for day in (SIX_MONTHS, date(2024, 9, 29), date(2024, 10, 1)):
        assert issued[day] > 0, day
    assert any(SIX_MONTHS < d <= TODAY for d in issued) and any(d < SIX_MONTHS for d in issued)
    prescribed = Counter(date.fromisoformat(m["prescribed_on"]) for m in acutes)
    for day in (TWELVE_MONTHS, date(2024, 3, 30), date(2024, 4, 1)):
        assert prescribed[day] > 0, day
    until = [m["repeat_until"] for m in repeats]
    assert "" in until
    assert any(u and date.fromisoformat(u) > TODAY for u in until)
    assert any(u and date.fromisoformat(u) < SIX_MONTHS for u in until)
    assert all(not m["repeat_until"] and not m["discontinued_on"] for m in acutes)
    stopped = [date.fromisoformat(m["discontinued_on"]) for m in repeats if m["discontinued_on"]]
    assert any(d >= SIX_MONTHS for d in stopped) and any(d < SIX_MONTHS for d in stopped)


def test_allergies_with_negative_entries(practice):
    allergies = practice[1]["allergies.csv"]
    assert {a["kind"] for a in allergies} == {"allergy", "intolerance", "adverse_reaction"}
    assert all(a["snomed_code"].isdigit() for a in allergies)
    negatives = [a for a in allergies if a["negative"] == "true"]
    assert negatives and all(a["description"].startswith("No known") for a in negatives)
    positives = [a for a in allergies if not a["description"].startswith("No known")]
    assert positives and all(a["negative"] == "false" for a in positives)
    assert any(a["description"] == "Adverse reaction to Codeine" for a in allergies)


def test_quoted_commas_newlines_and_control_characters(practice):
    summary, files = practice
    meds = files["medications.csv"]
    texts = ([m["drug"] for m in meds] + [m["dosage"] for m in meds]
             + [a["description"] for a in files["allergies.csv"]])
    assert any("\n" in t for t in texts)
    assert any("," in t for t in texts)
    assert any("\x0b" in t for t in texts)
    assert any(c in t for t in texts for c in "&<>")
    raw = (summary.out_dir / "medications.csv").read_text(encoding="utf-8")
    assert re.search(r'"[^"]*\n[^"]*"', raw)         # a newline inside a quoted field


def test_groups(practice):
    files = practice[1]
    groups = files["groups.csv"]
    ids = {p["patient_id"] for p in files["patients.csv"]}
    sizes = Counter(g["group_name"] for g in groups)
    assert 2 <= len(sizes) <= 3 and "Care home residents" in sizes
    assert all(10 <= n <= 200 for n in sizes.values())
    assert {g["patient_id"] for g in groups} <= ids
    assert len({(g["group_name"], g["patient_id"]) for g in groups}) == len(groups)


# --- the designed outcomes -----------------------------------------------------------------------

def test_expected_reasons_are_exact_and_cover_every_reason(practice):
    summary, files = practice
    assert list(summary.expected_reasons) == list(NOT_REQUIRED_REASONS)
    assert oracle(files, TODAY) == (summary.expected_reasons, summary.expected_eligible)
    assert all(n > 0 for n in summary.expected_reasons.values())
    assert sum(summary.expected_reasons.values()) + summary.expected_eligible == 2000
    assert 0.70 <= summary.expected_eligible / 2000 <= 0.80
    assert all(n <= 0.04 * 2000 for n in summary.expected_reasons.values())


@pytest.mark.parametrize("patients", [1, 2, 3, 7, 50, 201, 1000])
def test_small_practices_are_exact_and_have_eligible_patients(tmp_path, patients):
    summary = synth.write_practice(tmp_path, patients, seed=patients, today=TODAY)
    assert oracle(read(tmp_path), TODAY) == (summary.expected_reasons, summary.expected_eligible)
    assert summary.expected_eligible >= min(patients, 3)
    if patients >= 1000:
        assert all(n > 0 for n in summary.expected_reasons.values())


def test_every_size_gets_exactly_its_rows_with_pairs_kept_whole(tmp_path):
    for patients in range(1, 151):
        out = tmp_path / str(patients)
        summary = synth.write_practice(out, patients, seed=patients, today=TODAY)
        files = read(out)
        assert len(files["patients.csv"]) == patients
        assert oracle(files, TODAY) == (summary.expected_reasons, summary.expected_eligible), patients


def test_a_duplicate_pair_with_one_malformed_row(tmp_path):
    """Malformed comes first; its partner is still a duplicate, since the id is on two rows."""
    synth.write_practice(tmp_path, 6000, seed=3, today=TODAY)
    patients = read(tmp_path)["patients.csv"]
    ids = Counter(p["patient_id"] for p in patients)
    pairs = {}
    for p in patients:
        if ids[p["patient_id"]] == 2:
            pairs.setdefault(p["patient_id"], []).append(malformed(p))
    assert any(sorted(flags) == [False, True] for flags in pairs.values())


def test_months_back_clamps_to_the_end_of_the_month():
    assert synth.months_back(date(2025, 8, 31), 6) == date(2025, 2, 28)
    assert synth.months_back(date(2024, 8, 31), 6) == date(2024, 2, 29)
    assert synth.months_back(TODAY, 6) == SIX_MONTHS
    assert synth.months_back(TODAY, 12) == TWELVE_MONTHS
    assert synth.months_back(date(2025, 1, 15), 13) == date(2023, 12, 15)


def test_synth_writes_the_practice_details(tmp_path):
    import json

    from scr_nb.sim.synth import write_practice

    write_practice(tmp_path / "p", 5, seed=1, ods_code="B82001", name="Fulford Grange")
    assert json.loads((tmp_path / "p" / "practice.json").read_text()) == {
        "ods_code": "B82001", "name": "Fulford Grange", "asid": "200000000001"}
    write_practice(tmp_path / "q", 5, seed=1)
    assert json.loads((tmp_path / "q" / "practice.json").read_text())["name"] == \
        "Synthetic practice A12345"
