"""Time, as an object the engine is given, so tests can use a fake one instead of sleeping."""

from __future__ import annotations

import asyncio
import time
from datetime import date, datetime, timezone


class SystemClock:
    def now(self) -> datetime:
        """Aware UTC now: session expiry and schedules compare against this."""
        return datetime.now(timezone.utc)

    def today(self) -> date:
        """The practice's local date: the clinical windows count back from it."""
        return datetime.now().astimezone().date()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
