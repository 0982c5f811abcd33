"""The fleet's one rate limit (SPEC 12 ``--rate-limit``), whichever worker sends.

A practice job awaits its gate's ``take()`` before every POST. The gate hands out slots of the
fleet's limit: reserved a few at a time (as many as the job's senders are waiting for, up to a
tenth of a second's worth) from the one place that holds the limit, and spaced as that place
spaced them. Where that place is depends on the stores:

- a PostgreSQL store: the fleet's row in the ``fleet_rate`` table, reserved atomically by the
  database's own clock (``scr_nb.store.fleet_rate``), so workers on any machine share it;
- SQLite stores: the coordinating process, which serves slots over HTTP (``RateServer``) from
  its own monotonic clock, and outlives any worker.

A gate is built on the worker from a small picklable description (``DatabaseGateSpec``,
``CoordinatorGateSpec``). Slots are never saved up: a reserved slot its job did not use within
``LATE_S`` of its time lapses, so a job that falls behind cannot send a burst to catch up.

Slots are times on the holder's clock. A gate turns them into times on its own machine's
monotonic clock through ``ClockLink``: each reservation's round trip bounds the difference
between the two clocks, and the tightest recent bound is used, on its late side, so a slot is
never taken early and is late by at most the quickest recent round trip, however slow this one
was. No machine's clock is compared with another machine's: only with the holder's.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from scr_nb.errors import ScrNbError
from scr_nb.store.database import Database, Location
from scr_nb.store.fleet_rate import STRETCH, reserve, set_rate
from scr_nb.store.schema import open_database

BLOCK_S = 0.1          # a reservation holds at most this many seconds of the fleet's slots ...
MAX_BLOCK = 32         # ... and never more than this many slots
LATE_S = 0.004         # a slot not taken within this long after its time lapses
RETRY_S = 30.0         # how long a gate keeps trying to reach the place that holds the limit
LINK_WINDOW_S = 5.0    # round trips older than this say nothing more of the two clocks (drift)


class RateGateError(ScrNbError):
    """The place that holds the fleet's rate limit could not be reached for ``RETRY_S``."""


class ClockLink:
    """Where this machine's monotonic clock stands against the clock of the holder of the limit.

    A round trip that left at ``sent`` and came back at ``received`` (this clock) with the
    holder's ``now`` says the holder's clock is ahead by between ``now - received`` and ``now -
    sent``. The round trips of the last LINK_WINDOW_S narrow that to their intersection; its low
    end maps a holder's time to the latest this machine's time it can be, so never early."""

    def __init__(self) -> None:
        self._bounds: deque[tuple[float, float, float]] = deque()   # (received, low, high)

    def measure(self, sent: float, received: float, now: float) -> None:
        while self._bounds and self._bounds[0][0] < received - LINK_WINDOW_S:
            self._bounds.popleft()
        self._bounds.append((received, now - received, now - sent))
        low = max(b[1] for b in self._bounds)
        high = min(b[2] for b in self._bounds)
        if low > high:   # the clocks drifted apart faster than the window forgets: start again
            self._bounds = deque([self._bounds[-1]])

    def local(self, holder_time: float) -> float:
        """A holder's time as this machine's monotonic time, never earlier than it is."""
        return holder_time - max(b[1] for b in self._bounds)


class SlotGate:
    """What a job awaits before each POST. Subclasses say how slots are reserved
    (``_reserve``); this class hands them out in order, drops the lapsed ones and waits."""

    def __init__(self, rate: float):
        self.block = max(1, min(MAX_BLOCK, int(rate * BLOCK_S)))
        self._slots: deque[float] = deque()   # this machine's monotonic times
        self._waiting = 0
        self._lock = asyncio.Lock()
        self._link = ClockLink()

    async def take(self) -> None:
        """Wait for this POST's slot of the fleet's rate. A slot this job wakes up for too late
        (its event loop was busy) is given up for the next: sent late, it would go closer to the
        next worker's than the limit allows."""
        while True:
            self._waiting += 1
            try:
                async with self._lock:
                    slot = self._next_slot()
                    if slot is None:
                        self._slots.extend(await asyncio.to_thread(
                            self._reserve_retrying, min(self.block, self._waiting)))
                        slot = self._next_slot()
            finally:
                self._waiting -= 1
            if slot is None:
                continue
            delay = slot - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.monotonic() - slot <= LATE_S:
                return

    def _next_slot(self) -> float | None:
        now = time.monotonic()
        while self._slots and self._slots[0] < now - LATE_S:
            self._slots.popleft()
        return self._slots.popleft() if self._slots else None

    def _reserve_retrying(self, count: int) -> list[float]:
        """``count`` slots as this machine's monotonic times; retried while the place that holds
        the limit cannot be reached, up to RETRY_S."""
        deadline = time.monotonic() + RETRY_S
        pause = 0.1
        while True:
            try:
                self._connect()
                sent = time.monotonic()
                first, spacing, now = self._reserve(count)
                self._link.measure(sent, time.monotonic(), now)
            except Exception as err:   # the database or the coordinator, unreachable for now
                self.close()           # a new connection on the next try
                if time.monotonic() + pause > deadline:
                    raise RateGateError(f"the fleet's rate limit could not be reached for "
                                        f"{RETRY_S:.0f} s ({type(err).__name__}: {err})") from err
                time.sleep(pause)
                pause = min(pause * 2, 2.0)
                continue
            first = self._link.local(first)
            return [first + i * spacing for i in range(count)]

    def _connect(self) -> None:
        """Open the connection to the holder, when it is not open (outside the round trip)."""

    def _reserve(self, count: int) -> tuple[float, float, float]:
        """Reserve ``count`` slots: (the first's time, the spacing, the holder's now), times on
        the holder's clock."""
        raise NotImplementedError

    def close(self) -> None:
        """Let go of the connection to the holder of the limit."""


# --- PostgreSQL: the limit in the database ------------------------------------------------------

class DatabaseGate(SlotGate):
    """Slots from the fleet's ``fleet_rate`` row, through one connection of this gate's own."""

    def __init__(self, spec: "DatabaseGateSpec"):
        super().__init__(spec.rate)
        self.spec = spec
        self._db: Database | None = None

    def _connect(self) -> None:
        if self._db is None:
            self._db = Database(Location.of(self.spec.store, self.spec.ods))

    def _reserve(self, count: int) -> tuple[float, float, float]:
        first_in, spacing, now = reserve(self._db, self.spec.fleet, count)
        return now + first_in, spacing, now

    def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            try:
                db.close()
            except Exception:
                pass   # a connection already gone has nothing to let go of


@dataclass(frozen=True)
class DatabaseGateSpec:
    """A gate on the fleet's row ``fleet`` of the PostgreSQL store ``store`` (any practice
    ``ods`` of it names the database)."""

    store: str
    ods: str
    fleet: str
    rate: float

    def build(self) -> DatabaseGate:
        return DatabaseGate(self)


def configure_database(store: str, ods: str, fleet: str, rate: float) -> DatabaseGateSpec:
    """Set the fleet's rate in the database (the coordinator does this once, before any job)
    and describe the gates its jobs build."""
    db = open_database(Location.of(store, ods))   # the store's tables made if it is new
    try:
        set_rate(db, fleet, rate)
    finally:
        db.close()
    return DatabaseGateSpec(store, ods, fleet, rate)


# --- SQLite stores: the limit in the coordinating process ---------------------------------------

class CoordinatorGate(SlotGate):
    """Slots from the coordinator's RateServer."""

    def __init__(self, spec: "CoordinatorGateSpec"):
        super().__init__(spec.rate)
        self.spec = spec
        self._http: httpx.Client | None = None

    def _connect(self) -> None:
        if self._http is None:
            self._http = httpx.Client(timeout=10.0)

    def _reserve(self, count: int) -> tuple[float, float, float]:
        answer = self._http.post(self.spec.url, json={"count": count})
        answer.raise_for_status()
        data = answer.json()
        return float(data["first"]), float(data["spacing"]), float(data["now"])

    def close(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            http.close()


@dataclass(frozen=True)
class CoordinatorGateSpec:
    url: str      # the RateServer's slots URL, its secret included
    rate: float

    def build(self) -> CoordinatorGate:
        return CoordinatorGate(self)


class RateServer:
    """The coordinator's slots: a GCRA on this process's monotonic clock, served over HTTP
    (``POST {url}`` with ``{"count": n}`` answers ``{"first": t, "spacing": s, "now": t}``, times
    on that clock) on ``host`` to the workers. The URL carries a secret, so nothing else can
    take slots."""

    def __init__(self, rate: float, host: str = "127.0.0.1"):
        self.rate = rate
        self.spacing = STRETCH / rate   # the same slack as the database's slots
        self._next_at = 0.0
        self._lock = threading.Lock()
        secret = secrets.token_urlsafe(16)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"   # a gate keeps its connection: quicker round trips

            def do_POST(self) -> None:   # noqa: N802 (the http.server's name)
                if self.path != f"/slots/{secret}":
                    self.send_error(404)
                    return
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    count = int(json.loads(self.rfile.read(length))["count"])
                except (ValueError, KeyError, TypeError):
                    self.send_error(400)
                    return
                body = json.dumps(server.reserve(max(1, min(count, MAX_BLOCK)))).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass   # one line a reservation would drown the coordinator's own

        self._http = ThreadingHTTPServer((host, 0), Handler)
        self._http.daemon_threads = True
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self._http.server_address[1]}/slots/{secret}"
        self._thread = threading.Thread(target=self._http.serve_forever, name="scr-nb-fleet-rate",
                                        daemon=True)

    def reserve(self, count: int) -> dict:
        with self._lock:
            now = time.monotonic()
            first = max(self._next_at, now)
            self._next_at = first + count * self.spacing
        return {"first": first, "spacing": self.spacing, "now": now}

    def spec(self) -> CoordinatorGateSpec:
        return CoordinatorGateSpec(self.url, self.rate)

    def start(self) -> "RateServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._http.shutdown()
        self._http.server_close()


GateSpec = DatabaseGateSpec | CoordinatorGateSpec

__all__ = ["CoordinatorGateSpec", "DatabaseGateSpec", "GateSpec", "RateGateError", "RateServer",
           "SlotGate", "configure_database"]
