"""Transport security to the Spine and its identity provider (SPEC 6.5 and 10).

One ``TlsSettings`` (the CA bundle, the client certificate and its key) is built from the options
once and handed to the Spine client and to login; both use the ``ssl.SSLContext`` it makes (TLS
1.2 or newer). ``check_url`` refuses plain ``http://`` to anything but this machine, before any
connection. ``check_connection`` makes one complete non-clinical request (a GET of a base URL) and
says in plain words what failed: a job makes it before anything else, and the Spine client makes it
again when a request dies without an answer, to tell a TLS failure (never retried) from a
transient connection error (retried).

In TLS 1.3 a server that refuses the client certificate does so after the handshake has completed
on the client's side, often by closing the connection without a word: only a complete request
shows it, as an HTTPS connection closed before any HTTP answer.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from scr_nb.errors import OptionError, TlsFailure, Unreachable

# Where each setting comes from outside the command line (SPEC 10).
ENVIRONMENT = {"ca_bundle": "SCR_NB_CA_BUNDLE", "client_cert": "SCR_NB_CLIENT_CERT",
               "client_key": "SCR_NB_CLIENT_KEY"}
CHECK_TIMEOUT = 10.0      # seconds for the connection check at the start of a job
# OpenSSL alerts by which a server says it will not take the client certificate.
CLIENT_CERTIFICATE_ALERTS = frozenset({
    "TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    "TLSV1_ALERT_UNKNOWN_CA", "TLSV1_ALERT_ACCESS_DENIED",
})


@dataclass(frozen=True)
class TlsSettings:
    """The CA bundle that decides which servers are trusted (None: this machine's own), and the
    client certificate and key that identify this system to the Spine (None: no client
    certificate). Paths as given."""

    ca_bundle: str | None = None
    client_cert: str | None = None
    client_key: str | None = None

    @classmethod
    def from_options(cls, ca_bundle: str | None = None, client_cert: str | None = None,
                     client_key: str | None = None,
                     environ: Mapping[str, str] | None = None) -> "TlsSettings":
        """The settings given, each one not given (None or empty) taken from the environment
        (SCR_NB_CA_BUNDLE, SCR_NB_CLIENT_CERT, SCR_NB_CLIENT_KEY)."""
        environ = os.environ if environ is None else environ
        given = {"ca_bundle": ca_bundle, "client_cert": client_cert, "client_key": client_key}
        return cls(**{name: (str(value) if value else None) or environ.get(ENVIRONMENT[name])
                      or None for name, value in given.items()})

    def context(self) -> ssl.SSLContext:
        """The client-side SSL context: server certificates verified against the CA bundle (and
        host names checked), the client certificate presented, TLS 1.2 or newer. Raises
        OptionError, naming the file, when a file cannot be read or used."""
        if bool(self.client_cert) != bool(self.client_key):
            raise OptionError(
                "a client certificate needs its private key and a key needs its certificate: give "
                "both --client-cert and --client-key (or SCR_NB_CLIENT_CERT and SCR_NB_CLIENT_KEY)")
        for what, path in (("CA bundle", self.ca_bundle), ("client certificate", self.client_cert),
                           ("client key", self.client_key)):
            if path:
                _readable(what, path)
        try:
            context = ssl.create_default_context(cafile=self.ca_bundle or None)
        except (ssl.SSLError, ValueError) as err:
            raise OptionError(f"the CA bundle {self.ca_bundle} holds no usable CA certificate "
                              f"({_reason(err)})") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.client_cert:
            try:
                context.load_cert_chain(self.client_cert, self.client_key)
            except (ssl.SSLError, ValueError) as err:
                raise OptionError(f"the client certificate {self.client_cert} and key "
                                  f"{self.client_key} cannot be used together ({_reason(err)}): "
                                  "give the PEM certificate and its own private key") from None
        return context

    def check(self) -> None:
        """Raise OptionError now, before anything happens, when the settings cannot be used."""
        self.context()

    def trusted_by(self) -> str:
        return (f"--ca-bundle {self.ca_bundle}" if self.ca_bundle
                else "this machine's certificate authorities (no --ca-bundle was given)")


def _readable(what: str, path: str) -> None:
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as err:
        raise OptionError(f"the {what} {path} cannot be read ({err.strerror or err})") from None


def _reason(err: BaseException) -> str:
    return getattr(err, "reason", None) or str(err) or type(err).__name__


# --- URLs --------------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: the only hosts plain http:// may go to."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, what: str = "the Spine URL") -> str:
    """The URL, or OptionError when it is not http(s) or is plain http:// to another machine
    (the token and patient data would cross the network in clear)."""
    try:
        parts = urlsplit(str(url))
        host = parts.hostname
        parts.port   # raises on a port that is not a number
    except ValueError:
        raise OptionError(f"{what} {url!r} is not a URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise OptionError(f"{what} {url!r} is not an https:// URL")
    if parts.scheme == "http" and not is_loopback(host):
        raise OptionError(f"{what} {url} is plain http:// to another machine: use https:// "
                          "(plain http is only allowed to 127.0.0.1, ::1 or localhost)")
    return url


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) with the scheme's default port filled in: where a token may go."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme, 0)
    return scheme, (parts.hostname or "").lower(), port


def show_origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


# --- the connection check ----------------------------------------------------------------------

def check_connection(url: str, tls: TlsSettings | None = None, timeout: float = CHECK_TIMEOUT,
                     what: str = "the Spine") -> int:
    """One complete GET of ``url`` on a fresh connection, without the session token; returns the
    HTTP status (any answer, even 404, proves TLS works both ways). Raises TlsFailure when the
    client certificate is refused, the server is not trusted or the handshake fails; Unreachable
    when there is no answer for another reason; OptionError for a URL or setting not allowed."""
    check_url(url, f"{what}'s URL")
    tls = tls if tls is not None else TlsSettings.from_options()
    context = tls.context()
    try:
        with httpx.Client(verify=context, timeout=timeout, trust_env=False,
                          follow_redirects=False) as client:
            return client.get(url).status_code
    except httpx.TransportError as err:
        raise diagnose(err, url, tls, what, timeout) from None


def diagnose(err: BaseException, url: str, tls: TlsSettings, what: str = "the Spine",
             timeout: float | None = None) -> TlsFailure | Unreachable:
    """What a request that got no HTTP answer says about the connection, in plain words."""
    where = show_origin(url)
    if isinstance(err, httpx.TimeoutException):
        within = f" within {timeout:g} s" if timeout else ""
        return Unreachable(f"{what} at {where} did not answer{within}")
    found = _ssl_error(err)
    if isinstance(found, ssl.SSLCertVerificationError):
        detail = found.verify_message or _reason(found)
        return TlsFailure(f"{what}'s certificate at {where} is not trusted by {tls.trusted_by()} "
                          f"({detail})")
    if found is not None and str(found.reason) in CLIENT_CERTIFICATE_ALERTS:
        return TlsFailure(_refused_certificate(what, where, tls, _reason(found)))
    if found is not None:
        return TlsFailure(f"the TLS handshake with {what} at {where} failed ({_reason(found)}): "
                          "check the URL is the service's https:// address and that it speaks "
                          "TLS 1.2 or newer")
    closed_after_handshake = isinstance(err, (httpx.RemoteProtocolError, httpx.ReadError,
                                              httpx.WriteError))
    if urlsplit(url).scheme == "https" and closed_after_handshake:
        return TlsFailure(_refused_certificate(
            what, where, tls, "it closed the connection after the TLS handshake without answering"))
    return Unreachable(f"cannot reach {what} at {where} ({_reason(err)})")


def _refused_certificate(what: str, where: str, tls: TlsSettings, detail: str) -> str:
    if not tls.client_cert:
        return (f"{what} at {where} refused the connection without a client certificate "
                f"({detail}): give the endpoint certificate issued for this system with "
                "--client-cert and --client-key (or SCR_NB_CLIENT_CERT and SCR_NB_CLIENT_KEY)")
    return (f"{what} at {where} refused the client certificate {tls.client_cert} ({detail}): "
            "check it is the endpoint certificate issued for this system, with its own key, "
            "from a CA the service trusts")


def _ssl_error(err: BaseException | None) -> ssl.SSLError | None:
    """The ssl.SSLError behind an HTTP library's exception, if any (causes, contexts, args)."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return current
        todo.extend([current.__cause__, current.__context__,
                     *(a for a in current.args if isinstance(a, BaseException))])
    return None


__all__ = ["TlsSettings", "check_connection", "check_url", "diagnose", "is_loopback", "origin"]
