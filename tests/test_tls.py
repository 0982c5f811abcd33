"""Mutual TLS to the Spine and its identity provider (SPEC 6.5, 10), against the simulator serving
HTTPS on loopback with a throwaway PKI (tests/conftest.py ``pki``): what the Spine holds, what the
store says, what the command printed and its exit code."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from scr_nb.errors import OptionError, TlsFailure, Unreachable
from scr_nb.job.options import JobOptions
from scr_nb.job.runner import run_upload
from scr_nb.sim.spine_sim import ServerTls
from scr_nb.spine import session as sessions
from scr_nb.spine.tls import TlsSettings, check_connection, check_url
from scr_nb.store.log import PracticeLog
from scr_nb.store.practice_store import read_status
from scr_nb.store.states import Mode
from scr_nb.ui import cli
from tests.conftest import ADMIN
from tests.test_engine import eligible_numbers, held

REFUSAL_SECONDS = 20     # the whole `python -m scr_nb upload` process, interpreter start included


@pytest.fixture(autouse=True)
def no_tls_from_the_environment(monkeypatch):
    for name in ("SCR_NB_CA_BUNDLE", "SCR_NB_CLIENT_CERT", "SCR_NB_CLIENT_KEY"):
        monkeypatch.delenv(name, raising=False)


def trusted(pki) -> TlsSettings:
    return TlsSettings(str(pki.ca), str(pki.client_cert), str(pki.client_key))


def login(spine, pki, tmp_path, monkeypatch, *tls_options) -> object:
    """`scr-nb login` over TLS; the session file."""
    monkeypatch.setenv("SCR_NB_PASSCODE", ADMIN["passcode"])
    session = tmp_path / "session.json"
    options = list(tls_options) or pki.client_options()
    assert cli.main(["login", "--identity", spine.url, "--user", ADMIN["user_id"],
                     "--session", str(session), *options]) == 0
    return session


def upload_command(mode, practice, tmp_path, spine_url, session, *extra) -> list[str]:
    return [sys.executable, "-m", "scr_nb", "upload", mode, "--practice", str(practice),
            "--store", str(tmp_path / "s.sqlite"), "--spine", spine_url, "--session",
            str(session), "--quiet", *extra]


def refused_upload(practice, tmp_path, spine, session, *tls_options):
    """A `python -m scr_nb upload run` process with these TLS options: (exit code, stderr, s)."""
    started = time.monotonic()
    done = subprocess.run(upload_command("run", practice, tmp_path, spine.url, session,
                                         *tls_options),
                          capture_output=True, text=True, timeout=120)
    return done.returncode, done.stderr, time.monotonic() - started


def assert_nothing_happened(spine, tmp_path):
    """No clinical request reached the Spine, no job was recorded, no patient failed, and the
    refusal is in the practice log."""
    assert spine.simulator.stats()["requests"] == 0
    assert spine.simulator.summaries() == []
    status = read_status(tmp_path / "s.sqlite")
    assert status["latest_job"] is None
    assert status["counters"]["failed"] == 0 and status["counters"]["sent"] == 0
    events = list(PracticeLog(tmp_path / "s.sqlite").read())
    assert [e["event"] for e in events] == ["refused"]
    assert events[0]["user_id"] == ADMIN["user_id"]
    return events[0]


# --- (a) an upload over mutual TLS --------------------------------------------------------------

def test_an_upload_over_mutual_tls_acknowledges_every_eligible_patient_once(
        practice, tmp_path, spine_factory, pki, monkeypatch, capsys, today):
    spine = spine_factory(tls=pki.server(mutual=True))
    assert spine.url.startswith("https://127.0.0.1:")
    session = login(spine, pki, tmp_path, monkeypatch)
    code = cli.main(["upload", "run", "--practice", str(practice), "--store",
                     str(tmp_path / "s.sqlite"), "--spine", spine.url, "--session", str(session),
                     "--quiet", *pki.client_options()])
    assert code == 0, capsys.readouterr().err
    eligible = eligible_numbers(practice, today)
    summaries = spine.simulator.summaries()
    assert len(summaries) == len(eligible) and set(held(spine)) == eligible
    stats = spine.simulator.stats()
    assert stats["accepted"] == len(eligible) and stats["rejected_by_code"] == {}
    assert read_status(tmp_path / "s.sqlite")["counters"]["sent"] == len(eligible)
    # The inspection endpoints answer over mutual TLS too, to a client with a certificate.
    with httpx.Client(verify=trusted(pki).context(), timeout=10) as client:
        assert client.get(spine.url + "/_admin/stats").json()["accepted"] == len(eligible)
        assert len(client.get(spine.url + "/_admin/summaries").json()) == len(eligible)


def test_the_tls_options_come_from_the_environment(practice, tmp_path, spine_factory, pki,
                                                   monkeypatch, today):
    spine = spine_factory(tls=pki.server(mutual=True))
    monkeypatch.setenv("SCR_NB_CA_BUNDLE", str(pki.ca))
    monkeypatch.setenv("SCR_NB_CLIENT_CERT", str(pki.client_cert))
    monkeypatch.setenv("SCR_NB_CLIENT_KEY", str(pki.client_key))
    monkeypatch.setenv("SCR_NB_PASSCODE", ADMIN["passcode"])
    session = tmp_path / "session.json"
    assert cli.main(["login", "--identity", spine.url, "--user", ADMIN["user_id"],
                     "--session", str(session)]) == 0
    outcome = run_upload(practice, tmp_path / "s.sqlite", spine.url, session,
                         JobOptions(mode=Mode.RUN))
    assert outcome.exit_code == 0, outcome.message
    assert set(held(spine)) == eligible_numbers(practice, today)


# --- (b), (c), (d) certificate failures refuse the job before anything is sent ------------------

def test_a_client_certificate_from_another_ca_is_refused_at_once(practice, tmp_path,
                                                                 spine_factory, pki, monkeypatch):
    spine = spine_factory(tls=pki.server(mutual=True))
    session = login(spine, pki, tmp_path, monkeypatch)
    code, err, seconds = refused_upload(practice, tmp_path, spine, session,
                                        "--ca-bundle", str(pki.ca),
                                        "--client-cert", str(pki.stranger_cert),
                                        "--client-key", str(pki.stranger_key))
    assert code == 3, err
    assert seconds < REFUSAL_SECONDS
    assert f"the Spine at {spine.url} refused the client certificate {pki.stranger_cert}" in err
    refusal = assert_nothing_happened(spine, tmp_path)
    assert "refused the client certificate" in refusal["reason"]


def test_no_client_certificate_is_refused_at_once(practice, tmp_path, spine_factory, pki,
                                                  monkeypatch):
    spine = spine_factory(tls=pki.server(mutual=True))
    session = login(spine, pki, tmp_path, monkeypatch)
    code, err, seconds = refused_upload(practice, tmp_path, spine, session,
                                        "--ca-bundle", str(pki.ca))
    assert code == 3, err
    assert seconds < REFUSAL_SECONDS
    assert f"the Spine at {spine.url} refused the connection without a client certificate" in err
    assert "--client-cert" in err
    assert_nothing_happened(spine, tmp_path)


def test_a_server_whose_certificate_the_ca_bundle_does_not_trust_is_refused(
        practice, tmp_path, spine_factory, pki, monkeypatch):
    spine = spine_factory(tls=pki.rogue_server())
    session = login(spine, pki, tmp_path, monkeypatch, "--ca-bundle", str(pki.other_ca),
                    "--client-cert", str(pki.client_cert), "--client-key", str(pki.client_key))
    code, err, seconds = refused_upload(practice, tmp_path, spine, session,
                                        *pki.client_options())
    assert code == 3, err
    assert seconds < REFUSAL_SECONDS
    assert f"the Spine's certificate at {spine.url} is not trusted by --ca-bundle {pki.ca}" in err
    assert_nothing_happened(spine, tmp_path)


def test_the_connection_check_names_each_failure(spine_factory, pki):
    """The check the job makes first (and `preflight` will): any HTTP answer passes."""
    mutual = spine_factory(tls=pki.server(mutual=True))
    assert check_connection(mutual.url, trusted(pki)) == 200
    assert check_connection(mutual.url + "/no/such/page", trusted(pki)) == 404
    with pytest.raises(TlsFailure, match="refused the client certificate"):
        check_connection(mutual.url, TlsSettings(str(pki.ca), str(pki.stranger_cert),
                                                 str(pki.stranger_key)))
    with pytest.raises(TlsFailure, match="not trusted by this machine's certificate authorities"):
        check_connection(mutual.url, TlsSettings())
    with pytest.raises(TlsFailure, match="TLS handshake with the identity provider .* failed"):
        plain = spine_factory()
        check_connection(plain.url.replace("http://", "https://"), trusted(pki),
                         what="the identity provider")
    mutual.stop()
    with pytest.raises(Unreachable, match="cannot reach the Spine"):
        check_connection(mutual.url, trusted(pki), timeout=2)
    assert mutual.simulator.stats()["requests"] == 0


# --- (e) options refused before anything happens -----------------------------------------------

def test_plain_http_to_another_machine_is_refused_before_any_connection(practice, tmp_path,
                                                                       pki, capsys):
    """192.0.2.1 is TEST-NET-1: nothing answers there, so only a refusal made before connecting
    can come back at once."""
    started = time.monotonic()
    for argv in (["upload", "run", "--practice", str(practice), "--store",
                  str(tmp_path / "s.sqlite"), "--spine", "http://192.0.2.1:8080", "--session",
                  str(tmp_path / "session.json")],
                 ["login", "--identity", "http://192.0.2.1:8080", "--user", ADMIN["user_id"],
                  "--session", str(tmp_path / "session.json")]):
        with pytest.raises(SystemExit) as caught:
            cli.main(argv)
        assert caught.value.code == 2
        assert "plain http:// to another machine" in capsys.readouterr().err
    outcome = run_upload(practice, tmp_path / "s.sqlite", "http://192.0.2.1:8080",
                         tmp_path / "session.json", JobOptions(mode=Mode.RUN))
    assert outcome.exit_code == 2 and "https://" in outcome.message
    with pytest.raises(OptionError):
        sessions.login("http://192.0.2.1:8080", ADMIN["user_id"], "x")
    assert time.monotonic() - started < 5
    assert not (tmp_path / "s.sqlite").exists() and not (tmp_path / "session.json").exists()
    for url in ("http://127.0.0.1:8900", "http://127.5.6.7:1", "http://[::1]:8900",
                "http://localhost:8900", "https://spine.example.nhs.uk"):
        assert check_url(url) == url
    for url in ("http://spine.example.nhs.uk", "http://10.0.0.1", "ftp://127.0.0.1", "spine"):
        with pytest.raises(OptionError):
            check_url(url)


def test_unreadable_certificates_and_a_certificate_without_its_key_are_exit_2(
        practice, tmp_path, pki, capsys):
    base = ["upload", "run", "--practice", str(practice), "--store", str(tmp_path / "s.sqlite"),
            "--spine", "https://127.0.0.1:1", "--session", str(tmp_path / "session.json")]
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    cases = [
        (["--ca-bundle", str(tmp_path / "missing.pem")], "missing.pem cannot be read"),
        (["--client-cert", str(pki.client_cert)], "needs its private key"),
        (["--client-key", str(pki.client_key)], "needs its certificate"),
        (["--client-cert", str(pki.client_cert), "--client-key", str(pki.stranger_key)],
         "cannot be used together"),
        (["--ca-bundle", str(not_pem)], "holds no usable CA certificate"),
    ]
    for options, words in cases:
        for command in (base, ["login", "--identity", "https://127.0.0.1:1", "--user",
                               ADMIN["user_id"], "--session", str(tmp_path / "session.json")]):
            with pytest.raises(SystemExit) as caught:
                cli.main([*command, *options])
            assert caught.value.code == 2
            assert words in capsys.readouterr().err
    assert not (tmp_path / "s.sqlite").exists() and not (tmp_path / "session.json").exists()


# --- (f) the token only goes to the Spine's own origin -----------------------------------------

class _Trap(BaseHTTPRequestHandler):
    """Records every request made to it: none should be."""

    seen: list[dict] = []

    def do_GET(self):   # noqa: N802 - the http.server spelling
        type(self).seen.append({"path": self.path, **dict(self.headers)})
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_poll_location_on_another_origin_is_never_followed(practice, tmp_path, spine_factory,
                                                             today):
    trap = ThreadingHTTPServer(("127.0.0.1", 0), _Trap)
    _Trap.seen = []
    threading.Thread(target=trap.serve_forever, daemon=True).start()
    try:
        elsewhere = f"http://127.0.0.1:{trap.server_address[1]}"   # same host, another port
        spine = spine_factory(poll_location_base=elsewhere)
        session = tmp_path / "session.json"
        sessions.save(sessions.login(spine.url, ADMIN["user_id"], ADMIN["passcode"]), session)
        outcome = run_upload(practice, tmp_path / "s.sqlite", spine.url, session,
                             JobOptions(mode=Mode.RUN))
    finally:
        trap.shutdown()
        trap.server_close()
    assert _Trap.seen == []
    eligible = eligible_numbers(practice, today)
    assert outcome.exit_code == 0
    status = read_status(tmp_path / "s.sqlite")
    assert status["failed_by_code"] == {"poll_location_refused": len(eligible)}
    assert status["counters"]["sent"] == 0
    # The Spine took them (202): uncertain, so Failed re-sends them with their original ids.
    assert spine.simulator.stats()["accepted"] == len(eligible)
    spine.simulator.config.poll_location_base = None
    again = run_upload(practice, tmp_path / "s.sqlite", spine.url, session,
                       JobOptions(mode=Mode.FAILED))
    assert again.exit_code == 0
    stats = spine.simulator.stats()
    assert stats["duplicates"] == len(eligible) and stats["accepted"] == len(eligible)
    assert read_status(tmp_path / "s.sqlite")["counters"]["sent"] == len(eligible)


# --- (g) login over TLS ----------------------------------------------------------------------------

def test_login_over_mutual_tls_and_its_failures(spine_factory, pki, tmp_path, monkeypatch,
                                                capsys):
    spine = spine_factory(tls=pki.server(mutual=True))
    session = login(spine, pki, tmp_path, monkeypatch)
    assert json.loads(session.read_text())["role_profile_id"] == ADMIN["role_profile_id"]
    assert sessions.login(spine.url, ADMIN["user_id"], ADMIN["passcode"],
                          tls=trusted(pki)).user_id == ADMIN["user_id"]
    capsys.readouterr()
    for options, words in (
            (["--ca-bundle", str(pki.ca), "--client-cert", str(pki.stranger_cert),
              "--client-key", str(pki.stranger_key)],
             f"the identity provider at {spine.url} refused the client certificate"),
            (["--ca-bundle", str(pki.other_ca), "--client-cert", str(pki.client_cert),
              "--client-key", str(pki.client_key)],
             f"the identity provider's certificate at {spine.url} is not trusted")):
        code = cli.main(["login", "--identity", spine.url, "--user", ADMIN["user_id"],
                         "--session", str(tmp_path / "other.json"), *options])
        assert code == 3
        assert words in capsys.readouterr().err
    assert not (tmp_path / "other.json").exists()


# --- a TLS failure mid-run ------------------------------------------------------------------------

def test_a_tls_failure_mid_run_stops_the_job_and_fails_no_one(practice, tmp_path, spine_factory,
                                                              pki, today):
    """The Spine stops trusting this system's certificate part-way (the simulator comes back on
    the same port requiring another CA): the job stops with tls_failure, at once, nobody failed;
    Resume over the mended connection finishes with one summary per patient."""
    spine = spine_factory(tls=pki.server(mutual=True), rate_limit_tps=200)
    session = tmp_path / "session.json"
    sessions.save(sessions.login(spine.url, ADMIN["user_id"], ADMIN["passcode"],
                                 tls=trusted(pki)), session)
    outcomes = []
    job = threading.Thread(target=lambda: outcomes.append(run_upload(
        practice, tmp_path / "s.sqlite", spine.url, session,
        JobOptions(mode=Mode.RUN, rate_limit=40, concurrency=4), tls=trusted(pki))),
        daemon=True)
    job.start()
    deadline = time.monotonic() + 30
    while spine.simulator.stats()["accepted"] < 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    refused_at = time.monotonic()
    # The same server certificate, but now only a client certificate from the other CA will do.
    spine.restart(ServerTls(str(pki.server_cert), str(pki.server_key), str(pki.other_ca)))
    job.join(60)
    assert not job.is_alive()
    [outcome] = outcomes
    assert outcome.exit_code == 4, outcome.message
    assert "refused the client certificate" in outcome.message
    assert outcome.job["status"] == "stopped" and outcome.job["reason"] == "tls_failure"
    assert time.monotonic() - refused_at < 15
    status = read_status(tmp_path / "s.sqlite")
    assert status["counters"]["failed"] == 0
    assert 0 < status["counters"]["sent"] < len(eligible_numbers(practice, today))
    stop = [e for e in PracticeLog(tmp_path / "s.sqlite").read() if e["event"] == "stop"]
    assert stop and stop[0]["reason"] == "tls_failure"

    spine.restart(pki.server(mutual=True))
    resumed = run_upload(practice, tmp_path / "s.sqlite", spine.url, session,
                         JobOptions(mode=Mode.RESUME), tls=trusted(pki))
    assert resumed.exit_code == 0, resumed.message
    eligible = eligible_numbers(practice, today)
    assert set(held(spine)) == eligible and len(spine.simulator.summaries()) == len(eligible)
    assert spine.simulator.stats()["rejected_by_code"] == {}
    assert read_status(tmp_path / "s.sqlite")["counters"]["failed"] == 0


def test_spine_sim_serves_mutual_tls_from_the_command_line(tmp_path, pki):
    """`scr-nb spine-sim --tls-cert --tls-key --client-ca`, as the README starts it."""
    users = tmp_path / "users.json"
    users.write_text(json.dumps([ADMIN]))
    with pytest.raises(SystemExit) as caught:
        cli.main(["spine-sim", "--users", str(users), "--tls-cert", str(pki.server_cert)])
    assert caught.value.code == 2
    process = subprocess.Popen(
        [sys.executable, "-m", "scr_nb", "spine-sim", "--port", "0", "--users", str(users),
         "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
         "--client-ca", str(pki.ca)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert "listening on https://127.0.0.1:" in line, line or process.stderr.read()
        url = line.split()[-1]
        assert check_connection(url, trusted(pki)) == 200
        with pytest.raises(TlsFailure):
            check_connection(url, TlsSettings(str(pki.ca)))
    finally:
        process.terminate()
        process.wait(30)
