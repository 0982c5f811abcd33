"""The store on its own: the state machine on every move, ids committed before sending, durable
commits that roll back whole, migrations, read-only readers, owner-only files, and the lock."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from datetime import datetime, timezone

import pytest

from scr_nb.errors import RefusedError, StoreError
from scr_nb.store import lock
from scr_nb.store.lock import StoreLock, break_lock, process_start, read_holder
from scr_nb.store.practice_store import Store, read_status
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
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.db.execute("DELETE FROM patients")
    finally:
        reader.close()
    assert read_status(tmp_path / "practice.sqlite")["not_required_by_reason"]["no_nhs_number"] == 1
    with pytest.raises(StoreError, match="no such store"):
        Store(tmp_path / "nothing.sqlite", readonly=True)


def test_an_older_store_is_walked_up_to_the_current_schema(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    from scr_nb.store.schema import SCHEMA
    db.executescript(SCHEMA)
    db.execute("INSERT INTO meta VALUES ('schema', '1')")
    db.commit()
    db.close()
    assert read_status(path)["counters"]["sent"] == 0       # readers read it as it is
    opened = Store(path)
    try:
        assert opened.db.execute("SELECT value FROM meta").fetchone()[0] == SCHEMA_VERSION
        columns = {r[1] for r in opened.db.execute("PRAGMA table_info(job_lock)")}
        assert {"started", "beat"} <= columns
    finally:
        opened.close()


# --- the lock -----------------------------------------------------------------------------------

def insert_holder(store: Store, **fields) -> None:
    row = {"user_id": "555000000009", "user_name": "Pat Other", "host": "another-host",
           "pid": 4242, "since": "2026-11-20T19:00:00+00:00", "heartbeat": 0.0,
           "token": "theirs", "started": "boot:1", "beat": 3, **fields}
    with store.transaction() as db:
        db.execute(f"INSERT INTO job_lock (id, {', '.join(row)}) VALUES "
                   f"(1, {', '.join('?' * len(row))})", tuple(row.values()))


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
    assert read_holder(store.db) is None


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
    assert holder.host == "another-host" and read_holder(store.db) is None
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
