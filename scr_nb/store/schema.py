"""The store's tables, their migrations, and the one way to open a store for writing (a job) or
for reading alongside a running job (status, panels, reports, the support desk).

The tables are declared once with SQLAlchemy Core and created the same on SQLite and PostgreSQL
(BLOB there, BYTEA here). Every key begins with the practice's ODS code, so one PostgreSQL database
holds a fleet's practices side by side and an SQLite file holds one.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import (Column, Float, Index, Integer, LargeBinary, MetaData, PrimaryKeyConstraint,
                        Table, Text, text)

from scr_nb.errors import StoreError
from scr_nb.private_files import create_private
from scr_nb.store.database import Database, DatabaseError, Location

SCHEMA_VERSION = "6"
TABLES = MetaData()
Table("meta", TABLES,                                 # the database's own facts: its schema
      Column("key", Text, primary_key=True), Column("value", Text))
Table("practice_meta", TABLES,                        # a practice's facts: its extract's fingerprint
      Column("ods", Text, nullable=False), Column("key", Text, nullable=False),
      Column("value", Text), PrimaryKeyConstraint("ods", "key"))
patients = Table(
    "patients", TABLES,
    Column("ods", Text, nullable=False), Column("pkey", Text, nullable=False),
    Column("patient_id", Text, nullable=False), Column("nhs_number", Text, nullable=False),
    Column("source_row", Integer, nullable=False), Column("eligibility", Text),
    Column("dissent", Integer, nullable=False, server_default=text("0")),
    Column("state", Text, nullable=False), Column("reason", Text), Column("message_id", Text),
    Column("chain_id", Integer), Column("ack_event_id", Text), Column("ack_message_id", Text),
    Column("updated_at", Text, nullable=False),
    PrimaryKeyConstraint("ods", "pkey"))
# Resume's first message at once on a large store: the work of one state read in extract order
# without a sort, messages built and never posted found without reading every unprocessed
# patient, and the eligible counted without reading every row.
Index("ix_patients_patient_id", patients.c.ods, patients.c.patient_id)
Index("ix_patients_state_row", patients.c.ods, patients.c.state, patients.c.source_row)
Index("ix_patients_source_row", patients.c.ods, patients.c.source_row)
Index("ix_patients_eligibility", patients.c.ods, patients.c.eligibility)
_UNSENT = text("state = 'unprocessed' AND message_id IS NOT NULL")
Index("ix_patients_unsent", patients.c.ods, patients.c.chain_id, patients.c.source_row,
      sqlite_where=_UNSENT, postgresql_where=_UNSENT)
messages = Table(
    "messages", TABLES,
    Column("ods", Text, nullable=False), Column("message_id", Text, nullable=False),
    Column("pkey", Text, nullable=False), Column("job_id", Integer, nullable=False),
    Column("event_id", Text, nullable=False), Column("prior_event_id", Text),
    Column("created_at", Text, nullable=False), Column("size", Integer, nullable=False),
    Column("content_type", Text), Column("body", LargeBinary), Column("state", Text, nullable=False),
    Column("poll_url", Text),
    Column("post_attempts", Integer, nullable=False, server_default=text("0")),
    Column("transmitted_at", Text), Column("acked_at", Text), Column("ack_type", Text),
    Column("ack_codes", Text), Column("failure_code", Text), Column("ack_body", LargeBinary),
    PrimaryKeyConstraint("ods", "message_id"))
Index("ix_messages_pkey", messages.c.ods, messages.c.pkey)
attempts = Table(
    "attempts", TABLES,
    Column("ods", Text, nullable=False), Column("id", Integer, nullable=False, autoincrement=False),
    Column("message_id", Text, nullable=False), Column("at", Text, nullable=False),
    Column("kind", Text, nullable=False), Column("http_status", Integer), Column("detail", Text),
    PrimaryKeyConstraint("ods", "id"))
Index("ix_attempts_message", attempts.c.ods, attempts.c.message_id)
Table("jobs", TABLES,
      Column("ods", Text, nullable=False), Column("id", Integer, nullable=False, autoincrement=False),
      Column("chain_id", Integer), Column("mode", Text, nullable=False),
      Column("chain_mode", Text, nullable=False), Column("group_name", Text),
      Column("status", Text, nullable=False), Column("reason", Text), Column("user_id", Text),
      Column("user_name", Text), Column("started_at", Text, nullable=False),
      Column("ended_at", Text), Column("settings", Text), Column("totals", Text),
      PrimaryKeyConstraint("ods", "id"))
Table("groups", TABLES,
      Column("ods", Text, nullable=False), Column("group_name", Text, nullable=False),
      Column("patient_id", Text, nullable=False), Column("source", Text, nullable=False),
      PrimaryKeyConstraint("ods", "group_name", "patient_id"))
Table("job_lock", TABLES,                             # who runs the practice's job now (SPEC 8)
      Column("ods", Text, nullable=False), Column("user_id", Text, nullable=False),
      Column("user_name", Text, nullable=False), Column("host", Text, nullable=False),
      Column("pid", Integer, nullable=False), Column("since", Text, nullable=False),
      Column("heartbeat", Float, nullable=False), Column("token", Text, nullable=False),
      Column("started", Text), Column("beat", Integer, nullable=False, server_default=text("0")),
      PrimaryKeyConstraint("ods"))
Table("control_requests", TABLES,                     # Stop, Stop and Close, Cancel from anywhere
      Column("ods", Text, nullable=False), Column("id", Integer, nullable=False, autoincrement=False),
      Column("job_id", Integer, nullable=False), Column("request", Text, nullable=False),
      Column("user_id", Text, nullable=False), Column("user_name", Text, nullable=False),
      Column("asked_at", Text, nullable=False), Column("seen_at", Text),
      PrimaryKeyConstraint("ods", "id"))
Table("practice_log", TABLES,                         # the practice log, in a PostgreSQL store
      Column("ods", Text, nullable=False), Column("id", Integer, nullable=False, autoincrement=False),
      Column("at", Text, nullable=False), Column("event", Text, nullable=False),
      Column("record", Text, nullable=False), PrimaryKeyConstraint("ods", "id"))
Table("fleet_rate", TABLES,                           # a fleet's one rate limit (SPEC 12)
      Column("fleet", Text, primary_key=True), Column("rate", Float, nullable=False),
      Column("next_at", Float, nullable=False))

# The tables of schema 1, as the first SQLite stores were made: stores of schema 1 to 5 are walked
# up the steps below (each lists the statements that take a store from the version before it to
# its own), and step 6 moves them into the tables above.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS patients (
    pkey TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL,
    nhs_number TEXT NOT NULL,
    source_row INTEGER NOT NULL,
    eligibility TEXT,
    dissent INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    reason TEXT,
    message_id TEXT,
    chain_id INTEGER,
    ack_event_id TEXT,
    ack_message_id TEXT,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS patients_state ON patients (state);
CREATE INDEX IF NOT EXISTS patients_patient_id ON patients (patient_id);
CREATE TABLE IF NOT EXISTS messages (
    message_id TEXT PRIMARY KEY,
    pkey TEXT NOT NULL,
    job_id INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    prior_event_id TEXT,
    created_at TEXT NOT NULL,
    size INTEGER NOT NULL,
    content_type TEXT,
    body BLOB,
    state TEXT NOT NULL,
    poll_url TEXT,
    post_attempts INTEGER NOT NULL DEFAULT 0,
    transmitted_at TEXT,
    acked_at TEXT,
    ack_type TEXT,
    ack_codes TEXT,
    failure_code TEXT,
    ack_body BLOB
);
CREATE INDEX IF NOT EXISTS messages_pkey ON messages (pkey);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL,
    at TEXT NOT NULL,
    kind TEXT NOT NULL,
    http_status INTEGER,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS attempts_message ON attempts (message_id);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    chain_id INTEGER,
    mode TEXT NOT NULL,
    chain_mode TEXT NOT NULL,
    group_name TEXT,
    status TEXT NOT NULL,
    reason TEXT,
    user_id TEXT,
    user_name TEXT,
    started_at TEXT NOT NULL,
    ended_at TEXT,
    settings TEXT,
    totals TEXT
);
CREATE TABLE IF NOT EXISTS groups (
    group_name TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    source TEXT NOT NULL,
    PRIMARY KEY (group_name, patient_id)
);
CREATE TABLE IF NOT EXISTS job_lock (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    user_id TEXT NOT NULL,
    user_name TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    since TEXT NOT NULL,
    heartbeat REAL NOT NULL,
    token TEXT NOT NULL
);
"""
MIGRATIONS: dict[str, tuple[str, ...]] = {
    # the lock's holder: its process start (pid reuse) and a beat counter (skew-free heartbeats)
    "2": ("ALTER TABLE job_lock ADD COLUMN started TEXT",
          "ALTER TABLE job_lock ADD COLUMN beat INTEGER NOT NULL DEFAULT 0"),
    # Stop, Stop and Close and Cancel asked from anywhere that can open the store (SPEC 8)
    "3": ("CREATE TABLE IF NOT EXISTS control_requests (id INTEGER PRIMARY KEY, "
          "job_id INTEGER NOT NULL, request TEXT NOT NULL, user_id TEXT NOT NULL, "
          "user_name TEXT NOT NULL, asked_at TEXT NOT NULL, seen_at TEXT)",),
    # a job's work read a page at a time in extract order, not sorted whole before the first send
    "4": ("CREATE INDEX IF NOT EXISTS patients_source_row ON patients (source_row)",),
    # Resume's first message at once on a large store: the work of one state read in extract
    # order without a sort, messages built and never posted found without reading every
    # unprocessed patient, and the eligible counted without reading every row
    "5": ("DROP INDEX IF EXISTS patients_state",
          "CREATE INDEX IF NOT EXISTS patients_state_row ON patients (state, source_row)",
          "CREATE INDEX IF NOT EXISTS patients_unsent ON patients (chain_id, source_row) "
          "WHERE state = 'unprocessed' AND message_id IS NOT NULL",
          "CREATE INDEX IF NOT EXISTS patients_eligibility ON patients (eligibility)"),
    # the practice first in every key, so a PostgreSQL database holds many: _to_practice_keys
    "6": (),
}




_V5_COLUMNS = {
    "patients": "pkey, patient_id, nhs_number, source_row, eligibility, dissent, state, reason, "
                "message_id, chain_id, ack_event_id, ack_message_id, updated_at",
    "messages": "message_id, pkey, job_id, event_id, prior_event_id, created_at, size, "
                "content_type, body, state, poll_url, post_attempts, transmitted_at, acked_at, "
                "ack_type, ack_codes, failure_code, ack_body",
    "attempts": "id, message_id, at, kind, http_status, detail",
    "jobs": "id, chain_id, mode, chain_mode, group_name, status, reason, user_id, user_name, "
            "started_at, ended_at, settings, totals",
    "groups": "group_name, patient_id, source",
    "job_lock": "user_id, user_name, host, pid, since, heartbeat, token, started, beat",
    "control_requests": "id, job_id, request, user_id, user_name, asked_at, seen_at",
}


def _to_practice_keys(db: Database) -> None:
    """Step 6: the tables of one SQLite practice moved under keys that begin with the practice.
    The practice is not known yet ('' for now): the first job that knows it names it."""
    for table in _V5_COLUMNS:
        db.execute(f"ALTER TABLE {table} RENAME TO {table}_v5")
    TABLES.create_all(db.conn)
    for table, columns in _V5_COLUMNS.items():
        db.execute(f"INSERT INTO {table} (ods, {columns}) SELECT '', {columns} FROM {table}_v5")
        db.execute(f"DROP TABLE {table}_v5")
    db.execute("INSERT INTO practice_meta SELECT '', key, value FROM meta WHERE key != 'schema'")
    db.execute("DELETE FROM meta WHERE key != 'schema'")


def _schema_version(db: Database) -> str | None:
    try:
        return db.scalar("SELECT value FROM meta WHERE key = 'schema'")
    except DatabaseError as err:   # no meta table: a new store; anything else is an error
        words = _words(err)
        if ("no such table" not in words and "does not exist" not in words) or \
                (db.in_transaction and db.dialect == "postgresql"):
            raise
        return None


def _check_version(label: str, version: str | None) -> None:
    if version is None:
        raise StoreError(f"{label}: no scr-nb store here yet (no upload has written to it)")
    if version != SCHEMA_VERSION:
        raise StoreError(f"{label}: store schema {version} is not {SCHEMA_VERSION}; "
                         "use the scr-nb version that wrote it")


def _create(db: Database) -> None:
    """A new store's tables, at the current version. On PostgreSQL the database may be new to
    several workers at once: a transaction-scoped advisory lock lets one create, the others wait
    and find the tables made."""
    db.begin()
    try:
        if db.dialect == "postgresql":
            db.execute("SELECT pg_advisory_xact_lock(?, ?)", _CREATE_LOCK)
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        if _schema_version(db) is None:
            TABLES.create_all(db.conn)
            db.execute("INSERT INTO meta (key, value) VALUES ('schema', ?) "
                       "ON CONFLICT (key) DO NOTHING", (SCHEMA_VERSION,))
        db.commit()
    except BaseException:
        db.rollback()
        raise


# The kit's own advisory lock for schema work, in the two-number key space (pg_locks' objsubid 2),
# apart from the practices' one-number keys (practice_lock_key).
_CREATE_LOCK = (5_432_010, 6)


def _migrate(db: Database, version: str) -> str:
    """Walk a store up to SCHEMA_VERSION, one step a transaction (a PostgreSQL store starts at
    6; the steps before are SQLite's). On PostgreSQL the step waits on the same advisory lock as
    a creation, so of several workers opening an older database one walks it."""
    while version != SCHEMA_VERSION and str(int(version) + 1) in MIGRATIONS:
        step = str(int(version) + 1)
        db.begin()
        try:
            if db.dialect == "postgresql":
                db.execute("SELECT pg_advisory_xact_lock(?, ?)", _CREATE_LOCK)
            if _schema_version(db) == version:   # another process may have walked it meanwhile
                if step == "6":
                    _to_practice_keys(db)
                else:
                    for statement in MIGRATIONS[step]:
                        db.execute(statement)
                db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (step,))
            db.commit()
        except BaseException:
            db.rollback()
            raise
        version = _schema_version(db)
    return version


def open_database(location: Location, readonly: bool = False) -> Database:
    """Open a store: for the one job that writes to it (created when new; an SQLite file mode
    0600, since it holds patient data), or read-only alongside it: no schema work, no writes, no
    waiting on the writer."""
    if location.path is not None:
        if readonly and (not str(location.path) or not location.path.is_file()):
            raise StoreError(f"{location.path}: no such store")
        if not readonly:
            create_private(location.path)   # it holds patient data: the owner's alone
    db = Database(location, readonly=readonly)
    try:
        version = _schema_version(db)
        if readonly and location.path is not None and version in {"1", *MIGRATIONS} \
                and version != SCHEMA_VERSION:
            # an SQLite store of an older kit: brought up to date once (a job would do the
            # same), then read as it is now
            db.close()
            open_database(location).close()
            db = Database(location, readonly=True)
            version = _schema_version(db)
        if not readonly:
            if version is None:
                _create(db)
                version = _schema_version(db)
            elif version.isdigit():
                version = _migrate(db, version)
        _check_version(location.label, version)
    except DatabaseError as err:
        db.close()
        raise StoreError(f"{location.label}: not a usable scr-nb store ({_words(err)})") from None
    except BaseException:
        db.close()
        raise
    if location.path is not None and not readonly:
        for suffix in ("-wal", "-shm"):
            side = Path(str(location.path) + suffix)
            if side.exists():
                os.chmod(side, 0o600)
    return db


def _words(err: Exception) -> str:
    return str(getattr(err, "orig", err)).strip().splitlines()[0]
