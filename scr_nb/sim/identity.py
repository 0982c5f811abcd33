"""The demo identity provider: a users file, and the signed session tokens it issues (SPEC 7, 10).

A token is ``base64url(JSON claims) "." base64url(HMAC-SHA256(secret, first part))``, with the claims
``user_id``, ``name``, ``role_profile_id``, ``activities`` and ``exp`` (epoch seconds). The Spine side
verifies every token it is given: a token is never trusted for what it says about itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from scr_nb import constants
from scr_nb.errors import ScrNbError, SessionError

USER_FIELDS = ("user_id", "passcode", "name", "role_profile_id", "activities")


class InvalidToken(SessionError):
    """A session token the Spine side will not accept. ``reason`` is missing, garbled, forged or expired."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(f"{message}; log in again to get a new session")


class UsersFileError(ScrNbError):
    """The identity provider's users file (or list) cannot be used; the message names the entry."""


def issue_token(user: dict, secret: bytes, now: float, hours: float) -> tuple[str, str]:
    """Sign a session for ``user`` valid ``hours`` from ``now``; returns (token, expires_at ISO 8601)."""
    exp = int(math.floor(now + hours * 3600.0))
    claims = {
        "user_id": user["user_id"],
        "name": user["name"],
        "role_profile_id": user["role_profile_id"],
        "activities": list(user["activities"]),
        "exp": exp,
    }
    payload = _b64encode(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode("utf-8"))
    signature = _b64encode(_sign(payload, secret))
    return f"{payload}.{signature}", iso_utc(exp)


def verify_token(token: str | None, secret: bytes, now: float) -> dict[str, Any]:
    """The claims of a token signed with ``secret`` and not expired at ``now``; else InvalidToken."""
    if not token:
        raise InvalidToken("missing", "no session token was given")
    if not isinstance(token, str) or not token.isascii():
        raise InvalidToken("garbled", "the session token is not plain ASCII text")
    payload, dot, signature = token.partition(".")
    if not dot or not payload or not signature or "." in signature:
        raise InvalidToken("garbled", "the session token is not in the form <claims>.<signature>")
    try:
        given = _b64decode(signature)
    except ValueError:
        raise InvalidToken("garbled", "the session token's signature is not base64url") from None
    if not hmac.compare_digest(given, _sign(payload, secret)):
        raise InvalidToken("forged", "the session token's signature does not verify "
                                     "(forged, altered, or issued by another identity provider)")
    try:
        claims = json.loads(_b64decode(payload))
    except (ValueError, UnicodeDecodeError):
        raise InvalidToken("garbled", "the session token's claims are not readable JSON") from None
    if not isinstance(claims, dict) or not _claims_look_right(claims):
        raise InvalidToken("garbled", "the session token's claims are incomplete")
    if now >= claims["exp"]:
        raise InvalidToken("expired", f"the session expired at {iso_utc(claims['exp'])}")
    return claims


def load_users(path: str | Path) -> list[dict]:
    """Read and check a users file: a JSON list of users (SPEC 10). Errors name the file and entry."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsersFileError(f"{path}: cannot read the users file ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsersFileError(f"{path}: not valid JSON ({exc})") from None
    return check_users(entries, str(path))


def check_users(entries: Any, source: str = "users") -> list[dict]:
    """Check a list of user entries and fill in defaults; ``source`` names where they came from."""
    if not isinstance(entries, list):
        raise UsersFileError(f"{source}: expected a JSON list of users, found {type(entries).__name__}")
    users: list[dict] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries, start=1):
        where = f"{source}, entry {index}"
        if not isinstance(entry, dict):
            raise UsersFileError(f"{where}: expected an object, found {type(entry).__name__}")
        if isinstance(entry.get("user_id"), str) and entry["user_id"]:
            where += f" (user_id {entry['user_id']!r})"
        for name in ("user_id", "passcode", "name", "role_profile_id"):
            value = entry.get(name)
            if not isinstance(value, str) or not value.strip():
                raise UsersFileError(f"{where}: '{name}' must be a non-empty string")
        activities = entry.get("activities")
        if not isinstance(activities, list) or not all(isinstance(a, str) for a in activities):
            raise UsersFileError(f"{where}: 'activities' must be a list of RBAC activity codes "
                                 f"(strings, e.g. [\"{constants.B0062}\"])")
        hours = entry.get("session_hours", constants.SESSION_HOURS)
        if isinstance(hours, bool) or not isinstance(hours, (int, float)) \
                or not math.isfinite(hours) or hours <= 0:
            raise UsersFileError(f"{where}: 'session_hours' must be a positive number of hours")
        if entry["user_id"] in seen:
            raise UsersFileError(f"{where}: user_id is listed twice")
        seen.add(entry["user_id"])
        users.append({**{name: entry[name] for name in USER_FIELDS},
                      "activities": list(activities), "session_hours": float(hours)})
    return users


def find_user(users: list[dict], user_id: Any, passcode: Any) -> dict | None:
    """The listed user with this id and passcode, else None (passcodes compared in constant time)."""
    if not isinstance(user_id, str) or not isinstance(passcode, str):
        return None
    for user in users:
        if user["user_id"] == user_id:
            if hmac.compare_digest(user["passcode"].encode("utf-8"), passcode.encode("utf-8")):
                return user
            return None
    return None


def iso_utc(epoch_seconds: float) -> str:
    """``2024-05-01T09:30:00+00:00``: ISO 8601 with its timezone, as the session file and API carry."""
    return datetime.fromtimestamp(epoch_seconds, tz=timezone.utc).isoformat(timespec="seconds")


def _claims_look_right(claims: dict) -> bool:
    exp = claims.get("exp")
    return (isinstance(claims.get("user_id"), str)
            and isinstance(claims.get("name"), str)
            and isinstance(claims.get("role_profile_id"), str)
            and isinstance(claims.get("activities"), list)
            and isinstance(exp, (int, float)) and not isinstance(exp, bool))


def _sign(payload: str, secret: bytes) -> bytes:
    return hmac.new(secret, payload.encode("ascii"), hashlib.sha256).digest()


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    try:
        raw = text.encode("ascii")
        return base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    except (UnicodeEncodeError, binascii.Error) as exc:
        raise ValueError(str(exc)) from None
