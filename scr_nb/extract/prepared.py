"""A job's view of its extract (issue 11): read once into the store's extract index, a piece at a
time, and decided there; read again only when the files or the eligibility settings changed.

``prepare`` is what a job calls. Its answers are exactly ``decide(load_practice(...))``'s (a test
holds the two together), without the whole practice ever being in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import TypeVar

from scr_nb.extract.eligibility import (
    Policy, consent_code, consent_order, final_reason, own_reason, patient_key,
    summarise_reasons, with_consent,
)
from scr_nb.extract.nhs_number import is_valid
from scr_nb.extract.reader import (
    REQUIRED_COLUMNS, charge, check_directory, load_groups, read_allergies, read_consent,
    read_medications, read_patients,
)
from scr_nb.extract.records import ConsentEntry, Patient
from scr_nb.store.extract_index import ExtractIndex, IndexWriter

# A decision as the store keeps it: (key, patient id, NHS number, row, reason or None, dissent).
StoredDecision = tuple[str, str, str, int, "str | None", bool]
_Record = TypeVar("_Record")


@dataclass
class Prepared:
    """The extract a job works from. ``read`` says whether its files were read this time (False:
    the index of an earlier job was still true to them)."""

    index: ExtractIndex
    fingerprint: dict
    summary: dict
    read: bool


def fingerprint(directory: str | Path, policy: Policy) -> dict:
    """What the decisions depend on, but for the day: each file's size and modification time (a
    new extract, or an edited file, changes them) and the settings. The day is dealt with by
    ``turning_day``."""
    root = Path(directory).resolve()
    files = {}
    for name in (*REQUIRED_COLUMNS, "practice.json"):
        try:
            found = (root / name).stat()
            files[name] = [found.st_size, found.st_mtime_ns]
        except OSError:
            files[name] = None
    return {"directory": str(root), "files": files, "dissent": policy.dissent,
            "update_existing_after_days": policy.update_existing_after_days}


def prepare(directory: str | Path, index_file: str | Path, policy: Policy,
            known: dict | None = None) -> Prepared:
    """The job's extract: the index at ``index_file`` when its fingerprint and ``known`` (what the
    store was last brought in line with) both match the files now and no decision has changed
    with the days since it was made; else the files read anew. Raises the reader's ExtractError,
    naming file, line and column, before anything is changed."""
    now = fingerprint(directory, policy)
    index = ExtractIndex.open(index_file)
    if index is not None:
        decided_on, turns = index.meta("decided_on"), index.meta("turns")
        same_days = decided_on is not None and decided_on <= policy.today.isoformat() and (
            turns is None or policy.today.isoformat() < turns)
        if index.meta("fingerprint") == now == known and same_days:
            return Prepared(index, now, index.meta("summary"), read=False)
        index.close()
    return Prepared(*build(directory, index_file, policy, now), read=True)


def build(directory: str | Path, index_file: str | Path, policy: Policy, stamp: dict, *,
          by_rows: bool = False) -> tuple[ExtractIndex, dict, dict]:
    """Read every file of the extract into a new index: (index, fingerprint, summary). The files
    are read by columns, a small fraction of the row reader's work; row by row when the columnar
    reader hands the extract over (or ``by_rows``, the definition the tests hold it to), so a
    broken file raises the row reader's own ExtractError."""
    root = check_directory(directory)
    if not by_rows:
        # pyarrow and numpy are imported here, not with the module: a Resume on an unchanged
        # extract reads nothing and need not pay a quarter of a second to load them.
        from scr_nb.extract.columnar import Fallback, fill_index

        try:
            return _build(root, index_file, policy, stamp, fill_index)
        except Fallback:
            pass
    return _build(root, index_file, policy, stamp, _fill_by_rows)


def _build(root: Path, index_file: str | Path, policy: Policy, stamp: dict,
           fill: Callable[[Path, Policy, IndexWriter], date | None]
           ) -> tuple[ExtractIndex, dict, dict]:
    """A new index filled by ``fill``, which returns the day a decision turns (``_Turns``)."""
    writer = IndexWriter(index_file)
    try:
        turn = fill(root, policy, writer)
        writer.seal()
        summary = summarise_reasons(d[4] for d in decisions(writer, policy))
    except BaseException:
        writer.abandon()
        raise
    meta = {"fingerprint": stamp, "summary": summary, "decided_on": policy.today.isoformat(),
            "turns": turn.isoformat() if turn else None}
    return writer.finish(meta), stamp, summary


def _fill_by_rows(root: Path, policy: Policy, writer: IndexWriter) -> date | None:
    """The row-at-a-time reader's rows and decisions into ``writer``."""
    charged: dict[str, list[str]] = {}
    turns = _Turns(policy)
    latest = _latest_consent(_charged(read_consent(root), "consent.csv", charged))
    writer.add_medications(_charged(read_medications(root), "medications.csv", charged))
    writer.add_allergies(_charged(read_allergies(root), "allergies.csv", charged))
    writer.add_groups(load_groups(root))
    writer.add_patients(
        (patient, is_valid(patient.nhs_number), own_reason(patient, policy),
         *_consent(latest.get(patient.patient_id)))
        for patient in turns.noting(read_patients(root, policy.today, charged)))
    return turns.day


class _Turns:
    """The earliest day after today on which one of the decisions would change: a date in the
    future stops being one (the row is malformed until then), or a national summary becomes old
    enough to update (``update_existing_after_days``). Until that day, an index made today gives
    the decisions of any later day."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.day: date | None = None

    def noting(self, patients: Iterable[Patient]) -> Iterator[Patient]:
        today, days = self.policy.today, self.policy.update_existing_after_days
        for patient in patients:
            for value in (patient.birth_date, patient.registered_on, patient.left_on,
                          patient.deceased_on):
                if value is not None and value > today:
                    self._see(value)
            if days is not None and patient.has_national_summary and patient.registered_on:
                updatable = patient.registered_on + timedelta(days=days + 1)
                if updatable > today:
                    self._see(updatable)
            yield patient

    def _see(self, day: date) -> None:
        if self.day is None or day < self.day:
            self.day = day


def _charged(pairs: Iterable[tuple[_Record, list[str]]], file: str,
             charged: dict[str, list[str]]) -> Iterator[_Record]:
    for record, problems in pairs:
        charge(charged, file, record.patient_id, record.row, problems)
        yield record


def _latest_consent(entries: Iterable[ConsentEntry]) -> dict[str, ConsentEntry]:
    """Each patient's latest consent entry, as ``latest_consent_entry`` picks it (a dated entry
    beats an undated one; then the later date; then the later row), one entry kept per patient."""
    latest: dict[str, ConsentEntry] = {}
    for entry in entries:
        kept = latest.get(entry.patient_id)
        if kept is None or consent_order(entry) > consent_order(kept):
            latest[entry.patient_id] = entry
    return latest


def _consent(entry: ConsentEntry | None) -> tuple[str | None, date | None]:
    if entry is None:
        return None, None
    return consent_code(entry), entry.recorded_on


def decisions(source: ExtractIndex | IndexWriter, policy: Policy) -> Iterator[StoredDecision]:
    """Every row's decision, in file order, from an index's rows."""
    duplicated_ids, duplicated_numbers = source.duplicated()
    for row, pid, nhs, valid, own, consent in source.rows():
        duplicated = pid in duplicated_ids or (bool(valid) and nhs in duplicated_numbers)
        reason, dissent = with_consent(final_reason(own, duplicated), consent, policy)
        yield patient_key(pid, row, duplicated_ids), pid, nhs, row, reason, dissent


__all__ = ["Prepared", "decisions", "fingerprint", "prepare"]
