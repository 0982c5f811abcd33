"""Who gets a GP Summary (SPEC 4): exactly one reason for every patient who does not.

The reasons are tried in the order of ``states.NOT_REQUIRED_REASONS``; the first that applies wins.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta

from scr_nb.constants import CONSENT_DISSENT, LEGACY_CONSENT
from scr_nb.extract.nhs_number import is_valid
from scr_nb.extract.records import ConsentEntry, Patient, Practice
from scr_nb.store.states import NOT_REQUIRED_REASONS

DISSENT_POLICIES = ("exclude", "blank")


@dataclass(frozen=True)
class Policy:
    """Eligibility settings. ``update_existing_after_days``: None keeps patients who already hold a
    national summary out (the default); a number lets those registered longer than that be sent."""

    today: date
    dissent: str = "exclude"
    update_existing_after_days: int | None = None

    def __post_init__(self) -> None:
        if self.dissent not in DISSENT_POLICIES:
            raise ValueError(f"dissent policy must be one of {', '.join(DISSENT_POLICIES)}, "
                             f"not {self.dissent!r}")


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one patient row. ``key`` is unique per row (see ``patient_key``)."""

    key: str
    patient: Patient
    reason: str | None      # None: eligible
    dissent: bool = False   # eligible under the `blank` policy: send a summary stating dissent

    @property
    def eligible(self) -> bool:
        return self.reason is None


def patient_key(patient_id: str, row: int, duplicated_ids: set[str]) -> str:
    """The store's key for a row: the patient_id, or id and line when the id is on several rows."""
    if patient_id in duplicated_ids:
        return f"{patient_id} (line {row})"
    return patient_id


def consent_order(entry: ConsentEntry) -> tuple:
    """Which consent entry is the latest: a dated one beats an undated one, then the later date,
    then the later row in the file."""
    return (entry.recorded_on is not None, entry.recorded_on or date.min, entry.row)


def consent_code(entry: ConsentEntry) -> str:
    """An entry's code, a legacy code mapped to the one it stands for."""
    return LEGACY_CONSENT.get(entry.code, entry.code)


def latest_consent_entry(entries: list[ConsentEntry] | None) -> ConsentEntry | None:
    return max(entries, key=consent_order) if entries else None


def latest_consent(entries: list[ConsentEntry] | None) -> str | None:
    """The latest entry's code, legacy codes mapped."""
    latest = latest_consent_entry(entries)
    return None if latest is None else consent_code(latest)


def decide(practice: Practice, policy: Policy) -> list[Decision]:
    """One Decision per patient row, in file order."""
    ids = Counter(p.patient_id for p in practice.patients)
    numbers = Counter(p.nhs_number for p in practice.patients if is_valid(p.nhs_number))
    duplicated_ids = {pid for pid, n in ids.items() if n > 1}
    decisions = []
    for patient in practice.patients:
        duplicated = patient.patient_id in duplicated_ids or (
            is_valid(patient.nhs_number) and numbers[patient.nhs_number] > 1)
        reason = final_reason(own_reason(patient, policy), duplicated)
        reason, dissent = with_consent(
            reason, latest_consent(practice.consent.get(patient.patient_id)), policy)
        decisions.append(Decision(patient_key(patient.patient_id, patient.row, duplicated_ids),
                                  patient, reason, dissent))
    return decisions


def final_reason(own: str | None, duplicated: bool) -> str | None:
    """The reason once the other rows are known: a duplicate comes right after a malformed row in
    the precedence, so it can be decided after the patient's own reasons."""
    if own == "malformed_record" or not duplicated:
        return own
    return "duplicate_record"


def with_consent(reason: str | None, consent: str | None, policy: Policy) -> tuple[str | None, bool]:
    """(reason, dissent) after the latest consent code: an otherwise eligible patient who dissents
    is left out, or sent a summary stating dissent under the ``blank`` policy."""
    if reason is None and consent == CONSENT_DISSENT:
        if policy.dissent == "exclude":
            return "dissent", False
        return None, True
    return reason, False


def own_reason(patient: Patient, policy: Policy) -> str | None:
    """The first reason that applies from the patient's own row, leaving out the duplicate check,
    which needs every row (``final_reason``) and dissent, which needs consent (``with_consent``)."""
    if patient.problems:
        return "malformed_record"
    if not patient.nhs_number:
        return "no_nhs_number"
    if not is_valid(patient.nhs_number):
        return "invalid_nhs_number"
    if patient.registration_type != "permanent":
        return "not_permanent"
    if patient.left_on is not None:
        return "left_practice"
    if patient.deceased_on is not None:
        return "deceased"
    if patient.fp69:
        return "fp69"
    if patient.sensitive:
        return "sensitive"
    if not patient.pds_synchronised:
        return "not_pds_synchronised"
    if patient.has_national_summary and not _may_update(patient, policy):
        return "existing_summary"
    return None


def _may_update(patient: Patient, policy: Policy) -> bool:
    days = policy.update_existing_after_days
    if days is None or patient.registered_on is None:
        return False
    return patient.registered_on + timedelta(days=days) < policy.today


def summarise(decisions: Iterable[Decision]) -> dict:
    """The dry-run figures of ``scr-nb eligibility --json``: every reason listed, in SPEC order."""
    return summarise_reasons(d.reason for d in decisions)


def summarise_reasons(reasons: Iterable[str | None]) -> dict:
    """``summarise``'s figures from each row's reason (None: eligible)."""
    counts = Counter(reasons)
    eligible = counts.pop(None, 0)
    return {
        "total": eligible + sum(counts.values()),
        "eligible": eligible,
        "not_required_by_reason": {r: counts.get(r, 0) for r in NOT_REQUIRED_REASONS},
    }
