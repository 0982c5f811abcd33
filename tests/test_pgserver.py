"""The throwaway PostgreSQL server the store's tests run against: it answers, it is reachable from
this machine only, each test gets a database of its own, and advisory locks (how the store lets one
worker create its tables while the others wait) behave as the product expects."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import psycopg
import pytest

from tests import pgserver
from tests.pgserver import PostgresServer, PostgresUnavailable, find_bindir

LOCK_KEY = 4_242_001


def test_server_answers(pg_url):
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SHOW server_encoding").fetchone() == ("UTF8",)


def _listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on ``port``, read from /proc/net (hex,
    little-endian for IPv4)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:   # 0A: LISTEN
                found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]) if len(address) == 8
                          else address)
    return found


def test_listens_on_loopback_only(postgres_server):
    assert _listening_addresses(postgres_server.port) == {"127.0.0.1"}
    with psycopg.connect(postgres_server.url()) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        # its Unix socket is in its own folder, not beside a system cluster's
        assert conn.execute("SHOW unix_socket_directories").fetchone() == (
            str(postgres_server.folder),)


def test_each_database_is_separate(postgres_server, pg_url):
    with postgres_server.fresh_database("another") as other_url:
        assert other_url != pg_url
        with psycopg.connect(pg_url, autocommit=True) as mine, \
                psycopg.connect(other_url, autocommit=True) as theirs:
            mine.execute("CREATE TABLE patients (nhs_number text)")
            mine.execute("INSERT INTO patients VALUES ('9990000018')")
            assert theirs.execute("SELECT to_regclass('patients')").fetchone() == (None,)
            theirs.execute("CREATE TABLE patients (nhs_number text)")
            assert theirs.execute("SELECT count(*) FROM patients").fetchone() == (0,)
            assert mine.execute("SELECT count(*) FROM patients").fetchone() == (1,)


def _database_exists(server: PostgresServer, name: str) -> bool:
    with psycopg.connect(server.url()) as conn:
        return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() \
            is not None


def test_fresh_database_dropped_even_with_a_connection_left_open(postgres_server):
    with postgres_server.fresh_database("left open") as url:
        name = url.rsplit("/", 1)[1]
        left_open = psycopg.connect(url)
        assert _database_exists(postgres_server, name)
    assert not _database_exists(postgres_server, name)
    with pytest.raises(psycopg.OperationalError):
        left_open.execute("SELECT 1")
    left_open.close()


def _try_lock(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()[0]


def test_advisory_lock_is_refused_to_another_connection_until_the_holder_closes(pg_url):
    holder = psycopg.connect(pg_url, autocommit=True)
    with psycopg.connect(pg_url, autocommit=True) as other:
        assert _try_lock(holder)
        assert not _try_lock(other)
        assert not _try_lock(other)           # asking again does not take it either
        holder.close()
        # the server releases the lock when the holder's backend has exited, a moment after the
        # client closed: wait for that, up to a generous bound
        deadline = time.monotonic() + 10
        while not _try_lock(other):
            assert time.monotonic() < deadline, "the lock outlived its connection"
            time.sleep(0.02)


def test_transaction_advisory_lock_is_released_at_commit(pg_url):
    with psycopg.connect(pg_url) as first, psycopg.connect(pg_url) as second:
        query = "SELECT pg_try_advisory_xact_lock(%s)"
        assert first.execute(query, (LOCK_KEY,)).fetchone() == (True,)
        assert second.execute(query, (LOCK_KEY,)).fetchone() == (False,)
        second.rollback()
        first.commit()
        assert second.execute(query, (LOCK_KEY,)).fetchone() == (True,)


def test_stop_leaves_no_process_and_no_files():
    server = PostgresServer().start()
    folder, port = server.folder, server.port
    pid = int((folder / "data" / "postmaster.pid").read_text().split()[0])
    server.stop()
    assert not folder.exists()
    state = Path(f"/proc/{pid}/stat")
    # gone, or dead and waiting for its new parent (init) to collect it
    assert not state.exists() or state.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    server.stop()                              # a second stop is harmless


def test_a_port_taken_after_the_pick_is_given_up_for_another(monkeypatch):
    kernel_pick = pgserver.free_loopback_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        picks = iter([taken])                  # the first pick is lost to the squatter
        monkeypatch.setattr(pgserver, "free_loopback_port", lambda: next(picks, None) or
                            kernel_pick())
        with PostgresServer() as server:
            assert server.port != taken
            with psycopg.connect(server.url()) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)


def test_newest_debian_version_is_used(tmp_path):
    for version, programs in {"9.6": ["initdb", "pg_ctl"], "16": ["initdb", "pg_ctl"],
                              "17": ["initdb"], "15": ["initdb", "pg_ctl"]}.items():
        (tmp_path / version / "bin").mkdir(parents=True)
        for program in programs:
            (tmp_path / version / "bin" / program).touch(mode=0o755)
    assert find_bindir(tmp_path) == tmp_path / "16" / "bin"   # 17 has no pg_ctl


def test_missing_binaries_are_named_with_the_remedy(tmp_path):
    with pytest.raises(PostgresUnavailable) as raised:
        find_bindir(tmp_path)
    message = str(raised.value)
    assert "initdb" in message and "pg_ctl" in message
    assert "scripts/test.sh" in message and "postgresql" in message
