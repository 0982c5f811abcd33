"""``scr-nb preflight`` (SPEC 10): what an administrator runs the afternoon before a night upload.

Everything a run needs is checked without sending a clinical message: the extract and its
eligibility counts, the Smartcard session (user, B0062, time left), a TLS connection to the Spine and
to the identity provider, a sample of the messages the job would build against the conformance
facts, and the time the job needs at the rate limit against the stop time and the session. Each
check says in plain words what it found; the practice is ready when every one passes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from itertools import islice
from pathlib import Path

from scr_nb.errors import ExtractError, ScrNbError
from scr_nb.extract.eligibility import Policy
from scr_nb.extract.prepared import decisions, prepare
from scr_nb.extract.reader import load_details
from scr_nb.extract.records import Patient, PracticeDetails
from scr_nb.job.options import JobOptions, describe_duration
from scr_nb.spine import session as sessions
from scr_nb.spine.conformance import check_message
from scr_nb.spine.content import SummaryContent, Windows, select_content
from scr_nb.spine.gp_summary import Author, build_message, new_id
from scr_nb.spine.tls import TlsSettings, check_connection
from scr_nb.store.extract_index import ExtractIndex
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
    today = now().astimezone().date()
    policy = Policy(today=today, dissent=options.dissent,
                    update_existing_after_days=options.update_existing_after_days)
    # The extract is read as a job reads it, into an index of its own that goes with the check:
    # memory stays flat whatever the practice's size.
    scratch = tempfile.TemporaryDirectory(prefix="scr-nb-preflight-")
    prepared = details = None
    try:
        details = load_details(practice_dir)
        prepared = prepare(practice_dir, Path(scratch.name) / "extract", policy)
        report.counts = prepared.summary
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

    try:
        if prepared is not None:
            _check_messages(report, prepared.index, policy, details, session, options, now(),
                            sample)
            _check_timing(report, report.counts["eligible"], session, options, now())
    finally:
        if prepared is not None:
            prepared.index.close()
        scratch.cleanup()
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


@dataclass(frozen=True)
class _Sampled:
    key: str
    patient: Patient
    dissent_on: date | None
    dissent: bool
    content: SummaryContent


def _sample(index: ExtractIndex, policy: Policy, size: int,
            windows: Windows) -> list[_Sampled]:
    """The first eligible patients, plus the first of each kind of summary (dissent, nothing to
    send, each medication kind, allergies), so every shape of message is checked. The eligible
    patients are read from the index a batch at a time until every kind has been seen."""
    eligible = ((key, row, dissent) for key, _, _, row, reason, dissent
                in decisions(index, policy) if reason is None)
    chosen: dict[str, _Sampled] = {}
    kinds: dict[str, _Sampled] = {}
    while len(kinds) < 6 and (batch := list(islice(eligible, 500))):
        patients = index.patients([row for _, row, _ in batch])
        medications, allergies = index.clinical([p.patient_id for p, _ in patients.values()])
        for key, row, dissent in batch:
            patient, consent_on = patients[row]
            content = select_content(medications.get(patient.patient_id, ()),
                                     allergies.get(patient.patient_id, ()), windows)
            sampled = _Sampled(key, patient, consent_on if dissent else None, dissent, content)
            if len(chosen) < size:
                chosen[key] = sampled
            kind = ("dissent" if dissent else "repeat" if content.repeat
                    else "discontinued" if content.discontinued else "acute" if content.acute
                    else "allergy" if content.allergies else "nothing")
            kinds.setdefault(kind, sampled)
    chosen.update({sampled.key: sampled for sampled in kinds.values()})
    return list(chosen.values())


def _check_messages(report: Preflight, index: ExtractIndex, policy: Policy,
                    details: PracticeDetails, session, options: JobOptions, now: datetime,
                    size: int) -> None:
    author = Author(user_id=session.user_id if session else "", name=session.name if session else "",
                    role_profile_id=session.role_profile_id if session else "",
                    sender_asid=details.asid or options.sender_asid,
                    receiver_asid=options.receiver_asid,
                    practice_ods=details.ods_code or options.practice_ods,
                    practice_name=details.name or options.practice_name)
    windows = Windows(now.astimezone().date())
    breaches: dict[str, list[str]] = {}
    built = 0
    for sampled in _sample(index, policy, size, windows):
        try:
            message = build_message(sampled.patient, sampled.content, author=author,
                                    message_id=new_id(), event_id=new_id(),
                                    created=now.astimezone().replace(tzinfo=None),
                                    dissent=sampled.dissent, dissent_on=sampled.dissent_on)
        except ValueError as err:
            report.add("messages", False, f"the messages cannot be built: {err}")
            return
        built += 1
        for breach in check_message(message.body, message.content_type):
            breaches.setdefault(breach.describe(), []).append(sampled.patient.patient_id)
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
