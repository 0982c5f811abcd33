"""The records that cross modules: one practice extract's rows, parsed but never dropped.

Dates that did not parse are ``None`` and the problem is kept in ``problems`` so eligibility can
make the patient ``malformed_record`` while support still sees the row number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date


@dataclass(frozen=True, slots=True)
class Patient:
    patient_id: str
    nhs_number: str          # digits only (spaces and dashes removed); may be empty or invalid
    family_name: str
    given_name: str
    birth_date: date | None
    sex: str
    registration_type: str
    registered_on: date | None
    left_on: date | None
    deceased_on: date | None
    fp69: bool
    sensitive: bool
    pds_synchronised: bool
    has_national_summary: bool
    row: int                 # line number in patients.csv (header is line 1)
    problems: tuple[str, ...] = ()   # "column: what is wrong", for malformed rows


@dataclass(frozen=True, slots=True)
class Medication:
    patient_id: str
    medication_id: str
    kind: str                # acute | repeat
    dmd_code: str
    drug: str
    dosage: str
    quantity: str
    prescribed_on: date | None   # acute: date prescribed; repeat: last issue
    repeat_until: date | None
    discontinued_on: date | None
    row: int


@dataclass(frozen=True, slots=True)
class Allergy:
    patient_id: str
    allergy_id: str
    kind: str                # allergy | intolerance | adverse_reaction
    snomed_code: str
    description: str
    recorded_on: date | None
    negative: bool
    row: int


@dataclass(frozen=True, slots=True)
class ConsentEntry:
    patient_id: str
    code: str                # normalised: suffix and trailing dot removed, legacy codes kept as given
    recorded_on: date | None
    row: int


@dataclass(frozen=True)
class PracticeDetails:
    """``practice.json`` (SPEC 3): who the practice is on the Spine. Every field may be None when the
    file does not give it; the job's options fill the gaps (and override it)."""

    ods_code: str | None = None
    name: str | None = None
    asid: str | None = None


@dataclass
class Practice:
    """A whole extract, indexed by patient."""

    directory: str
    details: PracticeDetails = field(default_factory=PracticeDetails)
    patients: list[Patient] = field(default_factory=list)
    medications: dict[str, list[Medication]] = field(default_factory=dict)
    allergies: dict[str, list[Allergy]] = field(default_factory=dict)
    consent: dict[str, list[ConsentEntry]] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)   # group name -> patient ids
