"""Facts from the NHS world, each with where it comes from, so a reader can check them.

"samples" means the real Spine messages of the public NHSDigital/summary-care-record-api repository
(third-party data, kept beside the project in ``../shared/reference/spine/``, never in it); "SPEC" means ``shared/SPEC.md``; "MIM" the NHS MIM
7.2.02 schemas and examples; "Spine rules" the Spine's validation stylesheets.
"""

from __future__ import annotations

# --- Interactions and services (SPEC 5 and 6; samples) -------------------------------------------
SERVICE = "urn:nhs:names:services:psis"
GP_SUMMARY_INTERACTION = "REPC_IN150016SM05"
SOAP_ACTION = f"{SERVICE}/{GP_SUMMARY_INTERACTION}"
ACK_INTERACTION = "MCCI_IN010000UK13"
HL7_VERSION_CODE = "V3NPfIT4.2.00"  # versionCode of the GP Summary samples

# --- Namespaces (samples) -------------------------------------------------------------------------
HL7_NS = "urn:hl7-org:v3"
SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
EBXML_NS = "http://www.oasis-open.org/committees/ebxml-msg/schema/msg-header-2_0.xsd"
XLINK_NS = "http://www.w3.org/1999/xlink"
HL7_EBXML_NS = "urn:hl7-org:transport/ebXML/DSTUv1.0"
PRESENTATION_NS = "xhtml:NPfIT:PresentationText"  # gp-summary-standard.xml

# --- OIDs (samples) -------------------------------------------------------------------------------
OID_INTERACTION = "2.16.840.1.113883.2.1.3.2.4.12"
OID_ASID = "1.2.826.0.1285.0.2.0.107"
OID_NHS_NUMBER = "2.16.840.1.113883.2.1.4.1"
OID_SNOMED = "2.16.840.1.113883.2.1.3.2.4.15"
OID_SDS_ROLE_PROFILE = "1.2.826.0.1285.0.2.0.67"
OID_SDS_USER = "1.2.826.0.1285.0.2.0.65"
OID_SDS_JOB_ROLE = "1.2.826.0.1285.0.2.1.104"
OID_TEMPLATE = "2.16.840.1.113883.2.1.3.2.4.18.2"
OID_PRESENTATION_TEXT = "2.16.840.1.113883.2.1.3.2.4.17.126"
OID_DOSE_INSTRUCTIONS = "2.16.840.1.113883.2.1.3.2.4.17.30"
OID_SPINE_ERROR_CODES = "2.16.840.1.113883.2.1.3.2.4.17.33"  # ack-AE-psis-35160.mime

# --- Codes (samples; the medication entry from the public SCR GP Summary mapping notes) ----------
GP_SUMMARY_CODE = "196981000000101"
GP_SUMMARY_DISPLAY = "General Practice Summary"
CARE_PROFESSIONAL_DOCUMENTATION = "163171000000105"
MEDICATION_CRE = "185361000000102"
ACUTE_MEDICATION_CODE = "222671000000103"
QUANTITY_CODE = "246205007"
DEFAULT_JOB_ROLE = "R0260"  # General Medical Practitioner, as in gp-summary-soap-1.xml
CONTROL_ACT_CLASS = "ALRT"  # ControlActEvent/@classCode of gp-summary-soap-1.xml (the acks use CACT)
EXCERPT_TEMPLATE = "CSAT_RM-NPfITUK10.excerptFrom"  # gp-summary-soap-1.xml (the standard sample: CSAB_)
PRESENTATION_TEXT_CODE = "PresentationText"  # samples, code system OID_PRESENTATION_TEXT
DOSE_INSTRUCTIONS_CODE = "DI"  # public SCR GP Summary mapping notes, code system OID_DOSE_INSTRUCTIONS

# Coded entries: CRE types, entry element names and fixed entry codes from the MIM 7.2.02 schemas
# REPC_MT150007UK05 (public repository pacharanero/mim) and its GP Summary examples
# (Examples/GP Summary/REPC_EX150007UK05_01 to _03).
ALLERGY_CRE = "163221000000102"  # "Allergies and Adverse Reactions"
ACUTE_MEDICATION_ENTRY = "UKCT_MT144040UK01.AcuteMedication"
REPEAT_MEDICATION_ENTRY = "UKCT_MT144040UK01.CurrentRepeatMedication"
DISCONTINUED_MEDICATION_ENTRY = "UKCT_MT144040UK01.DiscontinuedRepeatMedication"
ALLERGY_ENTRY = "UKCT_MT144053UK02.Allergy"
REPEAT_MEDICATION_CODE = "222681000000101"  # fixed code of CurrentRepeatMedication
REPEAT_MEDICATION_DISPLAY = "Repeat medication"
DISCONTINUED_MEDICATION_CODE = "222691000000104"  # fixed code of DiscontinuedRepeatMedication
DISCONTINUED_MEDICATION_DISPLAY = "Discontinued repeat medication"
# A GP Summary holds at least one coded entry (pertinentInformation2 is 1..*). The two summaries with
# no clinical item carry these entries (MIM examples _02 and _03), and the Spine's GP Summary rules
# (nhsdigitalmait/SPINE_schema, spine2_xslt/REPC_IN1500xxUK05_GPSummary.xsl) recognise the two cases
# by these exact phrases in the presentation text: the dissent phrase in an h1, h2, h3 or td, the
# no-significant-data phrase in an h3.
FINDINGS_CRE = "163131000000108"  # "Clinical Observations and Findings"
FINDINGS_CRE_DISPLAY = "Clinical Observations and Findings"
FINDING_ENTRY = "UKCT_MT144043UK02.Finding"
NO_SIGNIFICANT_DATA_CODE = "184229000"
NO_SIGNIFICANT_DATA_DISPLAY = "notes summary on computer"
NO_SIGNIFICANT_DATA_PHRASE = "The practice holds no significant data on this patient"
PREFERENCES_CRE = "162961000000108"  # "Personal Preferences"
PREFERENCES_CRE_DISPLAY = "Personal Preferences"
REFUSAL_ENTRY = "UKCT_MT144056UK01.Refusal"
DISSENT_CODE = "416308001"
DISSENT_DISPLAY = "refused consent for upload to national shared electronic record"
DISSENT_PHRASE = "Refused consent for upload to national shared electronic record"
# The author's SDS user id and role profile id: 12 digits (MIM data types, pattern [0-9]{12}).
SDS_ID_PATTERN = r"[0-9]{12}"

# --- ebXML envelope (the lead's message brief; confirm with the Spine's SDS/CPA details before live use)
# The reliable-messaging elements (DuplicateElimination, AckRequested, SyncReply) follow the Spine's
# ebXML rules (SPINE_schema spine2_xslt/ebxmlReliableValidator.xsl), as NHS Digital's SCR API sends them.
SOAP_NEXT_ACTOR = "http://schemas.xmlsoap.org/soap/actor/next"  # eb:SyncReply/@soap:actor
TO_PARTY_MSH_ACTOR = "urn:oasis:names:tc:ebxml-msg:actor:toPartyMSH"  # eb:AckRequested/@soap:actor
SPINE_PARTY_KEY = "YES-0000806"  # eb:To party key of the Spine's PSIS endpoint
SPINE_CPA_ID = "S20001A000100"  # eb:CPAId of the REPC_IN150016SM05 agreement
EBXML_PARTY_TYPE = "urn:nhs:names:partyType:ocs+serviceInstance"  # eb:PartyId/@eb:type (ack samples)

# --- Limits and windows (SPEC 5) ------------------------------------------------------------------
MAX_MESSAGE_BYTES = 4_999_600
REPEAT_ISSUE_WINDOW_MONTHS = 6
REPEAT_UNTIL_GRACE_MONTHS = 6
DISCONTINUED_WINDOW_MONTHS = 6
ACUTE_WINDOW_MONTHS = 12
EMPTY_SECTION_TEXT = "No relevant information available for this category"

# --- RBAC (SPEC 7) --------------------------------------------------------------------------------
B0062 = "B0062"
B0062_TEXT = (
    "schedule, manually start, stop and restart bulk uploads, including the initial upload"
)
SESSION_HOURS = 10

# --- NHS numbers (SPEC 3 and 4) -------------------------------------------------------------------
TEST_NHS_NUMBER_RANGE = (9_990_000_000, 9_999_999_999)

# --- Consent codes (SPEC 3): code -> meaning used by eligibility ----------------------------------
CONSENT_IMPLIED = "9Ndl"
CONSENT_EXPRESS_CORE = "9Ndm"
CONSENT_EXPRESS_ADDITIONAL = "9Ndn"
CONSENT_DISSENT = "9Ndo"
LEGACY_CONSENT = {"93C2": CONSENT_EXPRESS_ADDITIONAL, "93C3": CONSENT_DISSENT}
CONSENT_CODES = (
    CONSENT_IMPLIED,
    CONSENT_EXPRESS_CORE,
    CONSENT_EXPRESS_ADDITIONAL,
    CONSENT_DISSENT,
    *LEGACY_CONSENT,
)

# --- Spine error codes (SPEC 6): code -> (plain words, category, what to do next) ----------------
# Categories let analysts group failures: data (fix the record), access (RBAC, consent on Spine),
# duplicate (already there), transport (SOAP faults, HTTP), kit (decided by the kit itself).
# The next step says what to check, what to fix and which mode to use, for the support desk.
_FAILED_SAME_ID = ("Nothing to fix in the record: the Spine may hold the message, so Failed "
                   "re-sends it with its original id and the Spine answers with its first outcome.")
_FIX_AND_FAILED = "then use Failed, which builds the summary again from the corrected extract."
SPINE_ERRORS: dict[str, tuple[str, str, str]] = {
    "0": ("Unspecified error reported by the Spine", "other",
          "Read the ack's words in the patient's timeline. If they name the record, fix it and use "
          "Failed; otherwise give the message id to the NHS national service desk."),
    "18": ("Request or message not well formed (GP2GP code)", "data",
           "The Spine could not read the message: check the message XML in the desk; if every "
           "message fails the same way, stop and report it with a message id: it is the kit's."),
    "99": ("Unexpected condition (GP2GP code)", "other",
           "Retry with Failed later; if it recurs for this patient, give the message id to the NHS "
           "national service desk."),
    "200": ("Spine service temporarily unavailable (SOAP fault, retried)", "transport",
            _FAILED_SAME_ID),
    "202": ("Duplicate HL7 id: the Spine already has a message with this id", "duplicate",
            "Check the timeline: the Spine took this message id before. Use Failed, which sends a "
            "new message with a new id."),
    "206": ("Spine could not process the request in time (SOAP fault, retried)", "transport",
            _FAILED_SAME_ID),
    "208": ("Spine message handling failure (SOAP fault, retried)", "transport", _FAILED_SAME_ID),
    "300": ("Message rejected by the Spine as not valid (SOAP fault)", "transport",
            "Check the message XML against the extract row (dates, codes, text); fix the record, "
            + _FIX_AND_FAILED + " If every message fails so, stop and report it: it is the kit's."),
    "400": ("Invalid request: the message did not pass the Spine's checks", "data",
            "Read the ack's other code (35160 names the NHS number) or words for the field; fix the "
            "record, " + _FIX_AND_FAILED),
    "401": ("Duplicate message id", "duplicate",
            "The Spine has seen this message id already: check the timeline, then use Failed."),
    "410": ("Logical inconsistency in the message", "data",
            "Check the record's dates (prescribed, last issue, discontinued, recorded) for ones that "
            "contradict each other; fix them, " + _FIX_AND_FAILED),
    "420": ("Access control refused the update (consent or RBAC)", "access",
            "Check the ack's second code: 30418 means the patient's dissent is recorded on the "
            "Spine (do not re-send); otherwise check the Smartcard role holds B0062 and log in "
            "again before Failed."),
    "430": ("Invalid update of the record: the summary it replaces is not the current one",
            "data",
            "Check the patient's timeline for the summary the Spine holds; use Rerun for the "
            "patient (put them in a group) so the current summary is replaced."),
    "5000": ("Unable to process the message (EPS code)", "other",
             "Give the message id to the NHS national service desk; retry with Failed later."),
    "30134": ("Duplicate event: the Spine already holds a summary for this patient", "duplicate",
              "Nothing to send: the patient already has a summary on the Spine. To replace it, "
              "use Rerun for the patient."),
    "30312": ("Case not found: the Spine does not know this patient", "data",
              "Trace the patient on PDS: check the NHS number and demographics (name, birth "
              "date, sex), correct the record and synchronise it with PDS, "
              + _FIX_AND_FAILED + " Re-sending unchanged gets the same answer."),
    "30418": ("Dissent is recorded on the Spine for this patient (access control)", "access",
              "Do not re-send: the patient has dissented nationally. Record the dissent (9Ndo) in "
              "the practice record, so the next extract marks them not required."),
    "35160": ("NHS number missing or incorrect", "data",
              "Check the NHS number against PDS, correct it in the record, " + _FIX_AND_FAILED),
    "message_too_large": ("The message is over the Spine's 4,999,600 byte limit", "kit",
                          "Look for runaway text in the patient's medication and allergy "
                          "entries (a pasted letter, a repeated line); fix the record, "
                          + _FIX_AND_FAILED),
    "ack_timeout": ("No acknowledgement arrived within the ack timeout", "kit", _FAILED_SAME_ID),
    "retries_exhausted": ("Transient Spine failures did not clear within the retry limit",
                          "transport", _FAILED_SAME_ID + " Wait until the Spine is back."),
    "http_error": ("The Spine answered with an unexpected HTTP status", "transport",
                   _FAILED_SAME_ID),
    # After the Spine's 202 it holds the message: every failure from then on is uncertain (SPEC 6.6).
    "poll_failed": ("After the Spine took the message, its poll answered an unexpected status or "
                    "an unreadable ack", "transport", _FAILED_SAME_ID),
    "poll_limit": ("The ack was polled for as many times as allowed without an answer",
                   "transport", _FAILED_SAME_ID),
    "poll_location_refused": ("The Spine's poll location was on another host: it was not "
                              "followed, so the session token never went there", "transport",
                              _FAILED_SAME_ID + " If it recurs, report the Spine's answer to the "
                              "NHS national service desk."),
}
# Failures after which the Spine may hold the message: Failed re-sends these with their original
# id, so duplicate elimination answers with the first outcome; every other failure is rebuilt.
UNCERTAIN_FAILURES = frozenset({"ack_timeout", "retries_exhausted", "poll_failed", "poll_limit",
                                "poll_location_refused"})
# An AE 30134 (duplicate event) is not a failure to fix: the Spine already holds a summary for the
# patient, who becomes not required with this reason (SPEC 6.6).
DUPLICATE_EVENT = "30134"
EXISTING_SUMMARY_AT_SPINE = "existing_summary_at_spine"
RETRIABLE_SOAP_FAULTS = frozenset({"200", "206", "208"})
PSIS_CODE_MIN_DIGITS = 5  # PSIS codes (30134, 35160...) are five digits; generic ones are three


def explain(code: str) -> str:
    """Plain words for a failure code, for status, reports and the error desk."""
    known = SPINE_ERRORS.get(str(code))
    return known[0] if known else f"Spine error code {code}"


def category(code: str) -> str:
    known = SPINE_ERRORS.get(str(code))
    return known[1] if known else "other"


def next_step(code: str) -> str:
    """What support should check, fix and run for a failure code."""
    known = SPINE_ERRORS.get(str(code))
    return known[2] if known else ("Read the ack in the patient's timeline; if it names the record, "
                                   "fix it and use Failed, else give the message id to the NHS "
                                   "national service desk.")
