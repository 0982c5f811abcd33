"""The conformance facts of SPEC 5 (from the NHS MIM schemas and the Spine's own rules), checked on
every message the kit builds for synthetic and hand-made practices, and each rule shown to catch
the breach it names."""

from __future__ import annotations

import re
from datetime import date, datetime

import pytest

from scr_nb.extract.eligibility import Policy, decide, latest_consent_entry
from scr_nb.extract.reader import load_practice
from scr_nb.sim.synth import write_practice
from scr_nb.spine.conformance import RULES, check_message
from scr_nb.spine.content import Windows, select_content
from scr_nb.spine.gp_summary import Author, OutboundMessage, build_message, new_id
from tests.handmade import edge_case_practice

TODAY = date(2026, 11, 28)
AUTHOR = Author(user_id="555000000001", name="Dr Alex Morgan", role_profile_id="555000001001")


def messages_for(directory) -> list[tuple[str, OutboundMessage]]:
    """Every message the pipeline would build for the practice (dissent sent blank), every third
    one as a replacement."""
    practice = load_practice(directory, today=TODAY)
    built = []
    for n, decision in enumerate(d for d in decide(practice, Policy(TODAY, dissent="blank"))
                                 if d.eligible):
        pid = decision.patient.patient_id
        content = select_content(practice.medications.get(pid, ()),
                                 practice.allergies.get(pid, ()), Windows(TODAY))
        consent = latest_consent_entry(practice.consent.get(pid)) if decision.dissent else None
        built.append((pid, build_message(
            decision.patient, content, author=AUTHOR, message_id=new_id(), event_id=new_id(),
            created=datetime(2026, 11, 28, 19, 5, 1), dissent=decision.dissent,
            dissent_on=consent.recorded_on if consent else None,
            prior_event_id=new_id() if n % 3 == 0 else None)))
    return built


def test_every_message_for_a_synthetic_practice_meets_every_rule(tmp_path):
    write_practice(tmp_path / "practice", patients=400, seed=23)
    built = messages_for(tmp_path / "practice")
    assert len(built) > 250
    breaches = {pid: check_message(m.body, m.content_type) for pid, m in built}
    assert {pid: b for pid, b in breaches.items() if b} == {}


def test_every_message_for_the_hand_made_edge_cases_meets_every_rule(tmp_path):
    built = dict(messages_for(edge_case_practice(tmp_path / "edge", TODAY)))
    assert set(built) == {f"E{n}" for n in range(1, 14)}
    for pid, message in built.items():
        assert check_message(message.body, message.content_type) == [], pid
    assert b"Refused consent for upload to national shared electronic record" in built["E11"].body
    assert b"Refused consent for upload to national shared electronic record" in built["E12"].body
    for nothing in ("E5", "E6"):
        assert b"The practice holds no significant data on this patient" in built[nothing].body
    assert built["E4"].body.count(b'<value nullFlavor="NI"/>') == 3


def good() -> OutboundMessage:
    from tests.test_gp_summary import build
    return build()


@pytest.mark.parametrize("rule, old, new", [
    ("ebxml-sync-reply", rb'<eb:SyncReply [^>]*/>', b""),
    ("ebxml-duplicate-elimination", rb"<eb:DuplicateElimination/>", b""),
    ("ebxml-ack-requested", rb'eb:signed="false"', b'eb:signed="true"'),
    ("author-sds-ids", rb'extension="555000001001"|extension="055888118514"',
     b'extension="055888118514A1"'),
    ("medication-entry-code", rb'<code code="222681000000101"[^>]*/>', b'<code nullFlavor="UNK"/>'),
    ("dosage-part", rb'<pertinentInformation1 typeCode="PERT" contextConductionInd="true">.*?'
                    rb'</pertinentInformation1>', b""),
    ("coded-entry", rb"<pertinentInformation2 .*</pertinentInformation2>", b""),
    ("upper-case-ids", rb'<id root="([0-9A-F-]{36})"/><creationTime',
     lambda m: b'<id root="' + m.group(1).lower() + b'"/><creationTime'),
    ("hl7-times", rb'<creationTime value="[0-9]+"/>', b'<creationTime value="2024-08-31T14:03:05"/>'),
])
def test_each_rule_catches_the_breach_it_names(rule, old, new):
    message = good()
    broken = re.sub(old, new, message.body, count=0 if rule == "author-sds-ids" else 1,
                    flags=re.DOTALL)
    assert broken != message.body
    found = check_message(broken, message.content_type)
    assert rule in {b.rule for b in found}
    assert all(b.rule == rule for b in found), found
    assert RULES[rule] in found[0].describe()


def test_the_two_phrases_the_spine_recognises_are_required():
    from tests.test_gp_summary import build
    from scr_nb.spine.content import SummaryContent
    dissent = build(dissent=True)
    broken = dissent.body.replace(b"Refused consent for upload", b"Refused upload")
    assert [b.rule for b in check_message(broken, dissent.content_type)] == ["dissent-phrase"]
    empty = build(SummaryContent((), (), (), (), None))
    broken = empty.body.replace(b'<h3 id="NoSignificantData">', b'<h2 id="NoSignificantData">') \
        .replace(b"patient</h3>", b"patient</h2>")
    assert [b.rule for b in check_message(broken, empty.content_type)] == \
        ["no-significant-data-phrase"]
