"""NHS number checks: Modulus 11 (SPEC 4)."""

from __future__ import annotations

_WEIGHTS = (10, 9, 8, 7, 6, 5, 4, 3, 2)


def normalise(raw: str | None) -> str:
    """The number without the spaces and dashes people type inside it."""
    return (raw or "").strip().replace(" ", "").replace("-", "")


def check_digit(first_nine: str) -> int | None:
    """The Modulus 11 check digit for nine digits, or None when no valid number can end them."""
    total = sum(int(d) * w for d, w in zip(first_nine, _WEIGHTS))
    check = 11 - total % 11
    if check == 11:
        return 0
    if check == 10:
        return None
    return check


def is_valid(raw: str | None) -> bool:
    number = normalise(raw)
    if len(number) != 10 or not (number.isascii() and number.isdigit()):
        return False
    return check_digit(number[:9]) == int(number[9])


def mask(number: str) -> str:
    """``9434765919`` -> ``943 *** 5919``, for analyst-facing output."""
    n = normalise(number)
    if len(n) != 10:
        return "***"
    return f"{n[:3]} *** {n[6:]}"
