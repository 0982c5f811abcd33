"""The pace of the requests to the Spine (issue 11): how fast the kit sends, when the practice sets
a rate limit and when it does not.

Without a rate limit the kit sends as fast as its senders allow until the Spine first answers 429.
From then on it paces itself, as TCP's congestion control does with a window (CUBIC, RFC 9438),
but over a rate: each 429 takes the pace to 0.9 of the rate the kit was sending at, and the pace
then climbs back along a cubic curve, steeply at first, flat as it nears the rate that drew the
429 (so the kit probes the Spine's limit gently, where 429s would come from), and steeply again
past it (so a limit the kit underestimated, or one the Spine raised, is found within a minute or
so rather than an hour). Only one decrease is made per round trip: a 429 to a request sent before
the last decrease says nothing new. Nor does a lone 429, the only one to the last hundred
requests: a Spine limiting at about the rate the kit sends at refuses a request now and then
when the transit, or a stall of the kit's event loop or of the Spine's, brings two closer than it
allows. Such a 429 costs one retry, and they are at most one request in a hundred. A Retry-After
on a 429 holds every request until it has passed.

With a rate limit (``RateLimiter``) the pace starts at the limit and never goes above it. Sends
are spaced evenly, never making up for slots nobody used, so no two leave closer than a token
bucket of one token at the limit allows, and they stay a hundredth under the limit, so a Spine
that counts at most L requests in any second accepts them all even when the transit delays some
by up to 10 ms more than others. A bucket of one token has no such slack: a send the transit
delays by a tenth of a millisecond more than the one before it draws a 429 there, so against
such a Spine the 429s come, and the pace comes down until they are rare. A 429 slows a limited
kit too: the Spine allows less than the practice thought.

Polls take a slot only once the Spine has answered a poll with 429. Until then they go when
their own Retry-After says (after any hold): the simulator counts only POSTs against its rate
limit, and ``--rate-limit`` is POSTs a second. A Spine that answers a poll with 429 has shown that
it counts polls, and from then on polls share the slots with the POSTs, so the pace meters every
request the Spine counts. Left out of the pace, polls would keep coming at the rate of the POSTs
of some seconds before (a message is polled until its ack), draw 429 after 429 and drive the
POSTs' pace down to almost nothing.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

DECREASE = 0.9          # a 429 takes the pace to this much of the rate that drew it (CUBIC's beta)
RECOVERY_S = 5.0        # seconds the pace takes to climb back to the rate that drew the last 429
CUBIC = (1.0 - DECREASE) / RECOVERY_S ** 3   # so the cubic curve starts at DECREASE and meets 1.0
WINDOW_S = 1.0          # the rate the kit sends at is measured over the last second of sends
SHORTEST_SPAN_S = 0.01  # ... and never over less than this, so a few sends in a row are no infinity
LIMIT_MARGIN = 0.01     # a practice's rate limit is kept this fraction under: 10 ms of every second
TOLERATED = 100         # a lone 429 to this many requests in a row slows nothing; a second does


class SendGate(Protocol):
    """A rate limit shared with other jobs (a fleet's, SPEC 12): ``take`` returns when one more
    POST may go, whichever process or machine sends it."""

    async def take(self) -> None: ...


class Pacer:
    """When each request may go: a slot handed to each caller of ``acquire`` (every POST, and
    every poll once the Spine has shown it counts them), spaced evenly at the pace, and later than
    any Retry-After the Spine gave with a 429 (``limited``).

    ``limit`` caps the pace (requests a second; None: no cap, and no pace at all until the first
    429). ``clock`` and ``sleep`` are passed in so a test can move time instead of waiting."""

    def __init__(self, limit: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        if limit is not None and not (limit > 0 and math.isfinite(limit)):
            raise ValueError("the rate limit must be a number above zero")
        self.ceiling = limit * (1.0 - LIMIT_MARGIN) if limit is not None else None
        self.clock, self.sleep = clock, sleep
        self._peak: float | None = None         # the rate that drew the last 429 (CUBIC's W_max)
        self._decreased_at: float | None = None
        self._hold_until = -math.inf            # no send before this (the last Retry-After)
        self._next = -math.inf                  # the earliest free slot
        self._last_sent: float | None = None
        self._sent: deque[float] = deque()      # when the sends of the last WINDOW_S went
        self._recent: deque[float] = deque(maxlen=TOLERATED)    # ... and the last TOLERATED
        self._refused: deque[float] = deque(maxlen=TOLERATED)   # when those that drew 429 went
        self._epoch = 0                         # bumped when a 429 changes the pace or the hold
        self.paces_polls = False                # set by the first 429 to a poll
        self.gate: SendGate | None = None       # a fleet's one limit, over every POST

    def pace(self, now: float | None = None) -> float | None:
        """The pace in requests a second at ``now``; None while nothing limits the kit."""
        if self._peak is None:
            return self.ceiling
        now = self.clock() if now is None else now
        rate = self._peak * (1.0 + CUBIC * (now - self._decreased_at - RECOVERY_S) ** 3)
        return rate if self.ceiling is None else min(rate, self.ceiling)

    async def acquire(self, post: bool = True) -> float:
        """Wait for this send's slot; returns the time it goes, which the caller hands back to
        ``limited`` if the send draws a 429. A caller whose slot a 429 moved while it waited (a
        lower pace, a Retry-After) takes a new one. Slots are taken ahead on an even grid, so a
        sender that wakes late (the event loop was busy) does not delay the ones after it."""
        while True:
            now = self.clock()
            rate = self.pace(now)
            slot = max(now, self._hold_until, self._next)
            self._next = slot + 1.0 / rate if rate else slot
            epoch = self._epoch
            if slot > now:
                await self.sleep(slot - now)
                if epoch != self._epoch:
                    continue
            if post and self.gate is not None:
                await self.gate.take()
            sent = self.clock()
            self._record(sent)
            return sent

    async def acquire_poll(self) -> float:
        """Wait until a poll may go, and return its time: a slot once the Spine has answered a
        poll with 429, else as soon as the last Retry-After has passed."""
        if self.paces_polls:
            return await self.acquire(post=False)
        while (wait := self._hold_until - self.clock()) > 0:
            await self.sleep(wait)
        return self.clock()

    def limited(self, sent_at: float, retry_after: float | None, poll: bool = False) -> None:
        """A request sent at ``sent_at`` (this pacer's clock; a poll when ``poll``) drew a 429
        asking to wait ``retry_after`` seconds (None: it did not say). Every request is held that
        long; the pace comes down unless this 429 answers a request sent before the last
        decrease, which was already the answer to it, or it is the only 429 to the last TOLERATED
        requests."""
        now = self.clock()
        changed = False
        self.paces_polls = self.paces_polls or poll
        self._refused.append(sent_at)
        if retry_after and now + retry_after > self._hold_until:
            self._hold_until = now + retry_after
            changed = True
        new_sign = self._decreased_at is None or sent_at > self._decreased_at
        if new_sign and self.recent_429s() > 1:
            rates = [rate for rate in (self.pace(now), self.sending_rate(now)) if rate]
            if rates:
                self._peak, self._decreased_at = min(rates), now
                changed = True
        if changed:
            self._epoch += 1
            rate = self.pace(now)
            restart = self._last_sent + 1.0 / rate if self._last_sent is not None and rate else now
            self._next = max(restart, self._hold_until)

    def sending_rate(self, now: float | None = None) -> float | None:
        """The rate the kit sends at: the sends of the last WINDOW_S over the time since the
        first of them (shorter than WINDOW_S when the kit has just started); None when nothing
        was sent in that time."""
        now = self.clock() if now is None else now
        self._forget(now)
        if not self._sent:
            return None
        return len(self._sent) / max(now - self._sent[0], SHORTEST_SPAN_S)

    def recent_429s(self) -> int:
        """How many of the last TOLERATED requests drew a 429."""
        oldest = self._recent[0] if self._recent else -math.inf
        return sum(1 for sent_at in self._refused if sent_at >= oldest)

    def _record(self, sent: float) -> None:
        self._last_sent = sent
        self._sent.append(sent)
        self._recent.append(sent)
        self._forget(sent)

    def _forget(self, now: float) -> None:
        while self._sent and self._sent[0] <= now - WINDOW_S:
            self._sent.popleft()


class RateLimiter(Pacer):
    """A practice's rate limit (``--rate-limit``): at most ``rate`` POSTs a second (POSTs and
    polls, once the Spine has shown it counts polls), evenly spaced from the first POST on;
    slower only when the Spine answers 429."""

    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        super().__init__(rate, clock=clock, sleep=sleep)
