"""Shared fixtures: the Spine simulator on a free loopback port, users, sessions, practices."""

from __future__ import annotations

import shutil
from datetime import date
from pathlib import Path

import pytest

from scr_nb.sim.spine_sim import SimConfig, SimulatorThread
from scr_nb.sim.synth import write_practice
from scr_nb.spine import session as sessions

# The real Spine samples: shared/ sits beside the repository, in CI as on a developer's machine.
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "spine"

ADMIN = {"user_id": "555000000001", "passcode": "right-passcode", "name": "Dr Alex Morgan",
         "role_profile_id": "555000000001A1", "activities": ["B0062", "B0068"],
         "session_hours": 10}
CLERK = {"user_id": "555000000002", "passcode": "clerk-passcode", "name": "Sam Clerk",
         "role_profile_id": "555000000002A1", "activities": ["B0068"], "session_hours": 10}
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
