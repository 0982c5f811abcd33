"""The conformance facts the real Spine checks (SPEC 5), as one function over a built message.

The NHS MIM 7.2.02 schemas for REPC_MT150007UK05 and the Spine's own rule stylesheets (GP Summary
rules, ebXML reliable-messaging rules) are public but may not be copied here, so this module states
the facts they hold that the kit's messages depend on, each as a named rule. ``scr-nb preflight``
runs it over a sample of messages, and the simulator rejects a message that breaks one with a 400
AE naming the rule, so a regression shows in the project's own tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lxml import etree

from scr_nb import constants as C
from scr_nb.spine.mime import Part, parse_related

HL7 = f"{{{C.HL7_NS}}}"
EB = f"{{{C.EBXML_NS}}}"
SOAP = f"{{{C.SOAP_NS}}}"
XHTML = f"{{{C.PRESENTATION_NS}}}"
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)
_SDS_ID = re.compile(C.SDS_ID_PATTERN)
_UUID_ANY_CASE = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-"
                            r"[0-9A-Fa-f]{12}")
_HL7_TIME = re.compile(r"[0-9]{8}([0-9]{4}([0-9]{2})?)?")
# The fixed entry code of each medication entry type (MIM schemas).
MEDICATION_ENTRY_CODES = {
    C.ACUTE_MEDICATION_ENTRY: C.ACUTE_MEDICATION_CODE,
    C.REPEAT_MEDICATION_ENTRY: C.REPEAT_MEDICATION_CODE,
    C.DISCONTINUED_MEDICATION_ENTRY: C.DISCONTINUED_MEDICATION_CODE,
}
HEADINGS = ("h1", "h2", "h3", "td")   # where the Spine looks for the dissent phrase

# The rules, by name, with what each requires.
RULES = {
    "ebxml-sync-reply": "the ebXML header carries exactly one eb:SyncReply, eb:version 2.0, for the "
                        "next SOAP actor",
    "ebxml-duplicate-elimination": "the ebXML MessageHeader carries exactly one "
                                   "eb:DuplicateElimination",
    "ebxml-ack-requested": "the ebXML header carries exactly one eb:AckRequested, eb:version 2.0, "
                           "unsigned, for the toPartyMSH actor",
    "author-sds-ids": "the author's SDS user id and role profile id are 12-digit numbers",
    "coded-entry": "a GP Summary holds at least one coded entry (pertinentInformation2)",
    "medication-entry-code": "every medication entry carries its fixed entry code, never a "
                             "nullFlavor",
    "dosage-part": "every medication entry has its dosage instructions part "
                   "(pertinentInformation1)",
    "dissent-phrase": "a dissent summary says 'Refused consent for upload to national shared "
                      "electronic record' in an h1, h2, h3 or td of its presentation text",
    "no-significant-data-phrase": "a summary with nothing to send says 'The practice holds no "
                                  "significant data on this patient' in an h3",
    "upper-case-ids": "every UUID id is upper case",
    "hl7-times": "HL7 times are digits only (YYYYMMDD[HHMM[SS]])",
}


@dataclass(frozen=True)
class Breach:
    rule: str        # a key of RULES
    detail: str      # where, in a few words

    def describe(self) -> str:
        return f"{self.rule}: {RULES[self.rule]} ({self.detail})"


def check_message(body: bytes, content_type: str | None = None) -> list[Breach]:
    """The breaches of an ebXML multipart message as the kit sends it (header and HL7 parts)."""
    parts = parse_related(body, content_type)
    header = next((p for p in parts if b"MessageHeader" in p.body), None)
    payload = next((p for p in parts if p is not header), None)
    if header is None or payload is None:
        return [Breach("ebxml-sync-reply", "the message has no ebXML header part and HL7 part")]
    return check_header(_parse(header)) + check_payload(_parse(payload))


def _parse(part: Part) -> etree._Element:
    return etree.fromstring(part.body.lstrip(), _PARSER)


def check_header(envelope: etree._Element) -> list[Breach]:
    """The Spine's ebXML reliable-messaging rules the kit's header must meet."""
    breaches = []
    head = envelope.find(f"{SOAP}Header")
    head = head if head is not None else envelope
    sync = head.findall(f"{EB}SyncReply")
    if len(sync) != 1:
        breaches.append(Breach("ebxml-sync-reply", f"{len(sync)} found"))
    elif (sync[0].get(f"{EB}version") != "2.0"
          or sync[0].get(f"{SOAP}actor") != C.SOAP_NEXT_ACTOR):
        breaches.append(Breach("ebxml-sync-reply", "wrong eb:version or SOAP actor"))
    found = head.findall(f"{EB}MessageHeader/{EB}DuplicateElimination")
    if len(found) != 1:
        breaches.append(Breach("ebxml-duplicate-elimination", f"{len(found)} found"))
    ack = head.findall(f"{EB}AckRequested")
    if len(ack) != 1:
        breaches.append(Breach("ebxml-ack-requested", f"{len(ack)} found"))
    elif (ack[0].get(f"{EB}version") != "2.0" or ack[0].get(f"{EB}signed") != "false"
          or ack[0].get(f"{SOAP}actor") != C.TO_PARTY_MSH_ACTOR):
        breaches.append(Breach("ebxml-ack-requested", "wrong eb:version, eb:signed or SOAP actor"))
    return breaches


def check_payload(root: etree._Element) -> list[Breach]:
    """The MIM schema and GP Summary rule facts the kit's HL7 payload must meet."""
    breaches: list[Breach] = []
    summary = root.find(f".//{HL7}GPSummary")
    for where, person in (("ControlActEvent", root.find(f"{HL7}ControlActEvent/{HL7}author/"
                                                        f"{HL7}AgentPersonSDS")),
                          ("GPSummary", summary.find(f"{HL7}author/{HL7}UKCT_MT160018UK01."
                                                     f"AgentPersonSDS")
                           if summary is not None else None)):
        if person is None:
            breaches.append(Breach("author-sds-ids", f"no author in {where}"))
            continue
        role = person.find(f"{HL7}id[@root='{C.OID_SDS_ROLE_PROFILE}']")
        user = person.find(f"{HL7}agentPersonSDS/{HL7}id[@root='{C.OID_SDS_USER}']")
        for name, element in (("role profile id", role), ("user id", user)):
            value = element.get("extension") if element is not None else None
            if value is None or not _SDS_ID.fullmatch(value):
                breaches.append(Breach("author-sds-ids", f"{where} {name} {value!r}"))
    if summary is None:
        return breaches + [Breach("coded-entry", "no GPSummary")]
    if summary.find(f"{HL7}pertinentInformation2") is None:
        breaches.append(Breach("coded-entry", "no pertinentInformation2"))
    for element, code in MEDICATION_ENTRY_CODES.items():
        for entry in summary.iter(f"{HL7}{element}"):
            name = element.rpartition(".")[2]
            entry_code = entry.find(f"{HL7}code")
            if (entry_code is None or entry_code.get("code") != code
                    or entry_code.get("codeSystem") != C.OID_SNOMED
                    or entry_code.get("nullFlavor") is not None):
                breaches.append(Breach("medication-entry-code", f"{name} without code {code}"))
            if entry.find(f"{HL7}pertinentInformation1/{HL7}pertinentDosageInstructions") is None:
                breaches.append(Breach("dosage-part", f"{name} without pertinentInformation1"))
    texts = {tag: [" ".join(e.itertext()) for e in summary.iter(f"{XHTML}{tag}")]
             for tag in HEADINGS}
    refusals = [e for e in summary.iter(f"{HL7}{C.REFUSAL_ENTRY}")
                if e.find(f"{HL7}code[@code='{C.DISSENT_CODE}']") is not None]
    if refusals and not any(C.DISSENT_PHRASE in text for tag in HEADINGS for text in texts[tag]):
        breaches.append(Breach("dissent-phrase", "Refusal entry without the phrase"))
    findings = [e for e in summary.iter(f"{HL7}{C.FINDING_ENTRY}")
                if e.find(f"{HL7}code[@code='{C.NO_SIGNIFICANT_DATA_CODE}']") is not None]
    if findings and not any(C.NO_SIGNIFICANT_DATA_PHRASE in text for text in texts["h3"]):
        breaches.append(Breach("no-significant-data-phrase", "Finding 184229000 without the phrase"))
    for element in root.iter(f"{HL7}id"):
        value = element.get("root") or ""
        if _UUID_ANY_CASE.fullmatch(value) and value != value.upper():
            breaches.append(Breach("upper-case-ids", f"id {value}"))
            break
    for element in root.iter(f"{HL7}creationTime", f"{HL7}effectiveTime", f"{HL7}time",
                             f"{HL7}low", f"{HL7}high"):
        value = element.get("value")
        if value is not None and not _HL7_TIME.fullmatch(value):
            breaches.append(Breach("hl7-times", f"{etree.QName(element).localname} {value!r}"))
            break
    return breaches


__all__ = ["Breach", "RULES", "check_header", "check_message", "check_payload"]
