"""``scr-nb preflight`` (SPEC 10): what an administrator runs the afternoon before a night upload.

Everything a run needs is checked without sending a clinical message: the extract and its
eligibility counts, the Smartcard session (user, B0062, time left), a TLS connection to the Spine and
to the identity provider, a sample of the messages the job would build against the conformance
facts, and the time the job needs at the rate limit against the stop time and the session. Each
check says in plain words what it found; the practice is ready when every one passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from scr_nb.errors import ExtractError, ScrNbError
from scr_nb.extract.eligibility import Decision, Policy, decide, latest_consent_entry, summarise
from scr_nb.extract.reader import load_practice
from scr_nb.extract.records import Practice
from scr_nb.job.options import JobOptions, describe_duration
from scr_nb.spine import session as sessions
from scr_nb.spine.conformance import check_message
from scr_nb.spine.content import Windows, select_content
from scr_nb.spine.gp_summary import Author, build_message, new_id
from scr_nb.spine.tls import TlsSettings, check_connection
from scr_nb.store.states import Mode

SAMPLE = 25   # messages built and checked: the first patients, plus each kind of summary found


@dataclass(frozen=True)
class Check:
    name: str          # extract, session, spine, identity, messages, timing
    ok: bool
    words: str


@dataclass
class Preflight:
    checks: list[Check] = field(default_factory=list)
    counts: dict | None = None

    @property
    def ready(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def reasons(self) -> list[str]:
        return [check.words for check in self.checks if not check.ok]

    def add(self, name: str, ok: bool, words: str) -> bool:
        self.checks.append(Check(name, ok, words))
        return ok

    def to_json(self) -> dict:
        return {"ready": self.ready, "checks": [asdict(c) for c in self.checks],
                "eligibility": self.counts, "reasons": self.reasons}


def run_preflight(practice_dir: str | Path, spine: str, session_path: str | Path,
                  options: JobOptions | None = None, tls: TlsSettings | None = None,
                  identity: str | None = None, sample: int = SAMPLE,
                  now: Callable[[], datetime] | None = None,
                  connect: Callable[..., int] = check_connection) -> Preflight:
    """Every check, each one run even when an earlier one failed, so the administrator sees every
    reason at once. ``identity`` defaults to the identity provider the session came from."""
    options = options or JobOptions(mode=Mode.RUN)
    now = now or (lambda: datetime.now(timezone.utc))
    report = Preflight()
    practice = decisions = None
    try:
        practice = load_practice(practice_dir, today=now().astimezone().date())
        decisions = decide(practice, Policy(today=now().astimezone().date(),
                                            dissent=options.dissent,
                                            update_existing_after_days=
                                            options.update_existing_after_days))
        report.counts = summarise(decisions)
        eligible = report.counts["eligible"]
        report.add("extract", eligible > 0,
                   f"the extract reads: {report.counts['total']} patients, {eligible} eligible"
                   if eligible else "the extract holds no eligible patient: nothing would be sent")
    except ExtractError as err:
        report.add("extract", False, f"the extract cannot be read: {err}")

    session = _check_session(report, session_path, now())
    tls = tls or TlsSettings.from_options()
    for name, url, what in (("spine", spine, "the Spine"),
                            ("identity", identity or (session.identity_url if session else ""),
                             "the identity provider")):
        if not url:
            report.add(name, True, f"{what}: no URL to check (the session file names none)")
            continue
        try:
            status = connect(url, tls, what=what)
            report.add(name, True, f"{what} at {url} answers over "
                                   f"{'TLS' if url.startswith('https') else 'plain HTTP'} "
                                   f"(HTTP {status} to a GET of its base URL)")
        except ScrNbError as err:
            report.add(name, False, f"{what}: {err}")

    if practice is not None and decisions is not None:
        _check_messages(report, practice, decisions, session, options, now(), sample)
        _check_timing(report, report.counts["eligible"], session, options, now())
    return report


def _check_session(report: Preflight, path: str | Path, now: datetime):
    try:
        session = sessions.load(path)
    except ScrNbError as err:
        report.add("session", False, f"the session cannot be used: {err}")
        return None
    try:
        session.require_b0062(now)
    except ScrNbError as err:
        report.add("session", False, f"{session.name} ({session.user_id}): {err}")
        return session
    left = session.seconds_left(now)
    report.add("session", True, f"{session.name} ({session.user_id}), role "
                                f"{session.role_profile_id}, holds B0062; the card's session "
                                f"has {describe_duration(left)} left")
    return session


def _sample(practice: Practice, decisions: list[Decision], size: int,
            windows: Windows) -> list[Decision]:
    """The first eligible patients, plus the first of each kind of summary (dissent, nothing to
    send, each medication kind, allergies), so every shape of message is checked."""
    eligible = [d for d in decisions if d.eligible]
    chosen = {d.key: d for d in eligible[:size]}
    kinds: dict[str, Decision] = {}
    for decision in eligible:
        pid = decision.patient.patient_id
        content = select_content(practice.medications.get(pid, ()),
                                 practice.allergies.get(pid, ()), windows)
        kind = ("dissent" if decision.dissent else "repeat" if content.repeat
                else "discontinued" if content.discontinued else "acute" if content.acute
                else "allergy" if content.allergies else "nothing")
        kinds.setdefault(kind, decision)
        if len(kinds) == 6:
            break
    chosen.update({d.key: d for d in kinds.values()})
    return list(chosen.values())


def _check_messages(report: Preflight, practice: Practice, decisions: list[Decision], session,
                    options: JobOptions, now: datetime, size: int) -> None:
    author = Author(user_id=session.user_id if session else "", name=session.name if session else "",
                    role_profile_id=session.role_profile_id if session else "",
                    sender_asid=practice.details.asid or options.sender_asid,
                    receiver_asid=options.receiver_asid,
                    practice_ods=practice.details.ods_code or options.practice_ods,
                    practice_name=practice.details.name or options.practice_name)
    windows = Windows(now.astimezone().date())
    breaches: dict[str, list[str]] = {}
    built = 0
    for decision in _sample(practice, decisions, size, windows):
        pid = decision.patient.patient_id
        content = select_content(practice.medications.get(pid, ()),
                                 practice.allergies.get(pid, ()), windows)
        consent = latest_consent_entry(practice.consent.get(pid)) if decision.dissent else None
        try:
            message = build_message(decision.patient, content, author=author,
                                    message_id=new_id(), event_id=new_id(),
                                    created=now.astimezone().replace(tzinfo=None),
                                    dissent=decision.dissent,
                                    dissent_on=consent.recorded_on if consent else None)
        except ValueError as err:
            report.add("messages", False, f"the messages cannot be built: {err}")
            return
        built += 1
        for breach in check_message(message.body, message.content_type):
            breaches.setdefault(breach.describe(), []).append(pid)
    if breaches:
        report.add("messages", False, "built messages break the Spine's rules: " + "; ".join(
            f"{rule} (patients {', '.join(pids[:3])})" for rule, pids in breaches.items()))
    else:
        report.add("messages", True, f"{built} sample messages, every kind of summary the "
                                     "extract holds, meet the Spine's schema and rules")


def _check_timing(report: Preflight, to_send: int, session, options: JobOptions,
                  now: datetime) -> None:
    rate = options.rate_limit
    if not rate:
        report.add("timing", True, "no --rate-limit: the job sends as fast as the Spine allows; "
                                   "the time it needs is not known in advance")
        return
    start = max(options.schedule.start_at or now, now)
    needed = to_send / rate
    ends = [("the stop time", options.schedule.stop_at)]
    if session is not None:
        ends.append(("the Smartcard session's expiry", session.expires_at))
    short = []
    for what, end in ends:
        if end is not None and needed > (end - start).total_seconds():
            left = max(0.0, (end - start).total_seconds())
            short.append(f"{what} ({end.isoformat(timespec='minutes')}) leaves "
                         f"{describe_duration(left)}")
    words = (f"at {rate:g} messages a second, {to_send} messages need about "
             f"{describe_duration(needed)}")
    if short:
        report.add("timing", False, words + ", but " + " and ".join(short)
                   + ": raise the rate limit, move the stop time, or log in nearer the start")
    else:
        report.add("timing", True, words + ", within the stop time and the session")


__all__ = ["Check", "Preflight", "run_preflight"]
