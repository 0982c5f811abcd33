"""The upload engine over real HTTP against the simulator on loopback: what the Spine holds and what
the store says after each mode."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from scr_nb.errors import RefusedError, SessionError
from scr_nb.extract.eligibility import Policy, decide
from scr_nb.extract.reader import load_practice
from scr_nb.job import pipeline as pipeline_module
from scr_nb.job.engine import Engine
from scr_nb.job.options import JobControl, JobOptions
from scr_nb.spine import session as sessions
from scr_nb.spine.client import SpineClient
from scr_nb.store.log import PracticeLog
from scr_nb.store.practice_store import Store
from scr_nb.store.states import Mode
from tests.conftest import CLERK


def eligible_numbers(practice_dir, today, **policy) -> set[str]:
    practice = load_practice(practice_dir, today=today)
    return {d.patient.nhs_number for d in decide(practice, Policy(today=today, **policy))
            if d.eligible}


def held(spine) -> dict[str, dict]:
    return {s["nhs_number"]: s for s in spine.simulator.summaries()}


def job(tmp_path, session, spine, practice, mode, control=None, on_progress=None,
        client_factory=None, **options):
    store = Store(tmp_path / "practice.sqlite")
    try:
        engine = Engine(store, session, spine.url, practice, control=control,
                        on_progress=on_progress, client_factory=client_factory)
        options.setdefault("concurrency", 8)
        return engine.run(JobOptions(mode=Mode(mode), **options))
    finally:
        store.close()


def status(tmp_path) -> dict:
    store = Store(tmp_path / "practice.sqlite")
    try:
        return store.status()
    finally:
        store.close()


def test_run_sends_every_eligible_patient_exactly_once(tmp_path, spine, admin_session, practice,
                                                       today):
    result = job(tmp_path, admin_session, spine, practice, "run")
    eligible = eligible_numbers(practice, today)
    assert result.completed
    assert set(held(spine)) == eligible
    stats = spine.simulator.stats()
    assert stats["accepted"] == len(eligible) and stats["duplicates"] == 0
    st = status(tmp_path)
    assert st["counters"]["sent"] == len(eligible)
    assert st["counters"]["failed"] == 0 and st["counters"]["unprocessed"] == 0
    assert st["counters"]["sending"] == 0
    assert st["counters"]["not_required"] == 400 - len(eligible)
    assert st["latest_job"]["status"] == "completed" and st["latest_job"]["mode"] == "run"
    assert result.statistics["qualifying_patients"] == len(eligible)
    events = [e["event"] for e in PracticeLog(tmp_path / "practice.sqlite").read()]
    assert events == ["job_start", "job_end"]


def test_second_run_is_refused_as_already_run_to_completion(tmp_path, spine, admin_session,
                                                            practice):
    job(tmp_path, admin_session, spine, practice, "run")
    requests = spine.simulator.stats()["requests"]
    with pytest.raises(RefusedError) as caught:
        job(tmp_path, admin_session, spine, practice, "run")
    assert "already run to completion" in str(caught.value)
    assert "Rerun" in str(caught.value) and "Failed" in str(caught.value)
    assert spine.simulator.stats()["requests"] == requests
    log = list(PracticeLog(tmp_path / "practice.sqlite").read())
    assert log[-1]["event"] == "refused" and log[-1]["user_id"] == admin_session.user_id


def test_error_acks_fail_with_their_code_and_failed_mode_reprocesses(tmp_path, spine,
                                                                     admin_session, practice,
                                                                     today):
    unknown = sorted(eligible_numbers(practice, today))[:3]
    spine.simulator.config.unknown_nhs_numbers.update(unknown)
    first = job(tmp_path, admin_session, spine, practice, "run")
    assert first.completed
    st = status(tmp_path)
    assert st["failed_by_code"] == {"30312": 3}
    assert st["counters"]["failed"] == 3
    assert not set(unknown) & set(held(spine))

    spine.simulator.config.unknown_nhs_numbers.clear()   # PDS and the Spine now know them
    again = job(tmp_path, admin_session, spine, practice, "failed")
    assert again.completed and again.statistics["this_job"]["acknowledged"] == 3
    assert set(held(spine)) == eligible_numbers(practice, today)
    assert status(tmp_path)["counters"]["failed"] == 0
    with pytest.raises(RefusedError) as caught:
        job(tmp_path, admin_session, spine, practice, "failed")
    assert "no failed patients" in str(caught.value)


def test_rerun_replaces_every_acknowledged_summary(tmp_path, spine, admin_session, practice):
    job(tmp_path, admin_session, spine, practice, "run")
    before = held(spine)
    result = job(tmp_path, admin_session, spine, practice, "rerun")
    after = held(spine)
    assert result.completed and set(after) == set(before)
    assert all(after[n]["gp_summary_id"] != before[n]["gp_summary_id"] for n in before)
    stats = spine.simulator.stats()
    assert stats["replacements"] == len(before)
    assert stats["rejected_by_code"] == {}
    assert status(tmp_path)["counters"]["sent"] == len(before)


def test_rerun_skip_acknowledged_only_sends_the_rest(tmp_path, spine, admin_session, practice,
                                                     today):
    unknown = sorted(eligible_numbers(practice, today))[:2]
    spine.simulator.config.unknown_nhs_numbers.update(unknown)
    job(tmp_path, admin_session, spine, practice, "run")
    spine.simulator.config.unknown_nhs_numbers.clear()
    result = job(tmp_path, admin_session, spine, practice, "rerun", skip_acknowledged=True)
    assert result.statistics["this_job"]["to_send"] == 2
    assert spine.simulator.stats()["replacements"] == 0
    assert set(held(spine)) == eligible_numbers(practice, today)


def test_group_run_sends_only_the_group(tmp_path, spine, admin_session, practice, today):
    extract = load_practice(practice, today=today)
    name, members = sorted(extract.groups.items())[0]
    eligible = {d.patient.nhs_number for d in decide(extract, Policy(today=today))
                if d.eligible and d.patient.patient_id in members}
    assert eligible
    result = job(tmp_path, admin_session, spine, practice, "run", group=name)
    assert result.completed and set(held(spine)) == eligible
    assert status(tmp_path)["latest_job"]["group"] == name
    # The whole list is another scope: its Run sends the others and never re-sends the group.
    job(tmp_path, admin_session, spine, practice, "run")
    assert set(held(spine)) == eligible_numbers(practice, today)
    assert spine.simulator.stats()["duplicates"] == 0
    assert spine.simulator.stats()["rejected_by_code"] == {}


def test_unknown_group_is_refused(tmp_path, spine, admin_session, practice):
    with pytest.raises(RefusedError) as caught:
        job(tmp_path, admin_session, spine, practice, "run", group="No such group")
    assert "No such group" in str(caught.value)


def test_stop_then_run_is_refused_and_resume_finishes(tmp_path, spine, admin_session, practice,
                                                      today):
    control = JobControl()

    def stop_early(progress):
        if progress.acknowledged >= 20:
            control.stop()

    first = job(tmp_path, admin_session, spine, practice, "run", control=control,
                on_progress=stop_early, concurrency=2)
    assert first.job.status == "paused" and first.job.reason == "user_stop"
    st = status(tmp_path)
    assert st["counters"]["unprocessed"] > 0 and st["states"]["sending"] == 0
    with pytest.raises(RefusedError) as caught:
        job(tmp_path, admin_session, spine, practice, "run")
    assert "partially completed" in str(caught.value) and caught.value.use_mode == "resume"
    resumed = job(tmp_path, admin_session, spine, practice, "resume")
    assert resumed.completed and resumed.job.mode == "resume"
    assert set(held(spine)) == eligible_numbers(practice, today)
    assert spine.simulator.stats()["rejected_by_code"] == {}
    with pytest.raises(RefusedError):
        job(tmp_path, admin_session, spine, practice, "resume")


def test_a_stop_after_everything_was_built_but_not_sent_is_a_stop_not_a_completion(
        tmp_path, spine, admin_session, today):
    """A small practice: every message is built and queued at once (the queue holds them all);
    Stop and Close after the first acknowledgement leaves most of them never posted. They go
    back to Unprocessed with their ids, so the job stopped; it did not complete."""
    from scr_nb.sim.synth import write_practice

    small = tmp_path / "small"
    write_practice(small, 30, seed=5)
    control = JobControl()

    def stop_after_one(progress):
        if progress.acknowledged >= 1:
            control.stop_and_close()

    first = job(tmp_path, admin_session, spine, small, "run", control=control,
                on_progress=stop_after_one, concurrency=32, rate_limit=2)
    st = status(tmp_path)
    assert st["counters"]["unprocessed"] > 0 and st["counters"]["sending"] == 0
    assert not first.completed and first.job.reason == "user_stop"
    resumed = job(tmp_path, admin_session, spine, small, "resume")
    assert resumed.completed
    assert set(held(spine)) == eligible_numbers(small, today)
    assert spine.simulator.stats()["rejected_by_code"] == {}


class _Crash(BaseException):
    """Stands in for the process dying mid-job."""


def test_a_crash_mid_job_is_finished_by_resume_with_the_original_ids(tmp_path, spine,
                                                                     admin_session, practice,
                                                                     today):
    sends = {"n": 0}

    class CrashingClient(SpineClient):
        async def send(self, message):
            sends["n"] += 1
            if sends["n"] > 40:
                raise _Crash()
            return await super().send(message)

    with pytest.raises(_Crash):
        job(tmp_path, admin_session, spine, practice, "run", client_factory=CrashingClient)
    st = status(tmp_path)
    assert st["latest_job"]["status"] == "running"
    assert st["counters"]["sending"] > 0          # queued, sending or transmitted: in flight
    resumed = job(tmp_path, admin_session, spine, practice, "resume")
    assert resumed.completed
    assert set(held(spine)) == eligible_numbers(practice, today)
    assert spine.simulator.stats()["rejected_by_code"] == {}   # no 30134: nothing sent twice
    assert status(tmp_path)["counters"]["sent"] == len(eligible_numbers(practice, today))


def test_ack_timeout_fails_and_failed_resends_the_same_message(tmp_path, spine_factory,
                                                               admin_session, practice, today):
    spine = spine_factory(drop_ack_rate=0.2, seed=3)
    session = sessions.login(spine.url, admin_session.user_id, "right-passcode")
    first = job(tmp_path, session, spine, practice, "run", ack_timeout=0.5)
    st = status(tmp_path)
    timed_out = st["failed_by_code"].get("ack_timeout", 0)
    assert timed_out > 0 and first.completed
    assert len(held(spine)) == len(eligible_numbers(practice, today))  # the Spine took them all
    again = job(tmp_path, session, spine, practice, "failed", ack_timeout=5)
    assert again.completed and again.statistics["this_job"]["acknowledged"] == timed_out
    stats = spine.simulator.stats()
    assert stats["duplicates"] == timed_out and stats["rejected_by_code"] == {}
    assert status(tmp_path)["counters"]["sent"] == len(eligible_numbers(practice, today))


def test_transient_faults_are_retried_until_acknowledged(tmp_path, spine_factory, admin_session,
                                                         practice, today):
    spine = spine_factory(transient_rate=0.25, gateway_error_rate=0.1, seed=9)
    session = sessions.login(spine.url, admin_session.user_id, "right-passcode")
    result = job(tmp_path, session, spine, practice, "run", concurrency=16)
    assert result.completed
    assert set(held(spine)) == eligible_numbers(practice, today)
    faults = spine.simulator.stats()["transient_faults_injected"]
    assert sum(faults.values()) > 0
    assert status(tmp_path)["counters"]["failed"] == 0


def test_messages_over_the_size_limit_are_not_sent(tmp_path, spine, admin_session, practice,
                                                   monkeypatch):
    monkeypatch.setattr(pipeline_module, "MAX_MESSAGE_BYTES", 1000)
    result = job(tmp_path, admin_session, spine, practice, "run")
    assert result.completed
    assert spine.simulator.stats()["requests"] == 0
    st = status(tmp_path)
    assert st["failed_by_code"] == {"message_too_large": st["counters"]["failed"]}
    assert st["counters"]["failed"] > 0


def test_a_user_without_b0062_sends_nothing(tmp_path, spine, practice):
    clerk = sessions.login(spine.url, CLERK["user_id"], CLERK["passcode"])
    with pytest.raises(SessionError) as caught:
        job(tmp_path, clerk, spine, practice, "run")
    assert "B0062" in str(caught.value) and CLERK["name"] in str(caught.value)
    assert spine.simulator.stats()["requests"] == 0


def test_a_rejected_token_stops_the_job_without_failing_anyone(tmp_path, spine, admin_session,
                                                               practice, today):
    forged = sessions.Session(token=admin_session.token[:-4] + "AAAA",
                              user_id=admin_session.user_id, name=admin_session.name,
                              role_profile_id=admin_session.role_profile_id,
                              activities=admin_session.activities,
                              expires_at=datetime.now(timezone.utc) + timedelta(hours=1))
    result = job(tmp_path, forged, spine, practice, "run")
    assert result.job.status == "stopped" and result.job.reason == "session_expired"
    st = status(tmp_path)
    assert st["counters"]["failed"] == 0 and st["counters"]["sent"] == 0
    assert st["states"]["sending"] == 0
    resumed = job(tmp_path, admin_session, spine, practice, "resume")
    assert resumed.completed
    assert set(held(spine)) == eligible_numbers(practice, today)


def test_blank_dissent_policy_sends_dissenting_patients_a_summary(tmp_path, spine, admin_session,
                                                                  practice, today):
    result = job(tmp_path, admin_session, spine, practice, "run", dissent="blank")
    assert result.completed
    assert set(held(spine)) == eligible_numbers(practice, today, dissent="blank")
    assert status(tmp_path)["not_required_by_reason"]["dissent"] == 0


def test_resume_continues_a_stopped_whole_list_job_after_a_group_run(tmp_path, spine,
                                                                     admin_session, practice,
                                                                     today):
    control = JobControl()
    first = job(tmp_path, admin_session, spine, practice, "run", control=control, concurrency=2,
                on_progress=lambda p: control.stop() if p.acknowledged >= 10 else None)
    assert first.job.status == "paused"
    group = sorted(load_practice(practice, today=today).groups)[0]
    assert job(tmp_path, admin_session, spine, practice, "run", group=group).completed
    resumed = job(tmp_path, admin_session, spine, practice, "resume")
    assert resumed.completed and resumed.job.group is None
    assert set(held(spine)) == eligible_numbers(practice, today)
    with pytest.raises(RefusedError):
        job(tmp_path, admin_session, spine, practice, "resume")


def test_rerun_resends_ack_timeouts_with_their_original_id(tmp_path, spine_factory,
                                                           admin_session, practice, today):
    spine = spine_factory(drop_ack_rate=1.0)
    session = sessions.login(spine.url, admin_session.user_id, "right-passcode")
    job(tmp_path, session, spine, practice, "run", ack_timeout=0.3)
    lost = status(tmp_path)["failed_by_code"]["ack_timeout"]
    spine.simulator.config.drop_ack_rate = 0.0
    result = job(tmp_path, session, spine, practice, "rerun", ack_timeout=5)
    assert result.completed
    stats = spine.simulator.stats()
    assert stats["duplicates"] == lost and stats["rejected_by_code"] == {}
    assert status(tmp_path)["counters"]["sent"] == len(eligible_numbers(practice, today))


def test_an_unexpected_error_leaves_the_job_resumable(tmp_path, spine, admin_session, practice,
                                                      today):
    polls = {"n": 0}

    class BrokenPolls(SpineClient):
        async def poll(self, url, message_id=""):
            polls["n"] += 1
            if polls["n"] == 5:
                raise ValueError("garbled answer")
            return await super().poll(url, message_id)

    with pytest.raises(ValueError):
        job(tmp_path, admin_session, spine, practice, "run", client_factory=BrokenPolls)
    st = status(tmp_path)
    assert st["latest_job"]["status"] == "stopped"
    assert job(tmp_path, admin_session, spine, practice, "resume").completed
    assert set(held(spine)) == eligible_numbers(practice, today)


def test_patients_gone_from_the_extract_get_a_reason(tmp_path, spine, admin_session, practice,
                                                     today):
    control = JobControl()
    job(tmp_path, admin_session, spine, practice, "run", control=control, concurrency=1,
        on_progress=lambda p: control.stop() if p.acknowledged >= 5 else None)
    lines = (practice / "patients.csv").read_text(encoding="utf-8-sig").splitlines(keepends=True)
    (practice / "patients.csv").write_text("".join(lines[:-30]), encoding="utf-8")
    result = job(tmp_path, admin_session, spine, practice, "resume")
    st = status(tmp_path)
    assert result.completed and st["counters"]["unprocessed"] == 0
    assert st["not_required_by_reason"]["not_in_extract"] > 0
    assert len(held(spine)) == st["counters"]["sent"]
    assert st["counters"]["failed"] == 0


def test_a_second_job_on_the_same_store_is_refused_naming_the_holder(tmp_path, spine,
                                                                      admin_session, practice):
    from scr_nb.store.lock import StoreLock

    store = Store(tmp_path / "practice.sqlite")
    holder = StoreLock(store, "555000000009", "Pat Other", lambda: datetime.now(timezone.utc))
    holder.acquire()
    try:
        with pytest.raises(RefusedError) as caught:
            job(tmp_path, admin_session, spine, practice, "run")
        message = str(caught.value)
        assert "Pat Other" in message and "process" in message and "since" in message
        assert spine.simulator.stats()["requests"] == 0
        assert status(tmp_path)["running"]["user_name"] == "Pat Other"
    finally:
        holder.release()
        store.close()
    assert job(tmp_path, admin_session, spine, practice, "run").completed
    assert status(tmp_path)["running"] is None


def test_a_holder_whose_heartbeat_stopped_on_another_host_is_taken_over(tmp_path, spine,
                                                                       admin_session, practice,
                                                                       monkeypatch):
    from scr_nb.store import lock

    monkeypatch.setattr(lock, "LAPSE_SECONDS", 1.0)
    store = Store(tmp_path / "practice.sqlite")
    with store.transaction() as db:   # a job on another machine, whose beat no longer moves
        db.execute("INSERT INTO job_lock (ods, user_id, user_name, host, pid, since, heartbeat, "
                   "token, started, beat) VALUES ('', '555000000009', 'Pat Other', "
                   "'another-host', 4242, '2026-11-20T19:00:00+00:00', 9e12, 'theirs', "
                   "'boot:1', 17)")
    store.close()
    assert job(tmp_path, admin_session, spine, practice, "run").completed
    events = [e for e in PracticeLog(tmp_path / "practice.sqlite").read()]
    assert events[0]["event"] == "takeover" and "another-host" in events[0]["previous_holder"]


def test_cancel_leaves_the_upload_partially_completed_for_resume(tmp_path, spine, admin_session,
                                                                 practice, today):
    control = JobControl()
    first = job(tmp_path, admin_session, spine, practice, "run", control=control, concurrency=2,
                on_progress=lambda p: control.cancel() if p.acknowledged >= 10 else None)
    assert first.job.status == "cancelled" and first.job.reason == "user_cancel"
    assert status(tmp_path)["states"]["sending"] == 0
    with pytest.raises(RefusedError) as caught:
        job(tmp_path, admin_session, spine, practice, "run")
    assert caught.value.use_mode == "resume"
    assert job(tmp_path, admin_session, spine, practice, "resume").completed
    assert set(held(spine)) == eligible_numbers(practice, today)
    log = [e for e in PracticeLog(tmp_path / "practice.sqlite").read()]
    cancel = next(e for e in log if e["event"] == "cancel")
    assert cancel["reason"] == "user_cancel" and cancel["user_id"] == admin_session.user_id
