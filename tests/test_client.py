"""The Spine client (SPEC 6, 7) against HTTP servers on loopback: scripted ones that answer what a
test tells them (a 429, a gateway's 503, a SOAP fault, a skewed Date), and the simulator.

Time is injected: the client's sleep records the waits and moves a fake monotonic clock, and its
jitter comes from a seeded random source, so no test waits for a backoff.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from email.utils import formatdate

import pytest
from aiohttp import web

from scr_nb.errors import AccessDenied, SessionRejected, SpineError
from scr_nb.sim.spine_sim import soap_fault
from scr_nb.spine import session as sessions
from scr_nb.spine.client import (
    MIN_POLL_INTERVAL,
    POLL_FAILED,
    POLL_LIMIT,
    POLL_LOCATION_REFUSED,
    SpineClient,
    polls_allowed,
    retry_after,
)
from scr_nb.spine.gp_summary import OutboundMessage
from scr_nb.spine.session import Session
from scr_nb.spine.tls import TlsSettings
from tests.conftest import ADMIN
from tests.test_spine_sim import make_message

MESSAGE_ID = "6E2A2F1C-8D43-4B8E-A7A4-0C2B7C9E5D10"
MESSAGE = OutboundMessage(MESSAGE_ID, "0B6B1E8A-3C4D-4E5F-8A9B-1C2D3E4F5A6B", "9990000018",
                          'multipart/related; boundary="b"', b"--b\r\n\r\n<x/>\r\n--b--\r\n")
SESSION = Session(token="token-1", user_id="555000000001", name="Dr Alex Morgan",
                  role_profile_id="555000001001", activities=("B0062",),
                  expires_at=datetime.now(timezone.utc) + timedelta(hours=1))
ACK = ('<MCCI_IN010000UK13 xmlns="urn:hl7-org:v3"><acknowledgement typeCode="AE"><messageRef>'
       f'<id root="{MESSAGE_ID}"/></messageRef></acknowledgement><ControlActEvent><reason>'
       '<justifyingDetectedIssueEvent><code code="420" displayName="Access control"/>'
       '</justifyingDetectedIssueEvent></reason><reason><justifyingDetectedIssueEvent>'
       '<code code="30418" displayName="Dissent"/></justifyingDetectedIssueEvent></reason>'
       '</ControlActEvent></MCCI_IN010000UK13>').encode()


def answer(status: int, body: bytes = b"", **headers: str) -> Callable[[], web.Response]:
    return lambda: web.Response(status=status, body=body, headers=headers)


def accepted(location: str = "/poll/1", retry_ms: str = "100") -> Callable[[], web.Response]:
    return answer(202, **{"Content-Location": location, "Retry-After": retry_ms})


def fault(code: str) -> Callable[[], web.Response]:
    return lambda: soap_fault(500, code, "scripted fault")


def slow(seconds: float, then: Callable[[], web.Response]) -> Callable[[], Awaitable]:
    async def later() -> web.Response:
        await asyncio.sleep(seconds)
        return then()
    return later


class Scripted:
    """A server on a free loopback port answering each request with the next of ``answers`` (the
    last one repeats), keeping every request it was sent."""

    def __init__(self, *answers):
        self.answers, self.requests = list(answers), []
        self.url = ""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path, dict(request.headers),
                              await request.read()))
        make = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        made = make()
        return await made if asyncio.iscoroutine(made) else made

    async def __aenter__(self) -> "Scripted":
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self._runner.cleanup()


class FakeTime:
    """The client's monotonic clock and sleep: sleeping records the wait and moves the clock."""

    def __init__(self):
        self.now, self.waits = 1000.0, []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


def client_for(url: str, fake: FakeTime, seed: int = 1, session: Session = SESSION,
               **options) -> SpineClient:
    return SpineClient(url, session, asid="200000000001", tls=TlsSettings(),
                       monotonic=fake.monotonic, sleep=fake.sleep, rng=random.Random(seed),
                       **options)


def run(scenario: Callable[[], Awaitable]):
    return asyncio.run(scenario())


def ceilings(base: float, cap: float, n: int) -> list[float]:
    return [min(cap, base * 2 ** i) for i in range(n)]


# --- send -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("absolute", [False, True])
def test_send_takes_the_202_and_its_poll_location_on_the_spines_origin(absolute):
    async def scenario():
        async with Scripted(accepted()) as spine:
            location = f"{spine.url}/poll/1" if absolute else "/poll/1"
            spine.answers = [accepted(location, "250")]
            fake = FakeTime()
            async with client_for(spine.url, fake) as client:
                sent = await client.send(MESSAGE)
            return spine, sent, fake

    spine, sent, fake = run(scenario)
    assert (sent.poll_url, sent.retry_after, sent.attempts) == (f"{spine.url}/poll/1", 0.25, 1)
    ((method, path, headers, body),) = spine.requests
    assert (method, path, body) == ("POST", "/clinical", MESSAGE.body)
    assert {k: headers[k] for k in ("SOAPAction", "Content-Type", "Authorization",
                                    "NHSD-Session-URID", "NHSD-Identity-UUID", "nhsd-asid")} == {
        "SOAPAction": "urn:nhs:names:services:psis/REPC_IN150016SM05",
        "Content-Type": MESSAGE.content_type, "Authorization": "Bearer token-1",
        "NHSD-Session-URID": "555000001001", "NHSD-Identity-UUID": "555000000001",
        "nhsd-asid": "200000000001"}
    assert fake.waits == []


def test_a_poll_location_on_another_origin_is_refused_and_never_asked():
    async def scenario():
        async with Scripted(accepted()) as elsewhere, Scripted(accepted()) as spine:
            spine.answers = [accepted(f"{elsewhere.url}/poll/1")]
            async with client_for(spine.url, FakeTime()) as client:
                with pytest.raises(SpineError) as refused_location:
                    await client.send(MESSAGE)
                with pytest.raises(SpineError) as refused_poll:
                    await client.poll(f"{elsewhere.url}/poll/1", MESSAGE_ID)
            return elsewhere, refused_location.value, refused_poll.value

    elsewhere, refused_location, refused_poll = run(scenario)
    assert refused_location.codes == refused_poll.codes == (POLL_LOCATION_REFUSED,)
    assert elsewhere.requests == [], "the session token never went to the other origin"


def test_429_is_retried_after_the_spines_retry_after_in_milliseconds():
    async def scenario():
        async with Scripted(answer(429, **{"Retry-After": "1500"}), accepted()) as spine:
            fake = FakeTime()
            async with client_for(spine.url, fake) as client:
                sent = await client.send(MESSAGE)
            return spine, sent, fake

    spine, sent, fake = run(scenario)
    assert sent.attempts == 2 and fake.waits == [1.5]
    assert len(spine.requests) == 2


def test_soap_fault_208_is_retried_with_the_same_message_and_fault_300_is_not():
    async def scenario():
        async with Scripted(fault("208"), fault("206"), accepted()) as spine:
            fake = FakeTime()
            async with client_for(spine.url, fake, backoff_base=0.25) as client:
                sent = await client.send(MESSAGE)
                spine.answers = [fault("300")]
                with pytest.raises(SpineError) as refused:
                    await client.send(MESSAGE)
            return spine, sent, fake, refused.value

    spine, sent, fake, refused = run(scenario)
    assert sent.attempts == 3
    assert [body for _, _, _, body in spine.requests[:3]] == [MESSAGE.body] * 3
    assert len(fake.waits) == 2 and all(c / 2 <= w <= c for w, c in
                                        zip(fake.waits, ceilings(0.25, 30, 2)))
    assert (refused.codes, refused.retriable, refused.status) == (("300",), False, 500)
    assert len(spine.requests) == 4, "fault 300 was not retried"


@pytest.mark.parametrize("status, error", [(401, SessionRejected), (403, AccessDenied)])
def test_401_and_403_stop_at_once_without_retrying(status, error):
    async def scenario():
        async with Scripted(answer(status, b'{"error": "no"}')) as spine:
            fake = FakeTime()
            async with client_for(spine.url, fake) as client:
                with pytest.raises(error) as raised:
                    await client.send(MESSAGE)
            return spine, fake, raised.value

    spine, fake, raised = run(scenario)
    assert len(spine.requests) == 1 and fake.waits == [] and raised.status == status


def test_backoff_grows_with_jitter_inside_its_bounds_and_follows_the_seed():
    def waits(seed: int) -> list[float]:
        async def scenario():
            async with Scripted(*[answer(503)] * 7, accepted()) as spine:
                fake = FakeTime()
                async with client_for(spine.url, fake, seed=seed, backoff_base=1.0,
                                      backoff_max=16.0) as client:
                    sent = await client.send(MESSAGE)
                assert sent.attempts == 8
                return fake.waits
        return run(scenario)

    first, again, other = waits(5), waits(5), waits(6)
    bounds = ceilings(1.0, 16.0, 7)             # 1, 2, 4, 8, 16, 16, 16
    assert all(c / 2 <= w <= c for w, c in zip(first, bounds)), first
    assert first[3] > first[0] * 2, "the waits grow"
    assert first == again and first != other, "the jitter comes from the seeded source"


def test_backoff_draws_spread_over_half_the_ceiling_to_the_ceiling():
    async def scenario():
        async with client_for("http://127.0.0.1:9", FakeTime(), seed=2, backoff_base=0.5,
                              backoff_max=4.0) as client:
            return {n: [client.backoff(n) for _ in range(2000)] for n in (1, 3, 9)}

    draws = run(scenario)
    for n, ceiling in ((1, 0.5), (3, 2.0), (9, 4.0)):
        assert ceiling / 2 <= min(draws[n]) < ceiling * 0.55
        assert ceiling * 0.95 < max(draws[n]) <= ceiling


def test_retry_after_is_read_in_the_unit_of_whoever_gave_it():
    gateway_date = datetime(2026, 11, 28, 19, 0, 0, tzinfo=timezone.utc)
    as_http_date = formatdate(gateway_date.timestamp() + 7, usegmt=True)

    async def scenario():
        async with Scripted(answer(503, **{"Retry-After": "2"}),
                            answer(502, **{"Retry-After": as_http_date,
                                           "Date": formatdate(gateway_date.timestamp(),
                                                              usegmt=True)}),
                            answer(429, **{"Retry-After": "1500"}),
                            answer(504),
                            accepted(retry_ms="40")) as spine:
            fake = FakeTime()
            async with client_for(spine.url, fake, backoff_base=0.25) as client:
                sent = await client.send(MESSAGE)
            return sent, fake

    sent, fake = run(scenario)
    assert fake.waits[:3] == [2.0, 7.0, 1.5]     # gateway seconds, gateway HTTP-date, Spine ms
    assert 1.0 <= fake.waits[3] <= 2.0           # no Retry-After: the 4th backoff, 1 to 2 s
    assert sent.retry_after == MIN_POLL_INTERVAL  # 40 ms asked; never below the floor

    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert retry_after(202, {"Retry-After": "250"}, None) == 0.25
    assert retry_after(503, {"Retry-After": "250"}, None) == 250.0
    assert retry_after(503, {"Retry-After": formatdate(now.timestamp() + 30, usegmt=True)},
                       None, now) == 30.0
    assert retry_after(429, {"Retry-After": "soon"}, 1.0) == 1.0
    assert retry_after(429, {}, None) is None


def test_a_wait_past_the_retry_window_gives_up_at_once_as_retriable():
    async def scenario():
        async with Scripted(answer(503, **{"Retry-After": "3600"})) as spine:
            fake = FakeTime()
            async with client_for(spine.url, fake, retry_window=600) as client:
                with pytest.raises(SpineError) as raised:
                    await client.send(MESSAGE)
            return fake, raised.value

    fake, raised = run(scenario)
    assert fake.waits == [] and raised.retriable and raised.codes == ()
    assert "3600" in str(raised)


def test_request_timeout_is_the_longest_one_request_may_take():
    async def scenario():
        async with Scripted(slow(2.0, accepted()), accepted()) as spine:
            fake = FakeTime()
            attempts = []
            async with client_for(spine.url, fake, request_timeout=0.3,
                                  on_attempt=attempts.append) as client:
                assert client.request_timeout == 0.3
                started = time.monotonic()
                sent = await client.send(MESSAGE)
                took = time.monotonic() - started
            return sent, attempts, took

    sent, attempts, took = run(scenario)
    assert sent.attempts == 2 and took < 1.5
    assert attempts[0].status is None and "Timeout" in attempts[0].detail
    assert attempts[1].status == 202


# --- pace and connections ---------------------------------------------------------------------------

def test_an_unlimited_client_sends_unpaced_until_429s_then_at_a_pace_under_its_rate():
    async def scenario():
        async with Scripted(*[accepted()] * 20, *[answer(429, **{"Retry-After": "40"})] * 2,
                            accepted()) as spine:
            fake = FakeTime()
            async with client_for(spine.url, fake) as client:
                for _ in range(20):
                    await client.send(MESSAGE)
                    fake.now += 0.01             # 100 POSTs a second
                unpaced = list(fake.waits)
                for _ in range(5):
                    await client.send(MESSAGE)
                return unpaced, fake.waits[len(unpaced):], client.pacer.pace()

    unpaced, waits, pace = run(scenario)
    assert unpaced == []
    assert pace == pytest.approx(0.9 * 22 / 0.24, rel=0.01), "22 POSTs in 0.24 s, the last two 429s"
    assert waits[:2] == pytest.approx([0.04, 0.04]), "the Spine's Retry-After, in milliseconds"
    assert all(wait == pytest.approx(1 / pace, rel=0.01) for wait in waits[2:]), waits


def test_a_429_to_a_poll_holds_the_posts_for_its_retry_after_and_brings_polls_into_the_pace():
    async def scenario():
        async with Scripted(answer(429, **{"Retry-After": "2000"}), accepted()) as spine:
            fake = FakeTime()
            async with client_for(spine.url, fake) as client:
                pending = await client.poll(f"{spine.url}/poll/1", MESSAGE_ID)
                await client.send(MESSAGE)
            return pending, fake.waits, client.pacer.paces_polls

    pending, waits, paces_polls = run(scenario)
    assert (pending.ack, pending.status, pending.retry_after) == (None, 429, 2.0)
    assert waits == [2.0], "the POST waited out the poll's Retry-After"
    assert paces_polls, "the Spine counts polls: from now on they take slots too"


def test_polls_waiting_on_the_spine_never_hold_a_connection_a_post_needs():
    """More polls hang than the connections all requests used to share (concurrency * 2 + 4):
    the POST still goes, on a connection of its own; only its answer lets the polls go."""
    concurrency = 2
    hanging = concurrency * 2 + 4

    async def scenario():
        released = asyncio.Event()

        async def hang() -> web.Response:
            await released.wait()
            return web.Response(status=202, headers={"Retry-After": "100"})

        def accept_and_release() -> web.Response:
            released.set()
            return accepted()()

        async with Scripted(*[lambda: hang()] * hanging, accept_and_release) as spine:
            async with client_for(spine.url, FakeTime(), concurrency=concurrency) as client:
                polls = [asyncio.create_task(client.poll(f"{spine.url}/poll/{n}"))
                         for n in range(hanging)]
                while len(spine.requests) < hanging:
                    await asyncio.sleep(0.01)
                sent = await asyncio.wait_for(client.send(MESSAGE), 10)
                results = await asyncio.gather(*polls)
            return sent, results

    sent, results = run(scenario)
    assert sent.attempts == 1
    assert [r.status for r in results] == [202] * hanging


# --- poll -------------------------------------------------------------------------------------------

def test_poll_pending_then_the_ack():
    async def scenario():
        async with Scripted(answer(202, **{"Retry-After": "300"}),
                            answer(200, ACK, **{"Content-Type": "application/xml"})) as spine:
            async with client_for(spine.url, FakeTime()) as client:
                pending = await client.poll(f"{spine.url}/poll/1", MESSAGE_ID)
                done = await client.poll(f"{spine.url}/poll/1", MESSAGE_ID)
            return spine, pending, done

    spine, pending, done = run(scenario)
    assert (pending.ack, pending.retry_after, pending.status) == (None, 0.3, 202)
    assert done.status == 200 and done.body == ACK
    assert (done.ack.type_code, done.ack.message_ref, done.ack.codes) == \
        ("AE", MESSAGE_ID, ("420", "30418"))
    assert [(m, p, h["Authorization"]) for m, p, h, _ in spine.requests] == \
        [("GET", "/poll/1", "Bearer token-1")] * 2


@pytest.mark.parametrize("status, body", [(404, b"no such message"), (410, b""),
                                          (200, b"<html>a proxy's page</html>")])
def test_an_unexpected_poll_answer_is_poll_failed_which_the_job_treats_as_uncertain(status, body):
    async def scenario():
        async with Scripted(answer(status, body)) as spine:
            async with client_for(spine.url, FakeTime()) as client:
                with pytest.raises(SpineError) as raised:
                    await client.poll(f"{spine.url}/poll/1", MESSAGE_ID)
            return raised.value

    raised = run(scenario)
    assert raised.codes == (POLL_FAILED,) and raised.status == status and not raised.retriable


def test_transient_poll_answers_back_off_and_a_202_resets_the_backoff():
    async def scenario():
        async with Scripted(answer(503), answer(500), answer(502), answer(202),
                            answer(503)) as spine:
            async with client_for(spine.url, FakeTime(), backoff_base=1.0) as client:
                return [await client.poll(f"{spine.url}/poll/1") for _ in range(5)]

    results = run(scenario)
    assert [r.status for r in results] == [503, 500, 502, 202, 503]
    assert all(r.ack is None for r in results)
    waits = [r.retry_after for r in results]
    assert all(c / 2 <= w <= c for w, c in zip(waits[:3], ceilings(1.0, 30, 3))), waits
    assert waits[3] == 0.5                       # a 202 without Retry-After: half a second
    assert 0.5 <= waits[4] <= 1.0                # the first failure in a row again


def test_polls_are_bounded_per_message_and_the_bound_comes_from_the_ack_timeout():
    async def scenario():
        async with Scripted(answer(202, **{"Retry-After": "0"})) as spine:
            async with client_for(spine.url, FakeTime(), max_polls=3) as client:
                results = [await client.poll(f"{spine.url}/poll/1") for _ in range(3)]
                with pytest.raises(SpineError) as raised:
                    await client.poll(f"{spine.url}/poll/1")
                other = await client.poll(f"{spine.url}/poll/2")   # another message's own count
            async with client_for(spine.url, FakeTime(), ack_timeout=10) as derived, \
                    client_for(spine.url, FakeTime()) as default:
                bounds = derived.max_polls, default.max_polls
            return spine, results, raised.value, other, bounds

    spine, results, raised, other, bounds = run(scenario)
    assert [r.retry_after for r in results] == [MIN_POLL_INTERVAL] * 3   # Retry-After 0: floored
    assert raised.codes == (POLL_LIMIT,) and not raised.retriable
    assert len(spine.requests) == 4, "the poll past the bound was not sent"
    assert other.status == 202
    assert bounds == (polls_allowed(10), polls_allowed(600)) == (202, 12002)


# --- the session's margin: request_timeout and clock_offset ------------------------------------------

def test_clock_offset_follows_the_spines_date_header_but_not_a_gateways():
    def date(offset: float) -> str:
        return formatdate(time.time() + offset, usegmt=True)

    async def scenario():
        offsets = []
        async with Scripted(answer(202, **{"Date": date(30)}),
                            answer(503, **{"Date": date(-3600)}),
                            answer(202, **{"Date": date(-45)})) as spine:
            async with client_for(spine.url, FakeTime()) as client:
                offsets.append(client.clock_offset)
                for _ in range(3):
                    await client.poll(f"{spine.url}/poll/1")
                    offsets.append(client.clock_offset)
        return offsets

    before, ahead, after_gateway, behind = run(scenario)
    assert before == 0.0
    assert abs(ahead - 30) < 1.5
    assert after_gateway == ahead, "a gateway's Date is not the Spine's clock"
    assert abs(behind + 45) < 1.5


def test_clock_offset_against_the_simulator_with_a_skewed_clock(spine_factory):
    async def scenario(url: str, session: Session) -> tuple[float, str]:
        async with SpineClient(url, session, asid="200000000001", tls=TlsSettings()) as client:
            message_id, event_id, content_type, body = make_message()
            message = OutboundMessage(message_id, event_id, "", content_type, body)
            sent = await client.send(message)
            result = await client.poll(sent.poll_url, message.message_id)
            while result.ack is None:
                await asyncio.sleep(result.retry_after)
                result = await client.poll(sent.poll_url, message.message_id)
            return client.clock_offset, result.ack.type_code

    for skew in (0.0, 30.0):
        sim = spine_factory(clock_skew_s=skew)
        session = sessions.login(sim.url, ADMIN["user_id"], ADMIN["passcode"])
        offset, type_code = asyncio.run(scenario(sim.url, session))
        assert type_code == "AA"
        assert abs(offset - skew) < 1.5, (skew, offset)
