"""Shared fixtures: the Spine simulator on a free loopback port, users, sessions, practices, and a
throwaway PKI made at test time (trustme) for mutual TLS."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pytest
import trustme

from scr_nb.sim.spine_sim import ServerTls, SimConfig, SimulatorThread
from scr_nb.sim.synth import write_practice
from scr_nb.spine import session as sessions

from tests.pgserver import PostgresServer, PostgresUnavailable

# Third-party reference data (real NHS messages) is never copied into the project: tests that use it
# find it in ../shared/reference beside the clone and skip, saying why, when it is not there. The
# project's own fixtures in tests/fixtures cover the same code paths without it.
SHARED_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def reference(*parts: str) -> Path:
    """A file or folder of ../shared/reference, or a skip naming what is missing."""
    path = SHARED_REFERENCE.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"third-party reference data {path} is absent (it lives in ../shared/reference "
                    "beside the clone, never in the project); the project's own fixtures cover "
                    "this code path")
    return path

ADMIN = {"user_id": "555000000001", "passcode": "right-passcode", "name": "Dr Alex Morgan",
         "role_profile_id": "555000001001", "activities": ["B0062", "B0068"],
         "session_hours": 10}
CLERK = {"user_id": "555000000002", "passcode": "clerk-passcode", "name": "Sam Clerk",
         "role_profile_id": "555000001002", "activities": ["B0068"], "session_hours": 10}
USERS = [ADMIN, CLERK]


@dataclass(frozen=True)
class Pki:
    """PEM files of two unrelated CAs: ``ca`` signs the Spine's certificate and this system's
    client certificate; ``other_ca`` signs a rogue server's and a stranger's."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    rogue_server_cert: Path
    rogue_server_key: Path
    stranger_cert: Path
    stranger_key: Path

    def server(self, mutual: bool = True) -> ServerTls:
        """The simulator's TLS: HTTPS with the trusted certificate, client certificates from
        ``ca`` required when ``mutual``."""
        return ServerTls(str(self.server_cert), str(self.server_key),
                         str(self.ca) if mutual else None)

    def rogue_server(self) -> ServerTls:
        return ServerTls(str(self.rogue_server_cert), str(self.rogue_server_key), str(self.ca))

    def client_options(self) -> list[str]:
        """The kit's TLS options for the trusted CA and this system's client certificate."""
        return ["--ca-bundle", str(self.ca), "--client-cert", str(self.client_cert),
                "--client-key", str(self.client_key)]


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    """A throwaway PKI, made once per test run; nothing of it is kept."""
    folder = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()

    def write(cert: trustme.LeafCert, name: str) -> tuple[Path, Path]:
        cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
        cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key_path))
        return cert_path, key_path

    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    other.cert_pem.write_to_path(str(folder / "other-ca.pem"))
    return Pki(folder / "ca.pem",
               *write(ca.issue_cert("127.0.0.1", "localhost", "::1"), "server"),
               *write(ca.issue_cert("practice-system.example"), "client"),
               folder / "other-ca.pem",
               *write(other.issue_cert("127.0.0.1", "localhost"), "rogue-server"),
               *write(other.issue_cert("practice-system.example"), "stranger"))


@pytest.fixture
def spine_factory():
    """Start simulators with given switches (and ``tls=ServerTls(...)`` for HTTPS); all are
    stopped at the end of the test."""
    running: list[SimulatorThread] = []

    def start(tls: ServerTls | None = None, **switches) -> SimulatorThread:
        switches.setdefault("users", USERS)
        switches.setdefault("poll_retry_after_ms", 5)
        sim = SimulatorThread(SimConfig(**switches), tls=tls)
        sim.start()
        running.append(sim)
        return sim

    yield start
    for sim in running:
        sim.stop()


@pytest.fixture
def spine(spine_factory) -> SimulatorThread:
    return spine_factory()


def cli_login(spine, tmp_path: Path, monkeypatch) -> Path:
    """``scr-nb login`` as the administrator at ``spine``, as a user would; the session file."""
    from scr_nb.ui import cli

    monkeypatch.setenv("SCR_NB_PASSCODE", ADMIN["passcode"])
    session = tmp_path / "session.json"
    assert cli.main(["login", "--identity", spine.url, "--user", ADMIN["user_id"],
                     "--session", str(session)]) == 0
    return session


@pytest.fixture
def admin_session(spine) -> sessions.Session:
    return sessions.login(spine.url, ADMIN["user_id"], ADMIN["passcode"])


@pytest.fixture(scope="session")
def synthetic_practice(tmp_path_factory) -> Path:
    """A 400-patient synthetic practice, written once; copy it before changing it."""
    out = tmp_path_factory.mktemp("practice") / "practice"
    write_practice(out, 400, seed=11)
    return out


@pytest.fixture
def practice(synthetic_practice, tmp_path) -> Path:
    copy = tmp_path / "practice"
    shutil.copytree(synthetic_practice, copy)
    return copy


@pytest.fixture
def today() -> date:
    return date.today()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server of this test run alone (127.0.0.1, a free port), started once and
    stopped, files and all, at the end. When it cannot start the test fails, never skips: the suite
    promises a real server (scripts/test.sh installs Debian's postgresql when run as root)."""
    server = PostgresServer()
    try:
        server.start()
    except PostgresUnavailable as err:
        raise pytest.fail.Exception(f"the throwaway PostgreSQL server could not start: {err}",
                                    pytrace=False) from None
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres_server, request) -> Iterator[str]:
    """The URL of an empty database of this test's own, named after it; dropped afterwards even
    when a connection to it was left open."""
    with postgres_server.fresh_database(request.node.name) as url:
        yield url
