"""Resume at once (issue 11): on an unchanged extract a job reads none of its CSV files, takes the
decisions the store already holds, and sends the patients in flight first."""

from __future__ import annotations

from scr_nb.job.options import JobControl
from scr_nb.store.extract_index import index_path
from scr_nb.store.practice_store import Store
from tests.test_engine import eligible_numbers, held, job, status


def stopped_run(tmp_path, spine, session, practice, after: int = 10):
    control = JobControl()
    first = job(tmp_path, session, spine, practice, "run", control=control, concurrency=2,
                on_progress=lambda p: control.stop() if p.acknowledged >= after else None)
    assert first.job.status == "paused"
    return first


def test_resume_on_an_unchanged_extract_reads_no_csv_file(tmp_path, spine, admin_session,
                                                          practice, today):
    stopped_run(tmp_path, spine, admin_session, practice)
    index = index_path(tmp_path / "practice.sqlite")
    made = index.stat()
    resumed = job(tmp_path, admin_session, spine, practice, "resume")
    assert resumed.completed
    kept = index.stat()   # a new index is written beside and renamed into place: a new inode
    assert (kept.st_ino, kept.st_mtime_ns) == (made.st_ino, made.st_mtime_ns)
    assert set(held(spine)) == eligible_numbers(practice, today)
    assert spine.simulator.stats()["duplicates"] == 0


def test_a_changed_file_is_read_again_before_anything_is_sent(tmp_path, spine, admin_session,
                                                              practice):
    stopped_run(tmp_path, spine, admin_session, practice)
    store = Store(tmp_path / "practice.sqlite")
    try:
        waiting = store.select_work("run", store.latest_job().chain_id, None, limit=1)[0]
        removed = store.patient(waiting[0])
    finally:
        store.close()
    patients = practice / "patients.csv"
    lines = patients.read_text(encoding="utf-8-sig").splitlines(keepends=True)
    assert lines[removed["source_row"] - 1].startswith(removed["patient_id"] + ",")
    del lines[removed["source_row"] - 1]   # a patient waiting to be sent leaves the practice
    patients.write_text("".join(lines), encoding="utf-8")
    resumed = job(tmp_path, admin_session, spine, practice, "resume")
    assert resumed.completed
    store = Store(tmp_path / "practice.sqlite")
    try:
        gone = store.patient(waiting[0])
    finally:
        store.close()
    assert gone["state"] == "not_required" and gone["reason"] == "not_in_extract"
    assert removed["nhs_number"] not in held(spine)


def test_a_resumed_rerun_keeps_skipping_the_acknowledged(tmp_path, spine, admin_session,
                                                         practice, today):
    """``rerun --skip-acknowledged`` stopped and resumed: the Resume still sends only the rest."""
    rest = sorted(eligible_numbers(practice, today))[:40]
    spine.simulator.config.unknown_nhs_numbers.update(rest)
    job(tmp_path, admin_session, spine, practice, "run")
    spine.simulator.config.unknown_nhs_numbers.clear()
    control = JobControl()
    stopped = job(tmp_path, admin_session, spine, practice, "rerun", control=control,
                  concurrency=1, skip_acknowledged=True,
                  on_progress=lambda p: control.stop() if p.acknowledged >= 5 else None)
    assert stopped.job.status == "paused"
    resumed = job(tmp_path, admin_session, spine, practice, "resume")
    assert resumed.completed
    assert spine.simulator.stats()["replacements"] == 0   # nobody acknowledged was sent again
    assert set(held(spine)) == eligible_numbers(practice, today)
