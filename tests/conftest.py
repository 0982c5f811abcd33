"""Shared fixtures: the Spine simulator on a free loopback port, users, sessions, practices."""

from __future__ import annotations

import shutil
from datetime import date
from pathlib import Path

import pytest

from scr_nb.sim.spine_sim import SimConfig, SimulatorThread
from scr_nb.sim.synth import write_practice
from scr_nb.spine import session as sessions

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


@pytest.fixture
def spine_factory():
    """Start simulators with given switches; all are stopped at the end of the test."""
    running: list[SimulatorThread] = []

    def start(**switches) -> SimulatorThread:
        switches.setdefault("users", USERS)
        switches.setdefault("poll_retry_after_ms", 5)
        sim = SimulatorThread(SimConfig(**switches))
        sim.start()
        running.append(sim)
        return sim

    yield start
    for sim in running:
        sim.stop()


@pytest.fixture
def spine(spine_factory) -> SimulatorThread:
    return spine_factory()


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
