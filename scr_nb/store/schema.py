"""The store's tables, and the one way to open a store file for writing (a job) or for reading
alongside a running job (status, panels, reports, the support desk).

Plain SQL with portable types (TEXT, INTEGER, BLOB) so the schema can move to PostgreSQL.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from scr_nb.errors import StoreError
from scr_nb.private_files import create_private

SCHEMA_VERSION = "5"
# What a read may raise while the job that creates a store is still writing its tables.
DatabaseError = sqlite3.Error
SCHEMA = """
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
# A new store is created at version 1 and walked up these steps, so an old store opened by a newer
# kit ends with the same tables as a new one. Each step lists the statements that take a store from
# the version before it to its own.
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
}


def _schema_version(db: sqlite3.Connection) -> str | None:
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    except sqlite3.OperationalError:   # no meta table: a new store
        return None
    return row[0] if row else None


def _check_version(path: Path, version: str | None, readable: bool = False) -> None:
    """A writer needs the current schema; a reader also reads the older ones it knows."""
    known = {"1", *MIGRATIONS} if readable else {SCHEMA_VERSION}
    if version not in known:
        raise StoreError(f"{path}: store schema {version} is not {SCHEMA_VERSION}; "
                         "use the scr-nb version that wrote it")


def _migrate(db: sqlite3.Connection, version: str) -> str:
    """Walk a store up to SCHEMA_VERSION, one step a transaction."""
    while version != SCHEMA_VERSION and str(int(version) + 1) in MIGRATIONS:
        step = str(int(version) + 1)
        db.execute("BEGIN IMMEDIATE")
        try:
            if _schema_version(db) == version:   # another process may have walked it meanwhile
                for statement in MIGRATIONS[step]:
                    db.execute(statement)
                db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (step,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        version = _schema_version(db)
    return version


def open_writable(path: Path) -> sqlite3.Connection:
    """Open (creating it, mode 0600) a store for the one job that writes to it."""
    create_private(path)   # it holds patient data: the owner's alone
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            db.execute("PRAGMA journal_mode=WAL")
        # FULL: every commit reaches the disk before it returns, so the commit that stores a
        # message id before its POST survives a power cut or an OS crash, not only a crash of the
        # kit (NORMAL in WAL mode may lose the last commits). benchmarks/ measures the cost.
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        version = _schema_version(db)
        if version is None:
            db.executescript(SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', '1')")
            version = _schema_version(db)
        if version is not None and version.isdigit():
            version = _migrate(db, version)
    except sqlite3.DatabaseError as err:
        raise StoreError(f"{path}: not a usable scr-nb store ({err})") from None
    _check_version(path, version)
    for suffix in ("-wal", "-shm"):
        side = Path(str(path) + suffix)
        if side.exists():
            os.chmod(side, 0o600)
    return db


def open_readonly(path: Path) -> sqlite3.Connection:
    """Open an existing store read-only: no schema work, no writes, no waiting on the writer."""
    if not str(path) or not path.is_file():
        raise StoreError(f"{path}: no such store")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                             isolation_level=None, check_same_thread=False, timeout=30)
        version = _schema_version(db)
    except sqlite3.Error as err:
        raise StoreError(f"{path}: not a usable scr-nb store ({err})") from None
    try:
        _check_version(path, version, readable=True)
    except StoreError:
        db.close()
        raise
    return db
