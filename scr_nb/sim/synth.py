"""Synthetic practice extracts (SPEC 3), so demos, tests and benchmarks never need real patients.

``write_practice`` streams a practice of any size to disk, deterministic for (patients, seed, today).
Every patient row is built to have one designed outcome (eligible, or one not-required reason in
SPEC 4 order) and the summary it returns counts them, so the eligibility module can be checked
against it. All NHS numbers that pass Modulus 11 are unique numbers from the test range
(999 000 0000 to 999 999 9999) except in the deliberate duplicate pairs. That range holds only
909,091 valid numbers, so practices above about 940,000 rows carry more patients without a valid
number (the summary counts them like any other).
"""

from __future__ import annotations

import csv
import json
import heapq
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from scr_nb.constants import (
    CONSENT_DISSENT,
    CONSENT_EXPRESS_ADDITIONAL,
    CONSENT_EXPRESS_CORE,
    CONSENT_IMPLIED,
    TEST_NHS_NUMBER_RANGE,
)
from scr_nb.extract.nhs_number import check_digit, is_valid, normalise
from scr_nb.extract.reader import REQUIRED_COLUMNS
from scr_nb.spine.content import months_back
from scr_nb.store.states import NOT_REQUIRED_REASONS

# The columns of SPEC 3, in the order they are written: the reader's own list.
COLUMNS = REQUIRED_COLUMNS
BOM_FILES = frozenset({"patients.csv"})  # written as spreadsheets write them, to exercise the reader

# One block of 200 patient rows, shuffled, repeated: every reason appears in every full block, so
# any practice of 200 rows or more has them all. Pairs ("dup_*") are two rows each.
_BLOCK: tuple[tuple[str, int], ...] = (
    ("eligible", 156),
    ("malformed_record", 4),
    ("dup_pid", 1),             # the same patient_id on two rows
    ("dup_nhs", 1),             # two patient_ids with the same valid NHS number
    ("no_nhs_number", 3),
    ("invalid_nhs_number", 3),
    ("not_permanent", 6),
    ("left_practice", 4),
    ("deceased", 3),
    ("fp69", 2),
    ("sensitive", 2),
    ("not_pds_synchronised", 3),
    ("existing_summary", 5),
    ("dissent", 5),
)
_PAIRS = frozenset({"dup_pid", "dup_nhs"})
_BLOCK_ROWS = sum(count * (2 if design in _PAIRS else 1) for design, count in _BLOCK)
_FORCED_ELIGIBLE = 3           # the first rows of a practice, so even a tiny practice has some
_EXTRA_FLAG_RATE = 0.04        # chance of each later reason also holding on an excluded row
_DUP_PID_WITH_MALFORMED = 0.25  # share of duplicate-id pairs where one row is also malformed

# The test range holds this many numbers that pass Modulus 11 (one 9-digit stem in 11 has check 10).
VALID_TEST_NUMBERS = 909_091
_NUMBERS_PER_ROW = 0.965       # valid numbers the block design uses per row (measured 0.960)

_NUMBER_REASONS = ("no_nhs_number", "invalid_nhs_number")
_REASON_INDEX = {reason: i for i, reason in enumerate(NOT_REQUIRED_REASONS)}
_EARLIEST = date(1900, 1, 1).toordinal()
_FIRST_STEM = TEST_NHS_NUMBER_RANGE[0] // 10
_STEMS = TEST_NHS_NUMBER_RANGE[1] // 10 - _FIRST_STEM + 1

GROUPS: tuple[tuple[str, float], ...] = (
    ("Care home residents", 0.03),
    ("Pilot batch A", 0.05),
    ("Housebound patients", 0.02),
)

# --- Names ------------------------------------------------------------------------------------------
_FAMILY = (
    "Smith", "Jones", "Williams", "Taylor", "Brown", "Davies", "Evans", "Wilson", "Thomas", "Johnson",
    "Roberts", "Robinson", "Thompson", "Wright", "Walker", "White", "Edwards", "Hughes", "Green", "Hall",
    "Lewis", "Harris", "Clarke", "Patel", "Jackson", "Wood", "Turner", "Martin", "Cooper", "Hill",
    "Ward", "Morris", "Moore", "Clark", "Lee", "King", "Baker", "Harrison", "Morgan", "Allen", "James",
    "Scott", "Phillips", "Watson", "Davis", "Parker", "Price", "Bennett", "Young", "Griffiths",
    "Mitchell", "Kelly", "Cook", "Carter", "Richardson", "Bailey", "Collins", "Bell", "Shaw", "Murphy",
    "Miller", "Cox", "Richards", "Khan", "Marshall", "Anderson", "Simpson", "Ellis", "Adams", "Singh",
    "Begum", "Wilkinson", "Foster", "Chapman", "Powell", "Webb", "Rogers", "Gray", "Mason", "Ali",
    "Hunt", "Hussain", "Campbell", "Matthews", "Owen", "Palmer", "Holmes", "Mills", "Barnes", "Knight",
    "Lloyd", "Butler", "Russell", "Barker", "Fisher", "Stevens", "Jenkins", "Murray", "Dixon", "Harvey",
    "O'Brien", "D'Souza", "O'Connor", "O'Neill", "D'Arcy", "McDonald", "MacLeod", "Ahmed", "Kaur",
    "Shah", "Okafor", "Mensah", "Nowak", "Kowalski", "Fitzgerald-Jones", "Llewellyn", "ap Rhys",
)
_FAMILY_ACCENTED = (
    "Ångström-Smith", "Ó Súilleabháin", "Müller", "Nguyễn", "Wiśniewski", "Şahin", "Gonçalves",
    "Lefèvre", "Ní Bhriain", "Øvergård", "Dvořák", "Núñez",
)
_FAMILY_HOSTILE = ("Smith & <Jones>", "Smith, Jnr", "Brown-\"Bruno\"", "Lee & Co > Lee")

_GIVEN_F = (
    "Olivia", "Amelia", "Isla", "Ava", "Mia", "Grace", "Lily", "Sophie", "Emily", "Ella", "Freya",
    "Charlotte", "Jessica", "Poppy", "Evie", "Ruby", "Hannah", "Sarah", "Margaret", "Susan", "Patricia",
    "Elizabeth", "Jean", "Mary", "Joan", "Karen", "Julie", "Helen", "Rachel", "Aisha", "Fatima",
    "Priya", "Zoë", "Siân", "Chloé", "Siobhán", "Aoife", "Renée", "Niamh", "Cerys", "Mairéad", "Zofia",
)
_GIVEN_M = (
    "Oliver", "George", "Harry", "Noah", "Jack", "Leo", "Arthur", "Muhammad", "Oscar", "Charlie",
    "Jacob", "Thomas", "James", "William", "David", "John", "Michael", "Peter", "Robert", "Paul",
    "Andrew", "Mark", "Stephen", "Richard", "Christopher", "Daniel", "Mohammed", "Arjun", "Kwame",
    "Seán", "Rhys", "Dafydd", "Eóin", "Łukasz", "José", "Ciarán", "Ieuan", "Tomás", "Aled", "Kieran",
)
_GIVEN_HOSTILE = ('Elizabeth "Betty"', "Jean-Luc <JL>", "Anne & Marie", "Mary-Kate, Jnr")

# --- Medicines -----------------------------------------------------------------------------------
# form -> (dosage texts, quantities, unit). Some dosages hold commas and newlines on purpose.
_FORMS: dict[str, tuple[tuple[str, ...], tuple[int, ...], str]] = {
    "tablet": (
        ("One tablet daily", "Take ONE tablet TWICE a day", "One to be taken three times a day",
         "One tablet at night", "One or two tablets up to four times a day when required",
         "One tablet daily,\nwith or after food", "As directed by the hospital, review in 3 months"),
        (28, 56, 84, 30, 100), "tablet"),
    "capsule": (
        ("One capsule daily", "Take ONE capsule THREE times a day", "One capsule twice a day",
         "One capsule in the morning, before food", "One capsule three times a day\nuntil finished"),
        (21, 28, 56, 84), "capsule"),
    "inhaler": (
        ("Two puffs when required", "One puff twice a day", "Two puffs twice a day, rinse mouth after",
         "Two puffs up to four times a day when required for breathlessness"),
        (1, 2), "inhaler"),
    "cream": (
        ("Apply thinly twice a day", "Apply to the affected area 2-3 times a day, avoid the eyes",
         "Use as a soap substitute"),
        (15, 30, 50, 100), "gram"),
    "liquid": (
        ("5ml three times a day", "10ml after meals & at bedtime",
         "2.5ml to 5ml every 4 hours when required"),
        (100, 150, 300, 500), "ml"),
    "drops": (("One drop in each eye at night", "One drop into the affected eye every 2 hours"),
              (5, 10), "ml"),
    "injection": (("As directed", "Inject 10 units at night, titrate as advised"), (1, 5),
                  "pre-filled disposable injection"),
    "patch": (("Apply one patch every 7 days", "Apply one patch twice a week, change site"), (4, 8),
              "patch"),
}
# (drug, form, usually acute)
_DRUGS: tuple[tuple[str, str, bool], ...] = (
    ("Amlodipine 5mg tablets", "tablet", False),
    ("Atorvastatin 20mg tablets", "tablet", False),
    ("Metformin 500mg tablets", "tablet", False),
    ("Levothyroxine sodium 50microgram tablets", "tablet", False),
    ("Bisoprolol fumarate 2.5mg tablets", "tablet", False),
    ("Sertraline 50mg tablets", "tablet", False),
    ("Simvastatin 40mg tablets", "tablet", False),
    ("Aspirin 75mg dispersible tablets", "tablet", False),
    ("Paracetamol 500mg tablets", "tablet", True),
    ("Co-codamol 30mg/500mg tablets", "tablet", True),
    ("Citalopram 20mg tablets", "tablet", False),
    ("Furosemide 40mg tablets", "tablet", False),
    ("Naproxen 500mg tablets", "tablet", True),
    ("Prednisolone 5mg tablets", "tablet", True),
    ("Warfarin sodium 1mg tablets", "tablet", False),
    ("Apixaban 5mg tablets", "tablet", False),
    ("Losartan potassium 50mg tablets", "tablet", False),
    ("Bendroflumethiazide 2.5mg tablets", "tablet", False),
    ("Mirtazapine 15mg tablets", "tablet", False),
    ("Folic acid 5mg tablets", "tablet", False),
    ("Trimethoprim 200mg tablets", "tablet", True),
    ("Co-amoxiclav 500mg/125mg tablets", "tablet", True),
    ("Amoxicillin 500mg capsules", "capsule", True),
    ("Ramipril 5mg capsules", "capsule", False),
    ("Omeprazole 20mg gastro-resistant capsules", "capsule", False),
    ("Lansoprazole 30mg gastro-resistant capsules", "capsule", False),
    ("Flucloxacillin 500mg capsules", "capsule", True),
    ("Doxycycline 100mg capsules", "capsule", True),
    ("Gabapentin 300mg capsules", "capsule", False),
    ("Pregabalin 75mg capsules", "capsule", False),
    ("Fluoxetine 20mg capsules", "capsule", False),
    ("Tamsulosin 400microgram modified-release capsules", "capsule", False),
    ("Nitrofurantoin 100mg modified-release capsules", "capsule", True),
    ("Colecalciferol 800unit capsules", "capsule", False),
    ("Salbutamol 100micrograms/dose inhaler CFC free", "inhaler", False),
    ("Beclometasone 100micrograms/dose inhaler CFC free", "inhaler", False),
    ("Beclometasone 100micrograms/dose / Formoterol 6micrograms/dose inhaler CFC free", "inhaler",
     False),
    ("Tiotropium 2.5micrograms/dose solution for inhalation cartridge", "inhaler", False),
    ("Hydrocortisone 1% cream", "cream", True),
    ("Clotrimazole 1% cream", "cream", True),
    ("Fusidic acid 2% cream", "cream", True),
    ("Emollient cream (liquid paraffin 50%, white soft paraffin)", "cream", False),
    ("Lactulose 3.1-3.7g/5ml oral solution", "liquid", False),
    ("Amoxicillin 250mg/5ml oral suspension sugar free", "liquid", True),
    ("Sodium alginate & potassium bicarbonate oral suspension peppermint", "liquid", True),
    ("Latanoprost 50micrograms/ml eye drops", "drops", False),
    ("Chloramphenicol 0.5% eye drops", "drops", True),
    ("Insulin glargine 100units/ml solution for injection 3ml pre-filled pens", "injection", False),
    ("Estradiol 50micrograms/24hours transdermal patches", "patch", False),
    ("Buprenorphine 5micrograms/hour seven day transdermal patches", "patch", False),
)
# Free-text entries as clinicians type them, with characters XML must escape.
_DRUGS_HOSTILE: tuple[tuple[str, str, bool], ...] = (
    ("Paracetamol 500mg \"soluble\" tablets <hospital supply>", "tablet", True),
    ("Co-amoxiclav 500mg/125mg tablets & probiotic (patient's own)", "tablet", True),
    ("Aqueous cream, 100g <emollient> & 'barrier' use", "cream", False),
)

# (kind, description). Descriptions keep commas, quotes and XML-hostile characters now and then.
_ALLERGIES: tuple[tuple[str, str], ...] = (
    ("allergy", "Penicillin allergy"),
    ("allergy", "Allergy to peanuts"),
    ("allergy", "Allergy to latex, including gloves and catheters"),
    ("allergy", "Allergy to bee venom"),
    ("allergy", "Allergy to shellfish"),
    ("allergy", "Allergy to amoxicillin"),
    ("allergy", "Allergy to sulfonamides"),
    ("allergy", "House dust mite allergy"),
    ("allergy", "Allergy to adhesive plaster & <tape>"),
    ("allergy", "Allergy to eggs\nanaphylaxis as a child"),
    ("intolerance", "Lactose intolerance"),
    ("intolerance", "Intolerance to statins"),
    ("intolerance", "Gluten intolerance"),
    ("intolerance", "Intolerance to metformin - diarrhoea"),
    ("intolerance", "Intolerance to \"opioids\" (nausea, vomiting)"),
    ("adverse_reaction", "Adverse reaction to Codeine"),
    ("adverse_reaction", "Adverse reaction to ACE inhibitor, dry cough"),
    ("adverse_reaction", "Adverse reaction to Trimethoprim"),
    ("adverse_reaction", "Adverse reaction to Ibuprofen"),
    ("adverse_reaction", "Adverse reaction to iodinated contrast media"),
)
_NO_KNOWN_ALLERGY = (("allergy", "No known drug allergy"), ("allergy", "No known allergies"))

_CONSENT_CODES = (CONSENT_IMPLIED, CONSENT_EXPRESS_CORE, CONSENT_EXPRESS_ADDITIONAL, "93C2")
_DISSENT_CODES = (CONSENT_DISSENT, CONSENT_DISSENT, CONSENT_DISSENT, "93C3")
_CONTROL_CHARACTER = "\x0b"    # forbidden in XML 1.0: the message builder must remove it


@dataclass(frozen=True)
class SynthSummary:
    """What was written, and the outcome each patient row was designed to have.

    ``expected_reasons`` lists every not-required reason in SPEC 4 order (zero when absent) under the
    default policy (dissent excluded, existing summaries not updated), for an eligibility run with
    the same ``today``; ``expected_eligible`` is the rest.
    """

    out_dir: Path
    patients: int
    seed: int
    today: date
    rows: dict[str, int]
    expected_reasons: dict[str, int]
    expected_eligible: int


def write_practice(out_dir: str | Path, patients: int, seed: int,
                   today: date | None = None, ods_code: str = "A12345", name: str | None = None,
                   asid: str = "200000000001") -> SynthSummary:
    """Write patients.csv, consent.csv, medications.csv, allergies.csv, groups.csv and practice.json
    into out_dir.

    ``patients`` is the number of rows of patients.csv (duplicate pairs included). Rows are streamed,
    so memory does not grow with the practice. Example: ``write_practice("demo", 2000, seed=1)``.
    """
    if patients < 0:
        raise ValueError(f"patients must be 0 or more, not {patients}")
    today = today or date.today()
    details = {"ods_code": ods_code, "name": name or f"Synthetic practice {ods_code}",
               "asid": asid}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        name: open(out / name, "w", newline="", buffering=1 << 20,
                   encoding="utf-8-sig" if name in BOM_FILES else "utf-8")
        for name in COLUMNS
    }
    try:
        writers = {name: csv.writer(f) for name, f in files.items()}
        for name, columns in COLUMNS.items():
            writers[name].writerow(columns)
        generator = _Practice(writers, patients, seed, today)
        generator.write()
    finally:
        for f in files.values():
            f.close()
    (out / "practice.json").write_text(json.dumps(details, indent=2) + "\n", encoding="utf-8")
    reasons = {reason: generator.reasons.get(reason, 0) for reason in NOT_REQUIRED_REASONS}
    return SynthSummary(
        out_dir=out, patients=patients, seed=seed, today=today, rows=dict(generator.rows),
        expected_reasons=reasons, expected_eligible=generator.eligible,
    )


class _NumberPool:
    """Unique valid NHS numbers from the test range, in a seeded scattered order.

    The 9-digit stems of the range are visited once each through a bijection (a small Feistel
    network on two base-1000 halves), skipping the stems whose Modulus 11 check is 10.
    """

    def __init__(self, rng: random.Random):
        if _STEMS != 1000 * 1000:
            raise ValueError("the number pool expects a test range of one million 9-digit stems")
        self._keys = tuple(rng.randrange(1 << 20) for _ in range(4))
        self._next = 0

    def take(self) -> str | None:
        """The next unused valid number (10 digits), or None when the range is used up."""
        while self._next < _STEMS:
            left, right = divmod(self._next, 1000)
            self._next += 1
            for key in self._keys:
                left, right = right, (left + ((right * 7919 + key) * 2654435761 >> 9)) % 1000
            stem = str(_FIRST_STEM + left * 1000 + right)
            check = check_digit(stem)
            if check is not None:
                return f"{stem}{check}"
        return None


def _format_number(digits: str, r: float) -> str:
    """How people write numbers: mostly plain, sometimes grouped 3-3-4 with spaces or dashes."""
    if r < 0.88:
        return digits
    sep = " " if r < 0.96 else "-"
    return f"{digits[:3]}{sep}{digits[3:6]}{sep}{digits[6:]}"


def _code(rng: random.Random, extension: bool) -> str:
    """Digits shaped like a SNOMED CT id: core (item, partition 00, digit) or UK extension (item,
    namespace 1000001, partition 10, digit). The last digit is not a real Verhoeff check."""
    if extension:
        return f"{rng.randrange(1_000_000, 42_000_000)}100000110{rng.randrange(10)}"
    return f"{rng.randrange(100_000, 450_000)}00{rng.randrange(10)}"


def _catalogue_codes(items: tuple, salt: int) -> tuple[str, ...]:
    """One stable code per catalogue entry, the same in every practice."""
    rng = random.Random(salt)
    return tuple(_code(rng, rng.random() < 0.5) for _ in items)


# (drug, code, (dosage, quantity) choices, share prescribed as acute), hostile free text last.
_MEDICINES = tuple(
    (drug, code,
     tuple((dosage, f"{n} {_FORMS[form][2]}") for dosage in _FORMS[form][0] for n in _FORMS[form][1]),
     0.85 if acute_usually else 0.2)
    for (drug, form, acute_usually), code in zip(
        _DRUGS + _DRUGS_HOSTILE, _catalogue_codes(_DRUGS + _DRUGS_HOSTILE, 3_150_007))
)
_PLAIN_DRUGS = len(_DRUGS)
_ALLERGY_ENTRIES = _ALLERGIES + _NO_KNOWN_ALLERGY     # negative entries last
_ALLERGY_CODES = _catalogue_codes(_ALLERGY_ENTRIES, 3_150_016)


def _parse_iso(value: str) -> int | None:
    """The ordinal of a strict YYYY-MM-DD date, or None."""
    if len(value) != 10 or value[4] != "-" or value[7] != "-" or not value.replace("-", "").isdigit():
        return None
    try:
        return date(int(value[:4]), int(value[5:7]), int(value[8:])).toordinal()
    except ValueError:
        return None


def _malformed(row: list[str], today: int, known: dict[str, int]) -> bool:
    """Whether a patients.csv row breaks SPEC 4's date rules. ``known``: dates already parsed."""
    if not row[4]:
        return True
    for value in (row[4], row[7], row[8], row[9]):
        if value:
            day = known.get(value)
            if day is None:
                day = _parse_iso(value)
            if day is None or not _EARLIEST <= day <= today:
                return True
    return False


def _designed_reason(row: list[str], duplicated: bool, dissent: bool, valid_number: bool,
                     today: int, known: dict[str, int]) -> str | None:
    """The first SPEC 4 reason that applies to a patients.csv row as written (None: eligible).

    ``duplicated`` and ``dissent`` depend on other rows and files, and ``valid_number`` on how the
    number was made (the pool's pass Modulus 11, the others were checked to fail it), which the
    generator knows; the tests recompute all of it from the files."""
    if _malformed(row, today, known):
        return "malformed_record"
    if duplicated:
        return "duplicate_record"
    if not normalise(row[1]):
        return "no_nhs_number"
    if not valid_number:
        return "invalid_nhs_number"
    if row[6] != "permanent":
        return "not_permanent"
    if row[8]:
        return "left_practice"
    if row[9]:
        return "deceased"
    if row[10] == "true":
        return "fp69"
    if row[11] == "true":
        return "sensitive"
    if row[12] != "true":
        return "not_pds_synchronised"
    if row[13] == "true":
        return "existing_summary"
    if dissent:
        return "dissent"
    return None


class _Dates(dict):
    """ordinal -> "YYYY-MM-DD", each formatted once; ``ordinal`` maps the text back."""

    def __init__(self) -> None:
        super().__init__()
        self.ordinal: dict[str, int] = {}

    def __missing__(self, day: int) -> str:
        text = self[day] = date.fromordinal(day).isoformat()
        self.ordinal[text] = day
        return text


class _Practice:
    """The generator's state while one practice is streamed out."""

    def __init__(self, writers: dict, patients: int, seed: int, today: date):
        self.rng = random.Random(f"scr-nb synth {seed}")
        self.r = self.rng.random
        self.w_patients = writers["patients.csv"].writerow
        self.w_consent = writers["consent.csv"].writerows
        self.w_meds = writers["medications.csv"].writerows
        self.w_allergies = writers["allergies.csv"].writerows
        self.w_groups = writers["groups.csv"].writerow
        self.target = patients
        self.today_ord = today.toordinal()
        self.six = months_back(today, 6).toordinal()
        self.twelve = months_back(today, 12).toordinal()
        self.iso = _Dates()
        self.ordinal = self.iso.ordinal
        self.pool = _NumberPool(self.rng)
        self.rows = {name: 0 for name in COLUMNS}
        self.reasons: dict[str, int] = {}
        self.eligible = 0
        self.next_pid = 1
        self.next_med = 1
        self.next_allergy = 1
        # Above about 940,000 rows the test range cannot give every patient a unique valid number:
        # that share of would-be eligible patients is written without one (or with an invalid one).
        needed = patients * _NUMBERS_PER_ROW - VALID_TEST_NUMBERS * 0.995
        block_eligible = dict(_BLOCK)["eligible"] / _BLOCK_ROWS
        self.no_number_share = max(0.0, needed / (patients * block_eligible)) if patients else 0.0

    # --- the row plan --------------------------------------------------------------------------
    def _designs(self) -> Iterator[str]:
        """Designs in shuffled blocks; the first block starts with a few eligible patients."""
        block = [design for design, count in _BLOCK for _ in range(count)]
        first = True
        while True:
            self.rng.shuffle(block)
            if first:
                rest = list(block)
                for _ in range(_FORCED_ELIGIBLE):
                    rest.remove("eligible")
                yield from ["eligible"] * _FORCED_ELIGIBLE + rest
                first = False
            else:
                yield from block

    def write(self) -> None:
        pending: list[tuple] = []   # (due, order, row, dissent, valid_number): second rows of pairs
        designs = self._designs()
        written = 0
        order = 0
        while written < self.target:
            remaining = self.target - written
            if pending and (pending[0][0] <= written or remaining <= len(pending)):
                _, _, row, dissent, valid = heapq.heappop(pending)
                self._emit(row, True, dissent, valid)
                written += 1
                continue
            design = next(designs)
            if design in _PAIRS and remaining - len(pending) < 2:
                design = "eligible"
            if design == "eligible" and self.no_number_share and self.r() < self.no_number_share:
                design = "no_nhs_number" if self.r() < 0.6 else "invalid_nhs_number"
            if design in _PAIRS:
                pair = self._pair(design)
                if pair is None:            # the number range is used up: a single row instead
                    design = "no_nhs_number"
                else:
                    first, second = pair
                    self._emit(first[0], True, first[1], first[2])
                    written += 1
                    order += 1
                    due = written + int(self.r() * 40)
                    heapq.heappush(pending, (due, order, *second))
                    continue
            row, dissent, valid = self._single(design)
            self._emit(row, False, dissent, valid)
            written += 1

    def _emit(self, row: list[str], duplicated: bool, dissent: bool, valid_number: bool) -> None:
        self.w_patients(row)
        self.rows["patients.csv"] += 1
        reason = _designed_reason(row, duplicated, dissent, valid_number, self.today_ord, self.ordinal)
        if reason is None:
            self.eligible += 1
        else:
            self.reasons[reason] = self.reasons.get(reason, 0) + 1

    # --- patients -------------------------------------------------------------------------------
    def _new_pid(self) -> str:
        pid = f"P{self.next_pid:06d}"
        self.next_pid += 1
        return pid

    def _conditions(self, design: str, allow_number_reasons: bool = True) -> set[str]:
        """The reason the row is built for, plus now and then a later one (the first still wins)."""
        if design == "eligible":
            return set()
        conditions = {design} if design in _REASON_INDEX else set()
        start = max(_REASON_INDEX.get(design, 0), _REASON_INDEX["duplicate_record"]) + 1
        for reason in NOT_REQUIRED_REASONS[start:]:
            if self.r() < _EXTRA_FLAG_RATE:
                if reason in _NUMBER_REASONS and not allow_number_reasons:
                    continue
                conditions.add(reason)
        return conditions

    def _number(self, conditions: set[str]) -> tuple[str, bool]:
        """The number as written, and whether it passes Modulus 11."""
        if "no_nhs_number" in conditions:
            return "", False
        if "invalid_nhs_number" in conditions:
            return self._invalid_number(), False
        digits = self.pool.take()
        return (_format_number(digits, self.r()), True) if digits else ("", False)

    def _invalid_number(self) -> str:
        """Numbers that fail Modulus 11 the ways they do in real lists."""
        while True:
            stem = str(_FIRST_STEM + int(self.r() * _STEMS))
            check = check_digit(stem)
            r = self.r()
            if r < 0.5:         # a mistyped digit: the check digit does not match
                wrong = (check if check is not None else 0) + 1 + int(self.r() * 9)
                number = _format_number(f"{stem}{wrong % 10}", self.r())
            elif r < 0.65:      # a stem no valid number can end (its check would be 10)
                if check is not None:
                    continue
                number = f"{stem}{int(self.r() * 10)}"
            elif r < 0.8:       # a digit dropped
                number = stem
            elif r < 0.9:       # a digit too many
                number = f"{stem}{int(self.r() * 100):02d}"
            else:               # a letter O for a zero
                number = f"{stem[:3]}O{stem[4:]}{int(self.r() * 10)}"
            if not is_valid(number):
                return number

    def _person(self) -> tuple[str, str, str, int]:
        r = self.r
        x = r()
        sex = "F" if x < 0.495 else "M" if x < 0.985 else "U"
        given_list = _GIVEN_F if sex == "F" else _GIVEN_M if sex == "M" else (_GIVEN_F + _GIVEN_M)
        x = r()
        if x < 0.004:
            given = _GIVEN_HOSTILE[int(r() * len(_GIVEN_HOSTILE))]
        else:
            given = given_list[int(r() * len(given_list))]
        x = r()
        if x < 0.004:
            family = _FAMILY_HOSTILE[int(r() * len(_FAMILY_HOSTILE))]
        elif x < 0.05:
            family = _FAMILY_ACCENTED[int(r() * len(_FAMILY_ACCENTED))]
        else:
            family = _FAMILY[int(r() * len(_FAMILY))]
        # Ages roughly as on a UK list: children, working age, older, a few very old.
        x = r()
        low, width = ((0, 18) if x < 0.2 else (18, 22) if x < 0.48 else (40, 25) if x < 0.81
                      else (65, 20) if x < 0.97 else (85, 19))
        birth = self.today_ord - 1 - int((low + r() * width) * 365.25)
        return family, given, sex, max(birth, _EARLIEST)

    def _patient_row(self, pid: str, number: str, conditions: set[str],
                     person: tuple[str, str, str, int]) -> list[str]:
        r = self.r
        today = self.today_ord
        family, given, sex, birth = person
        low = max(birth, today - 60 * 365)
        registered = low + int(r() * (today - low)) if r() < 0.85 or birth < today - 365 * 20 else birth
        registration = "permanent"
        if "not_permanent" in conditions:
            registration = "applied" if r() < 0.55 else "temporary"
        left = deceased = ""
        if "left_practice" in conditions:
            left = self.iso[registered + int(r() * (today - registered))]
        if "deceased" in conditions:
            deceased = self.iso[registered + int(r() * (today - registered))]
        row = [
            pid, number, family, given, self.iso[birth], sex, registration, self.iso[registered], left,
            deceased,
            "true" if "fp69" in conditions else "false",
            "true" if "sensitive" in conditions else "false",
            "false" if "not_pds_synchronised" in conditions else "true",
            "true" if "existing_summary" in conditions else "false",
        ]
        if "malformed_record" in conditions:
            self._break_a_date(row, birth)
        return row

    def _break_a_date(self, row: list[str], birth: int) -> None:
        """Spoil one date the ways extracts do: another format, impossible, blank, future, pre-1900."""
        r = self.r
        birth_date = date.fromordinal(birth)
        future = self.iso[self.today_ord + 3650 + int(r() * 3650)]   # stays future for years
        year = 1993 + int(r() * 7) * 4 + 1                         # never a leap year
        x = r()
        if x < 0.15:
            row[4] = birth_date.strftime("%d/%m/%Y")
        elif x < 0.25:
            row[4] = f"31/02/{birth_date.year}"
        elif x < 0.35:
            row[4] = f"{birth_date.year}-02-30"
        elif x < 0.45:
            row[4] = ""
        elif x < 0.55:
            row[4] = future
        elif x < 0.62:
            row[4] = "1850-01-01" if r() < 0.5 else f"18{10 + int(r() * 90)}-{birth_date:%m-%d}"
        elif x < 0.70:
            row[7] = future
        elif x < 0.76:
            row[7] = "1899-12-31"
        elif x < 0.84:
            row[7] = f"{year}-13-01" if r() < 0.5 else f"01/09/{year}"
        elif x < 0.92:
            row[8] = f"{year}-02-29" if r() < 0.5 else future
        else:
            row[9] = "unknown" if r() < 0.5 else "1888-08-08"

    def _single(self, design: str) -> tuple[list[str], bool, bool]:
        """One row: (row, dissent, number passes Modulus 11)."""
        conditions = self._conditions(design)
        pid = self._new_pid()
        person = self._person()
        number, valid = self._number(conditions)
        row = self._patient_row(pid, number, conditions, person)
        dissent = "dissent" in conditions
        self._clinical(pid, person[3], dissent)
        return row, dissent, valid

    def _pair(self, design: str) -> tuple[tuple[list[str], bool, bool], ...] | None:
        """Two rows of one person: the same patient_id twice, or two ids with one NHS number."""
        person = self._person()
        if design == "dup_nhs":
            digits = self.pool.take()
            if digits is None:
                return None
            rows = []
            for _ in range(2):
                conditions = self._conditions(design, allow_number_reasons=False)
                pid = self._new_pid()
                row = self._patient_row(pid, _format_number(digits, self.r()), conditions, person)
                dissent = "dissent" in conditions
                self._clinical(pid, person[3], dissent)
                rows.append((row, dissent, True))
            return tuple(rows)
        pid = self._new_pid()
        first_conditions = self._conditions(design)
        second_conditions = self._conditions(design)
        if self.r() < _DUP_PID_WITH_MALFORMED:
            (first_conditions if self.r() < 0.5 else second_conditions).add("malformed_record")
        first_number, first_valid = self._number(first_conditions)
        if self.r() < 0.6 and first_number:     # the same number again, maybe typed differently
            second_number, second_valid = _format_number(normalise(first_number), self.r()), first_valid
        else:
            second_number, second_valid = self._number(second_conditions)
        dissent = "dissent" in first_conditions
        first = self._patient_row(pid, first_number, first_conditions, person)
        second = self._patient_row(pid, second_number, second_conditions, person)
        self._clinical(pid, person[3], dissent)
        return (first, dissent, first_valid), (second, dissent, second_valid)

    # --- the other files ------------------------------------------------------------------------
    def _clinical(self, pid: str, birth: int, dissent: bool) -> None:
        """Consent, medications, allergies and groups of one patient_id."""
        self._consent(pid, birth, dissent)
        self._medications(pid, birth)
        self._allergies(pid, birth)
        slot = self.next_pid - 2            # 0 for the first patient_id made
        r = self.r
        for index, (name, share) in enumerate(GROUPS):
            if r() < share or slot == index:
                self.w_groups((name, pid))
                self.rows["groups.csv"] += 1

    def _consent_code(self, dissent: bool) -> str:
        r = self.r
        codes = _DISSENT_CODES if dissent else _CONSENT_CODES
        code = codes[int(r() * len(codes))]
        x = r()
        return code if x < 0.6 else f"{code}.00" if x < 0.8 else f"{code}."

    def _consent(self, pid: str, birth: int, dissent: bool) -> None:
        """Most have no entry (implied consent). The latest date decides, whatever the file order."""
        x = self.r()
        if dissent:
            plan = (True,) if x < 0.45 else (False, True) if x < 0.85 else (True, False, True)
        else:
            if x < 0.85:
                return
            plan = (False,) if x < 0.93 else (False, False) if x < 0.96 else (True, False)
        low = max(birth, self.today_ord - 18 * 365)
        span = self.today_ord - low + 1
        plan = plan[-span:]
        days = sorted(self.rng.sample(range(low, self.today_ord + 1), len(plan)))
        entries = [(pid, self._consent_code(is_dissent), self.iso[day])
                   for is_dissent, day in zip(plan, days)]
        if self.r() < 0.3:
            entries.reverse()
        self.w_consent(entries)
        self.rows["consent.csv"] += len(entries)

    def _medications(self, pid: str, birth: int) -> None:
        """0-8 items, acute and repeat, dated inside, on and just outside the SPEC 5 windows."""
        r = self.r
        count = _MED_COUNTS[int(r() * len(_MED_COUNTS))]
        if not count:
            return
        iso = self.iso
        today, six, twelve = self.today_ord, self.six, self.twelve
        floor = birth if birth > _EARLIEST else _EARLIEST
        items = []
        append = items.append
        number = self.next_med
        for number in range(number, number + count):
            if r() < 0.01:
                index = _PLAIN_DRUGS + int(r() * (len(_MEDICINES) - _PLAIN_DRUGS))
            else:
                index = int(r() * _PLAIN_DRUGS)
            drug, code, choices, acute_share = _MEDICINES[index]
            dosage, quantity = choices[int(r() * len(choices))]
            if r() < 0.003:
                cut = drug.find(" ")
                drug = f"{drug[:cut]}{_CONTROL_CHARACTER}{drug[cut:]}"
            repeat_until = discontinued = ""
            if r() < acute_share:
                kind = "acute"
                prescribed = _around(r, today, twelve)
            else:
                kind = "repeat"
                prescribed = _around(r, today, six)
                x = r()
                if x < 0.4:
                    pass
                elif x < 0.6:
                    repeat_until = iso[today + 30 + int(r() * 335)]
                else:
                    until = _around(r, today, six)
                    repeat_until = iso[until if until > floor else floor]
                if r() < 0.15:
                    stopped = _around(r, today, six)
                    discontinued = iso[stopped if stopped > floor else floor]
                    prescribed = min(prescribed, stopped - int(r() * 60))
            append((
                pid, f"M{number:07d}", kind, code, drug, dosage, quantity,
                iso[prescribed if prescribed > floor else floor], repeat_until, discontinued,
            ))
        self.next_med = number + 1
        self.w_meds(items)
        self.rows["medications.csv"] += count

    def _allergies(self, pid: str, birth: int) -> None:
        """Most patients none; some a "no known allergy" entry (negative); some one to three."""
        r = self.r
        x = r()
        if x < 0.08:
            entries = [len(_ALLERGIES) + int(r() * len(_NO_KNOWN_ALLERGY))]
        elif x < 0.66:
            return
        else:
            count = 1 if x < 0.9 else 2 if x < 0.97 else 3
            entries = [int(r() * len(_ALLERGIES)) for _ in range(count)]
        low = max(birth, self.today_ord - 30 * 365)
        rows = []
        for index in entries:
            negative = index >= len(_ALLERGIES)
            kind, description = _ALLERGY_ENTRIES[index]
            if not negative and r() < 0.005:
                description = description.replace(" ", f" {_CONTROL_CHARACTER}", 1)
            recorded = low + int(r() * (self.today_ord - low + 1))
            rows.append((
                pid, f"A{self.next_allergy:07d}", kind, _ALLERGY_CODES[index], description,
                self.iso[recorded], "true" if negative else "false",
            ))
            self.next_allergy += 1
        self.w_allergies(rows)
        self.rows["allergies.csv"] += len(rows)


# How many medication items a patient has: 0 to 8, fewer more often.
_MED_COUNTS = tuple(n for n, weight in enumerate((25, 15, 14, 12, 10, 8, 7, 5, 4))
                    for _ in range(weight))


def _around(r, today: int, boundary: int) -> int:
    """A date near a window: inside it, exactly on its first day, a day either side, or long before."""
    x = r()
    if x < 0.5:
        return boundary + 1 + int(r() * (today - boundary))
    if x < 0.6:
        return boundary
    if x < 0.68:
        return boundary - 1
    if x < 0.73:
        return boundary + 1
    return boundary - 2 - int(r() * 4 * 365)
