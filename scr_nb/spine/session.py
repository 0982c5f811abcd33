"""The Smartcard session an upload runs under (SPEC 7): login, the session file, B0062.

The kit does not trust the token: the Spine verifies it on every request. The kit treats it as
opaque and only reads the identity, the activities and the expiry the identity provider gave
beside it, to refuse early and never to send with an expired session. User ids and role profile
ids are SDS ids, 12 digits: anything else is refused at login and in a session file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx

from scr_nb.constants import B0062, B0062_TEXT, SDS_ID_PATTERN
from scr_nb.errors import SessionError
from scr_nb.spine.tls import TlsSettings, check_url, diagnose

SDS_ID = re.compile(SDS_ID_PATTERN)   # SDS user and role profile ids (SPEC 7)


def is_sds_id(value: object) -> bool:
    """A 12-digit SDS id (user id or role profile id), as a string."""
    return isinstance(value, str) and SDS_ID.fullmatch(value) is not None


@dataclass(frozen=True)
class Session:
    token: str
    user_id: str
    name: str
    role_profile_id: str
    activities: tuple[str, ...]
    expires_at: datetime           # timezone-aware
    identity_url: str = ""

    def expired(self, now: datetime) -> bool:
        return now >= self.expires_at

    def seconds_left(self, now: datetime) -> float:
        return (self.expires_at - now).total_seconds()

    def require_b0062(self, now: datetime) -> None:
        """Refuse before anything starts: no B0062, or a session that has already ended."""
        if B0062 not in self.activities:
            raise SessionError(
                f"{self.name} ({self.user_id}) does not hold RBAC activity {B0062} ({B0062_TEXT}); "
                "nothing was sent. Log in with a Smartcard role that carries B0062.")
        if self.expired(now):
            raise SessionError(
                f"the Smartcard session of {self.name} ({self.user_id}) expired at "
                f"{self.expires_at.isoformat()}; nothing was sent. Log in again (scr-nb login) "
                "and start the job again (Resume, if a job was stopped).")

    @classmethod
    def from_idp(cls, answer: dict, identity_url: str = "",
                 source: str = "the identity provider's answer",
                 advice: str = "log in again") -> "Session":
        """A session from the identity provider's answer (or a session file holding one);
        SessionError when it is not one, or its user or role profile id is not an SDS id."""
        if isinstance(answer, dict):
            for field, what in (("user_id", "user id"), ("role_profile_id", "role profile id")):
                if not is_sds_id(answer.get(field)):
                    raise SessionError(f"{source} has the {what} {answer.get(field)!r}, which is "
                                       f"not a 12-digit SDS id; {advice}")
        try:
            expires = datetime.fromisoformat(str(answer["expires_at"]).replace("Z", "+00:00"))
            if expires.tzinfo is None:
                expires = expires.replace(tzinfo=timezone.utc)
            return cls(token=str(answer["token"]), user_id=str(answer["user_id"]),
                       name=str(answer.get("name", answer["user_id"])),
                       role_profile_id=str(answer["role_profile_id"]),
                       activities=tuple(str(a) for a in answer.get("activities", ())),
                       expires_at=expires, identity_url=identity_url)
        except (KeyError, TypeError, ValueError) as err:
            raise SessionError(f"the identity provider's answer is not a session ({err})") from None

    def to_json(self) -> dict:
        data = asdict(self)
        data["activities"] = list(self.activities)
        data["expires_at"] = self.expires_at.isoformat()
        return data


def session_endpoint(identity_url: str) -> str:
    url = identity_url.rstrip("/")
    return url if url.endswith("/identity/session") else url + "/identity/session"


def login(identity_url: str, user_id: str, passcode: str, *, tls: TlsSettings | None = None,
          transport: httpx.BaseTransport | None = None, timeout: float = 30.0) -> Session:
    """Ask the identity provider for a session (SPEC 10: POST {base}/identity/session), over the
    TLS settings given (default: from SCR_NB_CA_BUNDLE, SCR_NB_CLIENT_CERT, SCR_NB_CLIENT_KEY).
    Raises OptionError for a URL or TLS setting not allowed (nothing is sent), SessionError for a
    user id that is not an SDS id (nothing is sent), a refusal or an unusable answer, and
    TlsFailure when the connection fails for a TLS reason."""
    check_url(identity_url, "the identity provider's URL")
    if not is_sds_id(user_id):
        raise SessionError(f"login refused: the user id {user_id!r} is not a 12-digit SDS id "
                           "(e.g. 555000000001): give the SDS user id of your Smartcard")
    tls = tls if tls is not None else TlsSettings.from_options()
    url = session_endpoint(identity_url)
    try:
        with httpx.Client(transport=transport, timeout=timeout, verify=tls.context()) as client:
            answer = client.post(url, json={"user_id": user_id, "passcode": passcode})
    except httpx.TransportError as err:
        problem = diagnose(err, url, tls, "the identity provider", timeout)
        raise problem from None
    if answer.status_code == 401:
        raise SessionError(f"login refused for {user_id}: wrong user or passcode")
    if answer.status_code != 200:
        raise SessionError(f"the identity provider at {url} answered {answer.status_code}")
    try:
        body = answer.json()
    except ValueError:
        raise SessionError(f"the identity provider at {url} answered with no JSON session") from None
    if not isinstance(body, dict):
        raise SessionError(f"the identity provider at {url} answered with no JSON session")
    return Session.from_idp(body, identity_url,
                            f"login refused: the answer of the identity provider at {url}",
                            "Smartcard users and role profiles are identified by SDS ids")


def save(session: Session, path: str | Path) -> None:
    """Write the session file readable by its owner only (mode 0600): it holds a credential."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(session.to_json(), out, indent=2)
    os.chmod(path, 0o600)


def load(path: str | Path) -> Session:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SessionError(f"{path}: no session file; log in first with scr-nb login") from None
    except (OSError, ValueError) as err:
        raise SessionError(f"{path}: not a session file ({err}); log in again with scr-nb login") from None
    if not isinstance(data, dict):
        raise SessionError(f"{path}: not a session file; log in again with scr-nb login")
    return Session.from_idp(data, data.get("identity_url", ""), f"the session file {path}",
                            "log in again with scr-nb login")
