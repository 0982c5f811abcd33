"""The Smartcard session an upload runs under (SPEC 7): login, the session file, B0062.

The kit does not trust the token: the Spine verifies it on every request. The kit only reads the
activities and the expiry it was given, to refuse early and never to send with an expired session.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx

from scr_nb.constants import B0062, B0062_TEXT
from scr_nb.errors import SessionError


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
    def from_idp(cls, answer: dict, identity_url: str = "") -> "Session":
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


def login(identity_url: str, user_id: str, passcode: str, *,
          transport: httpx.BaseTransport | None = None, timeout: float = 30.0) -> Session:
    """Ask the identity provider for a session (SPEC 10: POST {base}/identity/session)."""
    url = session_endpoint(identity_url)
    try:
        with httpx.Client(transport=transport, timeout=timeout) as client:
            answer = client.post(url, json={"user_id": user_id, "passcode": passcode})
    except httpx.HTTPError as err:
        raise SessionError(f"cannot reach the identity provider at {url}: {err}") from None
    if answer.status_code == 401:
        raise SessionError(f"login refused for {user_id}: wrong user or passcode")
    if answer.status_code != 200:
        raise SessionError(f"the identity provider at {url} answered {answer.status_code}")
    return Session.from_idp(answer.json(), identity_url)


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
    return Session.from_idp(data, data.get("identity_url", ""))
