"""Hand-made practices for tests: write exactly the rows a test needs, defaults for the rest."""

from __future__ import annotations

import csv
from datetime import date, timedelta
from pathlib import Path

from scr_nb.extract.nhs_number import check_digit
from scr_nb.extract.reader import REQUIRED_COLUMNS


def nhs(stem: int) -> str:
    """A valid test-range NHS number from a small stem (skipping stems with no check digit)."""
    n = 999_000_000 + stem * 10
    while check_digit(str(n)) is None:
        n += 1
    return f"{n}{check_digit(str(n))}"


def patient(pid: str, stem: int, **fields) -> dict:
    row = {"patient_id": pid, "nhs_number": nhs(stem), "family_name": "Smith",
           "given_name": "Jo", "birth_date": "1970-01-01", "sex": "F",
           "registration_type": "permanent", "registered_on": "2001-05-01", "left_on": "",
           "deceased_on": "", "fp69": "false", "sensitive": "false", "pds_synchronised": "true",
           "has_national_summary": "false"}
    row.update(fields)
    return row


def ago(today: date, days: int) -> str:
    return (today - timedelta(days=days)).isoformat()


def write(directory: Path, patients: list[dict], consent=(), medications=(), allergies=(),
          groups=(), bom: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    files = {"patients.csv": patients, "consent.csv": consent, "medications.csv": medications,
             "allergies.csv": allergies, "groups.csv": groups}
    for name, rows in files.items():
        columns = list(REQUIRED_COLUMNS[name])
        with open(directory / name, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as f:
            out = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", restval="")
            out.writeheader()
            out.writerows(rows)
    return directory


HOSTILE_TEXT = "O'Brien & <Sons> \"x\" ]]> \x01 tab\there é \U0001F600 --=_MIME-Boundary"


def edge_case_practice(directory: Path, today: date) -> Path:
    """One patient per hard case of SPEC 5: each medication kind alone, a blank dosage, a
    discontinued repeat, a repeat past its review date, nothing in the windows, only negative
    allergies, dissent (sent blank), no drug or allergy codes, text that must be escaped, a huge
    quantity, a legacy dissent code with a Read suffix."""
    med = lambda pid, mid, kind, **f: {  # noqa: E731
        "patient_id": pid, "medication_id": mid, "kind": kind, "dmd_code": "322236009",
        "drug": "Paracetamol 500mg tablets", "dosage": "One four times a day",
        "quantity": "28 tablet", **f}
    allergy = lambda pid, aid, **f: {  # noqa: E731
        "patient_id": pid, "allergy_id": aid, "kind": "allergy", "snomed_code": "91936005",
        "description": "Allergy to penicillin", "recorded_on": ago(today, 400), "negative": "false",
        **f}
    patients = [patient(f"E{n}", 100 + n) for n in range(1, 14)]
    medications = [
        med("E1", "M1", "acute", prescribed_on=ago(today, 10)),
        med("E2", "M2", "repeat", prescribed_on=ago(today, 20)),
        med("E3", "M3", "repeat", prescribed_on=ago(today, 100), discontinued_on=ago(today, 30)),
        med("E4", "M4", "acute", prescribed_on=ago(today, 5), dosage=""),
        med("E4", "M5", "repeat", prescribed_on=ago(today, 5), dosage="   "),
        med("E4", "M6", "repeat", prescribed_on=ago(today, 200), discontinued_on=ago(today, 9),
            dosage=""),
        med("E5", "M7", "acute", prescribed_on=ago(today, 800)),           # outside every window
        med("E7", "M8", "acute", prescribed_on=ago(today, 3), dmd_code="", drug=HOSTILE_TEXT,
            dosage=HOSTILE_TEXT, quantity=HOSTILE_TEXT),
        med("E8", "M9", "repeat", prescribed_on=ago(today, 15), quantity="999999999 tablet",
            repeat_until=ago(today, 1)),
        med("E9", "M10", "repeat", prescribed_on=ago(today, 1), dmd_code="", quantity=""),
    ]
    allergies = [
        allergy("E6", "A1", negative="true", description="No known drug allergy"),
        allergy("E7", "A2", snomed_code="", description=HOSTILE_TEXT, kind="adverse_reaction"),
        allergy("E10", "A3", kind="intolerance", recorded_on=""),
        allergy("E11", "A4"),
    ]
    consent = [
        {"patient_id": "E11", "code": "9Ndo", "recorded_on": ago(today, 50)},
        {"patient_id": "E12", "code": "93C3.00", "recorded_on": ago(today, 60)},
        {"patient_id": "E13", "code": "9Ndn.", "recorded_on": ago(today, 70)},
    ]
    patients[6]["family_name"] = HOSTILE_TEXT
    return write(directory, patients, consent, medications, allergies)
