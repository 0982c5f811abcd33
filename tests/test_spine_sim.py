"""The Spine simulator and its identity provider, over real HTTP on loopback (SPEC 6, 7, 10).

Time is an injected clock: tests move it instead of sleeping.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import uuid
from datetime import datetime
from email.utils import parsedate_to_datetime

import httpx
import jwt
import pytest
from aiohttp.test_utils import make_mocked_request
from lxml import etree

from scr_nb import constants
from scr_nb.extract.nhs_number import check_digit
from scr_nb.sim import identity
from scr_nb.sim.spine_sim import (
    SimConfig,
    SimulatorThread,
    _loopback_only,
    add_arguments,
    config_from_args,
)
from scr_nb.spine import conformance, mime
from tests.test_gp_summary import build, patient

HL7 = "{urn:hl7-org:v3}"
SECRET = b"test-secret-for-the-simulator-32-bytes-at-least"
USERS = [
    {"user_id": "555021935107", "passcode": "1234", "name": "Dr Ada Admin",
     "role_profile_id": "555021936108", "activities": [constants.B0062]},
    {"user_id": "555021935200", "passcode": "short", "name": "Nurse Short Session",
     "role_profile_id": "555021936200", "activities": ["B0264"], "session_hours": 0.5},
]
NURSE = USERS[1]
# Valid Modulus 11 NHS numbers from the test range, and one that fails the check.
NHS_A, NHS_B, NHS_C = "9990000018", "9990000026", "9990000034"
NHS_BAD = "9990000019"


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def valid_nhs_number(n: int) -> str:
    """The n-th number of the test range that passes Modulus 11."""
    found = -1
    for stem in range(999_000_100, 999_999_999):
        digit = check_digit(str(stem))
        if digit is not None:
            found += 1
            if found == n:
                return f"{stem}{digit}"
    raise ValueError(n)


def new_id() -> str:
    return str(uuid.uuid4()).upper()


def make_message(nhs_number: str | None = NHS_A, message_id: str | None = None,
                 gp_summary_id: str | None = None, prior_id: str | None = None,
                 hl7: bytes | None = None, header: bytes | None = None) -> tuple[str, str, str, bytes]:
    """A GP Summary upload as the kit builds it (a repeat, a discontinued repeat, an acute
    medication and an allergy): (message id, GP Summary id, Content-Type, body). ``hl7`` or
    ``header`` replace that part's bytes; ``nhs_number=None`` leaves recordTarget out."""
    message_id = message_id or new_id()
    gp_summary_id = gp_summary_id or new_id()
    built = build(patient=patient(nhs_number or ""), message_id=message_id,
                  event_id=gp_summary_id, prior_event_id=prior_id)
    content_type, body = built.content_type, built.body
    if nhs_number is None:
        body = re.sub(rb"<recordTarget .*?</recordTarget>", b"", body, count=1, flags=re.DOTALL)
    if hl7 is not None or header is not None:
        kit_header, kit_hl7 = mime.parse_related(body, content_type)
        content_type, body = mime.build_related(
            [(kit_header.headers, kit_header.body if header is None else header),
             (kit_hl7.headers, kit_hl7.body if hl7 is None else hl7)],
            "--=_test-boundary", start=kit_header.content_id)
    return message_id, gp_summary_id, content_type, body


def read_ack(response: httpx.Response) -> dict:
    """typeCode, messageRef and reasons of an ack, read the way a kit's parser would."""
    assert response.headers["content-type"].startswith("multipart/related")
    parts = mime.parse_related(response.content, response.headers["content-type"])
    header = etree.fromstring(parts[0].body)
    ns = {"eb": constants.EBXML_NS}
    root = etree.fromstring(parts[1].body)
    assert root.tag == f"{HL7}MCCI_IN010000UK13"
    ack = root.find(f"{HL7}acknowledgement")
    return {
        "type": ack.get("typeCode"),
        "message_ref": ack.find(f"{HL7}messageRef/{HL7}id").get("root"),
        "ref_to": header.findtext(".//eb:RefToMessageId", namespaces=ns),
        "action": header.findtext(".//eb:Action", namespaces=ns),
        "reasons": [(c.get("code"), c.get("displayName"), c.find(f"{HL7}qualifier").get("code"),
                     c.get("codeSystem"))
                    for c in root.iterfind(f".//{HL7}reason/{HL7}justifyingDetectedIssueEvent/{HL7}code")],
        "detail": root.findtext(f".//{HL7}requestSuccessDetail/{HL7}detail"),
    }


def fault_code(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("text/xml")
    root = etree.fromstring(response.content)
    assert root.find(f"{{{constants.SOAP_NS}}}Body/{{{constants.SOAP_NS}}}Fault") is not None
    codes = [e.text for e in root.iter() if etree.QName(e).localname == "errorCode"]
    assert [e for e in root.iter() if etree.QName(e).localname == "description"]
    return codes[0]


class Spine:
    """A logged-in client of one running simulator."""

    def __init__(self, thread: SimulatorThread, user: dict = USERS[0], **http):
        self.thread = thread
        self.http = httpx.Client(base_url=thread.url, timeout=10, **http)
        self.user = user
        self.token = self.login().json()["token"]

    def login(self, passcode: str | None = None, user_id: str | None = None) -> httpx.Response:
        return self.http.post("/identity/session", json={
            "user_id": user_id or self.user["user_id"],
            "passcode": self.user["passcode"] if passcode is None else passcode})

    def headers(self, token: str | None = None, **extra: str) -> dict[str, str]:
        headers = {"SOAPAction": constants.SOAP_ACTION,
                   "NHSD-Session-URID": self.user["role_profile_id"]}
        if token is not False:
            headers["Authorization"] = f"Bearer {token or self.token}"
        headers.update(extra)
        return headers

    def send(self, content_type: str, body: bytes, **headers) -> httpx.Response:
        return self.http.post("/clinical", content=body,
                              headers={**self.headers(**headers), "Content-Type": content_type})

    def poll(self, location: str, token: str | None = None) -> httpx.Response:
        return self.http.get(location, headers=self.headers(token))

    def upload(self, *args, **kwargs) -> tuple[str, str, dict]:
        """Send a message and poll its ack once: (message id, GP Summary id, ack)."""
        message_id, gp_summary_id, content_type, body = make_message(*args, **kwargs)
        sent = self.send(content_type, body)
        assert sent.status_code == 202, sent.text
        return message_id, gp_summary_id, read_ack(self.poll(sent.headers["content-location"]))

    def stats(self) -> dict:
        return self.http.get("/_admin/stats").json()

    def summaries(self) -> list[dict]:
        return self.http.get("/_admin/summaries").json()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def spine(clock):
    """Start a simulator with fault switches; returns a logged-in client. Stopped after the test."""
    running: list[tuple[SimulatorThread, Spine]] = []

    def start(**switches) -> Spine:
        config = SimConfig(users=USERS, token_secret=SECRET, clock=clock, **switches)
        thread = SimulatorThread(config)
        thread.start()
        client = Spine(thread)
        running.append((thread, client))
        return client

    yield start
    for thread, client in running:
        client.http.close()
        thread.stop()


# --- identity provider ------------------------------------------------------------------------

def test_login_gives_a_signed_session_that_expires_after_session_hours(spine, clock):
    client = spine()
    answer = client.login()
    assert answer.status_code == 200
    body = answer.json()
    assert {k: body[k] for k in ("user_id", "name", "role_profile_id", "activities")} == {
        "user_id": "555021935107", "name": "Dr Ada Admin", "role_profile_id": "555021936108",
        "activities": ["B0062"]}
    expires = datetime.fromisoformat(body["expires_at"])
    assert expires.tzinfo is not None
    assert expires.timestamp() == clock.now + 10 * 3600
    claims = identity.verify_token(body["token"], SECRET, clock.now)
    assert claims["role_profile_id"] == "555021936108"
    # A standard JWT, readable by any JWT library with the secret, issuer and audience.
    standard = jwt.decode(body["token"], SECRET, algorithms=["HS256"], issuer=identity.ISSUER,
                          audience=identity.AUDIENCE, options={"verify_exp": False,
                                                               "verify_iat": False})
    assert jwt.get_unverified_header(body["token"])["alg"] == "HS256"
    assert {k: standard[k] for k in ("iss", "sub", "aud", "iat", "exp", "role_profile_id",
                                     "activities")} == {
        "iss": identity.ISSUER, "sub": "555021935107", "aud": identity.AUDIENCE,
        "iat": int(clock.now), "exp": int(clock.now) + 10 * 3600,
        "role_profile_id": "555021936108", "activities": ["B0062"]}

    short = client.login(user_id="555021935200", passcode="short").json()
    assert datetime.fromisoformat(short["expires_at"]).timestamp() == clock.now + 1800


def test_login_with_a_wrong_passcode_or_unknown_user_is_401(spine):
    client = spine()
    assert client.login(passcode="0000").status_code == 401
    assert "error" in client.login(user_id="nobody").json()
    assert client.http.post("/identity/session", content=b"not json").status_code == 400


# --- session checks on /clinical and the poll ---------------------------------------------------

def test_missing_forged_and_expired_tokens_are_401(spine, clock):
    client = spine()
    _, _, content_type, body = make_message()

    missing = client.send(content_type, body, token=False)
    assert missing.status_code == 401 and "Bearer" in missing.json()["error"]

    forged, _ = identity.issue_token(USERS[0], b"another secret" * 3, clock.now, 10)
    answer = client.send(content_type, body, token=forged)
    assert answer.status_code == 401 and answer.json()["reason"] == "forged"

    tampered = client.send(content_type, body, token=with_claims(client.token, sub="555021935200"))
    assert tampered.status_code == 401 and tampered.json()["reason"] == "forged"

    other_audience, _ = identity.issue_token(USERS[0], SECRET, clock.now, 10,
                                             audience="another-service")
    answer = client.send(content_type, body, token=other_audience)
    assert answer.status_code == 401 and answer.json()["reason"] == "wrong_audience"

    clock.advance(10 * 3600 + 1)
    expired = client.send(content_type, body)
    assert expired.status_code == 401 and expired.json()["reason"] == "expired"
    assert client.poll("/poll/ANY").status_code == 401
    assert client.stats()["accepted"] == 0


def test_session_urid_must_match_the_tokens_role_profile(spine):
    client = spine()
    _, _, content_type, body = make_message()
    answer = client.send(content_type, body, **{"NHSD-Session-URID": "999999999999"})
    assert answer.status_code == 403 and "NHSD-Session-URID" in answer.json()["error"]
    assert client.stats()["accepted"] == 0 and client.stats()["forbidden"] == 1


def test_a_token_without_b0062_is_403_on_every_clinical_request(spine):
    """Authorised from the verified token alone: the nurse's token lacks B0062, and no header
    claiming otherwise helps."""
    admin = spine()
    nurse = Spine(admin.thread, NURSE)
    try:
        _, _, content_type, body = make_message()
        answer = nurse.send(content_type, body)
        assert answer.status_code == 403 and answer.json()["reason"] == "no_b0062"
        assert "B0062" in answer.json()["error"]
        sent = admin.send(content_type, body)
        assert sent.status_code == 202
        assert nurse.poll(sent.headers["content-location"]).status_code == 403
        assert admin.poll(sent.headers["content-location"]).status_code == 200
    finally:
        nurse.http.close()
    assert admin.stats()["accepted"] == 1 and admin.stats()["forbidden"] == 2


def test_the_base_url_answers_without_a_token_and_counts_no_request(spine):
    client = spine()
    answer = client.http.get("/")
    assert answer.status_code == 200 and answer.json()["clinical"] == "/clinical"
    assert client.stats()["requests"] == 0


def test_poll_locations_can_be_given_on_another_origin(spine):
    client = spine(poll_location_base="http://127.0.0.1:9/elsewhere")
    _, _, content_type, body = make_message()
    sent = client.send(content_type, body)
    assert sent.headers["content-location"].startswith("http://127.0.0.1:9/elsewhere/poll/")


# --- the upload and its ack -----------------------------------------------------------------------

def test_valid_message_is_accepted_and_the_poll_returns_aa(spine, clock):
    client = spine()
    message_id, gp_summary_id, content_type, body = make_message(NHS_A)
    sent = client.send(content_type, body)
    assert sent.status_code == 202
    assert sent.content == b""
    assert sent.headers["content-location"] == f"/poll/{message_id}"
    assert sent.headers["retry-after"] == "100"

    polled = client.poll(sent.headers["content-location"])
    assert polled.status_code == 200
    ack = read_ack(polled)
    assert ack == {"type": "AA", "message_ref": message_id, "ref_to": message_id,
                   "action": "MCCI_IN010000UK13", "reasons": [],
                   "detail": "GP Summary upload successful"}
    assert client.summaries() == [{"nhs_number": NHS_A, "gp_summary_id": gp_summary_id,
                                   "message_id": message_id,
                                   "accepted_at": identity.iso_utc(clock.now)}]
    assert client.stats()["accepted"] == 1


def test_ack_is_202_until_the_ack_delay_has_passed(spine, clock):
    client = spine(ack_delay_ms=5000, poll_retry_after_ms=250)
    _, _, content_type, body = make_message()
    location = client.send(content_type, body).headers["content-location"]
    pending = client.poll(location)
    assert pending.status_code == 202 and pending.headers["retry-after"] == "250"
    clock.advance(5.0)
    assert read_ack(client.poll(location))["type"] == "AA"
    assert client.poll("/poll/NO-SUCH-ID").status_code == 404


def test_resent_message_id_gets_the_first_outcome_and_is_stored_once(spine):
    client = spine()
    message_id, gp_summary_id, content_type, body = make_message(NHS_A)
    first = client.send(content_type, body)
    again = client.send(content_type, body)
    assert again.status_code == 202
    assert again.headers["content-location"] == first.headers["content-location"]
    assert read_ack(client.poll(again.headers["content-location"]))["type"] == "AA"

    stats = client.stats()
    assert stats["duplicates"] == 1 and stats["accepted"] == 1
    assert [s["message_id"] for s in client.summaries()] == [message_id]


def test_resent_rejected_message_keeps_its_rejection(spine):
    client = spine()
    _, _, content_type, body = make_message(NHS_BAD)
    location = client.send(content_type, body).headers["content-location"]
    client.send(content_type, body)
    assert read_ack(client.poll(location))["type"] == "AE"
    assert client.stats()["rejected_by_code"] == {"35160": 1}


def test_second_new_message_for_the_same_patient_is_ae_30134(spine):
    client = spine()
    first_id, _, first = client.upload(NHS_A)
    assert first["type"] == "AA"
    _, _, second = client.upload(NHS_A)
    assert second["type"] == "AE"
    assert [r[0] for r in second["reasons"]] == ["30134"]
    assert [s["message_id"] for s in client.summaries()] == [first_id]


def test_replacement_of_the_current_summary_is_accepted(spine):
    client = spine()
    _, first_summary, _ = client.upload(NHS_A)
    second_id, second_summary, ack = client.upload(NHS_A, prior_id=first_summary)
    assert ack["type"] == "AA"
    assert client.summaries() == [{"nhs_number": NHS_A, "gp_summary_id": second_summary,
                                   "message_id": second_id,
                                   "accepted_at": client.summaries()[0]["accepted_at"]}]
    assert client.stats()["replacements"] == 1

    _, _, stale = client.upload(NHS_A, prior_id=first_summary)
    assert [r[0] for r in stale["reasons"]] == ["430"]
    _, _, nothing_to_replace = client.upload(NHS_B, prior_id=new_id())
    assert [r[0] for r in nothing_to_replace["reasons"]] == ["430"]


def test_bad_nhs_number_is_ae_400_and_35160_as_in_the_sample(spine):
    client = spine()
    _, _, ack = client.upload(NHS_BAD)
    assert ack["type"] == "AE"
    assert ack["reasons"] == [
        ("400", "Invalid Request", "ER", constants.OID_SPINE_ERROR_CODES),
        ("35160", "[PSIS-35160] - Invalid input message. Mandatory field NHS Number is missing or "
                  "incorrect", "ER", constants.OID_SPINE_ERROR_CODES)]
    _, _, empty = client.upload("")
    assert [r[0] for r in empty["reasons"]] == ["400", "35160"]
    assert client.summaries() == []


def test_nhs_number_unknown_to_the_spine_is_ae_30312(spine):
    client = spine(unknown_nhs_numbers={NHS_C})
    _, _, ack = client.upload(NHS_C)
    assert [r[0] for r in ack["reasons"]] == ["30312"]
    assert client.upload(NHS_A)[2]["type"] == "AA"


def test_malformed_or_incomplete_hl7_is_ae_400_naming_what_is_wrong(spine):
    client = spine()
    _, _, broken = client.upload(hl7=b"<REPC_IN150016SM05 xmlns='urn:hl7-org:v3'><id root=")
    assert broken["type"] == "AE" and [r[0] for r in broken["reasons"]] == ["400"]
    assert "well-formed" in broken["reasons"][0][1]

    message_id = new_id()
    no_code = (f'<REPC_IN150016SM05 xmlns="urn:hl7-org:v3"><id root="{message_id}"/>'
               '<interactionId extension="REPC_IN150016SM05"/><GPSummary><id root="X"/></GPSummary>'
               f'<recordTarget><patient><id root="{constants.OID_NHS_NUMBER}" extension="{NHS_A}"/>'
               "</patient></recordTarget></REPC_IN150016SM05>").encode()
    _, _, incomplete = client.upload(message_id=message_id, hl7=no_code)
    assert [r[0] for r in incomplete["reasons"]] == ["400"]
    assert "GPSummary/code/@code" in incomplete["reasons"][0][1]

    _, _, no_patient = client.upload(nhs_number=None)
    assert "recordTarget/patient/id" in no_patient["reasons"][0][1]
    assert client.stats()["rejected_by_code"] == {"400": 3}


def test_a_message_built_by_the_kit_meets_the_conformance_facts_and_is_accepted(spine):
    client = spine()
    message_id, gp_summary_id, content_type, body = make_message(NHS_A)
    assert conformance.check_message(body, content_type) == []
    sent = client.send(content_type, body)
    assert read_ack(client.poll(sent.headers["content-location"]))["type"] == "AA"
    assert [(s["nhs_number"], s["message_id"], s["gp_summary_id"]) for s in client.summaries()] \
        == [(NHS_A, message_id, gp_summary_id)]


@pytest.mark.parametrize("rule, breach, repair", [
    ("ebxml-sync-reply", rb"<eb:SyncReply [^>]*/>", b""),
    ("medication-entry-code", rb'<code code="222681000000101"[^>]*/>', b'<code nullFlavor="UNK"/>'),
    ("coded-entry", rb"<pertinentInformation2 .*</pertinentInformation2>", b""),
])
def test_a_message_breaking_a_conformance_fact_is_ae_400_naming_the_rule(spine, rule, breach,
                                                                         repair):
    client = spine()
    _, _, content_type, body = make_message(NHS_A)
    broken = re.sub(breach, repair, body, count=1, flags=re.DOTALL)
    assert broken != body
    sent = client.send(content_type, broken)
    assert sent.status_code == 202
    ack = read_ack(client.poll(sent.headers["content-location"]))
    assert ack["type"] == "AE"
    assert [(code, qualifier) for code, _, qualifier, _ in ack["reasons"]] == [("400", "ER")]
    display = ack["reasons"][0][1]
    assert display.startswith(f"Invalid Request: {rule}: {conformance.RULES[rule]} ("), display
    assert client.summaries() == []
    assert client.stats()["rejected_by_code"] == {"400": 1}
    # The rule, not the patient, was the matter: the intact message for them is taken.
    assert client.upload(NHS_A)[2]["type"] == "AA"


def test_seeded_rejection_carries_420_with_30418(spine):
    client = spine(reject_rates={"30418": 1.0})
    _, _, ack = client.upload(NHS_A)
    assert [r[0] for r in ack["reasons"]] == ["420", "30418"]
    assert client.stats()["rejected_by_code"] == {"30418": 1}


def test_seeded_rejections_follow_the_seed_and_the_nhs_number(spine):
    patients = [valid_nhs_number(i) for i in range(40)]
    runs = []
    for seed in (7, 7, 8):
        client = spine(seed=seed, reject_rates={"410": 0.5})
        runs.append([client.upload(nhs)[2]["type"] for nhs in patients])   # new ids each time
    assert runs[0] == runs[1], "the same seed rejects the same patients, whatever the message ids"
    assert {"AA", "AE"} == set(runs[0])
    assert runs[2] != runs[0], "another seed rejects other patients"


@pytest.mark.parametrize("code, reasons", [("30418", ["420", "30418"]), ("30312", ["30312"]),
                                           ("35160", ["35160"])])
def test_a_patient_rejected_for_who_they_are_is_rejected_again_on_every_resend(spine, code,
                                                                               reasons):
    """As at the Spine: dissent recorded there, a patient it does not know, a wrong NHS number do
    not go away when the message is built again with a new id, nor when it is re-sent with its
    own."""
    client = spine(seed=11, reject_rates={code: 0.5})
    patients = [valid_nhs_number(i) for i in range(16)]
    first = {nhs: client.upload(nhs)[2] for nhs in patients}
    rejected = [nhs for nhs, ack in first.items() if ack["type"] == "AE"]
    accepted = [nhs for nhs in patients if nhs not in rejected]
    assert rejected and accepted
    assert all([r[0] for r in first[nhs]["reasons"]] == reasons for nhs in rejected)
    for _ in range(3):
        for nhs in rejected:
            message_id, _, ack = client.upload(nhs)          # rebuilt with a new message id
            assert ack["type"] == "AE" and [r[0] for r in ack["reasons"]] == reasons, nhs
            again = make_message(nhs, message_id=message_id)  # the same id re-sent
            assert read_ack(client.poll(client.send(*again[2:]).headers["content-location"])) \
                == ack
    assert sorted(s["nhs_number"] for s in client.summaries()) == sorted(accepted)
    assert client.stats()["rejected_by_code"] == {code: 4 * len(rejected)}


def test_transient_faults_still_vary_per_attempt_for_a_rejected_patient(spine):
    """The patient's rejection recurs; a SOAP fault does not: the same message posted again can
    be taken."""
    client = spine(seed=3, transient_rate=0.5, reject_rates={"30418": 1.0})
    runs = []
    for n in range(6):
        _, _, content_type, body = make_message(NHS_A, message_id=f"00000000-0000-4000-8000-{n:012d}")
        statuses = [client.send(content_type, body)]
        while statuses[-1].status_code != 202:
            assert statuses[-1].status_code == 500 and len(statuses) < 40
            statuses.append(client.send(content_type, body))
        ack = read_ack(client.poll(statuses[-1].headers["content-location"]))
        assert [r[0] for r in ack["reasons"]] == ["420", "30418"]
        runs.append([answer.status_code for answer in statuses])
    assert any(run[0] == 500 for run in runs), "a message met a fault and was then taken"
    assert client.stats()["transient_faults_injected"] == {"500": sum(len(r) - 1 for r in runs)}
    assert client.summaries() == []


# --- transport faults ------------------------------------------------------------------------------

def test_rate_limit_answers_429_with_retry_after_in_ms(spine, clock):
    client = spine(rate_limit_tps=2)
    _, _, content_type, body = make_message(NHS_A)
    assert client.send(content_type, body).status_code == 202
    limited = client.send(*make_message(NHS_B)[2:])
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "500"
    clock.advance(0.5)
    assert client.send(*make_message(NHS_B)[2:]).status_code == 202
    assert client.stats()["transient_faults_injected"] == {"429": 1}


def test_transient_faults_are_soap_faults_200_206_208_drawn_per_attempt(spine):
    client = spine(transient_rate=1.0)
    _, _, content_type, body = make_message()
    answer = client.send(content_type, body)
    assert answer.status_code == 500
    assert fault_code(answer) in {"200", "206", "208"}
    assert client.stats()["transient_faults_injected"] == {"500": 1}
    assert client.summaries() == []

    flaky = spine(transient_rate=0.5, gateway_error_rate=0.3)
    _, _, content_type, body = make_message(message_id="00000000-0000-4000-8000-000000000001")
    statuses = [flaky.send(content_type, body).status_code for _ in range(30)]
    assert 202 in statuses, "a retry with the same message id must be able to succeed"
    assert set(statuses) - {202} <= {500, 502, 503, 504} and set(statuses) != {202}


def test_gateway_errors_have_an_empty_body(spine):
    client = spine(gateway_error_rate=1.0)
    answer = client.send(*make_message()[2:])
    assert answer.status_code in (502, 503, 504) and answer.content == b""
    assert sum(client.stats()["transient_faults_injected"].values()) == 1


def test_dropped_ack_stays_202(spine, clock):
    client = spine(drop_ack_rate=1.0)
    sent = client.send(*make_message(NHS_A)[2:])
    assert sent.status_code == 202
    for _ in range(3):
        clock.advance(3600)
        assert client.poll(sent.headers["content-location"]).status_code == 202
    assert client.stats()["acks_dropped"] == 1


def test_outage_window_answers_503_then_recovers(spine, clock):
    client = spine(outage_start_s=10, outage_duration_s=20)
    sent = client.send(*make_message(NHS_A)[2:])
    clock.advance(15)
    assert client.send(*make_message(NHS_B)[2:]).status_code == 503
    assert client.poll(sent.headers["content-location"]).status_code == 503
    clock.advance(15)
    assert client.poll(sent.headers["content-location"]).status_code == 200
    assert client.send(*make_message(NHS_B)[2:]).status_code == 202


def test_wrong_soap_action_or_content_type_is_400_fault_300(spine):
    client = spine()
    _, _, content_type, body = make_message()
    wrong_action = client.send(content_type, body, SOAPAction="urn:nhs:names:services:psis/OTHER")
    assert wrong_action.status_code == 400 and fault_code(wrong_action) == "300"
    not_multipart = client.send("text/xml", body)
    assert not_multipart.status_code == 400 and fault_code(not_multipart) == "300"


def test_unreadable_ebxml_header_is_500_fault_300(spine):
    client = spine()
    for header in (b"<not xml", b"<soap:Envelope xmlns:soap='x'/>"):
        answer = client.send(*make_message(header=header)[2:])
        assert answer.status_code == 500 and fault_code(answer) == "300"
    assert client.stats()["requests"] == 2


def test_an_error_inside_a_handler_is_a_500_fault_and_the_server_lives_on(spine, monkeypatch):
    client = spine()

    def explode(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(client.thread.simulator, "_decide", explode)
    answer = client.send(*make_message()[2:])
    assert answer.status_code == 500 and fault_code(answer) == "300"
    monkeypatch.undo()
    assert client.upload(NHS_A)[2]["type"] == "AA"


def test_admin_stats_count_what_happened(spine):
    client = spine()
    client.upload(NHS_A)
    client.upload(NHS_A)
    client.upload(NHS_BAD)
    stats = client.stats()
    assert stats == {**stats, "requests": 3, "accepted": 1, "duplicates": 0, "replacements": 0,
                     "rejected_by_code": {"30134": 1, "35160": 1}, "transient_faults_injected": {},
                     "polls": 3}
    assert client.thread.simulator.stats() == stats
    assert [s["nhs_number"] for s in client.summaries()] == [NHS_A]


# --- the Spine's clock ------------------------------------------------------------------------------

def test_the_date_header_follows_the_simulators_clock_and_its_skew(spine, clock):
    def date_of(answer: httpx.Response) -> float:
        return parsedate_to_datetime(answer.headers["date"]).timestamp()

    right, ahead = spine(), spine(clock_skew_s=30)
    assert date_of(right.http.get("/")) == clock.now
    assert date_of(ahead.http.get("/")) == clock.now + 30
    clock.advance(3600)
    assert date_of(ahead.poll("/poll/NO-SUCH-ID")) == clock.now + 30     # a 404 too
    assert date_of(ahead.send(*make_message(NHS_A)[2:])) == clock.now + 30
    assert date_of(ahead.login()) == clock.now, "the identity provider's clock is not the Spine's"


def test_a_spine_whose_clock_is_ahead_ends_the_session_that_much_sooner(spine, clock):
    """The identity provider issues the token by its own (right) clock; the Spine judges its
    expiry by the Spine's clock: 30 s ahead, it refuses the token 30 s before its expiry."""
    right, ahead = spine(), spine(clock_skew_s=30)
    clock.advance(10 * 3600 - 20)
    assert right.send(*make_message(NHS_A)[2:]).status_code == 202
    refused = ahead.send(*make_message(NHS_A)[2:])
    assert refused.status_code == 401 and refused.json()["reason"] == "expired"


# --- identity module and command line -------------------------------------------------------------

def with_claims(token: str, **changes) -> str:
    """The token with some claims changed and its signature kept: a tampered token."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    raw = json.dumps(claims, separators=(",", ":")).encode()
    return f"{header}.{base64.urlsafe_b64encode(raw).rstrip(b'=').decode()}.{signature}"


def test_tokens_are_verified_not_trusted():
    token, _ = identity.issue_token(NURSE, SECRET, 1000.0, 1.0)
    assert identity.verify_token(token, SECRET, 1000.0)["exp"] == 4600
    unsigned = jwt.encode({**identity.verify_token(token, SECRET, 1000.0)}, None,
                          algorithm="none")
    no_subject = jwt.encode({"iss": identity.ISSUER, "aud": identity.AUDIENCE, "iat": 1000,
                             "exp": 4600}, SECRET, algorithm="HS256")
    for bad, reason in ((None, "missing"), ("abc", "garbled"), ("a.b.c", "garbled"),
                        ("ü.x", "garbled"), (unsigned, "forged"),
                        (with_claims(token, activities=["B0062"]), "forged"),
                        (identity.issue_token(NURSE, b"x" * 32, 1000.0, 1.0)[0], "forged"),
                        (identity.issue_token(NURSE, SECRET, 1000.0, 1.0,
                                              audience="elsewhere")[0], "wrong_audience"),
                        (identity.issue_token(NURSE, SECRET, 1000.0, 1.0,
                                              issuer="elsewhere")[0], "wrong_issuer"),
                        (no_subject, "incomplete")):
        with pytest.raises(identity.InvalidToken) as raised:
            identity.verify_token(bad, SECRET, 1000.0)
        assert raised.value.reason == reason, bad
    assert identity.verify_token(token, SECRET, 4599.0)["sub"] == NURSE["user_id"]
    with pytest.raises(identity.InvalidToken, match="expired"):
        identity.verify_token(token, SECRET, 4600.0)   # no leeway: expired at exp


def test_the_admin_endpoints_answer_loopback_clients_only():
    class Peer:
        def __init__(self, address):
            self.address = address

        def get_extra_info(self, name, default=None):
            return (self.address, 50000) if name == "peername" else default

    def remote(address):
        return make_mocked_request("GET", "/_admin/stats", transport=Peer(address))

    assert _loopback_only(remote("127.0.0.1")) is None
    assert _loopback_only(remote("::1")) is None
    assert _loopback_only(remote("192.0.2.7")).status == 403


def test_users_file_is_checked_and_errors_name_the_file_and_entry(tmp_path):
    path = tmp_path / "users.json"
    path.write_text(json.dumps(USERS))
    users = identity.load_users(path)
    assert [u["session_hours"] for u in users] == [10.0, 0.5]

    path.write_text(json.dumps([USERS[0], {**USERS[1], "activities": "B0062"}]))
    with pytest.raises(identity.UsersFileError, match=r"users.json, entry 2 .*'activities'"):
        identity.load_users(path)
    path.write_text(json.dumps([{**USERS[0], "session_hours": -1}]))
    with pytest.raises(identity.UsersFileError, match="session_hours"):
        identity.load_users(path)
    path.write_text("{not json")
    with pytest.raises(identity.UsersFileError, match="users.json: not valid JSON"):
        identity.load_users(path)
    for field, value in (("user_id", "u1"), ("role_profile_id", "R8000"),
                         ("user_id", "5550219351070")):
        path.write_text(json.dumps([USERS[0], {**USERS[1], field: value}]))
        with pytest.raises(identity.UsersFileError,
                           match=rf"users.json, entry 2 .*'{field}' '{value}' is not a 12-digit"):
            identity.load_users(path)


def test_fault_switches_parse_into_a_config(tmp_path):
    unknown = tmp_path / "unknown.txt"
    unknown.write_text(f"{NHS_A}\n\n{NHS_B}\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([
        "--seed", "3", "--latency-ms", "20", "--latency-jitter-ms", "5", "--ack-delay-ms", "100",
        "--ack-delay-jitter-ms", "10", "--rate-limit", "50", "--transient-rate", "0.1",
        "--gateway-error-rate", "0.05", "--drop-ack-rate", "0.01", "--outage-start", "60",
        "--outage-duration", "30", "--reject", "30418=0.01", "--reject", "420=0",
        "--unknown-nhs-numbers", str(unknown), "--clock-skew", "-2.5"])
    config = config_from_args(args, USERS)
    assert (config.seed, config.latency_ms, config.rate_limit_tps, config.outage_start_s) == (3, 20, 50, 60)
    assert config.reject_rates == {"30418": 0.01, "420": 0.0}
    assert config.unknown_nhs_numbers == {NHS_A, NHS_B}
    assert config.clock_skew_s == -2.5
    with pytest.raises(SystemExit):
        parser.parse_args(["--transient-rate", "1.5"])
