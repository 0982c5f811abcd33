"""Talking to the Spine (SPEC 6): POST the GP Summary, poll for the application ack.

The HTTP client is aiohttp's: on loopback it does a request in about 1.3 ms where httpx's async
client took 8 ms, and 1,000 concurrent requests in 0.9 s where httpx took 11 s (measured here,
2 cores), and the kit's own cost has to vanish beside the Spine's limits. The clock and the sleep
are passed in, so retries and backoff are testable without waiting; the engine takes a client
factory, so a test can put in a fake client.

What is not about the message never fails a patient and is never retried: 401 (the session), 403
(the user may not upload) and TLS failures each raise their own error, and the job stops. A request
that dies without an HTTP answer over HTTPS is checked again on a fresh connection
(``tls.check_connection``): a refused client certificate in TLS 1.3 looks like a dropped
connection until then. The session token only goes to the Spine's own origin: a poll location
anywhere else is refused, never followed.

Retries are done as the field does them: exponential backoff with equal jitter from a random
source that can be seeded, the Retry-After of each answer read in the unit of whoever gave it (the
Spine's milliseconds, a gateway's seconds or HTTP-date), and a bounded number of polls per message.
Every answer's ``Date`` keeps ``clock_offset`` (the Spine's clock minus ours) up to date, so the job
can stop sending a safe margin before its session ends: ``request_timeout`` plus that offset.

The POSTs go at the pace of ``pacing``: the practice's rate limit when it set one, else a pace
learnt from the Spine's 429s (none until the first). They have ``concurrency`` connections of their
own and the polls have theirs, so however many messages wait for their acks, a POST never waits
for a connection a poll holds.
"""

from __future__ import annotations

import asyncio
import math
import random
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin

import aiohttp

from scr_nb.constants import RETRIABLE_SOAP_FAULTS, SOAP_ACTION
from scr_nb.errors import (
    AccessDenied,
    SessionExpired,
    SessionRejected,
    SpineError,
    Unreachable,
)
from scr_nb.spine.acks import Ack, parse_ack, parse_soap_fault
from scr_nb.spine.gp_summary import OutboundMessage
from scr_nb.spine.pacing import Pacer, RateLimiter
from scr_nb.spine.session import Session
from scr_nb.spine.tls import CHECK_TIMEOUT, TlsSettings, check_connection, check_url, origin

TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})
# Answers that come from a gateway or load balancer in front of the Spine, not from the Spine: their
# Retry-After is in seconds or an HTTP-date (RFC 9110), and their Date is not the Spine's clock.
GATEWAY_STATUSES = frozenset({502, 503, 504})
# Failure codes of SpineError after the Spine's 202, when the Spine holds the message and its
# outcome is uncertain (constants.UNCERTAIN_FAILURES; Failed re-sends it with its id):
POLL_LOCATION_REFUSED = "poll_location_refused"  # the 202 named a poll location on another origin:
                                                 # the session token is never sent there
POLL_FAILED = "poll_failed"   # the poll answered an unexpected status, or an unreadable ack
POLL_LIMIT = "poll_limit"     # the message was polled max_polls times without an ack
# The shortest wait the client advises between two polls of one message, whatever Retry-After
# says: within an ack timeout of T seconds a message needs at most T / MIN_POLL_INTERVAL polls.
MIN_POLL_INTERVAL = 0.05
DEFAULT_ACK_TIMEOUT = 600.0   # seconds from the 202 to the ack, when the job does not say
POLLS_KEPT = 4096             # poll counts kept before those older than the ack timeout are dropped


def polls_allowed(ack_timeout: float) -> int:
    """The most polls one message may need within ``ack_timeout`` seconds when every wait is at
    least MIN_POLL_INTERVAL, plus the first poll and one for rounding: more means the polling
    loop is not waiting as told."""
    return math.ceil(ack_timeout / MIN_POLL_INTERVAL) + 2


class SendHeld(Exception):
    """The job may not send now (paused, stopped, past its stop time, session over): the message
    stays queued with its id."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Transmission:
    """The transport acknowledgement: 202 with where to poll."""

    poll_url: str
    retry_after: float      # seconds
    attempts: int


@dataclass(frozen=True)
class PollResult:
    ack: Ack | None         # None while pending
    retry_after: float      # seconds until the next poll, when pending
    status: int
    body: bytes = b""


@dataclass
class Attempt:
    """One HTTP exchange, reported to the engine for the patient's timeline."""

    message_id: str
    kind: str               # post | poll
    status: int | None      # None: no HTTP answer (connection error, timeout)
    detail: str


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: "aiohttp.typedefs.LooseHeaders"
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


def from_gateway(status: int) -> bool:
    """Whether an answer comes from a gateway in front of the Spine rather than from the Spine.

    Decided by status alone, since nothing else in an answer says who wrote it: the Spine itself
    answers 202, 429, 4xx and 500 with a SOAP fault, while 502, 503 and 504 are what the proxies
    and load balancers between the kit and the Spine answer when the Spine behind them is away."""
    return status in GATEWAY_STATUSES


def retry_after(status: int, headers: Mapping[str, str], default: float | None,
                now: datetime | None = None) -> float | None:
    """The seconds an answer asks the kit to wait before asking again, ``default`` when its
    Retry-After is missing or cannot be read.

    The unit depends on who answered (``from_gateway``): a Retry-After from the Spine (on 202 and
    429 alike, SPEC 6) is in milliseconds; one from a gateway (502, 503, 504) is delay-seconds or
    an HTTP-date, as RFC 9110 has it. An HTTP-date is measured from the answer's own Date header
    (so neither clock's error counts), else from ``now``."""
    raw = (headers.get("Retry-After") or "").strip()
    if not raw:
        return default
    try:
        number = float(raw)
    except ValueError:
        return _until_http_date(raw, headers.get("Date"), now, default)
    if not math.isfinite(number):
        return default
    return max(0.0, number if from_gateway(status) else number / 1000.0)


def _until_http_date(raw: str, date_header: str | None, now: datetime | None,
                     default: float | None) -> float | None:
    when = _http_date(raw)
    if when is None:
        return default
    reference = _http_date(date_header) if date_header else None
    if reference is None:
        reference = now or utcnow()
    return max(0.0, (when - reference).total_seconds())


def _http_date(text: str | None) -> datetime | None:
    """An HTTP-date as an aware datetime, None when it is not one."""
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


class SpineClient:
    """The kit's connection to one Spine for one session.

    ``request_timeout`` is the longest one request may take (seconds, aiohttp's total timeout);
    ``clock_offset`` is the Spine's clock minus ours (seconds, 0.0 until the first answer). The job
    stops sending ``request_timeout + clock_offset`` before the session's expiry (SPEC 7).
    ``rng`` draws the backoff jitter: pass ``random.Random(seed)`` for a repeatable run.
    ``max_polls`` bounds the polls of one message; by default it is ``polls_allowed(ack_timeout)``.

    ``rate_limiter`` paces the POSTs at the practice's rate limit; without one the client paces
    itself from the Spine's 429s (``pacing.Pacer``), and sends unpaced until the first.
    ``concurrency`` is the most POSTs in flight: they have that many connections of their own, and
    the polls theirs, so polls never hold a connection a POST waits for.
    """

    def __init__(self, base_url: str, session: Session, *, asid: str,
                 rate_limiter: RateLimiter | None = None, concurrency: int = 8,
                 request_timeout: float = 30.0, retry_window: float = 600.0,
                 backoff_base: float = 0.25, backoff_max: float = 30.0,
                 ack_timeout: float | None = None, max_polls: int | None = None,
                 rng: random.Random | None = None,
                 now: Callable[[], datetime] = utcnow,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 on_attempt: Callable[[Attempt], None] | None = None,
                 may_send: Callable[[], bool] | None = None,
                 tls: TlsSettings | None = None, check_timeout: float = CHECK_TIMEOUT):
        if request_timeout <= 0:
            raise ValueError("the request timeout must be above zero")
        if max_polls is not None and max_polls < 1:
            raise ValueError("max_polls must be at least 1")
        self.base_url = check_url(base_url).rstrip("/")
        self.tls = tls if tls is not None else TlsSettings.from_options()
        self.check_timeout = check_timeout
        self.session, self.asid = session, asid
        self.pacer = rate_limiter if rate_limiter is not None else Pacer(clock=monotonic,
                                                                         sleep=sleep)
        self.now, self.sleep = now, sleep
        self.monotonic = monotonic
        self.retry_window, self.backoff_base, self.backoff_max = retry_window, backoff_base, backoff_max
        self.rng = rng if rng is not None else random.Random()
        self.request_timeout = float(request_timeout)
        self.clock_offset = 0.0
        self.ack_timeout = float(ack_timeout) if ack_timeout is not None else DEFAULT_ACK_TIMEOUT
        self.max_polls = max_polls if max_polls is not None else polls_allowed(self.ack_timeout)
        # poll URL -> (polls so far, failed polls in a row, monotonic time of the last poll)
        self._polls: dict[str, tuple[int, int, float]] = {}
        self.on_attempt = on_attempt
        self.may_send = may_send
        context = self.tls.context()
        self.post_connections = self._connections(concurrency, context)
        self.poll_connections = self._connections(concurrency * 2 + 4, context)

    def _connections(self, limit: int, context: ssl.SSLContext) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.request_timeout),
            connector=aiohttp.TCPConnector(limit=limit, ssl=context))

    async def aclose(self) -> None:
        await self.post_connections.close()
        await self.poll_connections.close()

    async def _request(self, http: aiohttp.ClientSession, method: str, url: str,
                       headers: dict[str, str], body: bytes | None = None) -> _Answer:
        async with http.request(method, url, data=body, headers=headers) as response:
            answer = _Answer(response.status, response.headers, await response.read())
        self._read_clock(answer)
        return answer

    def _read_clock(self, answer: _Answer) -> None:
        """Keep ``clock_offset`` from the Spine's Date header. A Date has whole seconds, so the
        Spine's time is taken as the middle of that second: the offset is good to about half a
        second plus the answer's transit. A gateway's Date is its own clock, not the Spine's."""
        if from_gateway(answer.status):
            return
        spine_time = _http_date(answer.headers.get("Date"))
        if spine_time is not None:
            self.clock_offset = spine_time.timestamp() + 0.5 - self.now().timestamp()

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after the ``attempt``-th failure in a row: equal jitter over an
        exponential ceiling, ``base * 2**(attempt - 1)`` capped at ``backoff_max``; the wait is
        drawn between half the ceiling and the ceiling. Half is never skipped, so a retry never
        comes at once; the other half spreads the senders that failed together."""
        ceiling = min(self.backoff_max, self.backoff_base * 2.0 ** min(attempt - 1, 64))
        return ceiling / 2 + self.rng.uniform(0.0, ceiling / 2)

    def _retry_after(self, answer: _Answer, default: float | None) -> float | None:
        return retry_after(answer.status, answer.headers, default, self.now())

    async def __aenter__(self) -> "SpineClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _headers(self) -> dict[str, str]:
        if self.session.expired(self.now()):
            raise SessionExpired(f"the Smartcard session of {self.session.user_id} expired at "
                                 f"{self.session.expires_at.isoformat()}")
        return {
            "Authorization": f"Bearer {self.session.token}",
            "NHSD-Session-URID": self.session.role_profile_id,
            "NHSD-Identity-UUID": self.session.user_id,
            "NHSD-Request-ID": str(uuid.uuid4()).upper(),
            "nhsd-asid": self.asid,
        }

    def _report(self, message_id: str, kind: str, status: int | None, detail: str) -> None:
        if self.on_attempt:
            self.on_attempt(Attempt(message_id, kind, status, detail))

    def _poll_url(self, location: str) -> str:
        """The poll URL of a Content-Location: a path is relative to the Spine's base URL; an
        absolute URL must be on the Spine's own origin (scheme, host and port), else SpineError
        with POLL_LOCATION_REFUSED: the token never goes anywhere else."""
        if location.startswith("/") and not location.startswith("//"):
            url = f"{self.base_url}/{location.lstrip('/')}"
        else:
            url = urljoin(self.base_url + "/", location)
        if origin(url) != origin(self.base_url):
            raise SpineError(f"the Spine gave a poll location on another origin ({location}); it "
                             f"was not followed: the session token only goes to {self.base_url}",
                             retriable=False, status=202, codes=(POLL_LOCATION_REFUSED,))
        return url

    async def _raise_if_tls(self, err: BaseException) -> None:
        """After a request died without an HTTP answer: TlsFailure when a fresh connection shows
        a TLS failure; otherwise nothing (the error was transient and may be retried)."""
        if isinstance(err, asyncio.TimeoutError) or not self.base_url.startswith("https:"):
            return
        if not isinstance(err, aiohttp.ClientConnectionError):
            return
        if isinstance(err, aiohttp.ClientConnectorError) and not isinstance(
                err, aiohttp.ClientSSLError):
            return   # no TCP connection at all: not a TLS matter
        try:
            await asyncio.to_thread(check_connection, self.base_url, self.tls,
                                    self.check_timeout)
        except Unreachable:
            return

    async def send(self, message: OutboundMessage) -> Transmission:
        """POST until the Spine takes the message (202), each attempt in a slot of the pacer;
        transient failures are retried with backoff and the same message id, waiting what a
        Retry-After asks when there is one, and a 429 slows the pacer for every message.
        Raises SpineError for a permanent refusal, or (retriable, no code: the job calls it
        retries_exhausted) when the next try would fall after the retry window; SessionRejected
        on 401, AccessDenied on 403, TlsFailure when the connection fails for a TLS reason,
        SessionExpired before a dead session."""
        started = self.monotonic()
        attempt = 0
        while True:
            attempt += 1
            sent_at = await self.pacer.acquire()
            if self.may_send is not None and not self.may_send():
                raise SendHeld()
            headers = self._headers()   # checks the session's expiry before every request
            headers["SOAPAction"] = SOAP_ACTION
            headers["Content-Type"] = message.content_type
            wait: float | None = None
            try:
                response = await self._request(self.post_connections, "POST",
                                               f"{self.base_url}/clinical", headers, message.body)
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                self._report(message.message_id, "post", None, f"{type(err).__name__}: {err}")
                await self._raise_if_tls(err)
                reason = f"no answer from the Spine ({type(err).__name__})"
            else:
                status = response.status
                if status == 202:
                    location = response.headers.get("Content-Location", "")
                    self._report(message.message_id, "post", status, location)
                    if not location:
                        raise SpineError("the Spine accepted the message but gave no "
                                         "Content-Location to poll", retriable=False, status=202)
                    first_wait = max(MIN_POLL_INTERVAL, self._retry_after(response, 0.5))
                    return Transmission(self._poll_url(location), first_wait, attempt)
                fault = parse_soap_fault(response.content, response.headers.get("Content-Type"))
                detail = f"{fault.code} {fault.description}".strip() if fault else response.text[:200]
                self._report(message.message_id, "post", status, detail)
                if status == 401:
                    raise SessionRejected()
                if status == 403:
                    raise AccessDenied(_forbidden(detail))
                if status in TRANSIENT_STATUSES:
                    reason = f"HTTP {status}"
                elif status == 500 and fault and fault.code in RETRIABLE_SOAP_FAULTS:
                    reason = f"SOAP fault {fault.code}"
                else:
                    codes = (fault.code,) if fault and fault.code else ()
                    raise SpineError(f"the Spine refused the message: HTTP {status} {detail}",
                                     retriable=False, status=status, codes=codes)
                wait = self._retry_after(response, None)   # None: none asked, back off
                if status == 429:
                    self.pacer.limited(sent_at, wait)
            if wait is None:
                wait = self.backoff(attempt)
            elapsed = self.monotonic() - started
            if elapsed + wait > self.retry_window:
                raise SpineError(f"transient failures did not clear in {self.retry_window:.0f} s "
                                 f"({attempt} attempts; last: {reason}; the next try would have "
                                 f"been {wait:.1f} s later)", retriable=True)
            await self.sleep(wait)

    async def poll(self, poll_url: str, message_id: str = "") -> PollResult:
        """One GET of the poll location, when the pacer lets it go (``Pacer.acquire_poll``; a
        429 to a poll slows the POSTs too). Pending (202) and transient answers (429, 500,
        502-504, no answer) give a PollResult without an ack and the seconds to wait: the
        Retry-After when there is one, else a backoff that grows with the failures in a row;
        never less than MIN_POLL_INTERVAL. Anything else unexpected, an ack that cannot be read,
        and a poll past ``max_polls`` raise SpineError with POLL_FAILED or POLL_LIMIT: the Spine
        holds the message, so the pipeline treats them as uncertain."""
        if origin(poll_url) != origin(self.base_url):
            raise SpineError(f"the poll location {poll_url} is not on the Spine's origin "
                             f"({self.base_url}); it was not followed", retriable=False,
                             codes=(POLL_LOCATION_REFUSED,))
        polls, failures, _ = self._polls.get(poll_url, (0, 0, 0.0))
        if polls >= self.max_polls:
            self._polls.pop(poll_url, None)
            raise SpineError(f"{polls} polls of {poll_url} brought no ack (at most "
                             f"{self.max_polls} are made); the Spine may hold the message",
                             retriable=False, codes=(POLL_LIMIT,))
        sent_at = await self.pacer.acquire_poll()
        headers = self._headers()
        self._count_poll(poll_url, polls + 1, failures)
        try:
            response = await self._request(self.poll_connections, "GET", poll_url, headers)
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            self._report(message_id, "poll", None, f"{type(err).__name__}: {err}")
            await self._raise_if_tls(err)
            return self._pending(poll_url, None, failed=True)
        status = response.status
        if status == 200:
            self._polls.pop(poll_url, None)
            try:
                ack = parse_ack(response.content, response.headers.get("Content-Type"))
            except SpineError as err:
                self._report(message_id, "poll", status, str(err))
                raise SpineError(f"polling {poll_url}: {err}", retriable=False, status=status,
                                 codes=(POLL_FAILED,)) from None
            self._report(message_id, "poll", status, f"{ack.type_code} {' '.join(ack.codes)}".strip())
            return PollResult(ack, 0.0, status, response.content)
        if status == 202:
            return self._pending(poll_url, response, failed=False)
        self._report(message_id, "poll", status, response.text[:200])
        if status == 401:
            raise SessionRejected()
        if status == 403:
            raise AccessDenied(_forbidden(response.text[:200]))
        if status in TRANSIENT_STATUSES or status == 500:
            if status == 429:
                self.pacer.limited(sent_at, self._retry_after(response, None), poll=True)
            return self._pending(poll_url, response, failed=True)
        self._polls.pop(poll_url, None)
        raise SpineError(f"polling {poll_url} answered HTTP {status}; the Spine may hold the "
                         f"message", retriable=False, status=status, codes=(POLL_FAILED,))

    def _pending(self, poll_url: str, response: _Answer | None, failed: bool) -> PollResult:
        """No ack yet: how long to wait. A failure in a row grows the backoff; a 202 resets it."""
        polls, failures, _ = self._polls.get(poll_url, (1, 0, 0.0))
        failures = failures + 1 if failed else 0
        self._count_poll(poll_url, polls, failures)
        default = self.backoff(failures) if failed else 0.5
        wait = self._retry_after(response, default) if response is not None else default
        return PollResult(None, max(MIN_POLL_INTERVAL, wait),
                          response.status if response is not None else 0)

    def _count_poll(self, poll_url: str, polls: int, failures: int) -> None:
        """Keep a message's poll count. The counts of messages the job gave up on (an ack timeout)
        are dropped once there are many and their last poll is older than the ack timeout."""
        now = self.monotonic()
        if poll_url not in self._polls and len(self._polls) >= POLLS_KEPT:
            stale = now - self.ack_timeout
            self._polls = {url: kept for url, kept in self._polls.items() if kept[2] >= stale}
        self._polls[poll_url] = (polls, failures, now)


def _forbidden(detail: str) -> str:
    return ("the Spine answered 403 Forbidden: this Smartcard role may not upload (it needs RBAC "
            "activity B0062)" + (f": {detail.strip()}" if detail.strip() else ""))
