"""The words people use for the names in ``states``: what the control panel, reports and the CLI
show an administrator instead of snake_case (Vision's words where Vision had them)."""

from __future__ import annotations

# Vision's completion screen, in its order, with the keys of the store's status()["counters"].
VISION_COUNTERS = (("Unprocessed", "unprocessed"), ("Sending", "sending"), ("Sent", "sent"),
                   ("Failed", "failed"), ("Not Required", "not_required"))
MISSING = "\u2013"     # the one marker for a missing value in every table people read (an en dash)

MODE_WORDS = {"run": "Run", "resume": "Resume", "rerun": "Rerun", "failed": "Failed"}

STATUS_WORDS = {
    "running": "Running", "paused": "Paused", "stopped": "Stopped", "cancelled": "Cancelled",
    "completed": "Completed",
}

REASON_WORDS = {
    "stop_time": "the scheduled stop time was reached",
    "pause_time": "paused at the scheduled pause time",
    "resume_cancelled": "the scheduled resume was cancelled",
    "session_expired": "the Smartcard session ended",
    "user_stop": "stopped by the user",
    "user_cancel": "cancelled by the user",
    "access_denied": "the Spine refused the user (no B0062 on the Spine's side)",
    "tls_failure": "the secure connection to the Spine failed",
}

NOT_REQUIRED_WORDS = {
    "malformed_record": "Record malformed in the extract",
    "duplicate_record": "Duplicate patient record",
    "no_nhs_number": "No NHS number",
    "invalid_nhs_number": "Invalid NHS number",
    "not_permanent": "Not permanently registered",
    "left_practice": "Left the practice",
    "deceased": "Deceased",
    "fp69": "FP69 flag set",
    "sensitive": "Sensitive record",
    "not_pds_synchronised": "Not synchronised with PDS",
    "existing_summary": "Already holds a national summary",
    "dissent": "Dissented",
    "not_in_extract": "No longer in the extract",
    "existing_summary_at_spine": "Summary already on the Spine",
}


def words(name: str | None, table: dict[str, str]) -> str:
    """The words for a name, or the name made readable when no table lists it."""
    if not name:
        return ""
    return table.get(name) or name.replace("_", " ").capitalize()


def job_words(status: str, reason: str | None) -> str:
    """"Stopped: the Smartcard session ended", "Completed"."""
    said = words(status, STATUS_WORDS)
    return f"{said}: {words(reason, REASON_WORDS)}" if reason else said


__all__ = ["MISSING", "VISION_COUNTERS", "MODE_WORDS", "NOT_REQUIRED_WORDS", "REASON_WORDS", "STATUS_WORDS", "job_words", "words"]
