"""Stopping a fleet's practice jobs from anywhere that can open their stores (SPEC 12
``scr-nb fleet stop``), as ``scr-nb stop`` does for one: the request is written into each
practice's store, and each job obeys it within two seconds, logging who asked.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from scr_nb.errors import ScrNbError
from scr_nb.fleet.status import practice_stores
from scr_nb.store.database import is_database_url

REQUESTS = {"stop": "Stop", "close": "Stop and Close", "cancel": "Cancel"}


@dataclass(frozen=True)
class Asked:
    """A practice's running job, asked to stop."""

    ods: str
    store: str
    job_id: int


def ask_to_stop(ods: str, store: str, request: str, who: tuple[str, str],
                asked_before: Collection[int] = ()) -> Asked | None:
    """Ask the job running on one practice's store to stop (``stop``, ``close`` or ``cancel``),
    unless it is one of ``asked_before`` (then it is not asked again); None when no job runs
    there."""
    from scr_nb.store.practice_store import Store

    if not is_database_url(store) and not Path(store).exists():
        return None
    handle = Store(store, ods)
    try:
        job = handle.running_job()
        if job is None:
            return None
        if job.id not in asked_before:
            handle.ask(job.id, request, *who)
    finally:
        handle.close()
    return Asked(ods, store, job.id)


def has_stopped(asked: Asked) -> bool:
    """Whether the job asked has ended (or its lock is gone: its process died)."""
    from scr_nb.store.practice_store import Store

    handle = Store(asked.store, asked.ods, readonly=True)
    try:
        job = handle.job(asked.job_id)
        return job is None or job.ended_at is not None or handle.lock_holder() is None
    finally:
        handle.close()


def stop_fleet(store: str | None = None, stores_dir: str | Path | None = None, *,
               request: str = "stop", who: tuple[str, str], wait: float = 900.0,
               say: Callable[[str], None] = print) -> tuple[list[Asked], list[Asked]]:
    """Ask every practice job running on the fleet's stores to stop, and wait until they all
    have (up to ``wait`` seconds). Asks again until a pass finds no job it has not asked: a
    fleet's coordinator may start one more as another ends. Returns (stopped, still running)."""
    if request not in REQUESTS:
        raise ValueError(f"a request is one of {', '.join(REQUESTS)}, not {request!r}")
    asked: dict[tuple[str, int], Asked] = {}
    stopped: dict[tuple[str, int], Asked] = {}
    deadline = time.monotonic() + wait
    while True:
        fresh = 0
        for ods, where in sorted(practice_stores(store, stores_dir).items()):
            try:
                found = ask_to_stop(ods, where, request, who,
                                    [job for (named, job) in asked if named == ods])
            except ScrNbError as err:
                say(f"{ods}: cannot ask its job to stop ({err})")
                continue
            if found is not None and (ods, found.job_id) not in asked:
                asked[(ods, found.job_id)] = found
                fresh += 1
                say(f"{ods}: asked job {found.job_id} to {REQUESTS[request]} (as {who[1]})")
        for key, one in asked.items():
            if key not in stopped and has_stopped(one):
                stopped[key] = one
                say(f"{one.ods}: job {one.job_id} has stopped")
        if (not fresh and len(stopped) == len(asked)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return list(stopped.values()), [a for key, a in asked.items() if key not in stopped]


__all__ = ["Asked", "REQUESTS", "ask_to_stop", "has_stopped", "stop_fleet"]
