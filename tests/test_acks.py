"""The ack parser on the real Spine acks in shared/reference/spine/, and on SOAP faults."""

from __future__ import annotations

import pytest

from scr_nb.errors import SpineError
from scr_nb.spine.acks import parse_ack, parse_soap_fault
from tests.conftest import REFERENCE


def read(name: str) -> bytes:
    return (REFERENCE / name).read_bytes()


def test_accepted_ack_in_ebxml_mime():
    ack = parse_ack(read("ack-AA-upload-successful.mime"))
    assert ack.type_code == "AA" and ack.accepted
    assert ack.message_ref == "94C77A1C-9249-4C40-B1FD-5A323F201F67"
    assert ack.reasons == ()
    assert ack.detail == "GP Summary upload successful"
    assert ack.failure_code is None


def test_error_ack_keeps_every_reason_and_picks_the_psis_code():
    ack = parse_ack(read("ack-AE-psis-35160.mime"))
    assert ack.type_code == "AE" and not ack.accepted
    assert ack.message_ref == "B87BE5AD-0F90-4261-A102-E14B95B456DB"
    assert [r.code for r in ack.reasons] == ["400", "35160"]
    assert ack.reasons[0].display == "Invalid Request"
    assert "NHS Number is missing or incorrect" in ack.reasons[1].display
    assert {r.qualifier for r in ack.reasons} == {"ER"}
    assert {r.code_system for r in ack.reasons} == {"2.16.840.1.113883.2.1.3.2.4.17.33"}
    assert ack.failure_code == "35160"


def test_soap_wrapped_ack_with_nested_qualifier_value():
    ack = parse_ack(read("ack-MCCI_IN010000UK13.xml"))
    assert ack.type_code == "AE"
    assert ack.message_ref == "11111111-65D3-EC42-BC31-62522532BC5D"
    assert len(ack.reasons) == 1
    reason = ack.reasons[0]
    assert (reason.code, reason.qualifier, reason.code_system) == (
        "0", "ER", "2.16.840.1.113883.2.1.3.2.4.17.42")
    assert ack.failure_code == "0"


def test_boundary_from_the_content_type_header_is_used():
    body = read("ack-AA-upload-successful.mime")
    ack = parse_ack(body, 'multipart/related; boundary="--=_MIME-Boundary"; type="text/xml"')
    assert ack.accepted


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
    assert parse_soap_fault(read("ack-AA-upload-successful.mime")) is None


def test_soap_fault_code_in_another_wrapper():
    body = (b'<Envelope><Body><Fault><faultcode>Server</faultcode><faultstring>busy</faultstring>'
            b'<detail><error><code>206</code></error></detail></Fault></Body></Envelope>')
    fault = parse_soap_fault(body)
    assert fault.code == "206" and fault.description == "busy"
