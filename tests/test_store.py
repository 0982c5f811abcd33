"""The store on its own: the state machine on every move, ids committed before sending, durable
commits that roll back whole, migrations, read-only readers, owner-only files, and the lock."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
import zlib
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from scr_nb.errors import RefusedError, StoreError
from scr_nb.store import lock, queries
from scr_nb.store.lock import StoreLock, break_lock, process_start, read_holder
from scr_nb.store.practice_store import Store, read_status
from scr_nb.store.database import DatabaseError
from scr_nb.store.schema import SCHEMA_VERSION

NOW = lambda: datetime.now(timezone.utc)  # noqa: E731
ID = "0B5E6F70-8192-4A3B-9C4D-5E6F708192A{}"


@pytest.fixture
def store(tmp_path):
    opened = Store(tmp_path / "practice.sqlite")
    opened.sync_patients([("P1", "P1", "9990000018", 2, None, False),
                          ("P2", "P2", "9990000026", 3, None, False),
                          ("P3", "P3", "", 4, "no_nhs_number", False)])
    yield opened
    opened.close()


def queue_one(store: Store, pkey: str = "P1", n: int = 1) -> int:
    job = store.start_job("run", "run", None, None, "555000000001", "Dr A", {})
    store.queue_messages(job.id, job.chain_id, [(pkey, ID.format(n), ID.format(n + 5), None,
                                                 "multipart/related", b"<body/>")])
    return job.id


def test_files_are_created_owner_only_and_commits_are_full(store, tmp_path):
    assert stat.S_IMODE(os.stat(tmp_path / "practice.sqlite").st_mode) == 0o600
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2      # FULL
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_message_id_is_committed_before_anything_can_send_it(store, tmp_path):
    queue_one(store)
    other = sqlite3.connect(tmp_path / "practice.sqlite")   # another process's view
    assert other.execute("SELECT state, message_id FROM patients WHERE pkey = 'P1'").fetchone() \
        == ("queued", ID.format(1))
    other.close()


def test_every_move_follows_the_state_table(store):
    queue_one(store)
    store.mark_sending(ID.format(1))
    store.mark_transmitted(ID.format(1), "/poll/1", 1)
    store.mark_acknowledged(ID.format(1), ID.format(6))
    assert store.state_counts()["acknowledged"] == 1
    with pytest.raises(ValueError, match="cannot go from acknowledged to transmitted"):
        store.mark_transmitted(ID.format(1), "/poll/1", 2)
        store.flush()


def test_a_failed_commit_rolls_back_whole_and_keeps_the_deferred_moves(store):
    """A COMMIT that fails (here a deferred constraint, checked only at COMMIT) leaves nothing of
    the step in the store, keeps the deferred moves for the next transaction, and says so."""
    job_id = queue_one(store)
    store.mark_sending(ID.format(1))            # deferred
    store.db.execute("CREATE TABLE trap (pkey TEXT REFERENCES patients (pkey) "
                     "DEFERRABLE INITIALLY DEFERRED)")
    with pytest.raises(StoreError, match="could not write.*Resume"):
        with store.transaction() as db:
            db.execute("INSERT INTO trap VALUES ('nobody')")
            store._move(db, "P2", store_state("queued"), message_id=ID.format(2), chain_id=job_id)
    assert not store.db.in_transaction
    assert store.patient("P2")["state"] == "unprocessed"
    assert store.pending == 1                  # the deferred move is still to be written
    store.db.execute("DROP TABLE trap")
    store.flush()
    assert store.patient("P1")["state"] == "sending" and store.pending == 0


def store_state(name: str):
    from scr_nb.store.states import PatientState
    return PatientState(name)


def test_a_reader_beside_the_writer_sees_committed_state_and_cannot_write(store, tmp_path):
    queue_one(store)
    reader = Store(tmp_path / "practice.sqlite", readonly=True)
    try:
        assert reader.status()["counters"]["sending"] == 1
        with pytest.raises(DatabaseError, match="readonly"):
            reader.db.execute("DELETE FROM patients")
    finally:
        reader.close()
    assert read_status(tmp_path / "practice.sqlite")["not_required_by_reason"]["no_nhs_number"] == 1
    with pytest.raises(StoreError, match="no such store"):
        Store(tmp_path / "nothing.sqlite", readonly=True)


def test_an_older_store_is_walked_up_to_the_current_schema(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    from scr_nb.store.schema import SCHEMA_V1
    db.executescript(SCHEMA_V1)
    db.execute("INSERT INTO meta VALUES ('schema', '1')")
    db.commit()
    db.close()
    assert read_status(path)["counters"]["sent"] == 0       # readers read it as it is
    opened = Store(path)
    try:
        assert opened.db.scalar("SELECT value FROM meta WHERE key = 'schema'") == SCHEMA_VERSION
        columns = [r[1] for r in opened.db.rows("PRAGMA table_info(job_lock)")]
        assert columns[0] == "ods" and {"started", "beat"} <= set(columns)
        assert opened.ods == ""           # an older store knows no practice yet
    finally:
        opened.close()
    db = sqlite3.connect(path)            # a patient of before, under no practice
    db.execute("INSERT INTO patients (ods, pkey, patient_id, nhs_number, source_row, state, "
               "updated_at) VALUES ('', 'P1', 'P1', '9990000018', 2, 'unprocessed', 'then')")
    db.commit()
    db.close()
    named = Store(path, "a12345")         # only a job names it, under its lock
    try:
        assert named.ods == ""
        named.claim("a12345")
        assert named.ods == "A12345" and named.patient("P1")["ods"] == "A12345"
    finally:
        named.close()
    assert Store(path, readonly=True).ods == "A12345"
    with pytest.raises(StoreError, match="holds practice A12345, not B99999"):
        Store(path, "B99999")


# --- the lock -----------------------------------------------------------------------------------

def insert_holder(store: Store, **fields) -> None:
    row = {"user_id": "555000000009", "user_name": "Pat Other", "host": "another-host",
           "pid": 4242, "since": "2026-11-20T19:00:00+00:00", "heartbeat": 0.0,
           "token": "theirs", "started": "boot:1", "beat": 3, **fields}
    with store.transaction() as db:
        db.execute(f"INSERT INTO job_lock (ods, {', '.join(row)}) VALUES "
                   f"(?, {', '.join('?' * len(row))})", (store.ods, *row.values()))


def test_a_live_holder_is_refused_by_name_and_its_heartbeat_moves(store):
    first = StoreLock(store, "555000000009", "Pat Other", NOW)
    assert first.acquire() is None
    try:
        started = time.monotonic()
        with pytest.raises(RefusedError, match="Pat Other .* process .* since"):
            StoreLock(store, "555000000001", "Dr A", NOW).acquire()
        assert time.monotonic() - started < lock.HEARTBEAT_SECONDS + 2
        assert store.lock_holder()["user_name"] == "Pat Other"
        with pytest.raises(RefusedError, match="alive"):
            break_lock(store)
    finally:
        first.release()
    assert read_holder(store.db, store.ods) is None


def test_a_dead_process_on_this_host_is_taken_over_at_once_even_when_its_pid_lives_again(store):
    """The holder's pid is this very test's (alive), but its start time is another process's:
    the pid was reused, so the holder is gone."""
    import socket
    insert_holder(store, host=socket.gethostname(), pid=os.getpid(),
                  started=process_start(os.getpid()).split(":")[0] + ":1")
    taker = StoreLock(store, "555000000001", "Dr A", NOW)
    started = time.monotonic()
    previous = taker.acquire()
    taker.release()
    assert previous.user_name == "Pat Other" and time.monotonic() - started < 1


def test_another_hosts_holder_is_judged_by_its_beat_not_by_clocks(store, monkeypatch):
    """Its wall-clock heartbeat is far in the future (skew); only the beat counter counts."""
    monkeypatch.setattr(lock, "LAPSE_SECONDS", 1.0)
    insert_holder(store, heartbeat=9e12)
    stop = threading.Event()

    def beat() -> None:
        db = sqlite3.connect(store.path, isolation_level=None)
        while not stop.wait(0.2):
            db.execute("UPDATE job_lock SET beat = beat + 1")
        db.close()

    beater = threading.Thread(target=beat)
    beater.start()
    try:
        with pytest.raises(RefusedError, match="another-host"):
            StoreLock(store, "555000000001", "Dr A", NOW).acquire()
    finally:
        stop.set()
        beater.join()
    # now it stands still: gone after the lapse, and the lock can be broken
    holder = break_lock(store)
    assert holder.host == "another-host" and read_holder(store.db, store.ods) is None
    with pytest.raises(RefusedError, match="nothing to break"):
        break_lock(store)


def test_stop_requests_travel_through_the_store_with_who_asked(store, tmp_path):
    first = StoreLock(store, "555000000001", "Dr A", NOW)
    first.acquire()
    try:
        job = store.start_job("run", "run", None, None, "555000000001", "Dr A", {})
        other = Store(tmp_path / "practice.sqlite")       # another process, another panel
        try:
            assert other.running_job().id == job.id
            other.ask(job.id, "close", "555000000002", "Sam Clerk")
            with pytest.raises(ValueError, match="stop, close, cancel"):
                other.ask(job.id, "explode", "555000000002", "Sam Clerk")
        finally:
            other.close()
        assert store.take_requests(job.id) == [("close", "555000000002", "Sam Clerk")]
        assert store.take_requests(job.id) == []            # each seen once
    finally:
        first.release()
    assert store.running_job() is None


# --- deferred moves, collapsed ------------------------------------------------------------------

PATIENTS = [(f"Q{n}", f"Q{n}", f"99900000{n:02d}", n + 1, None, False) for n in range(1, 9)]


def stored_state(store: Store) -> tuple[list[tuple], list[tuple]]:
    """What a reader sees: patients and messages, without the moments they were written."""
    store.flush()
    patients = store.db.execute(
        "SELECT pkey, state, reason, message_id, chain_id, ack_event_id, ack_message_id "
        "FROM patients ORDER BY pkey").fetchall()
    messages = [row[:-1] + (zlib.decompress(row[-1]) if row[-1] is not None else None,)
                for row in store.db.execute(
                    "SELECT message_id, pkey, state, poll_url, post_attempts, ack_type, ack_codes, "
                    "failure_code, transmitted_at IS NULL, acked_at IS NULL, ack_body "
                    "FROM messages ORDER BY message_id")]
    return patients, messages


def play(store: Store, one_at_a_time: bool) -> None:
    """One story of a job's moves, interleaved across patients. ``one_at_a_time`` writes every
    move on its own, as the store did before moves were collapsed; else they wait for flushes."""

    def move(name: str, *args: object) -> None:
        getattr(store, name)(*args)
        if one_at_a_time:
            store.flush()

    job = store.start_job("run", "run", None, None, "555000000001", "Dr A", {})
    store.queue_messages(job.id, job.chain_id, [(f"Q{n}", f"M{n}", f"E{n}", None, "text/xml",
                                                 f"<summary n='{n}'/>".encode())
                                                for n in range(1, 8)])
    for n in range(1, 7):
        move("mark_sending", f"M{n}")
    for n in (2, 3, 4, 6):
        move("mark_transmitted", f"M{n}", f"/poll/{n}", 1)
    store.flush()                          # the engine's flusher: Q2, Q3, Q4, Q6 transmitted
    move("unsend", "M5")                   # the session ended before its POST
    move("mark_sending", "M7")             # M7's whole way in one write
    move("mark_transmitted", "M7", "/poll/7", 1)
    move("mark_acknowledged", "M7", "E7")
    move("mark_sending", "M5")
    move("mark_transmitted", "M5", "/poll/5", 2)
    move("mark_transmitted", "M1", "/poll/1", 1)
    move("mark_acknowledged", "M1", "E1")
    move("mark_failed", "M2", "30418", "AE", ("30418",), b"<ack code='30418'/>")
    move("mark_failed", "M3", "ack_timeout")
    move("mark_failed", "M4", "ack_timeout")
    # Q3 gets a new message while M3's failure may be deferred (written first, or transmitted ->
    # queued would be refused); M3's late ack then is history
    store.queue_messages(job.id, job.chain_id, [("Q3", "M8", "E8", None, "text/xml", b"<new/>")])
    move("mark_sending", "M8")
    move("mark_acknowledged", "M3", "E3")
    # M4 failed and is sent again with its own id
    store.requeue("Q4", "M4", job.id, job.chain_id)
    move("mark_sending", "M4")
    move("mark_transmitted", "M4", "/poll/4b", 1)
    move("mark_acknowledged", "M4", "E4")
    move("mark_existing_at_spine", "M6", ("30134",), b"<ack code='30134'/>")
    store.flush()


def test_collapsed_moves_end_where_moves_one_at_a_time_did(tmp_path):
    results = []
    for one_at_a_time in (True, False):
        store = Store(tmp_path / f"{one_at_a_time}.sqlite")
        store.sync_patients(PATIENTS)
        try:
            play(store, one_at_a_time)
            results.append(stored_state(store))
        finally:
            store.close()
    assert results[0] == results[1]
    patients, messages = results[1]
    assert {p[0]: p[1:4] for p in patients} == {
        "Q1": ("acknowledged", None, "M1"),
        "Q2": ("failed", "30418", "M2"),
        "Q3": ("sending", None, "M8"),                  # M3's late ack did not move it
        "Q4": ("acknowledged", None, "M4"),
        "Q5": ("transmitted", None, "M5"),
        "Q6": ("not_required", "existing_summary_at_spine", "M6"),
        "Q7": ("acknowledged", None, "M7"),
        "Q8": ("unprocessed", None, None),
    }
    by_id = {m[0]: m for m in messages}
    assert by_id["M3"][2] == "acknowledged" and patients[2][5] is None   # message yes, patient no
    assert by_id["M4"][2:8] == ("acknowledged", "/poll/4b", 1, "AA", "", None)
    assert by_id["M5"][2:5] == ("transmitted", "/poll/5", 2)
    assert by_id["M2"][-1] == b"<ack code='30418'/>" and by_id["M6"][7] == "30134"


def test_moves_in_flight_wait_through_other_patients_queueing_and_collapse(store, tmp_path):
    job = store.start_job("run", "run", None, None, "555000000001", "Dr A", {})
    store.queue_messages(job.id, job.chain_id, [("P1", ID.format(1), ID.format(6), None, "x",
                                                 b"<one/>")])
    store.mark_sending(ID.format(1))
    store.record_attempt(ID.format(1), "post", 202, "")
    store.queue_messages(job.id, job.chain_id, [("P2", ID.format(2), ID.format(7), None, "x",
                                                 b"<two/>")])
    assert store.pending == 2                      # P1's move and attempt were not written
    store.mark_transmitted(ID.format(1), "/poll/1", 1)
    store.mark_acknowledged(ID.format(1), ID.format(6))
    assert store.pending == 2                      # three moves of one message: one entry
    other = sqlite3.connect(tmp_path / "practice.sqlite")
    try:
        assert other.execute("SELECT state FROM patients WHERE pkey = 'P1'").fetchone() == \
            ("queued",)
        store.flush()
        assert other.execute("SELECT state FROM patients WHERE pkey = 'P1'").fetchone() == \
            ("acknowledged",)
        assert other.execute("SELECT COUNT(*) FROM attempts").fetchone() == (1,)
    finally:
        other.close()


def test_each_event_keeps_its_own_moment_when_moves_are_collapsed(store, monkeypatch):
    from scr_nb.store import practice_store

    start = datetime(2026, 11, 23, 19, 0, tzinfo=timezone.utc)
    clock = {"ns": int(start.timestamp()) * 1_000_000_000}
    monkeypatch.setattr(practice_store, "time", SimpleNamespace(time_ns=lambda: clock["ns"]))
    queue_one(store)
    store.mark_sending(ID.format(1))
    clock["ns"] += 40_000_000
    store.mark_transmitted(ID.format(1), "/poll/1", 1)
    clock["ns"] += 250_000_000
    store.mark_acknowledged(ID.format(1), ID.format(6))
    clock["ns"] += 1_000_000_000
    store.flush()
    assert store.db.execute("SELECT transmitted_at, acked_at FROM messages").fetchone() == \
        ("2026-11-23T19:00:00.040+00:00", "2026-11-23T19:00:00.290+00:00")
    assert store.patient("P1")["updated_at"] == "2026-11-23T19:00:01.290+00:00"   # the flush


def test_an_illegal_step_of_a_collapsed_chain_raises_only_for_the_current_message(store):
    job_id = queue_one(store)
    store.mark_sending(ID.format(1))
    store.mark_transmitted(ID.format(1), "/poll/1", 1)
    store.mark_acknowledged(ID.format(1), ID.format(6))
    store.mark_transmitted(ID.format(1), "/poll/1", 2)       # after its ack: not allowed
    with pytest.raises(ValueError, match="cannot go from acknowledged to transmitted"):
        store.flush()
    assert store.patient("P1")["state"] == "queued" and store.message(ID.format(1)).state == \
        "queued" and store.pending == 0             # nothing of it written, and it is gone
    # the same chain for a message that is no longer its patient's current one is history
    store.queue_messages(job_id, job_id, [("P1", ID.format(2), ID.format(7), None, "x", b"<b/>")])
    store.mark_acknowledged(ID.format(1), ID.format(6))
    store.mark_transmitted(ID.format(1), "/poll/1", 2)
    store.flush()
    assert store.patient("P1")["message_id"] == ID.format(2)
    assert store.patient("P1")["state"] == "queued"
    assert store.message(ID.format(1)).state == "transmitted"


def test_a_batch_with_a_patient_that_cannot_be_queued_stores_nothing(store):
    job_id = queue_one(store)
    store.mark_sending(ID.format(1))
    store.mark_transmitted(ID.format(1), "/poll/1", 1)
    batch = [("P2", ID.format(2), ID.format(7), None, "x", b"<two/>"),
             ("P1", ID.format(3), ID.format(8), None, "x", b"<three/>")]
    with pytest.raises(ValueError, match="cannot go from transmitted to queued"):
        store.queue_messages(job_id, job_id, batch)
    assert store.message(ID.format(2)) is None and store.patient("P2")["state"] == "unprocessed"
    assert store.pending == 1                               # P1's moves were kept
    store.flush()
    assert store.patient("P1")["state"] == "transmitted"
    with pytest.raises(StoreError, match="no patient 'P9'"):
        store.queue_messages(job_id, job_id, [("P9", ID.format(4), ID.format(9), None, "x",
                                               b"<four/>")])
    assert store.message(ID.format(4)) is None


def test_bodies_read_back_the_same_from_new_and_older_stores(store):
    body = b"".join(f"<entry n='{n}'>amoxicillin {n * 7 % 13} mg</entry>".encode()
                    for n in range(400))
    job_id = queue_one(store)
    store.queue_messages(job_id, job_id, [("P2", ID.format(2), ID.format(7), None,
                                           "multipart/related", body)])
    stored = store.db.execute("SELECT body, size FROM messages WHERE message_id = ?",
                              (ID.format(2),)).fetchone()
    assert zlib.decompress(stored[0]) == body and stored[1] == len(body)
    assert len(stored[0]) * 2 < len(body)                   # kept compressed
    assert store.message(ID.format(2)).body == body
    store.mark_sending(ID.format(2))
    store.mark_failed(ID.format(2), "30418", "AE", ("30418",), b"<ack/>")
    store.flush()
    assert queries.ack_text(store, ID.format(2)) == b"<ack/>"
    assert queries.message_text(store, ID.format(2))[0] == body
    # a store written before keeps zlib level 1 bodies: read the same
    store.db.execute("UPDATE messages SET body = ? WHERE message_id = ?",
                     (zlib.compress(body, 1), ID.format(2)))
    assert store.message(ID.format(2)).body == body
