"""The GP Summary message: content windows, the ebXML envelope, the HL7 payload and its escaping.

Built messages are taken apart the way the Spine would: split with ``mime.parse_related`` and parsed
with lxml, then compared with the real samples in ``../shared/reference/spine/`` where they are
beside the clone (those comparisons skip, saying why, without it). The same structure is checked
without them by the project's own ebXML header fixture (tests/fixtures/spine/) and by the named
MIM and Spine rules of ``tests/test_conformance.py``.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone

import pytest
from lxml import etree

from scr_nb import constants as C
from scr_nb.extract.records import Allergy, Medication, Patient
from scr_nb.spine.content import SummaryContent, Windows, months_back, select_content
from scr_nb.spine.gp_summary import Author, build_message, new_id, xml_text
from scr_nb.spine.mime import parse_related
from tests.conftest import FIXTURES, reference

HL7 = "{urn:hl7-org:v3}"
NS = {"hl7": C.HL7_NS, "soap": C.SOAP_NS, "eb": C.EBXML_NS, "xlink": C.XLINK_NS,
      "x": C.PRESENTATION_NS}
TODAY = date(2024, 8, 31)           # a month end: six months back clamps to 29 Feb 2024
WINDOWS = Windows(TODAY)
CREATED = datetime(2024, 8, 31, 14, 3, 5)
AUTHOR = Author(user_id="979603625513", name="Dr Steve Jones", role_profile_id="055888118514",
                practice_ods="A12345", practice_name="Fulford Grange", sender_party_key="A12345-0000001")
UUID_UPPER = re.compile(r"[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}")
HOSTILE = ("O'Brien & <Sons> \"quoted\" ]]> \x00\x01\x08\x0b\x0c\x0e\x1f\x7f tab\there\r\nline "
           "\ud800 lone \udfff \ufffe\uffff emoji \U0001F600 é &amp; <![CDATA[x]]> --=_MIME-Boundary")


def clean(text: str) -> str:
    """What a parser reads back from ``xml_text(text)``: the text without XML-forbidden characters."""
    return re.sub("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]", "", text)


def patient(nhs_number: str = "9990000018") -> Patient:
    return Patient(
        patient_id="P1", nhs_number=nhs_number, family_name="Smith", given_name="Ann",
        birth_date=date(1970, 1, 1), sex="F", registration_type="permanent",
        registered_on=date(2000, 1, 1), left_on=None, deceased_on=None, fp69=False, sensitive=False,
        pds_synchronised=True, has_national_summary=False, row=2,
    )


def med(medication_id: str, kind: str, prescribed: date | None = None, until: date | None = None,
        stopped: date | None = None, drug: str = "Paracetamol 500mg tablets", dmd: str = "322236009",
        dosage: str = "One four times a day", quantity: str = "28 tablet") -> Medication:
    return Medication(
        patient_id="P1", medication_id=medication_id, kind=kind, dmd_code=dmd, drug=drug, dosage=dosage,
        quantity=quantity, prescribed_on=prescribed, repeat_until=until, discontinued_on=stopped, row=2,
    )


def allergy(allergy_id: str, recorded: date | None = date(2020, 1, 1), negative: bool = False,
            description: str = "Allergy to penicillin", code: str = "91936005",
            kind: str = "allergy") -> Allergy:
    return Allergy(patient_id="P1", allergy_id=allergy_id, kind=kind, snomed_code=code,
                   description=description, recorded_on=recorded, negative=negative, row=2)


def typical_content() -> SummaryContent:
    return select_content(
        [med("M1", "acute", TODAY - timedelta(days=40)),
         med("M2", "repeat", TODAY - timedelta(days=20), drug="Atorvastatin 20mg tablets",
             dmd="318420003"),
         med("M3", "repeat", TODAY - timedelta(days=90), stopped=TODAY - timedelta(days=30),
             drug="Ramipril 5mg capsules", dmd="317919004", quantity="28 capsule")],
        [allergy("A1"), allergy("A2", negative=True, description="No known drug allergy")],
        WINDOWS,
    )


def build(content: SummaryContent | None = None, **kw):
    kw.setdefault("author", AUTHOR)
    kw.setdefault("message_id", new_id())
    kw.setdefault("event_id", new_id())
    kw.setdefault("created", CREATED)
    return build_message(kw.pop("patient", patient()), typical_content() if content is None else content,
                         **kw)


def split(message):
    parts = parse_related(message.body, message.content_type)
    assert len(parts) == 2
    return parts, etree.fromstring(parts[0].body), etree.fromstring(parts[1].body)


def summary_of(payload):
    return payload.find(f"{HL7}ControlActEvent/{HL7}subject/{HL7}GPSummary")


def html_of(payload):
    return summary_of(payload).find(
        f"{HL7}excerptFrom/{HL7}UKCT_MT144051UK01.CareProfessionalDocumentationCRE/{HL7}component/"
        f"{HL7}presentationText/{HL7}value/{{{C.PRESENTATION_NS}}}html")


def local(element) -> str:
    return etree.QName(element).localname


def skeleton(root, stop=("value", "pertinentInformation2")) -> dict[str, dict[str, str]]:
    """Element paths under ``root`` (local names) with their attributes, not descending into ``stop``."""
    found: dict[str, dict[str, str]] = {}

    def walk(element, path):
        for child in element:
            if not isinstance(child.tag, str):
                continue
            name = f"{path}/{local(child)}" if path else local(child)
            found[name] = dict(child.attrib)
            if local(child) not in stop:
                walk(child, name)

    walk(root, "")
    return found


def fixed(path: str, attributes: dict[str, str]) -> dict[str, str]:
    """The attributes that are the same in every message: not ids, times or the interaction's name."""
    name = path.rsplit("/", 1)[-1]
    variable = {"id": {"root", "extension"}, "time": {"value"}, "effectiveTime": {"value"},
                "creationTime": {"value"}, "interactionId": {"extension"}}.get(name, set())
    return {k: v for k, v in attributes.items() if k not in variable}


def fixed_all(found: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    return {path: fixed(path, attributes) for path, attributes in found.items()}


# --- months_back ----------------------------------------------------------------------------------

@pytest.mark.parametrize("today, months, expected", [
    (date(2024, 8, 31), 6, date(2024, 2, 29)),     # leap year: clamps to 29 Feb
    (date(2023, 8, 31), 6, date(2023, 2, 28)),
    (date(2024, 3, 31), 1, date(2024, 2, 29)),
    (date(2024, 12, 31), 6, date(2024, 6, 30)),
    (date(2024, 2, 29), 12, date(2023, 2, 28)),
    (date(2024, 1, 15), 1, date(2023, 12, 15)),     # across a year end
    (date(2024, 5, 31), 3, date(2024, 2, 29)),
    (date(2024, 7, 31), 0, date(2024, 7, 31)),
    (date(2024, 8, 31), 30, date(2022, 2, 28)),
])
def test_months_back_counts_calendar_months_and_clamps_to_month_end(today, months, expected):
    assert months_back(today, months) == expected


# --- select_content: the SPEC 5 windows ------------------------------------------------------------

ISSUE_FROM = date(2024, 2, 29)      # 6 months before 31 Aug 2024
ACUTE_FROM = date(2023, 8, 31)      # 12 months before
DAY = timedelta(days=1)


def ids(items) -> list[str]:
    return [getattr(item, "medication_id", None) or item.allergy_id for item in items]


def test_repeat_last_issued_exactly_six_months_back_is_in_and_a_day_earlier_is_out():
    content = select_content([med("IN", "repeat", ISSUE_FROM), med("OUT", "repeat", ISSUE_FROM - DAY)],
                             [], WINDOWS)
    assert ids(content.repeat) == ["IN"]
    assert content.discontinued == () and content.acute == ()


def test_acute_prescribed_exactly_twelve_months_back_is_in_and_a_day_earlier_is_out():
    content = select_content([med("IN", "acute", ACUTE_FROM), med("OUT", "acute", ACUTE_FROM - DAY),
                              med("TODAY", "acute", TODAY)], [], WINDOWS)
    assert ids(content.acute) == ["TODAY", "IN"]


def test_repeat_until_may_be_blank_future_or_up_to_six_months_past():
    recent = TODAY - timedelta(days=10)
    content = select_content([
        med("BLANK", "repeat", recent),
        med("FUTURE", "repeat", recent, until=TODAY + timedelta(days=100)),
        med("EDGE", "repeat", recent, until=ISSUE_FROM),
        med("LAPSED", "repeat", recent, until=ISSUE_FROM - DAY),
    ], [], WINDOWS)
    assert sorted(ids(content.repeat)) == ["BLANK", "EDGE", "FUTURE"]


def test_discontinued_within_six_months_is_shown_as_discontinued_and_older_not_at_all():
    content = select_content([
        med("EDGE", "repeat", ISSUE_FROM - 30 * DAY, stopped=ISSUE_FROM),
        med("RECENT", "repeat", TODAY - 5 * DAY, stopped=TODAY - DAY),
        med("OLD", "repeat", TODAY - 5 * DAY, stopped=ISSUE_FROM - DAY),
    ], [], WINDOWS)
    assert ids(content.discontinued) == ["RECENT", "EDGE"]
    assert content.repeat == () and content.acute == ()


def test_a_discontinuation_dated_after_today_leaves_the_repeat_current():
    content = select_content([med("LATER", "repeat", TODAY - 5 * DAY, stopped=TODAY + DAY)], [], WINDOWS)
    assert ids(content.repeat) == ["LATER"] and content.discontinued == ()


def test_items_without_the_date_their_rule_needs_are_left_out():
    content = select_content([
        med("NOISSUE", "repeat", None),
        med("NODATE", "acute", None),
        med("STOPPED-NOISSUE", "repeat", None, stopped=TODAY - DAY),   # needs only discontinued_on
        med("ODDKIND", "one-off", TODAY),
    ], [], WINDOWS)
    assert content.repeat == () and content.acute == ()
    assert ids(content.discontinued) == ["STOPPED-NOISSUE"]


def test_items_are_ordered_newest_first_then_by_id():
    content = select_content([
        med("B", "acute", TODAY - 10 * DAY), med("A", "acute", TODAY - 10 * DAY),
        med("C", "acute", TODAY - 2 * DAY), med("Z", "acute", TODAY - 300 * DAY),
    ], [allergy("Y", date(2019, 1, 1)), allergy("X", date(2021, 1, 1)), allergy("W", None)], WINDOWS)
    assert ids(content.acute) == ["C", "A", "B", "Z"]
    assert ids(content.allergies) == ["X", "Y", "W"]     # undated allergies are kept, last


def test_negative_allergy_entries_are_left_out_and_every_kind_is_kept():
    content = select_content([], [
        allergy("A1"), allergy("I1", kind="intolerance"), allergy("R1", kind="adverse_reaction"),
        allergy("NKA", negative=True, description="No known allergies"),
    ], WINDOWS)
    assert sorted(ids(content.allergies)) == ["A1", "I1", "R1"]
    message = build(content)
    assert b"No known allergies" not in message.body


def test_windows_are_settings():
    wide = Windows(TODAY, acute_months=24)
    content = select_content([med("OLD", "acute", date(2023, 1, 1))], [], wide)
    assert ids(content.acute) == ["OLD"]
    _, _, payload = split(build(content))
    header = html_of(payload).find("x:body/x:h2[@id='AcuteMedsHeader']", NS).text
    assert header == "Acute Medications (For the 24 month period 31-Aug-2022 to 31-Aug-2024)"


# --- The ebXML envelope ----------------------------------------------------------------------------

def test_multipart_envelope_has_the_header_part_first_and_the_payload_by_content_id():
    message = build()
    mid = message.message_id
    assert message.content_type.startswith("multipart/related;")
    assert f'boundary="--=_MIME-Boundary-{mid}"' in message.content_type
    assert 'start="<ebXMLHeader@scr-nb>"' in message.content_type
    assert 'type="text/xml"' in message.content_type
    parts, _, _ = split(message)
    assert parts[0].headers == {"content-id": "<ebXMLHeader@scr-nb>", "content-type": "text/xml",
                                "content-transfer-encoding": "8bit"}
    assert parts[1].content_id == f"{mid}@scr-nb"
    assert parts[1].headers["content-type"] == "application/xml"
    assert message.size == len(message.body)


def test_ebxml_header_fields():
    message = build(created=datetime(2024, 8, 31, 15, 3, 5, tzinfo=timezone(timedelta(hours=1))))
    mid = message.message_id
    _, header, payload = split(message)
    head = header.find("soap:Header/eb:MessageHeader", NS)
    text = lambda path: head.findtext(path, namespaces=NS)  # noqa: E731
    assert text("eb:From/eb:PartyId") == AUTHOR.sender_party_key
    assert text("eb:To/eb:PartyId") == "YES-0000806"
    assert text("eb:CPAId") == "S20001A000100"
    assert text("eb:ConversationId") == mid
    assert text("eb:Service") == "urn:nhs:names:services:psis"
    assert text("eb:Action") == "REPC_IN150016SM05"
    assert text("eb:MessageData/eb:MessageId") == mid
    assert text("eb:MessageData/eb:Timestamp") == "2024-08-31T14:03:05Z"      # UTC
    assert head.find("eb:DuplicateElimination", NS) is not None
    ack = header.find("soap:Header/eb:AckRequested", NS)
    assert ack.get(f"{{{C.SOAP_NS}}}actor") == "urn:oasis:names:tc:ebxml-msg:actor:toPartyMSH"
    assert (ack.get(f"{{{C.EBXML_NS}}}version"), ack.get(f"{{{C.EBXML_NS}}}signed")) == ("2.0", "false")
    # the Spine's reliable pattern: exactly one SyncReply, version 2.0, for the next SOAP actor
    sync = header.findall("soap:Header/eb:SyncReply", NS)
    assert len(sync) == 1
    assert sync[0].get(f"{{{C.EBXML_NS}}}version") == "2.0"
    assert sync[0].get(f"{{{C.SOAP_NS}}}actor") == "http://schemas.xmlsoap.org/soap/actor/next"
    reference = header.find("soap:Body/eb:Manifest/eb:Reference", NS)
    assert reference.get(f"{{{C.XLINK_NS}}}href") == f"cid:{mid}@scr-nb"
    # HL7 times are the creation's own wall clock
    assert payload.find(f"{HL7}creationTime").get("value") == "20240831150305"


def _own_reliable_header():
    return etree.parse(str(FIXTURES / "spine" / "ebxml-reliable-header.xml")).getroot()


def _real_ack_header():
    sample = reference("spine", "ack-AA-upload-successful.mime").read_bytes()
    return etree.fromstring(parse_related(sample)[0].body)


@pytest.mark.parametrize("sample_header", [_own_reliable_header, _real_ack_header],
                         ids=["own", "real"])
def test_ebxml_header_has_the_shape_of_the_ack_samples(sample_header):
    sample = sample_header()
    _, header, _ = split(build())
    ours, theirs = skeleton(header, stop=()), skeleton(sample, stop=())
    # an ack refers to the message it answers; an upload does not
    theirs = {p: a for p, a in theirs.items() if "RefToMessageId" not in p}
    assert set(ours) == set(theirs)
    own = ("Body/Manifest/Reference", "Body/Manifest/Reference/Schema")   # cid and schema of the payload
    assert {p: a for p, a in ours.items() if p not in own} == \
        {p: a for p, a in theirs.items() if p not in own}


# --- The HL7 payload -------------------------------------------------------------------------------

def test_payload_ids_codes_and_oids():
    message = build()
    _, _, payload = split(message)
    assert payload.tag == f"{HL7}REPC_IN150016SM05"
    assert payload.find(f"{HL7}id").get("root") == message.message_id
    creation = payload.find(f"{HL7}creationTime").get("value")
    assert re.fullmatch(r"\d{14}", creation) and creation == "20240831140305"
    assert payload.find(f"{HL7}versionCode").get("code") == "V3NPfIT4.2.00"
    interaction = payload.find(f"{HL7}interactionId")
    assert (interaction.get("root"), interaction.get("extension")) == \
        ("2.16.840.1.113883.2.1.3.2.4.12", "REPC_IN150016SM05")
    assert payload.find(f"{HL7}processingCode").get("code") == "P"
    assert payload.find(f"{HL7}processingModeCode").get("code") == "T"
    assert payload.find(f"{HL7}acceptAckCode").get("code") == "NE"
    rcv = payload.find(f"{HL7}communicationFunctionRcv/{HL7}device/{HL7}id")
    snd = payload.find(f"{HL7}communicationFunctionSnd/{HL7}device/{HL7}id")
    assert (rcv.get("root"), rcv.get("extension")) == ("1.2.826.0.1285.0.2.0.107", AUTHOR.receiver_asid)
    assert (snd.get("root"), snd.get("extension")) == ("1.2.826.0.1285.0.2.0.107", AUTHOR.sender_asid)

    act = payload.find(f"{HL7}ControlActEvent")
    system = act.find(f"{HL7}author1/{HL7}AgentSystemSDS/{HL7}agentSystemSDS/{HL7}id")
    assert system.get("extension") == AUTHOR.sender_asid
    person = act.find(f"{HL7}author/{HL7}AgentPersonSDS")
    assert person.find(f"{HL7}id").attrib == {"root": "1.2.826.0.1285.0.2.0.67",
                                             "extension": AUTHOR.role_profile_id}
    assert person.find(f"{HL7}agentPersonSDS/{HL7}id").attrib == {"root": "1.2.826.0.1285.0.2.0.65",
                                                                  "extension": AUTHOR.user_id}
    assert person.find(f"{HL7}part/{HL7}partSDSRole/{HL7}id").attrib == {
        "root": "1.2.826.0.1285.0.2.1.104", "extension": "R0260"}

    summary = summary_of(payload)
    assert summary.get("classCode") == "COMPOSITION" and summary.get("moodCode") == "EVN"
    assert summary.find(f"{HL7}id").get("root") == message.event_id
    assert summary.find(f"{HL7}code").attrib == {"code": "196981000000101",
                                                "codeSystem": "2.16.840.1.113883.2.1.3.2.4.15",
                                                "displayName": "General Practice Summary"}
    assert summary.find(f"{HL7}statusCode").get("code") == "active"
    assert summary.findtext(f"{HL7}author/{HL7}UKCT_MT160018UK01.AgentPersonSDS/{HL7}agentPersonSDS/"
                            f"{HL7}name") == AUTHOR.name
    nhs = summary.find(f"{HL7}recordTarget/{HL7}patient/{HL7}id")
    assert nhs.attrib == {"root": "2.16.840.1.113883.2.1.4.1", "extension": "9990000018"}
    assert message.nhs_number == "9990000018"
    presentation = summary.find(f".//{HL7}presentationText")
    assert UUID_UPPER.fullmatch(presentation.find(f"{HL7}id").get("root"))
    assert presentation.find(f"{HL7}code").get("code") == "PresentationText"
    assert presentation.find(f"{HL7}statusCode").get("code") == "completed"
    root_cre = summary.find(f"{HL7}pertinentInformation1/{HL7}pertinentRootCREType/{HL7}code")
    assert root_cre.get("code") == "163171000000105"


def sample_summary(name: str):
    """The sample's GPSummary element (the standard sample is one, in no namespace)."""
    root = etree.parse(str(reference("spine", name))).getroot()
    return root if local(root) == "GPSummary" else root.find(f".//{HL7}GPSummary")


def test_gp_summary_skeleton_matches_the_soap_sample():
    theirs = skeleton(sample_summary("gp-summary-soap-1.xml"))
    _, _, payload = split(build(prior_event_id=new_id()))
    ours = skeleton(summary_of(payload))
    assert set(ours) == set(theirs)
    # the sample's presentation value is escaped text/plain; ours is the XHTML of the standard sample
    different = {path: (fixed(path, ours[path]), fixed(path, theirs[path])) for path in ours
                 if not path.endswith("presentationText/value")
                 and fixed(path, ours[path]) != fixed(path, theirs[path])}
    assert different == {}


def test_control_act_wrapper_matches_the_soap_sample():
    sample = etree.parse(str(reference("spine", "gp-summary-soap-1.xml"))).find(f".//{HL7}REPC_IN150016UK05")
    _, _, payload = split(build())
    theirs, ours = skeleton(sample, stop=("subject",)), skeleton(payload, stop=("subject",))
    assert fixed_all(ours) == fixed_all(theirs)
    assert dict(payload.attrib) == dict(sample.attrib)


def test_coded_entry_wrappers_match_the_standard_sample():
    theirs = skeleton(sample_summary("gp-summary-standard.xml").find("pertinentInformation2"),
                      stop=("component",))
    theirs = {p: a for p, a in theirs.items() if not p.startswith("pertinentCREType/code")}
    _, _, payload = split(build())
    for block in summary_of(payload).findall(f"{HL7}pertinentInformation2"):
        ours = skeleton(block, stop=("component",))
        ours = {p: a for p, a in ours.items() if not p.startswith("pertinentCREType/code")}
        assert ours == theirs
        for component in block.findall(f"{HL7}pertinentCREType/{HL7}component"):
            assert skeleton(component, stop=(local(component[2]),)).keys() == {
                "templateId", "seperatableInd", local(component[2])}


def test_presentation_text_has_the_sections_and_table_layouts_of_the_standard_sample():
    sample_html = sample_summary("gp-summary-standard.xml").find(f".//{{{C.PRESENTATION_NS}}}html")
    _, _, payload = split(build())
    html = html_of(payload)
    assert html is not None and local(html) == "html"
    body = html.find("x:body", NS)
    ours = [(local(e), e.get("id")) for e in body]
    assert ours[:5] == [("h2", "Title"), ("h3", "Disclaimer"), ("p", "CreateTime"), ("p", "Author"),
                        ("p", "Practice")]
    assert [i for tag, i in ours if tag in ("h2", "table")] == [
        "Title", "AllergiesHeader", "Allergies", "AcuteMedsHeader", "AcuteMeds", "RepeatMedsHeader",
        "RepeatMeds", "DiscRepeatMedsHeader", "DiscRepeatMeds"]
    for table in body.findall("x:table", NS):
        theirs = sample_html.find(f".//x:table[@id='{table.get('id')}']", NS)
        assert table.get("summary") == theirs.get("summary")
        assert [th.text for th in table.findall("x:thead/x:tr/x:th", NS)] == \
            [th.text for th in theirs.findall("x:thead/x:tr/x:th", NS)]
    assert body.find("x:h3[@id='Disclaimer']", NS).text == \
        sample_html.find(".//x:h3[@id='Disclaimer']", NS).text
    assert body.find("x:h2[@id='AcuteMedsHeader']", NS).text == \
        "Acute Medications (For the 12 month period 31-Aug-2023 to 31-Aug-2024)"
    assert body.find("x:h2[@id='DiscRepeatMedsHeader']", NS).text == \
        "Discontinued Repeat Medications (For the 6 month period 29-Feb-2024 to 31-Aug-2024)"
    assert body.find("x:p[@id='CreateTime']", NS).text == "Summary Created: 31-Aug-2024 14:03"
    assert body.find("x:p[@id='Author']", NS).text == "Created by: Dr Steve Jones"


def rows(html, table_id):
    return [[td.text or "" for td in tr.findall("x:td", NS)]
            for tr in html.findall(f"x:body/x:table[@id='{table_id}']/x:tbody/x:tr", NS)]


def test_each_item_shows_its_text_dosage_quantity_and_dates():
    _, _, payload = split(build())
    html = html_of(payload)
    dosage, quantity = "One four times a day", "28 tablet"
    assert rows(html, "AcuteMeds") == [["Acute Medication", "Prescribed: 22-Jul-2024",
                                        "Paracetamol 500mg tablets", dosage, quantity]]
    assert rows(html, "RepeatMeds") == [["Repeat Medication", "Last Issued: 11-Aug-2024",
                                         "Atorvastatin 20mg tablets", dosage, quantity]]
    assert rows(html, "DiscRepeatMeds") == [[
        "Repeat Medication", "Last Issued: 02-Jun-2024; Discontinued: 01-Aug-2024",
        "Ramipril 5mg capsules", "One four times a day", "28 capsule"]]
    assert rows(html, "Allergies") == [["01-Jan-2020", "Allergy to penicillin", "", "", "Allergy"]]


def test_coded_entries_one_component_per_item():
    _, _, payload = split(build())
    blocks = summary_of(payload).findall(f"{HL7}pertinentInformation2")
    assert [b.find(f"{HL7}pertinentCREType/{HL7}code").get("code") for b in blocks] == [
        C.MEDICATION_CRE, C.ALLERGY_CRE]
    meds = [component[2] for component in blocks[0].findall(f"{HL7}pertinentCREType/{HL7}component")]
    assert [local(m) for m in meds] == [C.ACUTE_MEDICATION_ENTRY, C.REPEAT_MEDICATION_ENTRY,
                                        C.DISCONTINUED_MEDICATION_ENTRY]
    acute = meds[0]
    assert (acute.get("classCode"), acute.get("moodCode")) == ("SBADM", "RQO")
    assert acute.find(f"{HL7}code").attrib == {"code": "222671000000103", "codeSystem": C.OID_SNOMED,
                                              "displayName": "Acute medication"}
    assert acute.find(f"{HL7}effectiveTime").get("value") == "20240722"
    dosage = acute.find(f"{HL7}pertinentInformation1/{HL7}pertinentDosageInstructions")
    assert dosage.findtext(f"{HL7}value") == "One four times a day"
    assert dosage.find(f"{HL7}code").attrib == {"code": "DI", "displayName": "Dose Instructions",
                                               "codeSystem": "2.16.840.1.113883.2.1.3.2.4.17.30"}
    quantity = acute.find(f"{HL7}component/{HL7}medicationQuantity")
    assert quantity.find(f"{HL7}quantity/{HL7}translation").get("value") == "28"
    assert quantity.findtext(f"{HL7}quantity/{HL7}translation/{HL7}originalText") == "tablet"
    product = acute.find(f"{HL7}consumable/{HL7}manufacturedProduct/"
                         f"{HL7}manufacturedManufacturedMaterial/{HL7}code")
    assert product.attrib == {"code": "322236009", "codeSystem": C.OID_SNOMED,
                              "displayName": "Paracetamol 500mg tablets"}
    # every medication entry carries its fixed entry code, never a nullFlavor (MIM schema)
    assert meds[1].find(f"{HL7}code").attrib == {"code": "222681000000101", "codeSystem": C.OID_SNOMED,
                                                "displayName": "Repeat medication"}
    stopped = meds[2]
    assert stopped.find(f"{HL7}code").attrib == {"code": "222691000000104",
                                                "codeSystem": C.OID_SNOMED,
                                                "displayName": "Discontinued repeat medication"}
    assert b"nullFlavor=\"UNK\"/><statusCode" not in etree.tostring(payload)
    assert stopped.find(f"{HL7}statusCode").get("code") == "aborted"
    assert stopped.find(f"{HL7}effectiveTime/{HL7}high").get("value") == "20240801"
    entry_ids = [m.find(f"{HL7}id").get("root") for m in meds]
    assert all(UUID_UPPER.fullmatch(i) for i in entry_ids) and len(set(entry_ids)) == 3

    allergies = [c[2] for c in blocks[1].findall(f"{HL7}pertinentCREType/{HL7}component")]
    assert [local(a) for a in allergies] == [C.ALLERGY_ENTRY]
    assert allergies[0].find(f"{HL7}code").attrib == {"code": "91936005", "codeSystem": C.OID_SNOMED,
                                                     "displayName": "Allergy to penicillin"}


def test_a_blank_dosage_keeps_its_required_dosage_part():
    content = select_content([med("M1", "acute", TODAY, dosage=""), med("M2", "repeat", TODAY,
                                                                      dosage="  ")], [], WINDOWS)
    _, _, payload = split(build(content))
    entries = summary_of(payload).findall(f".//{HL7}pertinentCREType/{HL7}component")
    assert len(entries) == 2
    for component in entries:
        value = component[2].find(f"{HL7}pertinentInformation1/{HL7}pertinentDosageInstructions/"
                                  f"{HL7}value")
        assert value is not None and value.get("nullFlavor") == "NI" and not value.text
        # the dosage part comes straight after effectiveTime, as the schema orders it
        assert [local(e) for e in component[2]][:5] == ["id", "code", "statusCode", "effectiveTime",
                                                        "pertinentInformation1"]


def test_items_without_codes_carry_their_text():
    content = select_content([med("M1", "acute", TODAY, dmd="", quantity="as directed")],
                             [allergy("A1", code="", description="Reacts to plasters")], WINDOWS)
    _, _, payload = split(build(content))
    summary = summary_of(payload)
    product = summary.find(f".//{HL7}manufacturedManufacturedMaterial/{HL7}code")
    assert product.get("code") is None
    assert product.findtext(f"{HL7}originalText") == "Paracetamol 500mg tablets"
    assert summary.findtext(f".//{HL7}medicationQuantity//{HL7}originalText") == "as directed"
    assert summary.findtext(f".//{HL7}UKCT_MT144053UK02.Allergy/{HL7}code/{HL7}originalText") == \
        "Reacts to plasters"


def test_a_summary_with_nothing_to_send_carries_the_no_significant_data_finding():
    empty = select_content([], [], WINDOWS)
    _, _, payload = split(build(empty))
    html = html_of(payload)
    for table_id in ("Allergies", "AcuteMeds", "RepeatMeds", "DiscRepeatMeds"):
        cells = html.findall(f"x:body/x:table[@id='{table_id}']/x:tbody/x:tr/x:td", NS)
        assert len(cells) == 1
        assert cells[0].text == "No relevant information available for this category"
        assert cells[0].get("colspan") == "5"
    # the Spine recognises the case by this phrase in an h3 (its GP Summary rules)
    assert [h.text for h in html.findall("x:body/x:h3", NS)][-1] == \
        "The practice holds no significant data on this patient"
    # a GP Summary holds at least one coded entry: the Finding "notes summary on computer"
    blocks = summary_of(payload).findall(f"{HL7}pertinentInformation2")
    assert len(blocks) == 1
    assert blocks[0].find(f"{HL7}pertinentCREType/{HL7}code").attrib == {
        "code": "163131000000108", "codeSystem": C.OID_SNOMED,
        "displayName": "Clinical Observations and Findings"}
    finding = blocks[0].find(f"{HL7}pertinentCREType/{HL7}component/{HL7}UKCT_MT144043UK02.Finding")
    assert finding.find(f"{HL7}code").get("code") == "184229000"
    assert finding.find(f"{HL7}code").get("displayName") == "notes summary on computer"
    assert finding.find(f"{HL7}statusCode").get("code") == "completed"
    assert finding.find(f"{HL7}effectiveTime").get("value") == "20240831"
    assert UUID_UPPER.fullmatch(finding.find(f"{HL7}id").get("root"))


def test_only_the_sections_with_items_carry_coded_entries():
    content = select_content([], [allergy("A1")], WINDOWS)
    _, _, payload = split(build(content))
    blocks = summary_of(payload).findall(f"{HL7}pertinentInformation2")
    assert [b.find(f"{HL7}pertinentCREType/{HL7}code").get("code") for b in blocks] == [C.ALLERGY_CRE]
    assert len(rows(html_of(payload), "AcuteMeds")) == 1


# --- replacementOf and dissent ---------------------------------------------------------------------

def test_replacement_of_only_with_a_prior_event_id():
    _, _, first = split(build())
    assert summary_of(first).find(f"{HL7}replacementOf") is None
    prior = new_id()
    _, _, second = split(build(prior_event_id=prior))
    ref = summary_of(second).find(f"{HL7}replacementOf/{HL7}priorMessageRef")
    assert ref.get("classCode") == "COMPOSITION" and ref.find(f"{HL7}id").get("root") == prior


def test_dissent_builds_a_blank_summary_that_states_the_dissent():
    message = build(typical_content(), dissent=True)
    _, _, payload = split(message)
    html = html_of(payload)
    statement = html.find("x:body/x:p[@id='DissentStatement']", NS)
    assert statement is not None and "dissented" in statement.text
    # the Spine recognises dissent only by this exact phrase in an h1, h2, h3 or td
    assert html.find("x:body/x:h2[@id='DissentHeader']", NS).text == \
        "Refused consent for upload to national shared electronic record"
    for table_id in ("Allergies", "AcuteMeds", "RepeatMeds", "DiscRepeatMeds"):
        assert rows(html, table_id) == [[C.EMPTY_SECTION_TEXT]]
    summary = summary_of(payload)
    blocks = summary.findall(f"{HL7}pertinentInformation2")
    assert [b.find(f"{HL7}pertinentCREType/{HL7}code").get("code") for b in blocks] == \
        ["162961000000108"]
    refusal = blocks[0].find(f"{HL7}pertinentCREType/{HL7}component/{HL7}UKCT_MT144056UK01.Refusal")
    assert refusal.find(f"{HL7}code").attrib == {
        "code": "416308001", "codeSystem": C.OID_SNOMED,
        "displayName": "refused consent for upload to national shared electronic record"}
    assert [local(e) for e in refusal] == ["id", "code", "effectiveTime"]
    assert refusal.find(f"{HL7}effectiveTime").get("value") == "20240831"   # no date given: today
    _, _, dated = split(build(typical_content(), dissent=True, dissent_on=date(2023, 5, 4)))
    assert dated.find(f".//{HL7}UKCT_MT144056UK01.Refusal/{HL7}effectiveTime").get("value") == \
        "20230504"
    assert summary.find(f"{HL7}recordTarget/{HL7}patient/{HL7}id").get("extension") == "9990000018"
    for text in (b"Paracetamol", b"Atorvastatin", b"Ramipril", b"penicillin"):
        assert text not in message.body
    _, _, ordinary = split(build(typical_content()))
    assert html_of(ordinary).find("x:body/x:p[@id='DissentStatement']", NS) is None


# --- Escaping --------------------------------------------------------------------------------------

def test_xml_text_escapes_markup_and_drops_forbidden_characters():
    assert xml_text("plain text 123") == "plain text 123"
    assert xml_text("") == "" and xml_text(None) == ""
    assert xml_text("a&b<c>d\"e'f") == "a&amp;b&lt;c&gt;d&quot;e&apos;f"
    assert xml_text("x]]>y") == "x]]&gt;y"
    assert xml_text("a\x00b\x1fc\x0bd\ud800e\ufffff") == "abcdef"
    assert xml_text("t\tn\nr\r") == "t&#9;n&#10;r&#13;"
    assert xml_text("café \U0001F600 \x85") == "café \U0001F600 \x85"
    safe = xml_text(HOSTILE)
    element = etree.fromstring(f"<e a=\"{safe}\" b='{safe}'>{safe}</e>")
    assert element.text == element.get("a") == element.get("b") == clean(HOSTILE)


def test_hostile_text_everywhere_stays_well_formed_and_reads_back_as_written():
    content = select_content(
        [med("M1\x00<", "acute", TODAY, drug=HOSTILE, dosage=HOSTILE, quantity="3 " + HOSTILE,
             dmd='1" onload="x'),
         med("M2", "repeat", TODAY, drug="<b>bold</b>", dosage="]]>", quantity=HOSTILE, dmd="")],
        [allergy("A1", description=HOSTILE, code="<&>", kind=HOSTILE)], WINDOWS)
    author = Author(user_id="555000000001", name=HOSTILE, role_profile_id="555000001001",
                    job_role="R0260&",
                    sender_asid="1>0", receiver_asid="'", practice_ods="A&1", practice_name=HOSTILE,
                    sender_party_key="<K>")
    message = build(content, patient=patient('99900"/><x y="'), author=author)
    message.body.decode("utf-8")                       # strict: no lone surrogates got through
    parts, header, payload = split(message)            # both parts parse
    assert header.findtext("soap:Header/eb:MessageHeader/eb:From/eb:PartyId", namespaces=NS) == "<K>"
    summary = summary_of(payload)
    assert summary.find(f"{HL7}recordTarget/{HL7}patient/{HL7}id").get("extension") == '99900"/><x y="'
    html = html_of(payload)
    acute = rows(html, "AcuteMeds")[0]
    assert acute[2:] == [clean(HOSTILE), clean(HOSTILE), "3 " + clean(HOSTILE)]
    assert rows(html, "RepeatMeds")[0][2:4] == ["<b>bold</b>", "]]>"]
    assert rows(html, "Allergies")[0][1] == clean(HOSTILE)
    assert html.find("x:body/x:p[@id='Author']", NS).text == "Created by: " + clean(HOSTILE)
    assert html.find("x:body/x:p[@id='Practice']", NS).text.startswith(clean(HOSTILE))
    product = summary.find(f".//{HL7}UKCT_MT144040UK01.AcuteMedication//"
                           f"{HL7}manufacturedManufacturedMaterial/{HL7}code")
    assert product.get("code") == '1" onload="x' and product.get("displayName") == clean(HOSTILE)
    assert summary.find(f".//{HL7}UKCT_MT144053UK02.Allergy/{HL7}code").get("code") == "<&>"
    person = payload.find(f"{HL7}ControlActEvent/{HL7}author/{HL7}AgentPersonSDS")
    assert person.find(f"{HL7}agentPersonSDS/{HL7}id").get("extension") == "555000000001"
    assert summary.findtext(f".//{HL7}UKCT_MT160018UK01.AgentPersonSDS//{HL7}name") == clean(HOSTILE)
    assert len(html.findall(".//x:b", NS)) == 0        # markup in data stays text


@pytest.mark.parametrize("field", ["message_id", "event_id", "prior_event_id"])
@pytest.mark.parametrize("bad", ["not-a-uuid", "b0e1c9d2-3a4b-4c5d-8e6f-7a8b9c0d1e2f", "X\r\nY", ""])
def test_ids_must_be_upper_case_uuids(field, bad):
    with pytest.raises(ValueError, match=field):
        build(**{field: bad})


@pytest.mark.parametrize("field, value", [
    ("user_id", "55500000000"), ("user_id", "1<2"), ("role_profile_id", "555000001001A1"),
    ("role_profile_id", "５５５０００００１００１"), ("role_profile_id", ""),
])
def test_author_ids_must_be_12_digit_sds_ids(field, value):
    """The Spine's schema takes only 12 ASCII digits for the author's user and role profile ids."""
    author = Author(**{"user_id": "555000000001", "role_profile_id": "555000001001",
                       "name": "Dr A", field: value})
    with pytest.raises(ValueError, match="12-digit SDS id"):
        build(author=author)


def test_new_id_is_a_fresh_upper_case_uuid4():
    made = {new_id() for _ in range(1000)}
    assert len(made) == 1000
    assert all(UUID_UPPER.fullmatch(i) and i[14] == "4" for i in made)


def test_the_same_inputs_build_the_same_bytes():
    kw = dict(message_id=new_id(), event_id=new_id(), prior_event_id=new_id())
    assert build(**kw).body == build(**kw).body
    other = build(message_id=kw["message_id"], event_id=new_id())
    assert other.body != build(**kw).body


def test_a_typical_message_is_far_below_the_spine_limit():
    assert build().size < C.MAX_MESSAGE_BYTES // 100


def test_text_holding_the_message_boundary_is_refused_rather_than_sent_broken():
    message_id = new_id()
    content = select_content([med("M1", "acute", TODAY, drug=f"x ----=_MIME-Boundary-{message_id} y")],
                             [], WINDOWS)
    with pytest.raises(ValueError, match="boundary"):
        build(content, message_id=message_id)
    build(content)                                     # any other id builds
