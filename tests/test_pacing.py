"""The pace of the requests (scr_nb.spine.pacing): no pace before the first 429, a decrease when
429s are more than a lone one, a gentle climb back, every Retry-After honoured, a practice's rate
limit kept with even spacing; models of a whole upload against token-bucket Spines (counting
POSTs, or polls too); then an unlimited kit against the simulator limiting its rate.

Time is virtual (``VirtualTime``): a sleeping task wakes when every task waits on the clock and
its wake time is the earliest, so a minute of pacing runs in a moment and nothing depends on
how loaded the machine is. Only the last test runs in real time, against the simulator.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools

import pytest

from scr_nb.spine import session as sessions
from scr_nb.spine.pacing import DECREASE, LIMIT_MARGIN, RECOVERY_S, Pacer, RateLimiter
from tests.conftest import ADMIN
from tests.test_engine import eligible_numbers, held, job, status


class VirtualTime:
    """A clock for the pacer and the tasks that use it: ``sleep`` parks the caller, and ``run``
    moves the clock to the earliest wake time once every task (those it was given and those
    ``spawn``ed since) is parked."""

    def __init__(self, now: float = 1000.0):
        self.now = now
        self.slept: list[float] = []
        self._sleepers: list[tuple[float, int, asyncio.Future]] = []
        self._order = itertools.count()
        self._live = 0
        self._errors: list[BaseException] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        wake = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(0.0, seconds), next(self._order), wake))
        await wake

    def spawn(self, coroutine) -> asyncio.Future:
        task = asyncio.ensure_future(coroutine)
        self._live += 1
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Future) -> None:
        self._live -= 1
        if not task.cancelled() and task.exception() is not None:
            self._errors.append(task.exception())

    def run(self, *coroutines):
        async def drive():
            given = [self.spawn(coroutine) for coroutine in coroutines]
            while self._live:
                if len(self._sleepers) < self._live:
                    await asyncio.sleep(0)
                    continue
                when, _, wake = heapq.heappop(self._sleepers)
                self.now = max(self.now, when)
                wake.set_result(None)
            if self._errors:
                raise self._errors[0]
            return [task.result() for task in given]

        return asyncio.run(drive())


def paced(limit: float | None = None) -> tuple[Pacer, VirtualTime]:
    time = VirtualTime()
    make = RateLimiter if limit is not None else Pacer
    return make(limit, clock=time.clock, sleep=time.sleep), time


async def send_every(pacer: Pacer, time: VirtualTime, gap: float, count: int) -> list[float]:
    """A sender that would send every ``gap`` seconds: the slots it got."""
    slots = []
    for _ in range(count):
        slots.append(await pacer.acquire())
        await time.sleep(gap)
    return slots


# --- no pace until the Spine asks for one -------------------------------------------------------

def test_nothing_waits_before_the_first_429():
    pacer, time = paced()
    slots = time.run(*(send_every(pacer, time, 0.0, 500) for _ in range(8)))
    assert pacer.pace() is None
    assert [wait for wait in time.slept if wait > 0] == []
    assert {slot for sender in slots for slot in sender} == {1000.0}, "4,000 sends, none held"


# --- a 429 brings the pace down -------------------------------------------------------------------

def refuse(pacer: Pacer, *sent_at: float, retry_after: float | None = None) -> None:
    """429s to the requests sent at these times."""
    for when in sent_at:
        pacer.limited(when, retry_after)


def test_429s_set_the_pace_under_the_rate_the_kit_was_sending_at():
    pacer, time = paced()
    slots = time.run(send_every(pacer, time, 0.005, 400))[0]    # 200 a second for 2 s
    refuse(pacer, slots[-2], slots[-1])
    assert pacer.pace() == pytest.approx(DECREASE * 200, rel=0.02)
    after = time.run(send_every(pacer, time, 0.0, 50))[0]
    assert all(b - a == pytest.approx(1 / pacer.pace(a), rel=0.01)
               for a, b in zip(after, after[1:])), "each send one pace after the one before"


def test_a_lone_429_holds_the_kit_but_does_not_slow_it():
    """One 429 to the last hundred requests is put down to the transit (two sends brought
    closer than the Spine allows); a second one to them is a sign."""
    pacer, time = paced()
    slots = time.run(send_every(pacer, time, 0.005, 400))[0]
    refuse(pacer, slots[-150], slots[-1], retry_after=0.02)     # the first is not a recent one
    assert pacer.pace() is None and pacer.recent_429s() == 1
    assert time.run(send_every(pacer, time, 0.0, 1))[0] == [slots[-1] + 0.005 + 0.02], "held"
    refuse(pacer, slots[-2])
    assert pacer.pace() == pytest.approx(DECREASE * 200, rel=0.02)


def test_one_decrease_per_round_trip_a_429_to_an_older_request_says_nothing_new():
    pacer, time = paced()
    slots = time.run(send_every(pacer, time, 0.01, 200))[0]     # 100 a second
    refuse(pacer, slots[-2], slots[-1])
    pace = pacer.pace()
    refuse(pacer, slots[-3])                                    # sent before the decrease
    assert pacer.pace() == pace
    later = time.run(send_every(pacer, time, 0.0, 3))[0]
    refuse(pacer, later[-1])                                    # sent after it: a new sign
    assert pacer.pace() == pytest.approx(DECREASE * pace, rel=0.01)


def test_a_429_to_a_kit_slower_than_its_pace_brings_it_under_the_rate_it_sent_at():
    """A kit sending slower than its pace (its own senders hold it back) is brought under the
    rate it actually sent at, not under a pace it never used."""
    pacer, time = paced()
    slots = time.run(send_every(pacer, time, 0.01, 200))[0]
    refuse(pacer, slots[-2], slots[-1])                         # pace 0.9 x 100
    time.now += 20                                              # the pace climbs far above 100
    assert pacer.pace() > 300
    slots = time.run(send_every(pacer, time, 0.02, 100))[0]     # but the kit sends 50 a second
    refuse(pacer, slots[-2], slots[-1])
    assert pacer.pace() == pytest.approx(DECREASE * 50, rel=0.03)


# --- then climbs back gently ----------------------------------------------------------------------

def test_the_pace_climbs_back_slowly_near_the_rate_that_drew_the_429_and_faster_past_it():
    pacer, time = paced()
    slots = time.run(send_every(pacer, time, 0.01, 200))[0]
    refuse(pacer, slots[-2], slots[-1])
    peak, start = pacer.pace() / DECREASE, time.now

    def at(seconds: float) -> float:
        return pacer.pace(start + seconds) / peak

    assert at(0) == pytest.approx(DECREASE)
    assert at(RECOVERY_S) == pytest.approx(1.0)
    rises = [at(t + 1) - at(t) for t in range(int(RECOVERY_S * 2))]
    assert all(rise >= 0 for rise in rises)
    assert max(rises) <= (1 - DECREASE) / 2, "no second of the climb gains half the decrease"
    assert at(RECOVERY_S + 1) - at(RECOVERY_S - 1) < 0.01, "flat where the 429 came from"
    assert at(60) > 10, "a limit far above the one estimated is found within a minute"


# --- Retry-After ----------------------------------------------------------------------------------

def test_a_retry_after_holds_every_send_and_poll_that_long():
    pacer, time = paced()
    sent = time.run(send_every(pacer, time, 0.01, 10))[0]
    pacer.limited(sent[-1], 1.5)
    held_from = time.now

    slots = time.run(*(send_every(pacer, time, 0.0, 1) for _ in range(4)), pacer.acquire_poll())
    assert min(slot for sender in slots[:4] for slot in sender) >= held_from + 1.5
    assert slots[4] >= held_from + 1.5


def test_senders_already_waiting_for_a_slot_take_new_ones_when_a_429_holds_everyone():
    pacer, time = paced(limit=10.0)

    async def retry_after_429() -> None:
        await time.sleep(0.05)                   # while the other senders wait for their slots
        pacer.limited(time.now - 0.01, 2.0)

    results = time.run(*(send_every(pacer, time, 0.0, 3) for _ in range(4)), retry_after_429())
    slots = sorted(slot for sender in results[:4] for slot in sender)
    assert slots[0] == 1000.0
    assert all(slot >= 1000.05 + 2.0 for slot in slots[1:]), slots


# --- a practice's rate limit ----------------------------------------------------------------------

def test_a_rate_limit_is_kept_from_the_first_send_with_even_spacing():
    pacer, time = paced(limit=100.0)
    results = time.run(*(send_every(pacer, time, 0.0, 250) for _ in range(8)))
    slots = sorted(slot for sender in results for slot in sender)
    gaps = [b - a for a, b in zip(slots, slots[1:])]
    assert slots[0] == 1000.0, "the first send goes at once"
    assert min(gaps) >= 1 / 100, "never two sends closer than a token bucket of one allows"
    in_any_second = max(sum(1 for s in slots[i:i + 200] if s < start + 1.0)
                        for i, start in enumerate(slots))
    assert in_any_second <= 100, "never more than the limit in any second"
    rate = (len(slots) - 1) / (slots[-1] - slots[0])
    assert rate == pytest.approx(100 * (1 - LIMIT_MARGIN))


def test_a_rate_limit_slows_on_a_429_and_climbs_back_to_it_never_past():
    pacer, time = paced(limit=50.0)
    slots = time.run(send_every(pacer, time, 0.0, 100))[0]
    refuse(pacer, slots[-2], slots[-1])
    assert pacer.pace() == pytest.approx(DECREASE * 50 * (1 - LIMIT_MARGIN), rel=0.02)
    time.now += 600
    assert pacer.pace() == 50 * (1 - LIMIT_MARGIN)


def test_a_rate_limit_must_be_a_positive_number():
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            RateLimiter(bad)


# --- against a Spine's token bucket, in virtual time ----------------------------------------------

class TokenBucket:
    """A Spine limiting at ``rate`` with a bucket of ``burst``, as the simulator does (a 429 with
    the time until the next token as Retry-After), counting POSTs only, as the simulator does,
    or polls as well."""

    def __init__(self, time: VirtualTime, rate: float, burst: float, counts_polls: bool):
        self.time, self.rate, self.burst, self.counts_polls = time, rate, burst, counts_polls
        self.tokens, self.stamp = burst, time.now
        self.answers: list[tuple[float, str, bool]] = []    # (time, post | poll, drew a 429)

    def answer(self, kind: str) -> float | None:
        now = self.time.now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if kind == "poll" and not self.counts_polls or self.tokens >= 1:
            self.tokens -= 0 if kind == "poll" and not self.counts_polls else 1
            self.answers.append((now, kind, False))
            return None
        self.answers.append((now, kind, True))
        return (1 - self.tokens) / self.rate


def upload(pacer: Pacer, time: VirtualTime, spine: TokenBucket, seconds: float,
           ack_delay: float = 0.0) -> None:
    """The client's way with the pacer, for ``seconds``: eight senders POST (a 1 ms round
    trip, so each could send 1,000 a second); each accepted message is polled every 0.1 s
    until its ack, ``ack_delay`` after the POST; every 429 goes to the pacer, then its
    Retry-After is waited."""
    end = time.now + seconds

    async def request(kind: str, sent_at: float) -> float | None:
        await time.sleep(0.0005)
        retry_after = spine.answer(kind)
        await time.sleep(0.0005)
        if retry_after is not None:
            pacer.limited(sent_at, retry_after, poll=kind == "poll")
        return retry_after

    async def poll(ack_at: float) -> None:
        wait = 0.1
        while True:
            await time.sleep(wait)
            retry_after = await request("poll", await pacer.acquire_poll())
            if retry_after is None and time.now >= ack_at:
                return
            wait = retry_after or 0.1

    async def sender() -> None:
        while time.now < end:
            retry_after = await request("post", await pacer.acquire())
            if retry_after is None:
                time.spawn(poll(time.now + ack_delay))
            else:
                await time.sleep(retry_after)

    time.run(*(sender() for _ in range(8)))


def tally(spine: TokenBucket, since: float, until: float) -> tuple[int, int, int]:
    """Accepted POSTs, accepted polls and 429s between two times."""
    kept = [(kind, refused) for at, kind, refused in spine.answers if since <= at < until]
    return (kept.count(("post", False)), kept.count(("poll", False)),
            sum(refused for _, refused in kept))


@pytest.mark.parametrize("rate, burst, counts_polls, ack_delay", [
    (100.0, 10.0, False, 0.0), (100.0, 1.0, False, 0.5), (20.0, 2.0, False, 0.0),
    (100.0, 10.0, True, 0.0), (100.0, 10.0, True, 0.5)])
def test_an_unlimited_kit_settles_near_a_spines_limit_with_few_429s(rate, burst, counts_polls,
                                                                   ack_delay):
    """A minute against a Spine limiting at ``rate``: once settled (after the first 10 s) at
    least 0.9 of the limit is used and at most 2% of the requests draw a 429 (here about one every
    five seconds); the first second, when the pace comes down from thousands a second, costs a
    few dozen more. With a Spine that counts polls, and messages polled six times each, polls
    take slots from the first 429 to a poll and the pace meters every request."""
    pacer, time = paced()
    spine = TokenBucket(time, rate, burst, counts_polls)
    start = time.now
    upload(pacer, time, spine, 60.0, ack_delay)
    posts, polls, refused = tally(spine, start + 10, start + 60)
    used = posts + polls if counts_polls else posts
    assert used / 50 >= 0.9 * rate, (posts, polls)
    assert refused <= 0.02 * (posts + polls + refused), (posts, polls, refused)
    assert pacer.paces_polls == counts_polls
    posts, polls, refused = tally(spine, start, start + 60)
    assert refused <= 0.05 * (posts + polls + refused), (posts, polls, refused)


@pytest.mark.parametrize("counts_polls", [False, True])
def test_a_rate_limit_against_a_spine_limiting_at_it_with_a_bucket_of_one(counts_polls):
    """With ``--rate-limit 50`` against a Spine at 50 that allows no burst at all, POSTs alone
    never draw a 429; with a Spine counting polls too, the first 429 to a poll brings the polls
    into the pace and 429s stay rare."""
    pacer, time = paced(limit=50.0)
    spine = TokenBucket(time, 50.0, 1.0, counts_polls)
    start = time.now
    upload(pacer, time, spine, 60.0)
    posts, polls, refused = tally(spine, start, start + 60)
    if counts_polls:
        assert (posts + polls) / 60 >= 0.9 * 50 and refused <= 0.01 * (posts + polls), \
            (posts, polls, refused)
    else:
        assert refused == 0 and posts / 60 >= 0.98 * 50, (posts, refused)


# --- against the simulator, in real time ----------------------------------------------------------

def test_an_unlimited_job_against_a_rate_limited_simulator_draws_few_429s(
        tmp_path, spine_factory, practice, today):
    """The whole kit (engine, pipeline, client) with no rate limit against the simulator limiting
    at 100 a second: before the pacer, seven requests in ten drew a 429 here."""
    spine = spine_factory(rate_limit_tps=100)
    session = sessions.login(spine.url, ADMIN["user_id"], ADMIN["passcode"])
    result = job(tmp_path, session, spine, practice, "run", concurrency=8)
    assert result.completed
    assert set(held(spine)) == eligible_numbers(practice, today)
    assert status(tmp_path)["counters"]["failed"] == 0
    stats = spine.simulator.stats()
    refused = stats["transient_faults_injected"].get("429", 0)
    assert refused < 0.10 * (stats["requests"] + stats["polls"]), stats
    traffic = spine.simulator.traffic()           # what benchmarks/bench_rate.py reads
    seconds = traffic["per_second"]
    assert sum(row["rate_limited_posts"] for row in seconds) == refused
    assert sum(row["polls"] for row in seconds) == stats["polls"]
    assert sum(row["accepted_posts"] for row in seconds) == traffic["accepted_posts"]["count"] \
        == stats["requests"] - refused
