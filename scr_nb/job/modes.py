"""The four modes' rules (SPEC 8): when Run, Resume, Rerun and Failed may start on a scope, in
Vision's words with the mode to use instead, and which chain of jobs a new job continues.

Read-only: deciding never changes the store. The engine refuses with these answers, and the control
panel greys its buttons with the same words.
"""

from __future__ import annotations

from scr_nb.errors import RefusedError
from scr_nb.store.practice_store import Job, Store
from scr_nb.store.states import JobStatus, Mode, PatientState


def refusal(store: Store, mode: Mode, group: str | None) -> tuple[str, str | None] | None:
    """Why ``mode`` may not start on ``group`` now, in Vision's words, with the mode to use
    instead; None when it may. The engine refuses with it, the control panel greys buttons."""
    if mode == Mode.RESUME:
        if store.latest_unfinished(group, any_scope=group is None) is None:
            where = f"Patient Group {group!r}" if group else "this store"
            return ("there is nothing to resume: no stopped, paused or cancelled upload in "
                    f"{where}. Use Run, Rerun or Failed.", None)
        return None
    latest = store.latest_job(group)
    if mode == Mode.RUN and latest is not None:
        if latest.status == JobStatus.COMPLETED.value:
            return ("the initial upload has already run to completion: use Rerun to send every "
                    "summary again or Failed to reprocess failures.", "rerun or failed")
        return "the upload is partially completed: use Resume to continue it.", "resume"
    if mode == Mode.FAILED and not store.count_in_scope(group, PatientState.FAILED):
        return f"there are no failed patients to reprocess in {group or 'the whole list'}.", None
    return None


def choose_chain(store: Store, mode: Mode, group: str | None) -> tuple[Job | None, str, str | None]:
    """(the unfinished job a Resume continues or None for a new chain, the work rule, the group);
    raises RefusedError, with the mode to use instead, when the mode may not start."""
    if group is not None and not store.has_group(group):
        names = ", ".join(store.group_names()) or "none"
        raise RefusedError(f"there is no Patient Group called {group!r} (groups: {names})")
    refused = refusal(store, mode, group)
    if refused is not None:
        raise RefusedError(*refused)
    if mode == Mode.RESUME:
        latest = store.latest_unfinished(group, any_scope=group is None)
        return latest, latest.chain_mode, latest.group
    return None, mode.value, group


__all__ = ["choose_chain", "refusal"]
