"""Where a store lives and the one connection a store object talks through (SPEC 10's ``--store``).

A store is an SQLite file (the embedded default: one practice a file) or a PostgreSQL database
(``postgresql://...``: many practices, each named by its ODS code). Both are reached through
SQLAlchemy Core: statements are written once, in SQL both databases read (``ON CONFLICT``,
``RETURNING``, ``IS [NOT] DISTINCT FROM``), with ``?`` for each value, bound by SQLAlchemy in the
style of each driver (sqlite3, psycopg 3).

Transactions are begun and ended by the store itself (``begin``, ``commit``, ``rollback``): on
SQLite ``BEGIN IMMEDIATE``, so a writer holds the file from its first statement, as the kit always
did; reads outside a transaction see the latest commit. A job writes its state moves on a thread
of its own, off the event loop: ``lock`` lets one thread at a time use the connection, and a
transaction holds it from its BEGIN to its end.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import NullPool, create_engine, event, text
from sqlalchemy.engine import Connection, Result
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from scr_nb.errors import StoreError

# What any statement may raise when the database refuses it or cannot be reached.
DatabaseError = SQLAlchemyError
POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")
_MARK = re.compile(r"\?(\d*)")


def is_database_url(location: object) -> bool:
    return isinstance(location, str) and location.startswith(POSTGRES_SCHEMES)


@dataclass(frozen=True)
class Location:
    """A store: an SQLite file, or a PostgreSQL URL and the practice (ODS code) within it."""

    url: str                  # the SQLAlchemy URL, password included: never printed
    path: Path | None         # the SQLite file; None for PostgreSQL
    ods: str | None           # the practice; required with PostgreSQL

    @classmethod
    def of(cls, store: str | Path | Location, ods: str | None = None) -> Location:
        if isinstance(store, Location):
            return store if ods is None or ods == store.ods else cls(store.url, store.path, ods)
        if is_database_url(store):
            store, named = _without_ods(str(store))
            ods = ods or named
            if not ods:
                raise StoreError(f"{redact(str(store))}: a PostgreSQL store holds many practices; "
                                 "name one with --ods CODE")
            scheme, rest = str(store).split("://", 1)
            return cls(f"postgresql+psycopg://{rest}", None, ods.strip().upper())
        path = Path(store)
        if not str(store) or str(store).startswith(("sqlite:", "mysql", "oracle", "mssql")):
            raise StoreError(f"{store!r}: --store is a file path or a postgresql:// URL")
        return cls(f"sqlite:///{path}", path, ods.strip().upper() if ods else None)

    @classmethod
    def database(cls, url: str) -> Location:
        """A PostgreSQL store as a whole, no practice named (to list its practices)."""
        base, _ = _without_ods(url)
        return cls(f"postgresql+psycopg://{base.split('://', 1)[1]}", None, None)

    @property
    def is_postgres(self) -> bool:
        return self.path is None

    @property
    def label(self) -> str:
        """How the store is named in messages: the file, or the database and practice, never
        the password."""
        if self.path is not None:
            return str(self.path)
        return redact(self.url) + (f" practice {self.ods}" if self.ods else "")

    def sibling(self, suffix: str) -> Path:
        """A file kept beside an SQLite store, or for a PostgreSQL practice in this machine's
        cache folder (``SCR_NB_CACHE``, else ``~/.cache/scr-nb``): the extract index, which any
        worker rebuilds from the extract when it has none."""
        if self.path is not None:
            return Path(str(self.path) + suffix)
        parts = urlsplit(self.url)
        where = f"{parts.hostname or 'local'}-{parts.port or 5432}-{parts.path.strip('/')}"
        base = Path(os.environ.get("SCR_NB_CACHE") or Path.home() / ".cache" / "scr-nb")
        return base / re.sub(r"[^A-Za-z0-9._-]", "_", where) / f"{self.ods}{suffix}"


def _without_ods(url: str) -> tuple[str, str | None]:
    """A URL may name its practice itself (``postgresql://host/db?ods=A12345``), so one string
    names a practice's store wherever a single value is asked for (a notebook's ``store``)."""
    parts = urlsplit(url)
    query = [pair for pair in parts.query.split("&") if pair]
    named = [pair.split("=", 1)[1] for pair in query if pair.startswith("ods=")]
    rest = "&".join(pair for pair in query if not pair.startswith("ods="))
    return urlunsplit(parts._replace(query=rest)), (named[-1] if named else None)


def practice_url(url: str, ods: str) -> str:
    """The one string naming practice ``ods`` of the PostgreSQL store at ``url``."""
    base, _ = _without_ods(url)
    return f"{base}{'&' if '?' in base else '?'}ods={ods}"


_ODS_DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def practice_lock_key(ods: str) -> int:
    """The PostgreSQL advisory lock key of a practice's job (a signed 64-bit number). An ODS code
    of up to twelve letters and digits is read as a number in base 37, so no two codes share a
    key; any other code is hashed."""
    code = ods.upper()
    if 0 < len(code) <= 12 and all(c in _ODS_DIGITS for c in code):
        key = 0
        for c in code:
            key = key * 37 + _ODS_DIGITS.index(c) + 1
        return key   # below 37**12 < 2**63
    digest = hashlib.blake2b(code.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def redact(url: str) -> str:
    """A database URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url.replace("+psycopg", "")
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc)).replace("+psycopg", "")


@functools.lru_cache(maxsize=2048)
def _statement(sql: str):
    """``sql`` with ``?`` (or ``?N``, the Nth value) as SQLAlchemy binds ``:pN``."""
    count = 0

    def bind(match: re.Match) -> str:
        nonlocal count
        if match.group(1):
            return f":p{match.group(1)}"
        count += 1
        return f":p{count}"

    return text(_MARK.sub(bind, sql))


def _binds(args: Sequence | Mapping) -> dict:
    if isinstance(args, Mapping):
        return dict(args)
    return {f"p{i}": value for i, value in enumerate(args, 1)}


def _sqlite_connect(path: Path, readonly: bool):
    if readonly:
        return f"sqlite:///file:{path.resolve()}?mode=ro&uri=true"
    return f"sqlite:///{path}"


class Database:
    """One connection to a store's database, used by one store object (and its thread pool)."""

    def __init__(self, location: Location, readonly: bool = False):
        self.location = location
        self.readonly = readonly
        if location.is_postgres:
            self.dialect = "postgresql"
            # Keepalives both ways: a job whose machine vanished is found dead by the server in
            # about 25 s, and its advisory lock freed for the worker that resumes its practice.
            engine = create_engine(location.url, poolclass=NullPool, connect_args={
                "connect_timeout": 10, "application_name": "scr-nb", "keepalives": 1,
                "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
                "options": "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 "
                           "-c tcp_keepalives_count=3"})
        else:
            self.dialect = "sqlite"
            engine = create_engine(_sqlite_connect(location.path, readonly), poolclass=NullPool,
                                   connect_args={"timeout": 30, "check_same_thread": False})
            if not readonly:
                event.listen(engine, "connect", _sqlite_pragmas)
        self.engine = engine
        try:
            self.conn: Connection = engine.connect().execution_options(
                isolation_level="AUTOCOMMIT")
        except DBAPIError as err:
            engine.dispose()
            raise StoreError(f"{location.label}: the store cannot be opened "
                             f"({_reason(err)})") from None
        self.in_transaction = False
        self.lock = threading.RLock()

    # --- statements -------------------------------------------------------------------------

    def execute(self, sql: str, args: Sequence | Mapping = ()) -> Result:
        """Run ``sql``; its rows, if it returns any, are read before the connection is let go,
        so another thread may use it while the caller reads them."""
        with self.lock:
            result = self.conn.execute(_statement(sql), _binds(args))
            return result.freeze()() if result.returns_rows else result

    def executemany(self, sql: str, rows: Iterable[Sequence]) -> int:
        """Run ``sql`` once for each row, as one batch; returns the rows it changed."""
        batch = [_binds(row) for row in rows]
        if not batch:
            return 0
        with self.lock:
            return self.conn.execute(_statement(sql), batch).rowcount

    def scalar(self, sql: str, args: Sequence | Mapping = ()) -> object:
        with self.lock:
            return self.execute(sql, args).scalar()

    def rows(self, sql: str, args: Sequence | Mapping = ()) -> list[tuple]:
        with self.lock:
            return [tuple(row) for row in self.execute(sql, args)]

    def pairs(self, sql: str, args: Sequence | Mapping = ()) -> dict:
        """A query of two columns as {first: second}."""
        with self.lock:
            return {row[0]: row[1] for row in self.execute(sql, args)}

    def record(self, sql: str, args: Sequence | Mapping = ()) -> dict | None:
        """The first row as {column: value}, or None."""
        with self.lock:
            row = self.execute(sql, args).mappings().first()
        return dict(row) if row is not None else None

    # --- transactions -----------------------------------------------------------------------

    def begin(self) -> None:
        with self.lock:
            self.conn.exec_driver_sql("BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN")
            self.in_transaction = True

    def commit(self) -> None:
        with self.lock:
            self.conn.exec_driver_sql("COMMIT")
            self.in_transaction = False

    def rollback(self) -> None:
        with self.lock:
            try:
                self.conn.exec_driver_sql("ROLLBACK")
            except SQLAlchemyError:
                pass   # nothing was begun (a COMMIT that failed on SQLite may end it already),
                       # or the connection is gone, and its transaction with it
            self.in_transaction = False

    def close(self) -> None:
        try:
            self.conn.close()
        finally:
            self.engine.dispose()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: every commit reaches the disk before it returns, so the commit that stores a
    # message id before its POST survives a power cut or an OS crash, not only a crash of the
    # kit (NORMAL in WAL mode may lose the last commits). benchmarks/ measures the cost.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _reason(err: DBAPIError) -> str:
    """The database's own words for a failure, without SQLAlchemy's statement dump."""
    return str(getattr(err, "orig", err)).strip().splitlines()[0] if str(err) else type(err).__name__


__all__ = ["Database", "DatabaseError", "Location", "is_database_url", "practice_lock_key",
           "practice_url", "redact"]
