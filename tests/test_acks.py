"""The ack parser on the project's own acks (tests/fixtures/acks), on the real acks in
../shared/reference/ (spine/ and the 17 of acks-real/) where they are beside the clone, and on
SOAP faults."""

from __future__ import annotations

import json
import re

import pytest

from scr_nb.errors import SpineError
from scr_nb.spine.acks import parse_ack, parse_soap_fault
from tests.conftest import FIXTURES, SHARED_REFERENCE, reference


def own(name: str) -> bytes:
    return (FIXTURES / "acks" / name).read_bytes()


def real(name: str) -> bytes:
    return reference("spine", name).read_bytes()


@pytest.mark.parametrize("body, ref, detail", [
    (lambda: own("aa-ebxml.mime"), "7D2E4A90-1C3B-4F5E-8A6D-2B9C0E1F3A47", ""),
    (lambda: real("ack-AA-upload-successful.mime"), "94C77A1C-9249-4C40-B1FD-5A323F201F67",
     "GP Summary upload successful"),
], ids=["own", "real"])
def test_accepted_ack_in_ebxml_mime(body, ref, detail):
    ack = parse_ack(body())
    assert ack.type_code == "AA" and ack.accepted
    assert ack.message_ref == ref
    assert ack.reasons == ()
    assert ack.detail == detail
    assert ack.failure_code is None


@pytest.mark.parametrize("body, ref, words, system", [
    (lambda: own("ae-ebxml-400-35160.mime"), "C0FFEE00-1234-4ABC-9DEF-00112233AA55",
     "NHS number missing or not valid", "2.16.840.1.113883.2.1.3.2.4.17.42"),
    (lambda: real("ack-AE-psis-35160.mime"), "B87BE5AD-0F90-4261-A102-E14B95B456DB",
     "NHS Number is missing or incorrect", "2.16.840.1.113883.2.1.3.2.4.17.33"),
], ids=["own", "real"])
def test_error_ack_keeps_every_reason_and_picks_the_psis_code(body, ref, words, system):
    ack = parse_ack(body())
    assert ack.type_code == "AE" and not ack.accepted
    assert ack.message_ref == ref
    assert [r.code for r in ack.reasons] == ["400", "35160"]
    assert ack.reasons[0].display == "Invalid Request"
    assert words in ack.reasons[1].display
    assert {r.qualifier for r in ack.reasons} == {"ER"}
    assert {r.code_system for r in ack.reasons} == {system}
    assert ack.failure_code == "35160"


@pytest.mark.parametrize("body, ref", [
    (lambda: own("ae-soap-nested-qualifier.xml"), "99AA88BB-77CC-46DD-95EE-44FF33001122"),
    (lambda: real("ack-MCCI_IN010000UK13.xml"), "11111111-65D3-EC42-BC31-62522532BC5D"),
], ids=["own", "real"])
def test_soap_wrapped_ack_with_nested_qualifier_value(body, ref):
    ack = parse_ack(body())
    assert ack.type_code == "AE"
    assert ack.message_ref == ref
    assert len(ack.reasons) == 1
    reason = ack.reasons[0]
    assert (reason.code, reason.qualifier, reason.code_system) == (
        "0", "ER", "2.16.840.1.113883.2.1.3.2.4.17.42")
    assert ack.failure_code == "0"


@pytest.mark.parametrize("body, content_type", [
    (lambda: own("aa-ebxml.mime"), 'multipart/related; boundary="--=_Boundary-scr-nb-fixture"'),
    (lambda: real("ack-AA-upload-successful.mime"),
     'multipart/related; boundary="--=_MIME-Boundary"; type="text/xml"'),
], ids=["own", "real"])
def test_boundary_from_the_content_type_header_is_used(body, content_type):
    assert parse_ack(body(), content_type).accepted


def test_an_answer_without_an_acknowledgement_is_an_error():
    with pytest.raises(SpineError) as caught:
        parse_ack(b"<html><body>Service Unavailable</body></html>")
    assert not caught.value.retriable


def test_soap_fault_code_and_words():
    body = (b'<?xml version="1.0"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/'
            b'envelope/"><soap:Body><soap:Fault><faultcode>soap:Server</faultcode><faultstring>'
            b'System failure</faultstring><detail><nasp:errorList xmlns:nasp="http://national.'
            b'carerecords.nhs.uk/schema/"><nasp:error><nasp:errorCode>208</nasp:errorCode>'
            b'<nasp:description>Timeout</nasp:description></nasp:error></nasp:errorList></detail>'
            b'</soap:Fault></soap:Body></soap:Envelope>')
    fault = parse_soap_fault(body)
    assert fault.code == "208" and fault.description == "Timeout"
    assert parse_soap_fault(own("aa-ebxml.mime")) is None


def test_soap_fault_code_in_another_wrapper():
    body = (b'<Envelope><Body><Fault><faultcode>Server</faultcode><faultstring>busy</faultstring>'
            b'<detail><error><code>206</code></error></detail></Fault></Body></Envelope>')
    fault = parse_soap_fault(body)
    assert fault.code == "206" and fault.description == "busy"


def test_an_ar_whose_only_code_is_an_acknowledgement_detail():
    ack = parse_ack(own("ar-soap-detail-202.xml"), "text/xml; charset=UTF-8")
    assert (ack.type_code, ack.codes, ack.failure_code) == ("AR", ("202",), "202")
    assert ack.reasons[0].display == "Duplicate HL7 ID Error"
    assert ack.message_ref == "0A0B0C0D-1E1F-4A2B-8C3D-4E5F6A7B8C9D"


def _corpus() -> list[str]:
    folder = SHARED_REFERENCE / "acks-real"
    if not (folder / "expected.json").exists():
        return ["(absent)"]
    return sorted(json.loads((folder / "expected.json").read_text()))


@pytest.mark.parametrize("name", _corpus())
def test_every_real_acknowledgement_is_read_as_a_person_reads_it(name):
    """The 17 real acks of ../shared/reference/acks-real, with what each means (expected.json):
    type, every code in document order, and the failure code SPEC 6.2 picks."""
    folder = reference("acks-real")
    expected = json.loads((folder / "expected.json").read_text())[name]
    ack = parse_ack((folder / name).read_bytes(), expected["content_type"])
    assert ack.type_code == expected["type"]
    assert list(ack.codes) == expected["codes"]
    assert ack.failure_code == expected["failure_code"]
    assert ack.accepted == (expected["type"] == "AA")


@pytest.mark.parametrize("name", _corpus())
def test_a_real_acknowledgement_answers_the_message_whose_id_it_is_given(name):
    """Set to answer a given message (messageRef, eb:RefToMessageId and every other occurrence of
    those ids rewritten), each real ack is taken as that message's."""
    folder = reference("acks-real")
    expected = json.loads((folder / name).with_name("expected.json").read_text())[name]
    body = (folder / name).read_bytes()
    first = parse_ack(body, expected["content_type"]).message_ref
    refs = {first.encode()} | set(re.findall(rb"RefToMessageId>\s*([^<\s]+)\s*<", body))
    ours = "0B5E6F70-8192-4A3B-9C4D-5E6F708192A3"
    for old in refs:
        body = re.sub(re.escape(old), ours.encode(), body, flags=re.IGNORECASE)
    assert parse_ack(body, expected["content_type"]).message_ref.upper() == ours
