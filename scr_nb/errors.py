"""The kit's exception tree. Every message says what went wrong and what to do next.

    ScrNbError
     +-- ExtractError        a practice extract that cannot be read (file, line, column)
     +-- RefusedError        a job that must not start (carries the mode to use instead)
     |    +-- SessionError   no session, an invalid or expired one, or no B0062
     +-- SpineError          the Spine answered something the kit cannot use (retriable or not)
     |    +-- SessionRejected  401: the token is missing, forged or expired
     |    +-- AccessDenied     403: this user may not upload (no B0062 in the token)
     |    +-- TlsFailure       certificate refused, server not trusted, handshake failed
     |    +-- Unreachable      no HTTP answer at all (connection refused, timeout)
     +-- StoreError          the store is not one this version can use
     +-- SessionExpired      the Smartcard session ended mid-run
     +-- OptionError         a bad option value: exit 2 before anything happens
"""

from __future__ import annotations


class ScrNbError(Exception):
    """Base of every error the kit raises on purpose."""


class ExtractError(ScrNbError):
    def __init__(self, path: str, message: str, line: int | None = None, column: str | None = None):
        self.path, self.line, self.column = str(path), line, column
        where = self.path
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column '{column}'"
        super().__init__(f"{where}: {message}")


class RefusedError(ScrNbError):
    """A job was refused before anything was sent. ``use_mode`` names the mode to use instead."""

    def __init__(self, message: str, use_mode: str | None = None):
        self.use_mode = use_mode
        super().__init__(message)


class SessionError(RefusedError):
    """No usable Smartcard session: missing, forged, expired, or without B0062."""


class SpineError(ScrNbError):
    def __init__(self, message: str, retriable: bool, status: int | None = None,
                 codes: tuple[str, ...] = ()):
        self.retriable, self.status, self.codes = retriable, status, codes
        super().__init__(message)


class SessionRejected(SpineError):
    """The Spine answered 401: the session token is missing, forged or expired."""

    def __init__(self, message: str = "the Spine rejected the session token (401)"):
        super().__init__(message, retriable=False, status=401)


class AccessDenied(SpineError):
    """The Spine answered 403: the session's user may not upload. Not about the message: the job
    stops (reason ``access_denied``) and no patient is failed for it."""

    def __init__(self, message: str = "the Spine answered 403 Forbidden: this Smartcard role may "
                                      "not upload (it needs RBAC activity B0062)"):
        super().__init__(message, retriable=False, status=403)


class TlsFailure(SpineError):
    """The TLS connection failed for a reason retrying cannot mend (the client certificate was
    refused, the server's certificate is not trusted, the handshake failed). Not transient, and
    not about the message: the job is refused, or stops with reason ``tls_failure``."""

    def __init__(self, message: str):
        super().__init__(message, retriable=False)


class Unreachable(SpineError):
    """No HTTP answer at all (connection refused, reset, timed out), with no sign of TLS trouble."""

    def __init__(self, message: str):
        super().__init__(message, retriable=True)


class OptionError(ScrNbError, ValueError):
    """A bad option value (a negative rate limit, zero concurrency, an unreadable certificate, a
    certificate without its key, plain http:// to another machine): the command exits 2, and the
    panel and the notebooks say what is wrong, before anything happens."""


class StoreError(ScrNbError):
    pass


class SessionExpired(ScrNbError):
    """The Smartcard session ended: the kit stops sending (job reason ``session_expired``)."""
