"""Which practices a fleet runs, and where each one's extract, store and session are (SPEC 12):
one sub-folder of ``--practices`` per practice, named by its ``practice.json``'s ODS code (else
by the folder's name); its store in the fleet's PostgreSQL database (``--store URL``) or in
``--stores DIR/<ODS>.sqlite``; its session ``--session FILE`` or ``--sessions DIR/<ODS>.json``.

Paths are made absolute: a worker runs each job wherever the cluster put it, so the folders must
be reachable there (on a cluster of several machines, a shared file system).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scr_nb.errors import ExtractError, OptionError
from scr_nb.extract.reader import load_details
from scr_nb.fleet.status import SQLITE_SUFFIX
from scr_nb.store.database import is_database_url

SESSION_SUFFIX = ".json"


@dataclass(frozen=True)
class Practice:
    """One practice of a fleet: its ODS code, extract folder, store and session file."""

    ods: str
    folder: str
    store: str                 # an SQLite file, or the fleet's postgresql:// URL
    session: str

    @property
    def on_database(self) -> bool:
        return is_database_url(self.store)


def find_practices(practices_dir: str | Path, *, store: str | None = None,
                   stores_dir: str | Path | None = None, session: str | Path | None = None,
                   sessions_dir: str | Path | None = None) -> list[Practice]:
    """The fleet's practices in ODS code order. OptionError (exit 2) when the folders or files
    are not there, two folders name the same practice, or the store and session options are
    not one of each kind."""
    root = Path(practices_dir)
    if not root.is_dir():
        raise OptionError(f"--practices {practices_dir}: no such folder")
    if (store is None) == (stores_dir is None):
        raise OptionError("give --store URL (one PostgreSQL database for the fleet) or "
                          "--stores DIR (one SQLite store per practice), not both or neither")
    if store is not None and not is_database_url(store):
        raise OptionError(f"--store {store}: a fleet's --store is a postgresql:// URL; for "
                          "SQLite stores give --stores DIR")
    if (session is None) == (sessions_dir is None):
        raise OptionError("give --session FILE (one session for every practice) or "
                          "--sessions DIR (DIR/<ODS>.json), not both or neither")
    if stores_dir is not None:
        Path(stores_dir).mkdir(parents=True, exist_ok=True)
    found: dict[str, Practice] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            named = load_details(folder).ods_code
        except ExtractError:
            named = None   # its job refuses it, saying what is wrong with practice.json
        ods = (named or folder.name).strip().upper()
        if ods in found:
            raise OptionError(f"--practices {practices_dir}: {found[ods].folder} and {folder} are "
                              f"both practice {ods}")
        where = store if store is not None else str(Path(stores_dir, ods + SQLITE_SUFFIX)
                                                    .resolve())
        who = Path(session if session is not None else Path(sessions_dir, ods + SESSION_SUFFIX))
        if not who.is_file():
            raise OptionError(f"practice {ods}: no session file {who} (scr-nb login makes one)")
        found[ods] = Practice(ods, str(folder.resolve()), where, str(who.resolve()))
    if not found:
        raise OptionError(f"--practices {practices_dir}: no practice folders in it")
    return [found[ods] for ods in sorted(found)]


__all__ = ["Practice", "find_practices"]
