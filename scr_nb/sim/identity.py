"""The demo identity provider: a users file, and the session tokens it issues (SPEC 7, 10).

Tokens are standard JSON Web Tokens, as NHS Care Identity Service 2 issues them, made and checked
with PyJWT: HS256 with the simulator's secret, the claims ``iss``, ``sub`` (the SDS user id),
``aud``, ``iat`` and ``exp``, and the user's ``name``, ``role_profile_id`` and ``activities``. The
Spine side verifies every token it is given (signature, issuer, audience, expiry) and authorises
from its claims alone: a token is never trusted for what it says about itself, and nothing else
the client sends (a header, a session file) adds to what it may do.
"""

from __future__ import annotations

import hmac
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jwt

from scr_nb import constants
from scr_nb.errors import ScrNbError, SessionError
from scr_nb.spine.session import is_sds_id

USER_FIELDS = ("user_id", "passcode", "name", "role_profile_id", "activities")
ISSUER = "scr-nb-spine-sim/identity"      # iss of every token the simulator issues
AUDIENCE = "scr-nb-spine-sim/clinical"    # aud: the simulated Spine's clinical service
ALGORITHM = "HS256"
REQUIRED_CLAIMS = ("iss", "sub", "aud", "iat", "exp")


class InvalidToken(SessionError):
    """A session token the Spine side will not accept. ``reason`` is missing, garbled, forged,
    wrong_issuer, wrong_audience, incomplete or expired."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(f"{message}; log in again to get a new session")


class UsersFileError(ScrNbError):
    """The identity provider's users file (or list) cannot be used; the message names the entry."""


def issue_token(user: dict, secret: bytes, now: float, hours: float, *, issuer: str = ISSUER,
                audience: str = AUDIENCE) -> tuple[str, str]:
    """Sign a session for ``user`` valid ``hours`` from ``now``; returns (token, expires_at ISO 8601)."""
    exp = int(math.floor(now + hours * 3600.0))
    claims = {
        "iss": issuer,
        "sub": user["user_id"],
        "aud": audience,
        "iat": int(math.floor(now)),
        "exp": exp,
        "name": user["name"],
        "role_profile_id": user["role_profile_id"],
        "activities": list(user["activities"]),
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM), iso_utc(exp)


def verify_token(token: str | None, secret: bytes, now: float, *, issuer: str = ISSUER,
                 audience: str = AUDIENCE) -> dict[str, Any]:
    """The claims of a token signed with ``secret`` for ``issuer`` and ``audience`` and not
    expired at ``now``; else InvalidToken saying why.

    PyJWT checks the algorithm, the signature, ``iss``, ``aud`` and that every required claim is
    there. The expiry is checked here, with no leeway, against ``now``, the simulator's clock,
    because PyJWT only reads the system clock and the simulator's time is injected (tests move it)."""
    if not token:
        raise InvalidToken("missing", "no session token was given")
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], issuer=issuer,
                            audience=audience,
                            options={"require": list(REQUIRED_CLAIMS), "verify_exp": False,
                                     "verify_iat": False, "verify_nbf": False})
    except jwt.InvalidSignatureError:
        raise InvalidToken("forged", "the session token's signature does not verify "
                                     "(forged, altered, or issued by another identity provider)") from None
    except jwt.InvalidAlgorithmError:
        raise InvalidToken("forged", f"the session token is not signed with {ALGORITHM}") from None
    except jwt.InvalidIssuerError:
        raise InvalidToken("wrong_issuer", "the session token was issued by another identity "
                                           "provider") from None
    except jwt.InvalidAudienceError:
        raise InvalidToken("wrong_audience", "the session token is not meant for this "
                                             "service (audience)") from None
    except jwt.MissingRequiredClaimError as err:
        raise InvalidToken("incomplete", f"the session token has no '{err.claim}' claim") from None
    except jwt.InvalidTokenError as err:
        raise InvalidToken("garbled", f"the session token is not a readable JSON Web Token "
                                      f"({err})") from None
    if not _claims_look_right(claims):
        raise InvalidToken("incomplete", "the session token's claims are incomplete")
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
        for name in ("user_id", "role_profile_id"):
            if not is_sds_id(entry[name]):
                raise UsersFileError(f"{where}: '{name}' {entry[name]!r} is not a 12-digit SDS id "
                                     "(e.g. 555000000001)")
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
    activities = claims.get("activities")
    return (isinstance(claims.get("sub"), str)
            and isinstance(claims.get("name"), str)
            and isinstance(claims.get("role_profile_id"), str)
            and isinstance(activities, list) and all(isinstance(a, str) for a in activities)
            and isinstance(exp, (int, float)) and not isinstance(exp, bool))
