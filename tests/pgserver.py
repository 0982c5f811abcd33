"""A throwaway PostgreSQL server for the test suite: a fresh cluster in a temporary folder,
listening on 127.0.0.1 only, on a free port chosen at run time, removed when stopped.

It uses Debian's server binaries (``/usr/lib/postgresql/<version>/bin``); ``scripts/test.sh``
installs Debian's ``postgresql`` package when they are missing and it runs as root. initdb and the
server refuse to run as root, so a root process runs them as the ``postgres`` system user that the
package creates, in a folder owned by that user."""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql

DEBIAN_ROOT = Path("/usr/lib/postgresql")
SERVER_USER = "postgres"     # the superuser initdb makes, and, as root, the system user to run as
START_ATTEMPTS = 5           # fresh ports tried when another process takes the one picked
START_TIMEOUT_S = 60


class PostgresUnavailable(RuntimeError):
    """The throwaway server cannot be started; the message says what is missing and what to do."""


def find_bindir(root: Path = DEBIAN_ROOT) -> Path:
    """The newest ``<root>/<version>/bin`` holding both ``initdb`` and ``pg_ctl``."""
    found = [bindir for bindir in root.glob("*/bin")
             if all(os.access(bindir / program, os.X_OK) for program in ("initdb", "pg_ctl"))]
    if not found:
        raise PostgresUnavailable(
            f"no PostgreSQL server binaries: initdb and pg_ctl were not found under {root}/*/bin. "
            "Install Debian's postgresql package (scripts/test.sh does this when run as root: "
            "apt-get install postgresql).")
    return max(found, key=lambda bindir: _version_key(bindir.parent.name))


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name))


def free_loopback_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """One throwaway cluster. ``start()`` makes and starts it, ``stop()`` stops it at once and
    deletes every file of it; ``url(dbname)`` is how a client reaches it (trust authentication,
    user ``postgres``, no password)."""

    def __init__(self, bindir: Path | None = None) -> None:
        self._bindir = bindir
        self.folder: Path | None = None
        self.port: int | None = None

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> PostgresServer:
        if self.folder is not None:
            raise RuntimeError("this PostgresServer is already started")
        self._bindir = bindir = self._bindir or find_bindir()
        as_user = self._server_user()
        self.folder = Path(tempfile.mkdtemp(prefix="scr-nb-pg-", dir=self._temp_parent(as_user)))
        atexit.register(self.stop)
        try:
            if as_user is not None:
                os.chown(self.folder, as_user.pw_uid, as_user.pw_gid)
            self._run(as_user, [bindir / "initdb", "-D", self._data, "-A", "trust",
                                "-U", SERVER_USER, "--no-sync", "-E", "UTF8", "--locale=C"])
            self._listen(bindir, as_user)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server without a shutdown checkpoint (nothing of it is kept) and remove its
        folder. Safe to call twice, and after a failed start."""
        folder, self.folder = self.folder, None
        if folder is None:
            return
        atexit.unregister(self.stop)
        try:
            if (folder / "data" / "postmaster.pid").exists():
                self._run(self._server_user(), [self._bindir / "pg_ctl", "-D", folder / "data",
                                                "-m", "immediate", "-w", "stop"], check=False)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            self.port = None

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- clients ----------------------------------------------------------------------------

    def url(self, dbname: str = "postgres") -> str:
        if self.port is None:
            raise RuntimeError("the PostgresServer is not started")
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """Create an empty database and return its URL."""
        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, ending any session still connected to it."""
        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    @contextlib.contextmanager
    def fresh_database(self, hint: str = "test") -> Iterator[str]:
        """A database of its own for one test, named after ``hint`` plus a random suffix, dropped
        at the end; yields its URL."""
        stem = re.sub(r"[^a-z0-9_]+", "_", hint.lower()).strip("_")[:40] or "test"
        name = f"{stem}_{uuid.uuid4().hex[:10]}"
        url = self.create_database(name)
        try:
            yield url
        finally:
            self.drop_database(name)

    def _admin(self, statement: sql.Composable) -> None:
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(statement)

    # -- internals --------------------------------------------------------------------------

    @property
    def _data(self) -> Path:
        assert self.folder is not None
        return self.folder / "data"

    def _listen(self, bindir: Path, as_user: pwd.struct_passwd | None) -> None:
        """Start the server on a free loopback port; when another process takes that port between
        the pick and the bind, try a new one."""
        log = self.folder / "server.log"
        for _ in range(START_ATTEMPTS):
            port = free_loopback_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {shlex.quote(str(self.folder))}"
                       " -c fsync=off -c max_connections=200")
            log.unlink(missing_ok=True)
            started = self._run(as_user, [bindir / "pg_ctl", "-D", self._data, "-l", log, "-w",
                                          "-t", str(START_TIMEOUT_S), "-o", options, "start"],
                                check=False)
            if started.returncode == 0:
                self.port = port
                return
            text = log.read_text(errors="replace") if log.exists() else ""
            if "could not bind" not in text and "could not create any TCP/IP sockets" not in text:
                raise PostgresUnavailable(f"the PostgreSQL server did not start:\n{started.stdout}"
                                          f"{text}")
        raise PostgresUnavailable(f"no free loopback port found in {START_ATTEMPTS} tries")

    @staticmethod
    def _server_user() -> pwd.struct_passwd | None:
        """The system user to run initdb and the server as: ``postgres`` when this process is
        root (they refuse root), else none (they run as this process's user)."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise PostgresUnavailable(
                "running as root, but there is no 'postgres' system user to run the server as "
                "(Debian's postgresql package creates it; scripts/test.sh installs the package "
                "as root)") from None

    @staticmethod
    def _temp_parent(as_user: pwd.struct_passwd | None) -> str:
        """Where to make the folder: the usual temporary directory, unless the server's user could
        not reach a folder inside it (a root-only TMPDIR), then /tmp."""
        parent = tempfile.gettempdir()
        if as_user is None:
            return parent
        folders = [Path(parent), *Path(parent).parents]
        reachable = all(folder.stat().st_mode & 0o001 for folder in folders)
        return parent if reachable else "/tmp"

    @staticmethod
    def _run(as_user: pwd.struct_passwd | None, command: list, check: bool = True
             ) -> subprocess.CompletedProcess:
        """Run a server program, as ``as_user`` when given, with a plain C locale and without the
        caller's PG* settings (they would point it at another server)."""
        argv = [str(part) for part in command]
        if as_user is not None and shutil.which("runuser"):
            argv = ["runuser", "-u", as_user.pw_name, "--", *argv]
        elif as_user is not None:
            argv = ["setpriv", f"--reuid={as_user.pw_uid}", f"--regid={as_user.pw_gid}",
                    "--init-groups", "--", *argv]
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env["LC_ALL"] = "C"
        result = subprocess.run(argv, env=env, cwd="/", stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if check and result.returncode != 0:
            raise PostgresUnavailable(f"{Path(command[0]).name} failed (exit {result.returncode}):"
                                      f"\n{result.stdout}")
        return result
