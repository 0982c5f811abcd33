"""Reading what the Spine answers: MCCI_IN010000UK13 application acks and SOAP faults (SPEC 6).

Real acks differ in wrapper (ebXML MIME multipart, a SOAP envelope, bare XML), in how a reason's
qualifier is written (``qualifier/@code`` or ``qualifier/value/@code``) and in where the codes sit
(``reason/justifyingDetectedIssueEvent/code``, or only ``acknowledgement/acknowledgementDetail/code``
as AR acks carry them), so the parser looks elements up by local name and ignores namespaces and
wrappers.
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from scr_nb.constants import PSIS_CODE_MIN_DIGITS
from scr_nb.errors import SpineError
from scr_nb.spine.mime import parse_related

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


@dataclass(frozen=True)
class AckReason:
    code: str
    display: str
    qualifier: str          # ER (error), WG (warning), IF (information), or "" when absent
    code_system: str


@dataclass(frozen=True)
class Ack:
    type_code: str          # AA accepted, AE error, AR rejected
    message_ref: str        # the id of the message this acknowledges
    reasons: tuple[AckReason, ...] = ()
    detail: str = ""

    @property
    def accepted(self) -> bool:
        return self.type_code == "AA"

    @property
    def failure_code(self) -> str | None:
        """The most specific code: the PSIS one (five digits, e.g. 35160) when present, else the
        first. None for an accepted ack."""
        if self.accepted:
            return None
        codes = [r.code for r in self.reasons if r.code]
        for code in codes:
            if len(code) >= PSIS_CODE_MIN_DIGITS and code.isdigit():
                return code
        return codes[0] if codes else self.type_code

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(r.code for r in self.reasons)


def _local(tag: object) -> str:
    """``{urn:hl7-org:v3}acknowledgement`` -> ``acknowledgement``; comments have no name."""
    return tag.rpartition("}")[2] if isinstance(tag, str) else ""


def _xml_documents(body: bytes, content_type: str | None,
                   wanted: bytes = b"") -> list[etree._Element]:
    """The XML parts of a body (or the body itself), skipping parts that do not mention
    ``wanted``, so the ebXML header of an ack is not parsed for nothing."""
    documents = []
    for part in parse_related(body, content_type):
        text = part.body.strip()
        if not text.startswith(b"<") or (wanted and wanted not in text):
            continue
        try:
            documents.append(etree.fromstring(text, _PARSER))
        except etree.XMLSyntaxError:
            continue
    return documents


def _first(root: etree._Element, name: str) -> etree._Element | None:
    """The first element called ``name`` in any namespace or none (lxml's ``{*}`` wildcard)."""
    return next(root.iter(f"{{*}}{name}"), None)


def _reason(issue: etree._Element) -> AckReason | None:
    code = next(issue.iterchildren("{*}code"), None)
    if code is None:
        return None
    qualifier = ""
    q = _first(code, "qualifier")
    if q is not None:   # qualifier/@code, or qualifier/value/@code as in the SOAP-wrapped ack
        qualifier = q.get("code") or next(
            (v.get("code", "") for v in q.iterchildren("{*}value")), "")
    return AckReason(code=(code.get("code") or "").strip(), display=code.get("displayName") or "",
                     qualifier=qualifier, code_system=code.get("codeSystem") or "")


def parse_ack(body: bytes, content_type: str | None = None) -> Ack:
    """Parse an application ack in any of the wrappers the Spine uses.

    Raises SpineError (not retriable) when no MCCI acknowledgement can be found."""
    for root in _xml_documents(body, content_type, b"acknowledgement"):
        ack = _first(root, "acknowledgement")
        if ack is None:
            continue
        ref_el = _first(ack, "messageRef")
        ref_id = _first(ref_el, "id") if ref_el is not None else None
        # Codes as they stand: acknowledgementDetail first (real AR acks carry their only code
        # there), then each reason's justifyingDetectedIssueEvent.
        details = [r for r in map(_reason, ack.iterchildren("{*}acknowledgementDetail")) if r]
        reasons = details + [r for r in map(_reason, root.iter("{*}justifyingDetectedIssueEvent"))
                             if r]
        detail_el = _first(root, "detail")
        detail = (detail_el.text or "").strip() if detail_el is not None else ""
        return Ack(type_code=(ack.get("typeCode") or "").strip(),
                   message_ref=(ref_id.get("root") or "") if ref_id is not None else "",
                   reasons=tuple(reasons), detail=detail)
    raise SpineError("the Spine's answer holds no MCCI_IN010000UK13 acknowledgement",
                     retriable=False)


@dataclass(frozen=True)
class SoapFault:
    code: str
    description: str


def parse_soap_fault(body: bytes, content_type: str | None = None) -> SoapFault | None:
    """The error code and words of a SOAP fault, or None when the body holds none."""
    for root in _xml_documents(body, content_type):
        fault = _first(root, "Fault")
        if fault is None:
            continue
        code_el = _first(fault, "errorCode")
        if code_el is None:   # other wrappers: the first numeric element named like a code
            code_el = next((e for e in fault.iter() if _local(e.tag).lower().endswith("code")
                            and (e.text or "").strip().isdigit()), None)
        words = _first(fault, "description")
        if words is None:
            words = _first(fault, "faultstring")
        return SoapFault(code=(code_el.text or "").strip() if code_el is not None else "",
                         description=(words.text or "").strip() if words is not None else "")
    return None
