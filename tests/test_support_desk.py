"""The support engineer's desk over a store with real failures, made by real jobs against the
simulator on loopback: what failed and why, one patient's timeline and XML, and reprocessing. Every
test runs on an SQLite file and on a PostgreSQL database that holds another practice's failures
beside the one investigated."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

import nbformat
import pandas as pd
import papermill
import pytest
from lxml import etree

from scr_nb.constants import explain
from scr_nb.errors import RefusedError
from scr_nb.extract.eligibility import Policy, decide
from scr_nb.extract.nhs_number import mask
from scr_nb.extract.reader import load_practice
from scr_nb.job.engine import Engine
from scr_nb.job.options import JobOptions
from scr_nb.sim.synth import write_practice
from scr_nb.spine import session as sessions
from scr_nb.store.database import practice_url
from scr_nb.store.practice_store import Store
from scr_nb.store.states import Mode
from scr_nb.ui.support_desk import (
    HIDDEN,
    ack_xml,
    ebxml_header,
    failed_patients,
    filter_widgets,
    find_patient,
    group_names,
    last_sent_message,
    mark_resolved,
    overview,
    message_xml,
    reprocess,
    timeline,
)

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "investigate_errors.ipynb"
SECOND_LOOK = "Second look"


@pytest.fixture(scope="module")
def small_practice(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("investigate") / "practice"
    write_practice(out, 80, seed=11)
    return out


@pytest.fixture(scope="module")
def neighbour_practice(tmp_path_factory) -> Path:
    """Another practice, B82001, whose patient ids are the same as ``small_practice``'s."""
    out = tmp_path_factory.mktemp("neighbour") / "practice"
    write_practice(out, 40, seed=5, ods_code="B82001", name="Neighbour Surgery")
    return out


@dataclass
class Failures:
    store: Path | str      # an SQLite file, or postgresql://...?ods=A12345
    practice: Path
    unknown: list          # eligible patients the Spine does not know: AE 30312 in job 1
    rejected: list         # two of them, sent again by job 2 and rejected with 35160
    acknowledged: object   # a patient the Spine took


def eligible_patients(practice: Path) -> list:
    return [d.patient for d in decide(load_practice(practice, today=date.today()),
                                      Policy(today=date.today())) if d.eligible]


def run(store_path, session, spine, practice, mode, **options):
    store = Store(store_path)
    try:
        return Engine(store, session, spine.url, practice).run(
            JobOptions(mode=Mode(mode), concurrency=4, **options))
    finally:
        store.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def failures(request, tmp_path, spine, admin_session, small_practice,
             neighbour_practice) -> Failures:
    """Job 1 (Run) fails four patients unknown to the Spine with AE 30312; support puts two of
    them in a group and job 2 (Failed over it) fails those again, now with 35160. The Spine
    still does not know the four when the fixture ends. In PostgreSQL the practice (A12345)
    shares its database with B82001, whose own job 1 failed three other patients with 30312."""
    eligible = eligible_patients(small_practice)
    unknown, acknowledged = eligible[:4], eligible[10]
    config = spine.simulator.config
    if request.param == "sqlite":
        path = tmp_path / "practice.sqlite"
    else:
        url = request.getfixturevalue("pg_url")
        path = practice_url(url, "A12345")
        ours = {p.patient_id for p in eligible[:11]}
        theirs = [p for p in eligible_patients(neighbour_practice) if p.patient_id not in ours][:3]
        config.unknown_nhs_numbers.update(p.nhs_number for p in theirs)
        neighbour = practice_url(url, "B82001")
        assert run(neighbour, admin_session, spine, neighbour_practice, "run").completed
        config.unknown_nhs_numbers.clear()
        assert ids(failed_patients(neighbour)) == {p.patient_id for p in theirs}
    config.unknown_nhs_numbers.update(p.nhs_number for p in unknown)
    assert run(path, admin_session, spine, small_practice, "run").completed
    store = Store(path)
    store.add_to_group(SECOND_LOOK, [p.patient_id for p in unknown[2:]])
    store.close()
    config.unknown_nhs_numbers.clear()
    config.reject_rates = {"35160": 1.0}
    assert run(path, admin_session, spine, small_practice, "failed", group=SECOND_LOOK).completed
    config.reject_rates = {}
    config.unknown_nhs_numbers.update(p.nhs_number for p in unknown)
    return Failures(path, small_practice, unknown, unknown[2:], acknowledged)


def ids(frame) -> set[str]:
    return set(frame["patient_id"])


def test_failed_patients_filter_by_code_job_group_and_date(failures):
    store = failures.store
    every = failed_patients(store, show_nhs=True)
    first = {p.patient_id for p in failures.unknown[:2]}
    second = {p.patient_id for p in failures.rejected}
    assert ids(every) == first | second
    by_id = every.set_index("patient_id")
    for p in failures.unknown:
        assert by_id.loc[p.patient_id, "nhs_number"] == p.nhs_number   # support sees it in full
    assert {by_id.loc[i, "failure_code"] for i in first} == {"30312"}
    assert {by_id.loc[i, "failure_code"] for i in second} == {"35160"}
    assert by_id.loc[next(iter(second)), "explanation"] == explain("35160")
    assert set(every["category"]) == {"data"}
    reference = Store(store)
    assert every["failure_code"].value_counts().to_dict() == reference.failed_by_code()
    reference.close()

    assert ids(failed_patients(store, code="30312")) == first
    assert ids(failed_patients(store, code="35160")) == second
    assert failed_patients(store, code="30418").empty
    assert ids(failed_patients(store, job_id=1)) == first
    assert ids(failed_patients(store, job_id=2)) == second
    assert ids(failed_patients(store, group=SECOND_LOOK)) == second
    assert ids(failed_patients(store, code="30312", group=SECOND_LOOK)) == set()
    with pytest.raises(ValueError, match="no Patient Group called 'Nobody'"):
        failed_patients(store, group="Nobody")

    today = date.today()
    assert ids(failed_patients(store, since=today, until=today)) == first | second
    assert ids(failed_patients(store, since=today.isoformat())) == first | second
    assert failed_patients(store, until=today - timedelta(days=1)).empty
    assert failed_patients(store, since=datetime.now() + timedelta(minutes=5)).empty
    job2_started = every.loc[every["job_id"] == 2, "failed_at"].min()
    assert ids(failed_patients(store, since=job2_started)) == second

    masked = failed_patients(store, show_nhs=False).set_index("patient_id")
    for p in failures.unknown:
        assert masked.loc[p.patient_id, "nhs_number"] == mask(p.nhs_number) != p.nhs_number


def test_timeline_shows_every_message_with_its_post_poll_and_ack(failures):
    patient = failures.rejected[0]
    pkey = find_patient(failures.store, patient.patient_id)
    assert find_patient(failures.store, patient.nhs_number) == pkey
    first_failed = find_patient(failures.store, failures.unknown[0].patient_id)
    assert find_patient(failures.store) == first_failed     # no name: the first failed patient
    steps = timeline(failures.store, pkey)
    messages = list(dict.fromkeys(steps["message_id"]))
    assert len(messages) == 2                       # job 1's message, then job 2's rebuilt one
    assert list(steps.drop_duplicates("message_id")["job_id"]) == [1, 2]
    for message_id, codes in zip(messages, ["30312", "35160"]):
        rows = steps[steps["message_id"] == message_id]
        post = rows[rows["kind"] == "post"].iloc[0]
        poll = rows[rows["kind"] == "poll"].iloc[-1]
        assert post["http_status"] == 202 and message_id in post["detail"]
        assert pd.isna(post["ack_type"]) and pd.isna(post["ack_codes"])
        assert poll["http_status"] == 200 and poll["ack_type"] == "AE"
        assert poll["ack_codes"] == codes
        assert post["time"] <= poll["time"]
        assert rows["replaces_summary_id"].isna().all()
    assert steps["gp_summary_id"].nunique() == 2
    assert steps.iloc[-1]["failure_code"] == "35160"
    latest = failed_patients(failures.store).set_index("pkey").loc[pkey, "message_id"]
    assert messages[-1] == latest == last_sent_message(failures.store, pkey)


def test_message_and_ack_xml(failures):
    patient = failures.unknown[0]
    pkey = find_patient(failures.store, patient.patient_id)
    message_id = last_sent_message(failures.store, pkey)
    event_id = timeline(failures.store, pkey)["gp_summary_id"].iloc[-1]

    hl7 = message_xml(failures.store, message_id, show_nhs=True)
    root = etree.fromstring(hl7.encode())
    assert etree.QName(root).localname == "REPC_IN150016SM05"
    assert patient.nhs_number in hl7 and event_id in hl7
    # by default the NHS number is masked and the clinical words hidden; ids and codes stay
    masked = message_xml(failures.store, message_id)
    assert patient.nhs_number not in masked and mask(patient.nhs_number) in masked
    assert event_id in masked and "REPC_IN150016SM05" in masked
    cells = [e.text for e in etree.fromstring(masked.encode()).iter("{*}td")]
    assert cells and set(cells) <= {HIDDEN, "No relevant information available for this category"}
    words = [e.get("displayName") for e in root.iter("{*}code")
             if etree.QName(e.getparent()).localname in ("manufacturedManufacturedMaterial",
                                                         "UKCT_MT144053UK02.Allergy")]
    words += [e.text.strip() for e in root.iter("{*}value", "{*}originalText") if e.text]
    assert not [w for w in words if w and w in masked]
    assert hl7.count("\n") > 20                       # indented for reading
    header = ebxml_header(failures.store, message_id)
    assert "Envelope" in header and f"<eb:MessageId>{message_id}</eb:MessageId>" in header
    assert "REPC_IN150016SM05" in header and patient.nhs_number not in header

    ack = ack_xml(failures.store, message_id)
    ack_root = etree.fromstring(ack.encode())
    assert etree.QName(ack_root).localname == "MCCI_IN010000UK13"
    assert ack_root.xpath("//*[local-name()='acknowledgement']/@typeCode") == ["AE"]
    assert ack_root.xpath("//*[local-name()='justifyingDetectedIssueEvent']"
                          "/*[local-name()='code']/@code") == ["30312"]
    assert message_id in ack

    accepted = last_sent_message(failures.store, find_patient(failures.store,
                                                              failures.acknowledged.patient_id))
    assert ack_xml(failures.store, accepted) is None      # AA acks are not kept
    with pytest.raises(ValueError, match="no message"):
        message_xml(failures.store, "NOT-A-MESSAGE-ID")


def test_only_failed_patients_can_be_marked_resolved(failures):
    wrong = [failures.unknown[0].patient_id, failures.acknowledged.patient_id, "NOBODY"]
    with pytest.raises(RefusedError) as caught:
        mark_resolved(failures.store, wrong, "Resolved by support")
    message = str(caught.value)
    assert f"{failures.acknowledged.patient_id} (acknowledged)" in message
    assert "NOBODY (not in this store)" in message
    assert failures.unknown[0].patient_id not in message
    assert "Resolved by support" not in group_names(failures.store)


def test_resolved_patients_are_reprocessed_and_acknowledged(failures, spine, admin_session,
                                                            tmp_path):
    session_file = tmp_path / "session.json"
    sessions.save(admin_session, session_file)
    resolved = [p.patient_id for p in failures.unknown]
    assert mark_resolved(failures.store, resolved, "Resolved by support") == 4
    assert mark_resolved(failures.store, resolved[:1], "Resolved by support") == 0

    spine.simulator.config.unknown_nhs_numbers.clear()   # PDS and the Spine now know them
    outcome = reprocess(failures.store, failures.practice, spine.url, session_file,
                        "Resolved by support", concurrency=4)
    assert outcome.exit_code == 0 and outcome.job["mode"] == "failed"
    assert outcome.job["group"] == "Resolved by support"
    assert outcome.statistics["this_job"]["acknowledged"] == 4
    assert failed_patients(failures.store).empty
    held = {s["nhs_number"] for s in spine.simulator.summaries()}
    assert {p.nhs_number for p in failures.unknown} <= held
    steps = timeline(failures.store, find_patient(failures.store, resolved[0]))
    assert steps.iloc[-1]["ack_type"] == "AA" and steps.iloc[-1]["message_state"] == "acknowledged"
    assert pd.isna(steps.iloc[-1]["failure_code"]) and pd.isna(steps.iloc[-1]["explanation"])
    again = reprocess(failures.store, failures.practice, spine.url, session_file,
                      "Resolved by support")
    assert again.refused and "no failed patients" in again.message


def test_filter_widgets_rerender_the_table(failures):
    desk = filter_widgets(failures.store)
    everyone = {p.patient_id for p in failures.unknown}
    assert ids(desk.frame) == everyone and "4 failed patients" in desk.table.value
    assert [value for _, value in desk.code.options] == ["", "30312", "35160"]

    desk.code.value = "35160"
    rejected = {p.patient_id for p in failures.rejected}
    assert ids(desk.frame) == rejected
    assert all(i in desk.table.value for i in rejected)
    assert failures.unknown[0].patient_id not in desk.table.value

    desk.code.value = ""
    desk.since.value = date.today() + timedelta(days=1)
    assert desk.frame.empty and "No failed patients match" in desk.table.value
    desk.since.value = date.today()
    assert ids(desk.frame) == everyone

    desk.group.value = SECOND_LOOK
    assert ids(desk.frame) == rejected
    masked = filter_widgets(failures.store, show_nhs=False)
    assert failures.unknown[0].nhs_number not in masked.table.value
    assert mask(failures.unknown[0].nhs_number) in masked.table.value


def _printed(notebook) -> str:
    return "".join(output.get("text", "") for cell in notebook.cells
                   for output in cell.get("outputs", []) if output.output_type == "stream")


def test_the_notebook_reprocesses_the_failures_against_the_spine(failures, spine, admin_session,
                                                                 tmp_path):
    session_file = tmp_path / "session.json"
    sessions.save(admin_session, session_file)
    spine.simulator.config.unknown_nhs_numbers.clear()
    papermill.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "investigated.ipynb"), kernel_name="python3",
        progress_bar=False,
        parameters={"practice": str(failures.practice), "store": str(failures.store),
                    "spine": spine.url, "session": str(session_file), "reprocess": True})
    printed = _printed(nbformat.read(tmp_path / "investigated.ipynb", as_version=4))
    assert "4 failed patients" in printed and "30312" in printed
    assert "MCCI_IN010000UK13" in printed and "REPC_IN150016SM05" in printed
    # with its defaults the desk shows no full NHS number anywhere, message XML included
    whole = (tmp_path / "investigated.ipynb").read_text()
    numbers = {p.nhs_number for p in failures.unknown + failures.rejected}
    assert not [n for n in numbers if n in whole]
    assert any(mask(n) in printed for n in numbers)
    assert "4 patients added to 'Resolved by support'" in printed
    assert "(failed, Resolved by support)" in printed
    assert failed_patients(failures.store).empty
    held = {s["nhs_number"] for s in spine.simulator.summaries()}
    assert {p.nhs_number for p in failures.unknown} <= held


def test_the_notebook_with_no_store_has_nothing_to_investigate(tmp_path):
    papermill.execute_notebook(str(NOTEBOOK), str(tmp_path / "empty.ipynb"),
                               kernel_name="python3", progress_bar=False, parameters={})
    printed = _printed(nbformat.read(tmp_path / "empty.ipynb", as_version=4))
    assert "Nothing to investigate: no store given" in printed


def test_every_code_the_kit_can_record_has_plain_words_and_a_next_step(failures):
    from scr_nb.constants import SPINE_ERRORS, next_step
    for code, (words, kind, step) in SPINE_ERRORS.items():
        assert words and kind in {"data", "access", "duplicate", "transport", "kit", "other"}
        assert "Failed" in step or "Rerun" in step or "re-send" in step or "desk" in step, code
    assert "PDS" in next_step("30312") and "Do not re-send" in next_step("30418")
    assert "service desk" in next_step("12345")        # a code nobody listed still gets one
    frame = failed_patients(failures.store)
    assert frame["next_step"].notna().all()
    assert "Next: Trace the patient on PDS" in overview(failures.store)


def test_every_timeline_row_says_what_happened(failures):
    from scr_nb.ui.support_desk import _what_happened

    for patient in failures.unknown + failures.rejected:
        steps = timeline(failures.store, find_patient(failures.store, patient.patient_id))
        assert steps["what_happened"].str.len().gt(10).all()
        assert steps["what_happened"].str.contains("Acknowledgement received").any()
    assert _what_happened("post", 429, "", None).startswith("Rate limited by the Spine (429)")
    assert "briefly unavailable (HTTP 503" in _what_happened("post", 503, "", None)
    assert "No answer from the Spine" in _what_happened("post", float("nan"), "ReadTimeout", None)
    assert "over the Spine's 4,999,600 byte limit" in _what_happened(
        float("nan"), float("nan"), None, "message_too_large")


def test_the_filter_shows_itself_in_an_exported_page(failures):
    desk = filter_widgets(failures.store)
    desk.code.value = "35160"
    bundle = desk._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle      # live: the widgets
    assert "<b>Filter</b> (Code: 35160" in bundle["text/html"]      # exported: what it showed
    assert failures.rejected[0].patient_id in bundle["text/html"]
