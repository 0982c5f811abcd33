"""The Spine simulator: a real HTTP server that stands in for the SCR service and its identity provider.

It speaks the asynchronous pattern of SPEC 6 (POST ``/clinical`` -> 202 + poll location -> GET the poll
location until the MCCI_IN010000UK13 ack), validates every GP Summary and answers with the Spine's codes,
keeps the summaries it accepted, and injects faults on switches (latency, ack delay, rate limit,
transient SOAP faults, gateway errors, dropped acks, an outage, seeded rejections, unknown patients).

It serves HTTPS when given a certificate and key (``ServerTls``), and mutual TLS when given a client
CA as well: a client without a certificate from that CA gets no answer at all. It authorises from
the verified session token alone (``identity``): a token without B0062, or a role profile header
that is not the token's, gets 403 on every clinical request. ``GET /`` answers anyone who got
through TLS, so a client can check its connection without sending a clinical message; the
``_admin`` endpoints answer loopback clients only.

Every GP Summary is checked against the conformance facts the real Spine checks
(``scr_nb.spine.conformance``), after the simulator's own checks: a breach is an AE 400 naming the
rule. Seeded rejections (``reject_rates``) and unknown NHS numbers are about the patient, as they
are at the Spine: they are drawn from the seed and the NHS number, so a patient rejected once is
rejected on every re-send, new message id or not. What is transient is drawn afresh: SOAP faults and
gateway errors per attempt (a retry can succeed), dropped acks and ack delays per message id. Every
time is read from ``SimConfig.clock``, the ``Date`` header included (shifted by ``clock_skew_s``
for a Spine whose clock is wrong), so tests move time instead of sleeping (only the injected
latency is a real sleep).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import secrets
import signal
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote, urlsplit
from xml.sax.saxutils import escape

from aiohttp import web
from lxml import etree

from scr_nb import constants
from scr_nb.errors import OptionError, ScrNbError
from scr_nb.extract.nhs_number import is_valid
from scr_nb.sim import identity
from scr_nb.spine import conformance, mime
from scr_nb.spine.tls import is_loopback

log = logging.getLogger(__name__)

HL7 = "{%s}" % constants.HL7_NS
EB = "{%s}" % constants.EBXML_NS
# SOAP fault detail as the Spine writes it: nasp:errorList/nasp:error with codeContext, errorCode,
# severity, location, description (public Spine fault examples).
NASP_NS = "http://national.carerecords.nhs.uk/schema/"
TMS_ERRORS = "urn:nhs:names:errors:tms"

RETRIABLE_FAULT_CODES = tuple(sorted(constants.RETRIABLE_SOAP_FAULTS))  # fixed order for seeded draws
PERMANENT_FAULT_CODE = "300"
GATEWAY_STATUSES = (502, 503, 504)
MAX_BODY_BYTES = 8 * 1024 * 1024                 # above the Spine's 4,999,600-byte message limit
VERIFIED_TOKENS_KEPT = 256                        # signature checks cached; expiry checked every time
ACK_BOUNDARY = "--=_MIME-Boundary"              # the sample acks' boundary
ACK_HEADER_CID = "ebXMLHeader@spine.nhs.uk"
SPINE_PARTY_ID = "YEA-0000806"                   # the Spine's party id in the sample acks
SIMULATOR_ASID = "990000000001"
ACCEPTED_POSTS, RATE_LIMITED_POSTS, POLLS = range(3)   # the columns of a second in traffic()
ACK_ID_NAMESPACE = uuid.UUID("6f1d0d52-2b8e-4d8c-9c55-3b3f6a2f9e10")  # ack ids derived from message ids

# Display names carried in acks. The sample ack-AE-psis-35160.mime gives the first two word for word;
# the rest use the plain words of constants.SPINE_ERRORS.
SAMPLE_DISPLAY_NAMES = {
    "400": "Invalid Request",
    "35160": "[PSIS-35160] - Invalid input message. Mandatory field NHS Number is missing or incorrect",
}
# A seeded rejection with one of these codes carries the generic code before the PSIS one.
CARRIED_WITH = {"30418": ("420", "30418")}
AA_DETAIL = "GP Summary upload successful"     # ack-AA-upload-successful.mime


# --- configuration ------------------------------------------------------------------------------

@dataclass
class SimConfig:
    """The simulator's users and fault switches. Rates are fractions in [0, 1]; times in ms unless _s."""

    users: list[dict] = field(default_factory=list)
    seed: int = 0
    latency_ms: float = 0.0             # added before answering POST /clinical
    latency_jitter_ms: float = 0.0      # latency is uniform in latency_ms +/- jitter (never below 0)
    ack_delay_ms: float = 0.0           # from acceptance until the poll answers 200
    ack_delay_jitter_ms: float = 0.0
    poll_retry_after_ms: int = 100      # Retry-After on 202 answers
    rate_limit_tps: float | None = None
    rate_limit_burst: float | None = None   # token bucket size; default max(1, tps / 10)
    transient_rate: float = 0.0         # 500 + SOAP fault 200/206/208, drawn per attempt
    gateway_error_rate: float = 0.0     # 502/503/504 with an empty body, drawn per attempt
    drop_ack_rate: float = 0.0          # accepted messages whose poll stays 202 forever
    outage_start_s: float | None = None   # seconds after start; every /clinical and poll gets 503
    outage_duration_s: float = 0.0
    reject_rates: dict[str, float] = field(default_factory=dict)   # code -> fraction of patients
    unknown_nhs_numbers: set[str] = field(default_factory=set)     # AE 30312 case not found
    token_secret: bytes | None = None   # random when not given
    poll_location_base: str | None = None   # give poll locations as absolute URLs under this base
    clock: Callable[[], float] = time.time
    clock_skew_s: float = 0.0           # the Spine's clock runs this far ahead (behind if < 0)

    def __post_init__(self) -> None:
        if self.token_secret is None:
            self.token_secret = secrets.token_bytes(32)
        for name in ("transient_rate", "gateway_error_rate", "drop_ack_rate"):
            _check_fraction(name, getattr(self, name))
        for name in ("latency_ms", "latency_jitter_ms", "ack_delay_ms", "ack_delay_jitter_ms",
                     "poll_retry_after_ms", "outage_duration_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"SimConfig.{name} must not be negative")
        if not math.isfinite(self.clock_skew_s):
            raise ValueError("SimConfig.clock_skew_s must be a finite number of seconds")
        if self.rate_limit_tps is not None and self.rate_limit_tps <= 0:
            raise ValueError("SimConfig.rate_limit_tps must be positive (or None for no limit)")
        self.reject_rates = {str(code): float(rate) for code, rate in self.reject_rates.items()}
        for code, rate in self.reject_rates.items():
            _check_fraction(f"reject rate for code {code}", rate)
        if sum(self.reject_rates.values()) > 1.0 + 1e-9:
            raise ValueError("SimConfig.reject_rates add up to more than 1")
        self.unknown_nhs_numbers = {str(n).strip() for n in self.unknown_nhs_numbers}


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a fraction between 0 and 1, got {value}")


@dataclass(frozen=True)
class ServerTls:
    """HTTPS for the simulator: its certificate and key, and with ``client_ca`` mutual TLS (every
    client must present a certificate issued by that CA). Paths to PEM files."""

    cert: str
    key: str
    client_ca: str | None = None

    def context(self) -> ssl.SSLContext:
        """The server-side SSL context (TLS 1.2 or newer); OptionError naming a file that cannot
        be used."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError, ValueError) as err:
            raise OptionError(f"the simulator's certificate {self.cert} and key {self.key} cannot "
                              f"be used ({getattr(err, 'strerror', None) or err})") from None
        if self.client_ca:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except (OSError, ssl.SSLError, ValueError) as err:
                raise OptionError(f"the client CA {self.client_ca} cannot be used "
                                  f"({getattr(err, 'strerror', None) or err})") from None
            context.verify_mode = ssl.CERT_REQUIRED
        return context


# --- what the simulator keeps -------------------------------------------------------------------

class _Message:
    """One message id the simulator accepted (202) and the outcome decided for it."""

    __slots__ = ("message_id", "type_code", "reasons", "due", "dropped", "sender_asid")

    def __init__(self, message_id: str, type_code: str, reasons: tuple[tuple[str, str], ...],
                 due: float, dropped: bool, sender_asid: str):
        self.message_id, self.type_code, self.reasons = message_id, type_code, reasons
        self.due, self.dropped, self.sender_asid = due, dropped, sender_asid


@dataclass(frozen=True)
class _Summary:
    gp_summary_id: str
    message_id: str
    accepted_at: str


class _Rejected(Exception):
    """An AE outcome found while validating; ``reasons`` are (code, displayName) pairs."""

    def __init__(self, *reasons: tuple[str, str]):
        self.reasons = reasons
        super().__init__(", ".join(code for code, _ in reasons))


def _reason(code: str, display: str | None = None) -> tuple[str, str]:
    return code, display or SAMPLE_DISPLAY_NAMES.get(code) or constants.explain(code)


def _invalid(detail: str) -> _Rejected:
    return _Rejected(("400", f"Invalid Request: {detail}"))


# --- the server ---------------------------------------------------------------------------------

class SpineSimulator:
    """The simulator's state and its aiohttp application. ``start()`` serves it; ``app`` can be mounted."""

    def __init__(self, config: SimConfig | None = None):
        self.config = config or SimConfig()
        self._users = identity.check_users(self.config.users, "SimConfig.users")
        self._clock = self.config.clock
        self._parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                                       huge_tree=False)
        self._lock = threading.Lock()   # the loop mutates; stats() and summaries() may read from elsewhere
        self._messages: dict[str, _Message] = {}
        self._summaries: dict[str, _Summary] = {}   # NHS number -> its current GP Summary
        self._attempts: dict[str, int] = {}
        self._verified: dict[str, dict] = {}        # token -> claims whose signature checked out
        self._counts = {"requests": 0, "accepted": 0, "duplicates": 0, "replacements": 0,
                        "polls": 0, "unauthorized": 0, "forbidden": 0, "acks_dropped": 0}
        self._rejected: dict[str, int] = {}
        self._faults: dict[str, int] = {}
        # Whole seconds since the start -> [POSTs answered 202, POSTs answered 429, polls], and
        # the times of the first and last 202 to a POST: what a benchmark of the kit's pace reads.
        self._per_second: dict[int, list[int]] = {}
        self._first_accepted_s: float | None = None
        self._last_accepted_s: float | None = None
        self._latency_rng = random.Random(f"{self.config.seed}:latency")
        tps = self.config.rate_limit_tps
        self._burst = self.config.rate_limit_burst or (max(1.0, tps / 10) if tps else 1.0)
        self._tokens = self._burst
        self._started_at = self._bucket_at = self._clock()
        self._runner: web.AppRunner | None = None
        self.url: str | None = None
        self.app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._guard])
        self.app.on_response_prepare.append(self._stamp_date)
        self.app.add_routes([
            web.get("/", self._root),
            web.post("/identity/session", self._session),
            web.post("/clinical", self._clinical),
            web.get("/poll/{message_id:.+}", self._poll),
            web.get("/_admin/stats", self._admin_stats),
            web.get("/_admin/summaries", self._admin_summaries),
            web.get("/_admin/traffic", self._admin_traffic),
        ])

    async def start(self, host: str = "127.0.0.1", port: int = 0,
                    tls: ServerTls | None = None) -> str:
        """Serve on ``host:port`` (0 picks a free port), over HTTPS with ``tls``; returns the base
        URL. What the simulator holds outlives a stop and a new start."""
        context = tls.context() if tls is not None else None
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, ssl_context=context).start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        if self.url is None:
            self._started_at = self._bucket_at = self._clock()
        self.url = f"{'https' if tls else 'http'}://{shown}:{bound_port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- inspection (also served under /_admin) --------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters for tests, reports and support; ``rejected_by_code`` uses the most specific code."""
        with self._lock:
            return {**self._counts, "rejected_by_code": dict(self._rejected),
                    "transient_faults_injected": dict(self._faults)}

    def traffic(self) -> dict[str, Any]:
        """The pace of what the simulator was sent, for benchmarks of the kit's pacing: POSTs
        answered 202 (their count, and the first and last in seconds since the start) and, for
        every second since the start, the POSTs answered 202, those answered 429 and the polls."""
        with self._lock:
            first, last = self._first_accepted_s, self._last_accepted_s
            rows = sorted(self._per_second.items())
        return {"accepted_posts": {"count": sum(row[0] for _, row in rows),
                                   "first_s": first, "last_s": last},
                "per_second": [{"second": second, "accepted_posts": row[0],
                                "rate_limited_posts": row[1], "polls": row[2]}
                               for second, row in rows]}

    def summaries(self) -> list[dict[str, str]]:
        """Every NHS number holding a current summary, with its GP Summary id, message id and time."""
        with self._lock:
            held = list(self._summaries.items())
        return [{"nhs_number": nhs, "gp_summary_id": s.gp_summary_id, "message_id": s.message_id,
                 "accepted_at": s.accepted_at} for nhs, s in held]

    def now(self) -> float:
        """The Spine's clock: the injected clock plus ``clock_skew_s``. Its Date headers, acks and
        token expiry follow it; the identity provider issues tokens by the injected clock alone,
        since the identity service's clock is not the Spine's."""
        return self._clock() + self.config.clock_skew_s

    # --- handlers ----------------------------------------------------------------------------------

    async def _stamp_date(self, request: web.Request, response: web.StreamResponse) -> None:
        """Every answer's Date from the simulator's clock, not the host's (aiohttp would write
        the host's), so a test can give the Spine a skewed or moved clock. The identity
        provider's answers carry its own, unskewed, time."""
        identity_provider = request.path.startswith("/identity/")
        when = self._clock() if identity_provider else self.now()
        response.headers["Date"] = formatdate(when, usegmt=True)

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        """No request may crash the server: anything unexpected is a logged 500 with SOAP fault 300."""
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception as exc:
            log.exception("Spine simulator failed handling %s %s", request.method, request.path)
            return soap_fault(500, PERMANENT_FAULT_CODE,
                              f"The simulator could not handle the request ({type(exc).__name__})")

    async def _root(self, request: web.Request) -> web.Response:
        """Who is here, for a client checking its connection (TLS included) without a clinical
        message; needs no token."""
        return web.json_response({"service": "scr-nb Spine simulator",
                                  "clinical": "/clinical", "identity": "/identity/session"})

    async def _session(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            return _json_error(400, "send JSON {\"user_id\": ..., \"passcode\": ...}")
        if not isinstance(body, dict):
            return _json_error(400, "send JSON {\"user_id\": ..., \"passcode\": ...}")
        user = identity.find_user(self._users, body.get("user_id"), body.get("passcode"))
        if user is None:
            return _json_error(401, "unknown user or wrong passcode")
        token, expires_at = identity.issue_token(user, self.config.token_secret, self._clock(),
                                                 user["session_hours"])
        return web.json_response({"token": token, "user_id": user["user_id"], "name": user["name"],
                                  "role_profile_id": user["role_profile_id"],
                                  "activities": list(user["activities"]), "expires_at": expires_at})

    async def _clinical(self, request: web.Request) -> web.Response:
        self._count("requests")
        delay = self._latency_s()
        if delay > 0:
            await asyncio.sleep(delay)
        refused = self._authorise(request)
        if refused is not None:
            return refused
        action = request.headers.get("SOAPAction", "").strip().strip('"')
        if action != constants.SOAP_ACTION:
            return soap_fault(400, PERMANENT_FAULT_CODE,
                              f"SOAPAction must be {constants.SOAP_ACTION}, got {action!r}", "Client")
        content_type = request.headers.get("Content-Type", "")
        if not content_type.lower().startswith("multipart/related") \
                or not mime.boundary_of(content_type, b""):
            return soap_fault(400, PERMANENT_FAULT_CODE,
                              "Content-Type must be multipart/related with a boundary", "Client")

        parts = mime.parse_related(await request.read(), content_type)
        message_id, header_problem, header = self._read_header(parts)
        fault = self._injected_fault(message_id)
        if fault is not None:
            return fault
        if header_problem:
            return soap_fault(500, PERMANENT_FAULT_CODE, header_problem, "Client")

        if message_id in self._messages:
            # Duplicate elimination: the first outcome, nothing stored twice. A lost ack is
            # delivered again, as the Spine answers a re-sent message with its original result.
            self._count("duplicates")
            self._messages[message_id].dropped = False
            return self._accepted(message_id)
        self._decide(message_id, parts, header)
        return self._accepted(message_id)

    async def _poll(self, request: web.Request) -> web.Response:
        self._count("polls")
        self._tally(POLLS)
        refused = self._authorise(request)
        if refused is not None:
            return refused
        if self._in_outage():
            return web.Response(status=503)
        message = self._messages.get(request.match_info["message_id"])
        if message is None:
            return _json_error(404, "no message with this id was accepted by the simulator")
        if message.dropped or self._clock() < message.due:
            return web.Response(status=202,
                                headers={"Retry-After": str(self.config.poll_retry_after_ms)})
        content_type, body = self._ack(message)
        return web.Response(status=200, body=body, headers={"Content-Type": content_type})

    async def _admin_stats(self, request: web.Request) -> web.Response:
        return _loopback_only(request) or web.json_response(self.stats())

    async def _admin_summaries(self, request: web.Request) -> web.Response:
        return _loopback_only(request) or web.json_response(self.summaries())

    async def _admin_traffic(self, request: web.Request) -> web.Response:
        return _loopback_only(request) or web.json_response(self.traffic())

    # --- checks and decisions ------------------------------------------------------------------

    def _authorise(self, request: web.Request) -> web.Response | None:
        """None when the verified token may make clinical requests; else the 401 (no valid
        token) or 403 (no B0062 in the token, or a role profile header that is not the token's)."""
        claims = self._claims(request)
        if isinstance(claims, web.Response):
            return claims
        if constants.B0062 not in claims["activities"]:
            self._count("forbidden")
            return _json_error(403, f"the session's role profile {claims['role_profile_id']} does "
                                    f"not carry RBAC activity {constants.B0062} "
                                    f"({constants.B0062_TEXT}): it may not upload",
                               reason="no_b0062")
        urid = request.headers.get("NHSD-Session-URID", "")
        if urid != claims["role_profile_id"]:
            self._count("forbidden")
            return _json_error(403, "NHSD-Session-URID does not match the session's role profile "
                                    f"(expected {claims['role_profile_id']!r}, got {urid!r})",
                               reason="role_profile_mismatch")
        return None

    def _claims(self, request: web.Request) -> dict | web.Response:
        """The verified session claims, or the 401 answer saying why there are none."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self._count("unauthorized")
            return _json_error(401, "no session token: send Authorization: Bearer <token>")
        token, now = token.strip(), self.now()   # the Spine's clock judges expiry
        claims = self._verified.get(token)
        try:
            if claims is None or now >= claims["exp"]:
                claims = identity.verify_token(token, self.config.token_secret, now)
                if len(self._verified) >= VERIFIED_TOKENS_KEPT:
                    self._verified.clear()
                self._verified[token] = claims
            return claims
        except identity.InvalidToken as exc:
            self._count("unauthorized")
            return _json_error(401, str(exc), reason=exc.reason)

    def _read_header(self, parts: list[mime.Part]) -> tuple[str, str | None, etree._Element | None]:
        """(MessageId, problem or None, the parsed ebXML header or None) from the header part."""
        if not parts or not parts[0].body.strip():
            return "", "the message has no ebXML header part", None
        try:
            root = etree.fromstring(parts[0].body.lstrip(), self._parser)
        except etree.XMLSyntaxError as exc:
            return "", f"the ebXML header is not well-formed XML ({exc})", None
        found = root.find(f".//{EB}MessageHeader/{EB}MessageData/{EB}MessageId")
        message_id = (found.text or "").strip() if found is not None else ""
        if not message_id:
            return "", "the ebXML header has no eb:MessageHeader/eb:MessageData/eb:MessageId", None
        return message_id, None, root

    def _injected_fault(self, message_id: str) -> web.Response | None:
        """Outage, rate limit, transient SOAP fault or gateway error for this attempt, if any."""
        config = self.config
        if self._in_outage():
            self._fault("503")
            return web.Response(status=503)
        if config.rate_limit_tps:
            wait_s = self._take_token()
            if wait_s > 0:
                self._fault("429")
                self._tally(RATE_LIMITED_POSTS)
                return web.Response(status=429,
                                    headers={"Retry-After": str(max(1, math.ceil(wait_s * 1000)))})
        if not (config.transient_rate or config.gateway_error_rate):
            return None
        attempt = self._attempts.get(message_id, 0) + 1
        self._attempts[message_id] = attempt
        if config.transient_rate:
            draw = random.Random(f"{config.seed}:{message_id}:transient:{attempt}")
            if draw.random() < config.transient_rate:
                code = draw.choice(RETRIABLE_FAULT_CODES)
                self._fault("500")
                return soap_fault(500, code, constants.explain(code))
        if config.gateway_error_rate:
            draw = random.Random(f"{config.seed}:{message_id}:gateway:{attempt}")
            if draw.random() < config.gateway_error_rate:
                status = draw.choice(GATEWAY_STATUSES)
                self._fault(str(status))
                return web.Response(status=status)
        return None

    def _decide(self, message_id: str, parts: list[mime.Part], header: etree._Element) -> None:
        """Validate the message (the simulator's checks, then the conformance facts of the header
        and the HL7 part), decide the outcome now, and keep it (and any accepted summary)."""
        config, now = self.config, self._clock()
        sender_asid = ""
        summary: tuple[str, str] | None = None
        try:
            hl7 = self._hl7_root(message_id, parts)
            sender_asid = _attribute(hl7, f"{HL7}communicationFunctionSnd/{HL7}device/{HL7}id",
                                     "extension") or ""
            nhs_number, gp_summary_id, prior_id = _read_gp_summary(hl7, message_id)
            breaches = conformance.check_header(header) + conformance.check_payload(hl7)
            if breaches:
                raise _Rejected(*(_reason("400", f"Invalid Request: {breach.describe()}")
                                  for breach in breaches))
            if nhs_number in config.unknown_nhs_numbers:
                raise _Rejected(_reason("30312"))
            code = self._seeded_rejection(nhs_number)
            if code is not None:
                raise _Rejected(*(_reason(c) for c in CARRIED_WITH.get(code, (code,))))
            current = self._summaries.get(nhs_number)
            if prior_id is None and current is not None:
                raise _Rejected(_reason("30134"))
            if prior_id is not None and (current is None or current.gp_summary_id != prior_id):
                raise _Rejected(_reason("430"))
            summary = (nhs_number, gp_summary_id)
            type_code, reasons = "AA", ()
        except _Rejected as rejected:
            type_code, reasons = "AE", rejected.reasons

        due = now + self._ack_delay_s(message_id)
        dropped = bool(config.drop_ack_rate) and random.Random(
            f"{config.seed}:{message_id}:drop_ack").random() < config.drop_ack_rate
        message = _Message(message_id, type_code, reasons, due, dropped, sender_asid)
        with self._lock:
            self._messages[message_id] = message
            if dropped:
                self._counts["acks_dropped"] += 1
            if summary is not None:
                nhs_number, gp_summary_id = summary
                if nhs_number in self._summaries:
                    self._counts["replacements"] += 1
                self._summaries[nhs_number] = _Summary(gp_summary_id, message_id,
                                                       identity.iso_utc(self.now()))
                self._counts["accepted"] += 1
            else:
                code = _most_specific(reasons)
                self._rejected[code] = self._rejected.get(code, 0) + 1

    def _hl7_root(self, message_id: str, parts: list[mime.Part]):
        """The parsed HL7 part: the one whose Content-Id is <MessageId@...>, else the second part."""
        prefix = message_id.lower() + "@"
        chosen = next((p for p in parts if p.content_id.lower().startswith(prefix)), None)
        if chosen is None:
            if len(parts) < 2:
                raise _invalid("the message has no HL7 payload part")
            chosen = parts[1]
        try:
            return etree.fromstring(chosen.body.lstrip(), self._parser)
        except etree.XMLSyntaxError as exc:
            raise _invalid(f"the HL7 payload is not well-formed XML ({exc})") from None

    def _seeded_rejection(self, nhs_number: str) -> str | None:
        """The code this patient is rejected with, if any. Drawn once per patient from the seed
        and the NHS number, never from the message: dissent on the Spine (30418), an unknown
        patient (30312), a wrong NHS number (35160) do not go away when the message is sent
        again, so re-sending, with a new message id or the same, meets the same answer."""
        rates = self.config.reject_rates
        if not rates:
            return None
        draw = random.Random(f"{self.config.seed}:{nhs_number}:reject").random()
        total = 0.0
        for code, rate in rates.items():
            total += rate
            if draw < total:
                return code
        return None

    def _ack(self, message: _Message) -> tuple[str, bytes]:
        """The ebXML MIME application ack (MCCI_IN010000UK13) for a message, shaped like the samples."""
        ack_id = str(uuid.uuid5(ACK_ID_NAMESPACE, message.message_id)).upper()
        now = self.now()
        timestamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        creation = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
        sent_id = _attr(message.message_id)
        header = _ACK_HEADER.format(party=SPINE_PARTY_ID, ack_id=ack_id, sent_id=sent_id,
                                    timestamp=timestamp)
        if message.type_code == "AA":
            detail = (f"<hl7:requestSuccessDetail><hl7:detail>{AA_DETAIL}</hl7:detail>"
                      f"<hl7:id root=\"Not Known\"/></hl7:requestSuccessDetail>")
        else:
            detail = "".join(_ACK_REASON.format(system=constants.OID_SPINE_ERROR_CODES,
                                                code=_attr(code), display=_attr(display))
                             for code, display in message.reasons)
        payload = _ACK_HL7.format(ack_id=ack_id, creation=creation, type_code=message.type_code,
                                  sent_id=sent_id, asid_oid=constants.OID_ASID,
                                  receiver=_attr(message.sender_asid or "000000000000"),
                                  sender=SIMULATOR_ASID, detail=detail,
                                  interaction_oid=constants.OID_INTERACTION,
                                  interaction=constants.ACK_INTERACTION)
        return mime.build_related(
            [({"Content-Id": f"<{ACK_HEADER_CID}>", "Content-Type": "text/xml",
               "Content-Transfer-Encoding": "8bit"}, header.encode("utf-8")),
             ({"Content-Id": f"<{ack_id}@spine.nhs.uk>", "Content-Type": "application/xml",
               "Content-Transfer-Encoding": "8bit"}, payload.encode("utf-8"))],
            ACK_BOUNDARY, start=ACK_HEADER_CID)

    # --- small helpers ---------------------------------------------------------------------------

    def _accepted(self, message_id: str) -> web.Response:
        self._tally(ACCEPTED_POSTS)
        base = (self.config.poll_location_base or "").rstrip("/")
        return web.Response(status=202, headers={
            "Content-Location": base + "/poll/" + quote(message_id, safe=""),
            "Retry-After": str(self.config.poll_retry_after_ms)})

    def _in_outage(self) -> bool:
        start = self.config.outage_start_s
        if start is None or self.config.outage_duration_s <= 0:
            return False
        elapsed = self._clock() - self._started_at
        return start <= elapsed < start + self.config.outage_duration_s

    def _take_token(self) -> float:
        """Token bucket over POST /clinical: 0 when a token was taken, else seconds until one is due."""
        tps = self.config.rate_limit_tps
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + max(0.0, now - self._bucket_at) * tps)
        self._bucket_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / tps

    def _latency_s(self) -> float:
        base, jitter = self.config.latency_ms, self.config.latency_jitter_ms
        if jitter:
            base += self._latency_rng.uniform(-jitter, jitter)
        return max(0.0, base) / 1000.0

    def _ack_delay_s(self, message_id: str) -> float:
        base, jitter = self.config.ack_delay_ms, self.config.ack_delay_jitter_ms
        if jitter:
            base += random.Random(f"{self.config.seed}:{message_id}:ack_delay").uniform(-jitter, jitter)
        return max(0.0, base) / 1000.0

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _tally(self, column: int) -> None:
        """One request in its second's row of ``traffic()``."""
        elapsed = self._clock() - self._started_at
        with self._lock:
            row = self._per_second.setdefault(int(elapsed), [0, 0, 0])
            row[column] += 1
            if column == ACCEPTED_POSTS:
                if self._first_accepted_s is None:
                    self._first_accepted_s = elapsed
                self._last_accepted_s = elapsed

    def _fault(self, status: str) -> None:
        with self._lock:
            self._faults[status] = self._faults.get(status, 0) + 1


def _read_gp_summary(hl7, message_id: str) -> tuple[str, str, str | None]:
    """(NHS number, GP Summary id, prior GP Summary id or None), or _Rejected with the Spine's codes."""
    missing = []
    if hl7.tag != f"{HL7}{constants.GP_SUMMARY_INTERACTION}":
        missing.append(f"root element {constants.GP_SUMMARY_INTERACTION} in {constants.HL7_NS}")
    else:
        sent_id = _attribute(hl7, f"{HL7}id", "root")
        if sent_id is None:
            missing.append("id/@root")
        elif sent_id.strip().upper() != message_id.upper():
            missing.append(f"id/@root equal to the ebXML MessageId {message_id}")
        if _attribute(hl7, f"{HL7}interactionId", "extension") != constants.GP_SUMMARY_INTERACTION:
            missing.append(f"interactionId/@extension {constants.GP_SUMMARY_INTERACTION}")
    gp_summary_id = (_attribute(hl7, f".//{HL7}GPSummary/{HL7}id", "root") or "").strip()
    if not gp_summary_id:
        missing.append("GPSummary/id/@root")
    if _attribute(hl7, f".//{HL7}GPSummary/{HL7}code", "code") != constants.GP_SUMMARY_CODE:
        missing.append(f"GPSummary/code/@code {constants.GP_SUMMARY_CODE}")
    patient_ids = [e for e in hl7.iterfind(f".//{HL7}recordTarget/{HL7}patient/{HL7}id")
                   if e.get("root") == constants.OID_NHS_NUMBER]
    if not patient_ids:
        missing.append(f"recordTarget/patient/id with root {constants.OID_NHS_NUMBER}")
    if missing:
        raise _invalid("missing " + "; ".join(missing))
    nhs_number = (patient_ids[0].get("extension") or "").strip()
    if not is_valid(nhs_number) or not nhs_number.isdigit():
        raise _Rejected(_reason("400"), _reason("35160"))
    prior = _attribute(hl7, f".//{HL7}replacementOf/{HL7}priorMessageRef/{HL7}id", "root")
    return nhs_number, gp_summary_id, prior.strip() if prior is not None else None


def _attribute(element, path: str, name: str) -> str | None:
    found = element.find(path)
    return found.get(name) if found is not None else None


def _most_specific(reasons: tuple[tuple[str, str], ...]) -> str:
    """The PSIS code when there is one (as the kit's failed_by_code counts it), else the first."""
    for code, _ in reasons:
        if len(code) >= constants.PSIS_CODE_MIN_DIGITS:
            return code
    return reasons[0][0] if reasons else "0"


def _attr(value: str) -> str:
    return escape(value, {'"': "&quot;"})


def _json_error(status: int, message: str, **extra: str) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _loopback_only(request: web.Request) -> web.Response | None:
    """403 for a client that is not on this machine: the inspection endpoints are for tests,
    reports and support on the simulator's own host."""
    if request.remote and is_loopback(request.remote):
        return None
    return _json_error(403, "the _admin endpoints answer loopback clients only")


# --- message templates --------------------------------------------------------------------------

_ACK_HEADER = (
    "<?xml version='1.0' encoding='UTF-8'?>\n"
    '<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/" '
    f'xmlns:eb="{constants.EBXML_NS}" xmlns:xlink="{constants.XLINK_NS}">'
    '<soap:Header><eb:MessageHeader eb:version="2.0" soap:mustUnderstand="1">'
    '<eb:From><eb:PartyId eb:type="urn:nhs:names:partyType:ocs+serviceInstance">{party}</eb:PartyId>'
    "</eb:From><eb:To><eb:PartyId eb:type=\"urn:nhs:names:partyType:ocs+serviceInstance\">SCR-NB"
    "</eb:PartyId></eb:To><eb:CPAId>S1001A1630</eb:CPAId>"
    "<eb:ConversationId>{sent_id}</eb:ConversationId>"
    f"<eb:Service>{constants.SERVICE}</eb:Service><eb:Action>{constants.ACK_INTERACTION}</eb:Action>"
    "<eb:MessageData><eb:MessageId>{ack_id}</eb:MessageId><eb:Timestamp>{timestamp}</eb:Timestamp>"
    "<eb:RefToMessageId>{sent_id}</eb:RefToMessageId></eb:MessageData><eb:DuplicateElimination/>"
    "</eb:MessageHeader>"
    '<eb:AckRequested eb:version="2.0" soap:mustUnderstand="1" '
    'soap:actor="urn:oasis:names:tc:ebxml-msg:actor:toPartyMSH" eb:signed="false"/>'
    '<eb:SyncReply eb:version="2.0" soap:mustUnderstand="1" '
    'soap:actor="http://schemas.xmlsoap.org/soap/actor/next"/></soap:Header><soap:Body>'
    f'<eb:Manifest xmlns:hl7ebxml="{constants.HL7_EBXML_NS}" eb:version="2.0">'
    '<eb:Reference xlink:href="cid:{ack_id}@spine.nhs.uk">'
    f'<eb:Schema eb:location="urn:hl7-org:v3_{constants.ACK_INTERACTION}.xsd" eb:version="13"/>'
    '<eb:Description xml:lang="en">The HL7 payload</eb:Description>'
    '<hl7ebxml:Payload style="HL7" encoding="XML" version="3.0"/></eb:Reference></eb:Manifest>'
    "</soap:Body></soap:Envelope>\n"
)

_ACK_HL7 = (
    "<?xml version='1.0' encoding='UTF-8'?>\n"
    f'<hl7:{{interaction}} xmlns:hl7="{constants.HL7_NS}">'
    '<hl7:id root="{ack_id}"/><hl7:creationTime value="{creation}"/>'
    f'<hl7:versionCode code="{constants.HL7_VERSION_CODE}"/>'
    '<hl7:interactionId root="{interaction_oid}" extension="{interaction}"/>'
    '<hl7:processingCode code="P"/><hl7:processingModeCode code="T"/><hl7:acceptAckCode code="NE"/>'
    '<hl7:acknowledgement typeCode="{type_code}"><hl7:messageRef><hl7:id root="{sent_id}"/>'
    "</hl7:messageRef></hl7:acknowledgement>"
    '<hl7:communicationFunctionRcv typeCode="RCV"><hl7:device classCode="DEV" determinerCode="INSTANCE">'
    '<hl7:id root="{asid_oid}" extension="{receiver}"/></hl7:device></hl7:communicationFunctionRcv>'
    '<hl7:communicationFunctionSnd typeCode="SND"><hl7:device classCode="DEV" determinerCode="INSTANCE">'
    '<hl7:id root="{asid_oid}" extension="{sender}"/></hl7:device></hl7:communicationFunctionSnd>'
    '<hl7:ControlActEvent classCode="CACT" moodCode="EVN"><hl7:author1 typeCode="AUT">'
    '<hl7:AgentSystemSDS classCode="AGNT"><hl7:agentSystemSDS classCode="DEV" determinerCode="INSTANCE">'
    '<hl7:id root="{asid_oid}" extension="{sender}"/></hl7:agentSystemSDS></hl7:AgentSystemSDS>'
    "</hl7:author1>{detail}</hl7:ControlActEvent></hl7:{interaction}>"
)

_ACK_REASON = (
    '<hl7:reason typeCode="RSON"><hl7:justifyingDetectedIssueEvent classCode="ALRT" moodCode="EVN">'
    '<hl7:code codeSystem="{system}" code="{code}" displayName="{display}">'
    '<hl7:qualifier code="ER"/></hl7:code></hl7:justifyingDetectedIssueEvent></hl7:reason>'
)

_SOAP_FAULT = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    f'<SOAP:Envelope xmlns:SOAP="{constants.SOAP_NS}"><SOAP:Body><SOAP:Fault>'
    "<faultcode>SOAP:{faultcode}</faultcode><faultstring>{faultstring}</faultstring>"
    f'<detail><nasp:errorList xmlns:nasp="{NASP_NS}"><nasp:error>'
    f"<nasp:codeContext>{TMS_ERRORS}</nasp:codeContext>"
    "<nasp:errorCode>{code}</nasp:errorCode><nasp:severity>Error</nasp:severity>"
    "<nasp:location>Not Supported</nasp:location><nasp:description>{description}</nasp:description>"
    "</nasp:error></nasp:errorList></detail></SOAP:Fault></SOAP:Body></SOAP:Envelope>\n"
)


def soap_fault(status: int, code: str, description: str, faultcode: str = "Server") -> web.Response:
    """A SOAP 1.1 fault as the Spine sends it: the code in detail//errorCode, plain words in description."""
    body = _SOAP_FAULT.format(faultcode=faultcode, code=_attr(code),
                              faultstring=_attr(constants.explain(code)),
                              description=_attr(description))
    return web.Response(status=status, body=body.encode("utf-8"),
                        headers={"Content-Type": "text/xml; charset=utf-8"})


# --- running it -----------------------------------------------------------------------------------

class SimulatorThread:
    """The simulator on its own event loop in a daemon thread, for tests, the demo and benchmarks.

        with SimulatorThread(SimConfig(users=[...])) as sim:
            httpx.post(sim.url + "/identity/session", json={...})
    """

    def __init__(self, config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0,
                 tls: ServerTls | None = None):
        self.simulator = SpineSimulator(config)
        self.host, self.port, self.tls = host, port, tls
        self.url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        if self._thread is not None:
            return self.url
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="spine-simulator",
                                        daemon=True)
        self._thread.start()
        ready.wait()
        future = asyncio.run_coroutine_threadsafe(
            self.simulator.start(self.host, self.port, self.tls), self._loop)
        try:
            self.url = future.result(timeout=30)
        except BaseException:
            self._shutdown_loop()
            raise
        return self.url

    def stop(self) -> None:
        if self._thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.simulator.stop(), self._loop).result(timeout=30)
        finally:
            self._shutdown_loop()

    def restart(self, tls: ServerTls | None) -> str:
        """Serve again on the same port with other TLS settings (say, another client CA); the
        simulator keeps what it holds. Open connections are closed."""
        self.port, self.tls = urlsplit(self.url).port, tls

        async def again() -> str:
            await self.simulator.stop()
            return await self.simulator.start(self.host, self.port, tls)

        self.url = asyncio.run_coroutine_threadsafe(again(), self._loop).result(timeout=30)
        return self.url

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(ready.set)
        self._loop.run_forever()
        self._loop.close()

    def _shutdown_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._thread = self._loop = None

    def __enter__(self) -> "SimulatorThread":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 8080,
          tls: ServerTls | None = None) -> None:
    """Run the simulator until SIGINT or SIGTERM (``scr-nb spine-sim``), over HTTPS with ``tls``."""
    asyncio.run(_serve(config, host, port, tls))


async def _serve(config: SimConfig, host: str, port: int, tls: ServerTls | None) -> None:
    simulator = SpineSimulator(config)
    url = await simulator.start(host, port, tls)
    print(f"Spine simulator listening on {url}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stopping.set)
        except (NotImplementedError, RuntimeError):   # not on this platform: Ctrl-C still raises
            pass
    try:
        await stopping.wait()
    finally:
        await simulator.stop()


# --- command line ---------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's fault switches to a parser (``scr-nb spine-sim``)."""
    group = parser.add_argument_group("Spine simulator fault switches")
    group.add_argument("--seed", type=int, default=0, help="seed for every fault decision (default 0)")
    group.add_argument("--latency-ms", type=_non_negative, default=0.0, metavar="MS",
                       help="delay before answering each POST /clinical")
    group.add_argument("--latency-jitter-ms", type=_non_negative, default=0.0, metavar="MS",
                       help="latency varies uniformly by up to this much either way")
    group.add_argument("--ack-delay-ms", type=_non_negative, default=0.0, metavar="MS",
                       help="time from acceptance until the poll returns the ack")
    group.add_argument("--ack-delay-jitter-ms", type=_non_negative, default=0.0, metavar="MS",
                       help="ack delay varies uniformly by up to this much either way")
    group.add_argument("--poll-retry-after-ms", type=_whole_ms, default=100, metavar="MS",
                       help="Retry-After sent with 202 answers (default 100)")
    group.add_argument("--rate-limit", type=_positive, default=None, metavar="TPS",
                       help="POST /clinical above this rate gets 429 with Retry-After")
    group.add_argument("--rate-limit-burst", type=_positive, default=None, metavar="N",
                       help="token bucket size (default max(1, TPS/10))")
    group.add_argument("--transient-rate", type=_fraction, default=0.0, metavar="FRACTION",
                       help="POSTs answered 500 with SOAP fault 200/206/208 (per attempt)")
    group.add_argument("--gateway-error-rate", type=_fraction, default=0.0, metavar="FRACTION",
                       help="POSTs answered 502/503/504 (per attempt)")
    group.add_argument("--drop-ack-rate", type=_fraction, default=0.0, metavar="FRACTION",
                       help="accepted messages whose poll stays 202 forever")
    group.add_argument("--outage-start", type=_non_negative, default=None, metavar="SECONDS",
                       help="seconds after start when every request starts getting 503")
    group.add_argument("--outage-duration", type=_non_negative, default=0.0, metavar="SECONDS",
                       help="how long the outage lasts")
    group.add_argument("--reject", type=_code_rate, action="append", default=[], metavar="CODE=RATE",
                       help="reject this fraction of patients with this code, e.g. 30418=0.01 "
                            "(repeatable); a rejected patient is rejected on every re-send")
    group.add_argument("--unknown-nhs-numbers", default=None, metavar="FILE",
                       help="NHS numbers (one a line) answered AE 30312 case not found")
    group.add_argument("--clock-skew", type=_number, default=0.0, metavar="SECONDS",
                       help="the simulated Spine's clock runs this far ahead of the host's "
                            "(negative: behind): its Date headers and its token expiry checks")


def config_from_args(args: argparse.Namespace, users: list[dict]) -> SimConfig:
    """The SimConfig for parsed ``add_arguments`` options and the users of the identity provider."""
    unknown: set[str] = set()
    if args.unknown_nhs_numbers:
        path = Path(args.unknown_nhs_numbers)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ScrNbError(f"{path}: cannot read the unknown NHS numbers "
                             f"({exc.strerror or exc})") from None
        unknown = {line.strip().replace(" ", "") for line in lines if line.strip()}
    rates: dict[str, float] = {}
    for code, rate in args.reject:
        rates[code] = rate
    if sum(rates.values()) > 1.0:
        raise ScrNbError("the --reject rates add up to more than 1")
    return SimConfig(
        users=users, seed=args.seed, latency_ms=args.latency_ms,
        latency_jitter_ms=args.latency_jitter_ms, ack_delay_ms=args.ack_delay_ms,
        ack_delay_jitter_ms=args.ack_delay_jitter_ms, poll_retry_after_ms=args.poll_retry_after_ms,
        rate_limit_tps=args.rate_limit, rate_limit_burst=args.rate_limit_burst,
        transient_rate=args.transient_rate, gateway_error_rate=args.gateway_error_rate,
        drop_ack_rate=args.drop_ack_rate, outage_start_s=args.outage_start,
        outage_duration_s=args.outage_duration, reject_rates=rates, unknown_nhs_numbers=unknown,
        clock_skew_s=args.clock_skew)


def _fraction(text: str) -> float:
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction between 0 and 1")
    return value


def _non_negative(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _whole_ms(text: str) -> int:
    value = _non_negative(text)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of milliseconds")
    return int(value)


def _positive(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _code_rate(text: str) -> tuple[str, float]:
    code, equals, rate = text.partition("=")
    if not equals or not code.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: write CODE=RATE, e.g. 30418=0.01")
    return code.strip(), _fraction(rate.strip())
