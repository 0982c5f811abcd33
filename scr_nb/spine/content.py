"""What goes into a patient's GP Summary: the SPEC 5 core-content windows applied to one patient's
medications and allergies. Hands ``SummaryContent`` to ``gp_summary``, which writes the XML."""

from __future__ import annotations

from calendar import monthrange
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from typing import Iterable

from scr_nb import constants as C
from scr_nb.extract.records import Allergy, Medication

__all__ = ["SummaryContent", "Windows", "months_back", "select_content", "window_starts"]


# --- Windows ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Windows:
    """The SPEC 5 content windows, in calendar months back from ``today``; boundaries are inclusive."""

    today: date
    repeat_issue_months: int = C.REPEAT_ISSUE_WINDOW_MONTHS
    repeat_until_grace_months: int = C.REPEAT_UNTIL_GRACE_MONTHS
    discontinued_months: int = C.DISCONTINUED_WINDOW_MONTHS
    acute_months: int = C.ACUTE_WINDOW_MONTHS


def months_back(today: date, months: int) -> date:
    """``today`` moved back by calendar months, the day clamped to the month's end.

    31 Aug 2024 less 6 months is 29 Feb 2024; 31 Dec less 6 is 30 Jun.
    """
    index = today.year * 12 + (today.month - 1) - months
    year, month = divmod(index, 12)
    month += 1
    return date(year, month, min(today.day, monthrange(year, month)[1]))


# --- Content ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SummaryContent:
    """The items one patient's summary shows, newest first. ``windows`` dates the section headings."""

    repeat: tuple[Medication, ...]
    discontinued: tuple[Medication, ...]
    acute: tuple[Medication, ...]
    allergies: tuple[Allergy, ...]
    windows: Windows | None = None


def select_content(medications: Iterable[Medication], allergies: Iterable[Allergy],
                   windows: Windows) -> SummaryContent:
    """Apply the SPEC 5 core-content rules to one patient's medications and allergies.

    A repeat whose ``discontinued_on`` is after ``today`` is not yet discontinued and is judged as a
    current repeat. Items missing the date their rule needs are left out; allergies need no date.
    Windows have no upper bound: a date after ``today`` is shown, since eligibility, not this, judges
    whether a row is malformed.
    """
    today = windows.today
    issue_from, until_from, stopped_from, acute_from = window_starts(windows)
    repeat: list[tuple[int, str, Medication]] = []
    stopped: list[tuple[int, str, Medication]] = []
    acute: list[tuple[int, str, Medication]] = []
    for med in medications:
        kind = med.kind.strip().lower()
        issued = med.prescribed_on
        if kind == "repeat":
            gone = med.discontinued_on
            if gone is not None and gone <= today:
                if gone >= stopped_from:
                    stopped.append((-gone.toordinal(), med.medication_id, med))
            elif issued is not None and issued >= issue_from and (
                    med.repeat_until is None or med.repeat_until >= until_from):
                repeat.append((-issued.toordinal(), med.medication_id, med))
        elif kind == "acute":
            if issued is not None and issued >= acute_from:
                acute.append((-issued.toordinal(), med.medication_id, med))
    kept: list[tuple[int, str, Allergy]] = []
    for allergy in allergies:
        if not allergy.negative:
            when = allergy.recorded_on
            kept.append((-when.toordinal() if when else 1, allergy.allergy_id, allergy))
    return SummaryContent(
        repeat=_sorted(repeat), discontinued=_sorted(stopped), acute=_sorted(acute),
        allergies=_sorted(kept), windows=windows,
    )


@lru_cache(maxsize=16)
def window_starts(windows: Windows) -> tuple[date, date, date, date]:
    """First day in each window: repeat last issue, repeat_until grace, discontinued, acute."""
    today = windows.today
    return (months_back(today, windows.repeat_issue_months),
            months_back(today, windows.repeat_until_grace_months),
            months_back(today, windows.discontinued_months),
            months_back(today, windows.acute_months))


def _sorted(rows: list) -> tuple:
    rows.sort(key=lambda row: (row[0], row[1]))
    return tuple(row[2] for row in rows)
