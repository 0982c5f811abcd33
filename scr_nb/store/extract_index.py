"""The extract index: one practice extract, read once, kept beside its store (issue 11).

A job reads the CSV files a piece at a time into this SQLite file, decides eligibility from it,
and builds each batch of messages from the rows of just that batch's patients: memory does not grow
with the practice. The index remembers the fingerprint of the files and settings it was made from,
so Resume on an unchanged extract reads nothing but that fingerprint.

It is written to a temporary file and renamed into place only when complete: a crash while
writing leaves the previous index (or none), never half of one. It holds clinical rows, so it is
created private to its owner, like the store.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from datetime import date
from pathlib import Path

from scr_nb.extract.records import Allergy, Medication, Patient
from scr_nb.private_files import create_private
from scr_nb.store.database import Location

INDEX_VERSION = "3"
# What a query picks rows by is a column; the rest of a row, read only to rebuild its record, is
# one JSON array (``data``; dates ISO or null, flags 0 or 1), which costs a small fraction of
# writing each value on its own. Its order is the record's, as ``IndexWriter.add_*`` write it. A
# medications or allergies row holds a run of one patient's records, consecutive in the file (each
# record's line first): ``row`` is the run's first line.
_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE patients (
    row INTEGER PRIMARY KEY, patient_id TEXT NOT NULL, nhs_number TEXT NOT NULL,
    nhs_valid INTEGER NOT NULL, own_reason TEXT, consent TEXT, data TEXT NOT NULL
);
CREATE TABLE medications (patient_id TEXT NOT NULL, row INTEGER NOT NULL, data TEXT NOT NULL);
CREATE TABLE allergies (patient_id TEXT NOT NULL, row INTEGER NOT NULL, data TEXT NOT NULL);
CREATE TABLE groups (name TEXT NOT NULL, patient_id TEXT NOT NULL);
"""
# Each table's count of columns, for ``IndexWriter.insert``.
_WIDTHS = {"patients": 7, "medications": 3, "allergies": 3, "groups": 2}
# Made after the rows are in: building an index over sorted rows once beats keeping it up to date.
_INDEXES = """
CREATE INDEX patients_patient_id ON patients (patient_id);
CREATE INDEX patients_nhs ON patients (nhs_number) WHERE nhs_valid = 1;
CREATE INDEX medications_patient ON medications (patient_id);
CREATE INDEX allergies_patient ON allergies (patient_id);
"""
# The largest number of host parameters one statement takes (SQLite's default is 32,766).
_CHUNK = 900


def index_path(store: str | Path | Location) -> Path:
    """Where a store's extract index lives: beside an SQLite store, named after it; for a practice
    of a PostgreSQL store, in this machine's cache (a worker without one builds it again)."""
    if isinstance(store, Location):
        path = store.sibling(".extract")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path
    store_path = Path(store)
    return store_path.with_name(store_path.name + ".extract")


def _iso(value: date | None) -> str | None:
    return value.isoformat() if value is not None else None


def _day(value: str | None) -> date | None:
    return date.fromisoformat(value) if value else None


def _chunks(items: list, size: int = _CHUNK) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class _Rows:
    """What both a finished index and one being written answer: the duplicates and the rows."""

    db: sqlite3.Connection

    def duplicated(self) -> tuple[set[str], set[str]]:
        """(patient ids on several rows, valid NHS numbers on several rows)."""
        ids = {r[0] for r in self.db.execute(
            "SELECT patient_id FROM patients GROUP BY patient_id HAVING COUNT(*) > 1")}
        numbers = {r[0] for r in self.db.execute(
            "SELECT nhs_number FROM patients WHERE nhs_valid = 1 GROUP BY nhs_number "
            "HAVING COUNT(*) > 1")}
        return ids, numbers

    def rows(self) -> Iterator[tuple[int, str, str, int, str | None, str | None]]:
        """(row, patient id, NHS number, valid, own reason, latest consent code), in file order."""
        cursor = self.db.execute("SELECT row, patient_id, nhs_number, nhs_valid, own_reason, "
                                 "consent FROM patients ORDER BY row")
        while batch := cursor.fetchmany(10_000):
            yield from batch


class IndexWriter(_Rows):
    """Writes a new index into ``<path>.partial``; ``finish`` renames it into place."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.partial.unlink(missing_ok=True)
        create_private(self.partial)
        self.db = sqlite3.connect(self.partial, isolation_level=None)
        # Nothing here needs to survive a crash: an unfinished index is thrown away.
        self.db.execute("PRAGMA journal_mode = OFF")
        self.db.execute("PRAGMA synchronous = OFF")
        self.db.executescript(_SCHEMA)
        self.db.execute("BEGIN")

    def insert(self, table: str, rows: Iterable[tuple]) -> None:
        """Rows of one table, each a tuple of its columns in the schema's order."""
        marks = ", ".join("?" * _WIDTHS[table])
        self.db.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)

    def add_medications(self, rows: Iterable[Medication]) -> None:
        self.insert("medications", (
            (m.patient_id, m.row, json.dumps([[
                m.row, m.medication_id, m.kind, m.dmd_code, m.drug, m.dosage, m.quantity,
                _iso(m.prescribed_on), _iso(m.repeat_until), _iso(m.discontinued_on)]]))
            for m in rows))

    def add_allergies(self, rows: Iterable[Allergy]) -> None:
        self.insert("allergies", (
            (a.patient_id, a.row, json.dumps([[
                a.row, a.allergy_id, a.kind, a.snomed_code, a.description, _iso(a.recorded_on),
                int(a.negative)]]))
            for a in rows))

    def add_groups(self, groups: dict[str, list[str]]) -> None:
        self.insert("groups", ((name, pid) for name, ids in groups.items() for pid in ids))

    def add_patients(self, rows: Iterable[tuple[Patient, bool, str | None, str | None,
                                                 date | None]]) -> None:
        """(patient, NHS number valid, own reason, latest consent code, its date) per row."""
        self.insert("patients", (
            (p.row, p.patient_id, p.nhs_number, int(valid), reason, consent, json.dumps([
                p.family_name, p.given_name, _iso(p.birth_date), p.sex, p.registration_type,
                _iso(p.registered_on), _iso(p.left_on), _iso(p.deceased_on), int(p.fp69),
                int(p.sensitive), int(p.pds_synchronised), int(p.has_national_summary),
                list(p.problems), _iso(consent_on)]))
            for p, valid, reason, consent, consent_on in rows))

    def seal(self) -> None:
        """Every row is in: commit them and index them, for the duplicates and for reading by
        patient (``executescript`` commits first)."""
        self.db.executescript(_INDEXES)

    def finish(self, meta: dict[str, object]) -> "ExtractIndex":
        """Write ``meta`` and put the file in place, complete."""
        self.db.executemany("INSERT INTO meta VALUES (?, ?)",
                            [(key, json.dumps(value)) for key, value in meta.items()]
                            + [("version", json.dumps(INDEX_VERSION))])
        self.db.close()
        os.replace(self.partial, self.path)
        return ExtractIndex(self.path)

    def abandon(self) -> None:
        self.db.close()
        self.partial.unlink(missing_ok=True)


class ExtractIndex(_Rows):
    """A finished index, read by the job that made it or by a later one of the same store."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                  check_same_thread=False)

    @classmethod
    def open(cls, path: str | Path) -> "ExtractIndex | None":
        """The index at ``path``, or None when there is none or it is not a finished one."""
        path = Path(path)
        if not path.is_file():
            return None
        try:
            index = cls(path)
            if index.meta("version") != INDEX_VERSION:
                index.close()
                return None
        except sqlite3.Error:
            return None
        return index

    def close(self) -> None:
        self.db.close()

    def meta(self, key: str) -> object:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for name, pid in self.db.execute("SELECT name, patient_id FROM groups ORDER BY rowid"):
            groups.setdefault(name, []).append(pid)
        return groups

    def patients(self, rows: list[int]) -> dict[int, tuple[Patient, date | None]]:
        """row -> (the patient on that row of patients.csv, the date of their latest consent)."""
        found: dict[int, tuple[Patient, date | None]] = {}
        for chunk in _chunks(rows):
            marks = ", ".join("?" * len(chunk))
            for row, pid, number, data in self.db.execute(
                    "SELECT row, patient_id, nhs_number, data FROM patients "
                    f"WHERE row IN ({marks})", chunk):
                (family_name, given_name, birth_date, sex, registration_type, registered_on,
                 left_on, deceased_on, fp69, sensitive, pds_synchronised, has_national_summary,
                 problems, consent_on) = json.loads(data)
                patient = Patient(
                    patient_id=pid, nhs_number=number, family_name=family_name,
                    given_name=given_name, birth_date=_day(birth_date), sex=sex,
                    registration_type=registration_type, registered_on=_day(registered_on),
                    left_on=_day(left_on), deceased_on=_day(deceased_on), fp69=bool(fp69),
                    sensitive=bool(sensitive), pds_synchronised=bool(pds_synchronised),
                    has_national_summary=bool(has_national_summary), row=row,
                    problems=tuple(problems))
                found[row] = (patient, _day(consent_on))
        return found

    def clinical(self, patient_ids: list[str]) -> tuple[dict[str, list[Medication]],
                                                         dict[str, list[Allergy]]]:
        """The medications and allergies of these patients, each in file order."""
        medications: dict[str, list[Medication]] = {}
        allergies: dict[str, list[Allergy]] = {}
        for chunk in _chunks(sorted(set(patient_ids))):
            marks = ", ".join("?" * len(chunk))
            for pid, _, data in self.db.execute(
                    f"SELECT * FROM medications WHERE patient_id IN ({marks}) ORDER BY row", chunk):
                for (row, medication_id, kind, dmd_code, drug, dosage, quantity, prescribed_on,
                     repeat_until, discontinued_on) in json.loads(data):
                    medications.setdefault(pid, []).append(Medication(
                        patient_id=pid, row=row, medication_id=medication_id, kind=kind,
                        dmd_code=dmd_code, drug=drug, dosage=dosage, quantity=quantity,
                        prescribed_on=_day(prescribed_on), repeat_until=_day(repeat_until),
                        discontinued_on=_day(discontinued_on)))
            for pid, _, data in self.db.execute(
                    f"SELECT * FROM allergies WHERE patient_id IN ({marks}) ORDER BY row", chunk):
                for (row, allergy_id, kind, snomed_code, description, recorded_on,
                     negative) in json.loads(data):
                    allergies.setdefault(pid, []).append(Allergy(
                        patient_id=pid, row=row, allergy_id=allergy_id, kind=kind,
                        snomed_code=snomed_code, description=description,
                        recorded_on=_day(recorded_on), negative=bool(negative)))
        return medications, allergies


__all__ = ["ExtractIndex", "IndexWriter", "index_path"]
