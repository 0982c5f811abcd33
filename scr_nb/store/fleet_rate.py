"""A fleet's one rate limit held in its database (SPEC 12): the ``fleet_rate`` row of a fleet is a
GCRA (a leaky bucket of one): ``next_at`` is the earliest moment, by the database's own clock, at
which the fleet's next POST may go. A worker reserves a block of slots in one statement, which
moves ``next_at`` past them atomically (the row lock orders the workers), so however many workers
on however many machines send, no two slots are closer than the limit allows, and no worker's
clock is ever compared with another's: each measures only how far ahead of the database's
``now`` its slots lie.

``next_at`` never falls behind ``now`` by more than the slots just handed out: time nobody used
is not saved up, so the fleet never bursts to catch up.
"""

from __future__ import annotations

from scr_nb.store.database import Database

# Slots are spaced this much wider than the limit: 3% of every second is slack for the transit
# and the event loops, so a Spine counting at most the limit in any second accepts every POST.
STRETCH = 1.03

# The database's clock in seconds since the epoch, read when the row is written (after any wait
# for its lock), and the larger of two numbers, in each database's words.
_NOW = {"postgresql": "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)",
        "sqlite": "((julianday('now') - 2440587.5) * 86400.0)"}
_GREATEST = {"postgresql": "GREATEST", "sqlite": "max"}


def set_rate(db: Database, fleet: str, rate: float) -> None:
    """Make ``rate`` (POSTs a second) the fleet's limit; slots already handed out stand."""
    db.execute("INSERT INTO fleet_rate (fleet, rate, next_at) "
               "VALUES (?, CAST(? AS DOUBLE PRECISION), CAST(0 AS DOUBLE PRECISION)) "
               "ON CONFLICT (fleet) DO UPDATE SET rate = excluded.rate", (fleet, float(rate)))


def reserve(db: Database, fleet: str, count: int) -> tuple[float, float, float]:
    """Reserve ``count`` consecutive slots of the fleet's rate: returns (seconds from the
    database's now to the first slot, seconds between slots, the database's now). Raises
    LookupError when the fleet has no rate (``set_rate`` was never called)."""
    now, greatest = _NOW[db.dialect], _GREATEST[db.dialect]
    row = db.record(
        f"UPDATE fleet_rate SET next_at = {greatest}(next_at, {now}) "
        f"+ CAST(? AS DOUBLE PRECISION) / rate WHERE fleet = ? "
        f"RETURNING next_at, rate, {now} AS now", (count * STRETCH, fleet))
    if row is None:
        raise LookupError(f"the fleet {fleet!r} has no rate limit in this store")
    spacing = STRETCH / float(row["rate"])
    first = float(row["next_at"]) - count * spacing
    return first - float(row["now"]), spacing, float(row["now"])


__all__ = ["STRETCH", "reserve", "set_rate"]
