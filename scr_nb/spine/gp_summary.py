"""The GP Summary message: the bytes sent to the Spine for one patient.

``build_message`` turns the ``SummaryContent`` that ``content`` selected into the ebXML multipart
REPC_IN150016SM05 the Spine takes. The XML is written with string
templates rather than an XML library because the Initial Upload builds a million of these; every value
from outside the kit goes through ``xml_text``, so the output is well-formed whatever the extract holds.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timezone
from functools import lru_cache
from hashlib import sha1

from scr_nb import constants as C
from scr_nb.extract.records import Medication, Patient
from scr_nb.spine.content import SummaryContent, Windows, window_starts
from scr_nb.spine.mime import build_related

__all__ = ["Author", "OutboundMessage", "build_message", "check_author", "new_id", "xml_text"]

CONTENT_ID_DOMAIN = "scr-nb"
HEADER_CONTENT_ID = f"ebXMLHeader@{CONTENT_ID_DOMAIN}"
BOUNDARY_PREFIX = "--=_MIME-Boundary-"
DISSENT_TEXT = (
    "This patient has dissented from sharing their Summary Care Record: no clinical information is "
    "included in this summary."
)
_SDS_ID = re.compile(C.SDS_ID_PATTERN)


# --- Text and ids -----------------------------------------------------------------------------------

# Characters XML 1.0 does not allow at all (C0 controls but tab, LF and CR; lone surrogates, which a
# str can hold after a lenient decode; U+FFFE and U+FFFF). They are dropped, not escaped.
_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_NEEDS_WORK = re.compile("[&<>\"'\t\n\r\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
# Tab, LF and CR are written as references so they survive attribute-value normalisation too.
_ESCAPES = str.maketrans({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;",
    "\t": "&#9;", "\n": "&#10;", "\r": "&#13;",
})


def xml_text(value: str) -> str:
    """``value`` made safe for XML element text and attribute values (either quote style)."""
    if not value:
        return ""
    if value.__class__ is not str:
        value = str(value)
    if _NEEDS_WORK.search(value) is None:
        return value
    return _FORBIDDEN.sub("", value).translate(_ESCAPES)


def new_id() -> str:
    """A fresh upper-case UUID4, the form the Spine uses for message and event ids."""
    return str(uuid.uuid4()).upper()


_UUID_UPPER = re.compile(r"[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}")
# Entry ids are derived (a name-based UUID, version 5, from the event id and the item), not random, so
# rebuilding a message from the same inputs gives the same bytes. Written out rather than through
# uuid.uuid5 because a message needs several and the uuid module's objects cost more than the hash.
_ENTRY_NAMESPACE = uuid.UUID("6F1E3C52-7C1B-4E0B-9D55-2B1C6A0E4F11").bytes


def _derived_id(*parts: str) -> str:
    h = sha1(_ENTRY_NAMESPACE + "/".join(parts).encode("utf-8", "surrogatepass")).hexdigest().upper()
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{'89AB'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"


def _check_id(name: str, value: str) -> None:
    if not isinstance(value, str) or _UUID_UPPER.fullmatch(value) is None:
        raise ValueError(f"{name} must be an upper-case UUID such as new_id() returns, not {value!r}")


# --- Dates ------------------------------------------------------------------------------------------

_MONTHS = ("", "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


# A practice's items share a few thousand dates, so each is formatted once.
@lru_cache(maxsize=100_000)
def _shown(day: date) -> str:
    """A date as the presentation text writes it: 14-May-2020 (not strftime: that follows the locale)."""
    return f"{day.day:02d}-{_MONTHS[day.month]}-{day.year:04d}"


@lru_cache(maxsize=100_000)
def _hl7_date(day: date) -> str:
    return f"{day.year:04d}{day.month:02d}{day.day:02d}"


def _effective(day: date | None) -> str:
    return f'<effectiveTime value="{_hl7_date(day)}"/>' if day else '<effectiveTime nullFlavor="UNK"/>'


# --- Sender -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Author:
    """Who sends: the Smartcard user (SDS ids, name, job role) and the practice's Spine settings."""

    user_id: str
    name: str
    role_profile_id: str
    job_role: str = C.DEFAULT_JOB_ROLE
    sender_asid: str = "200000000001"
    receiver_asid: str = "990101234567"
    practice_ods: str = "A12345"
    practice_name: str = "Example Practice"
    sender_party_key: str = "A12345-0000001"


def check_author(author: Author) -> None:
    """The author's SDS user id and role profile id must be 12-digit SDS ids: the Spine's schema
    rejects anything else. Raises ValueError naming the field."""
    for field, value in (("user id", author.user_id), ("role profile id", author.role_profile_id)):
        if not isinstance(value, str) or _SDS_ID.fullmatch(value) is None:
            raise ValueError(f"the author's SDS {field} {value!r} is not a 12-digit SDS id: the "
                             "Spine rejects it. Log in with the Smartcard user and role profile "
                             "as Care Identity Service issues them")


@lru_cache(maxsize=64)
def _author_xml(author: Author) -> dict[str, str]:
    """The author's fields escaped once (and checked); a job sends thousands of messages for the
    same author."""
    check_author(author)
    name = xml_text(author.name)
    practice = xml_text(author.practice_name)
    ods = xml_text(author.practice_ods)
    return {
        "user": xml_text(author.user_id), "name": name, "role": xml_text(author.role_profile_id),
        "job": xml_text(author.job_role), "snd": xml_text(author.sender_asid),
        "rcv": xml_text(author.receiver_asid), "party": xml_text(author.sender_party_key),
        "author_p": f'<p id="Author">Created by: {name}</p>',
        "practice_p": f'<p id="Practice">{practice} ({ods})</p>' if ods
                      else f'<p id="Practice">{practice}</p>',
    }


# --- The message ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutboundMessage:
    """One built message: the HTTP body and its Content-Type, with the ids the store keeps."""

    message_id: str
    event_id: str
    nhs_number: str
    content_type: str
    body: bytes

    @property
    def size(self) -> int:
        return len(self.body)


# Fixed runs of the payload, written once (SPEC 5 and gp-summary-soap-1.xml).
_TEMPLATE_ID = f'<templateId root="{C.OID_TEMPLATE}" extension="CSAB_RM-NPfITUK10.'
_PAYLOAD_FLAGS = (
    f'<versionCode code="{C.HL7_VERSION_CODE}"/>'
    f'<interactionId root="{C.OID_INTERACTION}" extension="{C.GP_SUMMARY_INTERACTION}"/>'
    '<processingCode code="P"/><processingModeCode code="T"/><acceptAckCode code="NE"/>'
)
_DEVICE = '<device classCode="DEV" determinerCode="INSTANCE">'
_SUMMARY_CODE = (
    f'<code code="{C.GP_SUMMARY_CODE}" codeSystem="{C.OID_SNOMED}" '
    f'displayName="{C.GP_SUMMARY_DISPLAY}"/>'
)
_CARE_DOCUMENTATION_CODE = (
    f'<code code="{C.CARE_PROFESSIONAL_DOCUMENTATION}" codeSystem="{C.OID_SNOMED}" '
    'displayName="Care Professional Documentation"/>'
)
_EXCERPT_OPEN = (
    '<excerptFrom typeCode="XCRPT" inversionInd="false" contextConductionInd="true" negationInd="false">'
    f'<templateId root="{C.OID_TEMPLATE}" extension="{C.EXCERPT_TEMPLATE}"/>'
    '<seperatableInd value="false"/>'
    '<UKCT_MT144051UK01.CareProfessionalDocumentationCRE classCode="CATEGORY" moodCode="EVN">'
    f'{_CARE_DOCUMENTATION_CODE}<component typeCode="COMP" inversionInd="false" negationInd="false">'
    f'{_TEMPLATE_ID}component"/><seperatableInd value="false"/>'
    '<presentationText classCode="OBS" moodCode="EVN"><value>'
)
_PRESENTATION_CODES = (
    f'<code code="{C.PRESENTATION_TEXT_CODE}" codeSystem="{C.OID_PRESENTATION_TEXT}" '
    'displayName="Presentation Text"/><statusCode code="completed"/>'
)
_EXCERPT_CLOSE = '</component></UKCT_MT144051UK01.CareProfessionalDocumentationCRE></excerptFrom>'
_PERTINENT_ROOT = (
    '<pertinentInformation1 typeCode="PERT" inversionInd="false" contextConductionInd="true" '
    f'negationInd="false">{_TEMPLATE_ID}pertinentInformation1"/><seperatableInd value="true"/>'
    f'<pertinentRootCREType classCode="CATEGORY" moodCode="EVN">{_CARE_DOCUMENTATION_CODE}'
    '</pertinentRootCREType></pertinentInformation1>'
)
_EB_PARTY = f'<eb:PartyId eb:type="{C.EBXML_PARTY_TYPE}">'
_EB_MANIFEST = (
    f'<eb:Manifest xmlns:hl7ebxml="{C.HL7_EBXML_NS}" eb:version="2.0"><eb:Reference xlink:href="cid:'
)
_EB_PAYLOAD = (
    f'<eb:Schema eb:location="urn:hl7-org:v3_{C.GP_SUMMARY_INTERACTION}.xsd" eb:version="13"/>'
    '<eb:Description xml:lang="en">The HL7 payload</eb:Description>'
    '<hl7ebxml:Payload style="HL7" encoding="XML" version="3.0"/></eb:Reference></eb:Manifest>'
)


def build_message(patient: Patient, content: SummaryContent, *, author: Author, message_id: str,
                  event_id: str, created: datetime, prior_event_id: str | None = None,
                  dissent: bool = False, dissent_on: date | None = None) -> OutboundMessage:
    """The ebXML multipart REPC_IN150016SM05 carrying ``content`` as the patient's GP Summary.

    ``created`` gives the HL7 times as its own wall-clock time and the ebXML timestamp in UTC (a naive
    value is taken as UTC). ``dissent`` builds the blank summary of the ``blank`` dissent policy: no
    clinical content, the Refusal entry (dated ``dissent_on``, the day the dissent was recorded, else
    the day of the summary) and the heading the Spine recognises, every section empty. A summary
    with no item in any window carries the "no significant data" Finding instead, since a GP
    Summary holds at least one coded entry.
    """
    _check_id("message_id", message_id)
    _check_id("event_id", event_id)
    if prior_event_id is not None:
        _check_id("prior_event_id", prior_event_id)
    who = _author_xml(author)
    hl7_time = (f"{created.year:04d}{created.month:02d}{created.day:02d}"
                f"{created.hour:02d}{created.minute:02d}{created.second:02d}")
    utc = created.astimezone(timezone.utc) if created.tzinfo else created
    timestamp = (f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}"
                 f"T{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}Z")
    windows = content.windows or Windows(created.date())
    if dissent:
        content = SummaryContent((), (), (), (), windows)

    nothing = not (content.acute or content.repeat or content.discontinued or content.allergies)
    html = _presentation_html(content, windows, created, who, dissent, nothing)
    if dissent:
        coded = _refusal_entry(event_id, dissent_on or created.date())
    elif nothing:
        coded = _no_significant_data_entry(event_id, created.date())
    else:
        coded = _medication_entries(content, event_id) + _allergy_entries(content, event_id)
    replaces = ""
    if prior_event_id:
        replaces = ('<replacementOf typeCode="RPLC">'
                    '<priorMessageRef classCode="COMPOSITION" moodCode="EVN">'
                    f'<id root="{prior_event_id}"/></priorMessageRef></replacementOf>')
    sds_ids = (f'<id root="{C.OID_SDS_ROLE_PROFILE}" extension="{who["role"]}"/>'
               '<agentPersonSDS classCode="PSN" determinerCode="INSTANCE">'
               f'<id root="{C.OID_SDS_USER}" extension="{who["user"]}"/>')
    payload = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<{C.GP_SUMMARY_INTERACTION} xmlns="{C.HL7_NS}" ITSVersion="XML_1.0">'
        f'<id root="{message_id}"/><creationTime value="{hl7_time}"/>{_PAYLOAD_FLAGS}'
        f'<communicationFunctionRcv typeCode="RCV">{_DEVICE}'
        f'<id root="{C.OID_ASID}" extension="{who["rcv"]}"/></device></communicationFunctionRcv>'
        f'<communicationFunctionSnd typeCode="SND">{_DEVICE}'
        f'<id root="{C.OID_ASID}" extension="{who["snd"]}"/></device></communicationFunctionSnd>'
        f'<ControlActEvent classCode="{C.CONTROL_ACT_CLASS}" moodCode="EVN">'
        '<author1 typeCode="AUT"><AgentSystemSDS classCode="AGNT">'
        '<agentSystemSDS classCode="DEV" determinerCode="INSTANCE">'
        f'<id root="{C.OID_ASID}" extension="{who["snd"]}"/></agentSystemSDS></AgentSystemSDS></author1>'
        f'<author typeCode="AUT"><AgentPersonSDS classCode="AGNT">{sds_ids}</agentPersonSDS>'
        '<part typeCode="PART"><partSDSRole classCode="ROL">'
        f'<id root="{C.OID_SDS_JOB_ROLE}" extension="{who["job"]}"/></partSDSRole></part>'
        '</AgentPersonSDS></author><subject typeCode="SUBJ" contextConductionInd="false">'
        f'<GPSummary classCode="COMPOSITION" moodCode="EVN"><id root="{event_id}"/>{_SUMMARY_CODE}'
        f'<effectiveTime value="{hl7_time}"/><statusCode code="active"/>'
        f'<author typeCode="AUT" contextControlCode="OP"><time value="{hl7_time}"/>'
        f'<UKCT_MT160018UK01.AgentPersonSDS classCode="AGNT">{sds_ids}<name>{who["name"]}</name>'
        '</agentPersonSDS></UKCT_MT160018UK01.AgentPersonSDS></author>'
        f'{_EXCERPT_OPEN}{html}</value><id root="{_derived_id(event_id, "presentation")}"/>'
        f'{_PRESENTATION_CODES}<effectiveTime value="{hl7_time}"/></presentationText>{_EXCERPT_CLOSE}'
        f'{_PERTINENT_ROOT}{coded}<recordTarget typeCode="RCT"><patient classCode="PAT">'
        f'<id root="{C.OID_NHS_NUMBER}" extension="{xml_text(patient.nhs_number)}"/></patient>'
        f'</recordTarget>{replaces}</GPSummary></subject></ControlActEvent>'
        f'</{C.GP_SUMMARY_INTERACTION}>\n'
    ).encode("utf-8")

    header = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<soap:Envelope xmlns:soap="{C.SOAP_NS}" xmlns:eb="{C.EBXML_NS}" xmlns:xlink="{C.XLINK_NS}">'
        '<soap:Header><eb:MessageHeader eb:version="2.0" soap:mustUnderstand="1">'
        f'<eb:From>{_EB_PARTY}{who["party"]}</eb:PartyId></eb:From>'
        f'<eb:To>{_EB_PARTY}{C.SPINE_PARTY_KEY}</eb:PartyId></eb:To>'
        f'<eb:CPAId>{C.SPINE_CPA_ID}</eb:CPAId><eb:ConversationId>{message_id}</eb:ConversationId>'
        f'<eb:Service>{C.SERVICE}</eb:Service><eb:Action>{C.GP_SUMMARY_INTERACTION}</eb:Action>'
        f'<eb:MessageData><eb:MessageId>{message_id}</eb:MessageId>'
        f'<eb:Timestamp>{timestamp}</eb:Timestamp></eb:MessageData>'
        '<eb:DuplicateElimination/></eb:MessageHeader>'
        '<eb:AckRequested eb:version="2.0" soap:mustUnderstand="1" '
        f'soap:actor="{C.TO_PARTY_MSH_ACTOR}" eb:signed="false"/>'
        f'<eb:SyncReply eb:version="2.0" soap:mustUnderstand="1" soap:actor="{C.SOAP_NEXT_ACTOR}"/>'
        f'</soap:Header><soap:Body>{_EB_MANIFEST}{message_id}@{CONTENT_ID_DOMAIN}">{_EB_PAYLOAD}'
        '</soap:Body></soap:Envelope>\n'
    ).encode("utf-8")

    boundary = BOUNDARY_PREFIX + message_id
    delimiter = boundary.encode("ascii")
    if delimiter in payload or delimiter in header:
        raise ValueError("the message text contains its own MIME boundary; build it again with a new id")
    content_type, body = build_related(
        [({"Content-Id": f"<{HEADER_CONTENT_ID}>", "Content-Type": "text/xml",
           "Content-Transfer-Encoding": "8bit"}, header),
         ({"Content-Id": f"<{message_id}@{CONTENT_ID_DOMAIN}>", "Content-Type": "application/xml",
           "Content-Transfer-Encoding": "8bit"}, payload)],
        boundary, start=HEADER_CONTENT_ID,
    )
    return OutboundMessage(message_id, event_id, patient.nhs_number, content_type, body)


# --- Presentation text (XHTML, as gp-summary-standard.xml) ------------------------------------------

_HTML_HEAD = (
    f'<html xmlns="{C.PRESENTATION_NS}"><body>'
    f'<h2 id="Title">General Practice Summary</h2>'
    f'<h3 id="Disclaimer">Sourced from the patient&apos;s General Practice record. This summary may not '
    f'include all the information pertinent to this patient.</h3>'
)
_MED_COLUMNS = (
    '<thead><tr><th>Type</th><th>Date</th><th>Medication Item</th><th>Dosage Instructions</th>'
    '<th>Quantity</th></tr></thead>'
)
_ALLERGY_TABLE = (
    '<h2 id="AllergiesHeader">Allergies and Adverse Reactions</h2>'
    '<table summary="This table includes information about this patient&apos;s allergies and adverse '
    'reactions." id="Allergies"><thead><tr><th>Date</th><th>Description</th><th>Certainty</th>'
    '<th>Severity</th><th>Supporting Information</th></tr></thead><tbody>'
)
_ACUTE_TABLE = (
    '<table summary="This table includes information about this patient&apos;s acute medications." '
    f'id="AcuteMeds">{_MED_COLUMNS}<tbody>'
)
_REPEAT_TABLE = (
    '<h2 id="RepeatMedsHeader">Current Repeat Medications</h2>'
    '<table summary="This table includes information about this patient&apos;s current repeat '
    f'medications." id="RepeatMeds">{_MED_COLUMNS}<tbody>'
)
_DISCONTINUED_TABLE = (
    '<table summary="This table includes information about this patient&apos;s discontinued repeat '
    f'medications." id="DiscRepeatMeds">{_MED_COLUMNS}<tbody>'
)
_EMPTY_ROW = f'<tr><td colspan="5">{C.EMPTY_SECTION_TEXT}</td></tr>'
_TABLE_END = '</tbody></table>'
_ROW_CLASS = ('<tr class="oddRow">', '<tr class="evenRow">')
_ALLERGY_KINDS = {"allergy": "Allergy", "intolerance": "Intolerance",
                  "adverse_reaction": "Adverse reaction"}


def _presentation_html(content: SummaryContent, windows: Windows, created: datetime,
                       who: dict[str, str], dissent: bool, nothing: bool) -> str:
    today = windows.today
    _, _, stopped_from, acute_from = window_starts(windows)
    at = f"{_shown(created.date())} {created.hour:02d}:{created.minute:02d}"
    parts = [_HTML_HEAD, f'<p id="CreateTime">Summary Created: {at}</p>']
    if dissent:
        parts.append(f'<h2 id="DissentHeader">{C.DISSENT_PHRASE}</h2>'
                     f'<p id="DissentStatement" class="HighlightedStatement">{DISSENT_TEXT}</p>')
    elif nothing:
        parts.append(f'<h3 id="NoSignificantData">{C.NO_SIGNIFICANT_DATA_PHRASE}</h3>')
    parts += [who["author_p"], who["practice_p"], _ALLERGY_TABLE]

    for n, allergy in enumerate(content.allergies):
        when = _shown(allergy.recorded_on) if allergy.recorded_on else ""
        kind = _ALLERGY_KINDS.get(allergy.kind) or xml_text(allergy.kind)
        parts.append(f'{_ROW_CLASS[n & 1]}<td>{when}</td><td>{xml_text(allergy.description)}</td>'
                     f'<td/><td/><td>{kind}</td></tr>')
    if not content.allergies:
        parts.append(_EMPTY_ROW)
    parts.append(_TABLE_END)

    parts.append(f'<h2 id="AcuteMedsHeader">Acute Medications (For the {windows.acute_months} month '
                 f'period {_shown(acute_from)} to {_shown(today)})</h2>')
    parts.append(_ACUTE_TABLE)
    _medication_rows(parts, content.acute, "Acute Medication", _acute_dates)
    parts.append(_REPEAT_TABLE)
    _medication_rows(parts, content.repeat, "Repeat Medication", _repeat_dates)
    parts.append(f'<h2 id="DiscRepeatMedsHeader">Discontinued Repeat Medications (For the '
                 f'{windows.discontinued_months} month period '
                 f'{_shown(stopped_from)} to {_shown(today)})</h2>')
    parts.append(_DISCONTINUED_TABLE)
    _medication_rows(parts, content.discontinued, "Repeat Medication", _discontinued_dates)
    parts.append(f'<p id="SendTime">Summary Sent: {at}</p>'
                 '</body></html>')
    return "".join(parts)


def _acute_dates(med: Medication) -> str:
    return f"Prescribed: {_shown(med.prescribed_on)}" if med.prescribed_on else ""


def _repeat_dates(med: Medication) -> str:
    shown = f"Last Issued: {_shown(med.prescribed_on)}" if med.prescribed_on else ""
    if med.repeat_until:
        shown += f"; Until: {_shown(med.repeat_until)}"
    return shown


def _discontinued_dates(med: Medication) -> str:
    shown = f"Last Issued: {_shown(med.prescribed_on)}; " if med.prescribed_on else ""
    stopped = med.discontinued_on
    return shown + (f"Discontinued: {_shown(stopped)}" if stopped else "Discontinued")


def _medication_rows(parts: list[str], meds: tuple[Medication, ...], kind: str, dates) -> None:
    for n, med in enumerate(meds):
        parts.append(f'{_ROW_CLASS[n & 1]}<td>{kind}</td><td>{dates(med)}</td>'
                     f'<td>{xml_text(med.drug)}</td><td>{xml_text(med.dosage)}</td>'
                     f'<td>{xml_text(med.quantity)}</td></tr>')
    if not meds:
        parts.append(_EMPTY_ROW)
    parts.append(_TABLE_END)


# --- Coded entries ----------------------------------------------------------------------------------

def _cre_open(code: str, display: str) -> str:
    return ('<pertinentInformation2 typeCode="PERT" inversionInd="false" contextConductionInd="true" '
            f'negationInd="false">{_TEMPLATE_ID}pertinentInformation1"/><seperatableInd value="true"/>'
            '<pertinentCREType classCode="CATEGORY" moodCode="EVN">'
            f'<code code="{code}" codeSystem="{C.OID_SNOMED}" displayName="{display}"/>')


_MEDICATION_CRE_OPEN = _cre_open(C.MEDICATION_CRE, "Medication")
_ALLERGY_CRE_OPEN = _cre_open(C.ALLERGY_CRE, "Allergies and Adverse Reactions")
_CRE_CLOSE = '</pertinentCREType></pertinentInformation2>'
_COMPONENT_OPEN = (
    f'<component typeCode="COMP" contextConductionInd="true">{_TEMPLATE_ID}component"/>'
    '<seperatableInd value="false"/>'
)
_ACUTE_CODE = (f'<code code="{C.ACUTE_MEDICATION_CODE}" codeSystem="{C.OID_SNOMED}" '
               f'displayName="Acute medication"/>')
_REPEAT_CODE = (f'<code code="{C.REPEAT_MEDICATION_CODE}" codeSystem="{C.OID_SNOMED}" '
                f'displayName="{C.REPEAT_MEDICATION_DISPLAY}"/>')
_DISCONTINUED_CODE = (f'<code code="{C.DISCONTINUED_MEDICATION_CODE}" codeSystem="{C.OID_SNOMED}" '
                      f'displayName="{C.DISCONTINUED_MEDICATION_DISPLAY}"/>')
_QUANTITY = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(.*)", re.DOTALL | re.ASCII)  # "28 tablet" -> 28, tablet
_QUANTITY_CODE = f'<code code="{C.QUANTITY_CODE}" codeSystem="{C.OID_SNOMED}" displayName="Quantity"/>'
_DOSAGE_CODE = (f'<code code="{C.DOSE_INSTRUCTIONS_CODE}" codeSystem="{C.OID_DOSE_INSTRUCTIONS}" '
                'displayName="Dose Instructions"/>')
_PRODUCT_OPEN = (
    '<consumable typeCode="CSM" contextControlCode="OP"><manufacturedProduct classCode="MANU">'
    '<manufacturedManufacturedMaterial classCode="MMAT" determinerCode="KIND">'
)
_PRODUCT_CLOSE = '</manufacturedManufacturedMaterial></manufacturedProduct></consumable>'


def _medication_entries(content: SummaryContent, event_id: str) -> str:
    if not (content.acute or content.repeat or content.discontinued):
        return ""
    parts = [_MEDICATION_CRE_OPEN]
    for n, med in enumerate(content.acute):
        parts.append(_medication_entry(med, C.ACUTE_MEDICATION_ENTRY, _ACUTE_CODE, "completed",
                                       _effective(med.prescribed_on),
                                       _derived_id(event_id, "acute", str(n), med.medication_id)))
    for n, med in enumerate(content.repeat):
        parts.append(_medication_entry(med, C.REPEAT_MEDICATION_ENTRY, _REPEAT_CODE, "active",
                                       _effective(med.prescribed_on),
                                       _derived_id(event_id, "repeat", str(n), med.medication_id)))
    for n, med in enumerate(content.discontinued):
        low = f'<low value="{_hl7_date(med.prescribed_on)}"/>' if med.prescribed_on else ""
        high = f'<high value="{_hl7_date(med.discontinued_on)}"/>' if med.discontinued_on else ""
        parts.append(_medication_entry(
            med, C.DISCONTINUED_MEDICATION_ENTRY, _DISCONTINUED_CODE, "aborted",
            f'<effectiveTime>{low}{high}</effectiveTime>' if low or high else _effective(None),
            _derived_id(event_id, "discontinued", str(n), med.medication_id)))
    parts.append(_CRE_CLOSE)
    return "".join(parts)


def _medication_entry(med: Medication, element: str, code: str, status: str, effective: str,
                      entry_id: str) -> str:
    drug = xml_text(med.drug)
    # The dosage part is required in every medication entry; a blank dosage is "no information".
    value = (f'<value>{xml_text(med.dosage)}</value>' if med.dosage.strip()
             else '<value nullFlavor="NI"/>')
    dosage = ('<pertinentInformation1 typeCode="PERT" contextConductionInd="true">'
              '<seperatableInd value="false"/>'
              '<pertinentDosageInstructions classCode="OBS" moodCode="EVN">'
              f'{value}{_DOSAGE_CODE}</pertinentDosageInstructions></pertinentInformation1>')
    quantity = ""
    if med.quantity:
        amount = _QUANTITY.fullmatch(med.quantity)
        if amount:
            unit = xml_text(amount.group(2).strip())
            translation = f'<translation value="{amount.group(1)}"><originalText>{unit}</originalText>'
        else:
            text = xml_text(med.quantity)
            translation = f'<translation nullFlavor="UNK"><originalText>{text}</originalText>'
        quantity = ('<component typeCode="COMP"><seperatableInd value="false"/>'
                    '<medicationQuantity classCode="SPLY" moodCode="RQO">'
                    f'<quantity unit="1">{translation}</translation></quantity>{_QUANTITY_CODE}'
                    '</medicationQuantity></component>')
    if med.dmd_code.strip():
        product = (f'<code code="{xml_text(med.dmd_code)}" codeSystem="{C.OID_SNOMED}" '
                   f'displayName="{drug}"/>')
    else:
        product = f'<code nullFlavor="OTH"><originalText>{drug}</originalText></code>'
    return (f'{_COMPONENT_OPEN}<{element} classCode="SBADM" moodCode="RQO"><id root="{entry_id}"/>{code}'
            f'<statusCode code="{status}"/>{effective}{dosage}{quantity}{_PRODUCT_OPEN}{product}'
            f'{_PRODUCT_CLOSE}</{element}></component>')


def _allergy_entries(content: SummaryContent, event_id: str) -> str:
    if not content.allergies:
        return ""
    parts = [_ALLERGY_CRE_OPEN]
    element = C.ALLERGY_ENTRY
    for n, allergy in enumerate(content.allergies):
        text = xml_text(allergy.description)
        if allergy.snomed_code.strip():
            code = (f'<code code="{xml_text(allergy.snomed_code)}" codeSystem="{C.OID_SNOMED}" '
                    f'displayName="{text}"/>')
        else:
            code = f'<code nullFlavor="OTH"><originalText>{text}</originalText></code>'
        entry_id = _derived_id(event_id, "allergy", str(n), allergy.allergy_id)
        when = (f'<effectiveTime><low value="{_hl7_date(allergy.recorded_on)}"/></effectiveTime>'
                if allergy.recorded_on else '<effectiveTime nullFlavor="UNK"/>')
        parts.append(f'{_COMPONENT_OPEN}<{element} classCode="OBS" moodCode="EVN">'
                     f'<id root="{entry_id}"/>{code}'
                     f'<statusCode code="completed"/>{when}</{element}></component>')
    parts.append(_CRE_CLOSE)
    return "".join(parts)


_FINDINGS_CRE_OPEN = _cre_open(C.FINDINGS_CRE, C.FINDINGS_CRE_DISPLAY)
_PREFERENCES_CRE_OPEN = _cre_open(C.PREFERENCES_CRE, C.PREFERENCES_CRE_DISPLAY)


def _no_significant_data_entry(event_id: str, day: date) -> str:
    """The Finding "notes summary on computer" of a summary with nothing to send (MIM example _02)."""
    return (f'{_FINDINGS_CRE_OPEN}{_COMPONENT_OPEN}<{C.FINDING_ENTRY} classCode="OBS" moodCode="EVN">'
            f'<id root="{_derived_id(event_id, "no-significant-data")}"/>'
            f'<code code="{C.NO_SIGNIFICANT_DATA_CODE}" codeSystem="{C.OID_SNOMED}" '
            f'displayName="{C.NO_SIGNIFICANT_DATA_DISPLAY}"/><statusCode code="completed"/>'
            f'<effectiveTime value="{_hl7_date(day)}"/></{C.FINDING_ENTRY}></component>{_CRE_CLOSE}')


def _refusal_entry(event_id: str, day: date) -> str:
    """The Refusal "refused consent for upload to national shared electronic record" of a dissent
    summary (MIM example _03)."""
    return (f'{_PREFERENCES_CRE_OPEN}{_COMPONENT_OPEN}<{C.REFUSAL_ENTRY} classCode="OBS" moodCode="EVN">'
            f'<id root="{_derived_id(event_id, "dissent")}"/>'
            f'<code code="{C.DISSENT_CODE}" codeSystem="{C.OID_SNOMED}" '
            f'displayName="{C.DISSENT_DISPLAY}"/><effectiveTime value="{_hl7_date(day)}"/>'
            f'</{C.REFUSAL_ENTRY}></component>{_CRE_CLOSE}')
