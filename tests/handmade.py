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
