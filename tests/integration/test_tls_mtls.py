"""Mutual TLS and client identities on a p11guard TCP listener (real SoftHSM2 behind it).

Only a client with a certificate from the configured CA, still valid, and
matching an ``[[identity]]`` rule gets a PKCS#11 session; the others are
refused before any PKCS#11 call, and the audit log says who and why.
"""

from __future__ import annotations

import socket
import ssl
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from p11guard.client import WireClient
from tests.support.net import free_tcp_port
from tests.support.pki import (
    Pki,
    audit_events,
    make_pki,
    start_toml_server,
    tls_client_context,
    tls_connect,
)
from tests.support.servers import Server
from tests.support.softhsm import SOFTHSM_MODULE, Token

CKR_OK = 0
CKR_GENERAL_ERROR = 5
CKF_SERIAL_SESSION = 4


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def server_toml(pki: Pki, port: int, *, extra_tls: str = "", identities: str | None = None) -> str:
    if identities is None:
        identities = f"""
[[identity]]
name = "build-server"
subject_cn = "build-*"
san = "*.example.org"
modules = ["signing"]
read_only = true

[[identity]]
name = "admin-host"
cert_sha256 = "{pki.clients['good2'].sha256}"
modules = ["*"]
admin = true
"""
    return f"""
[server]
shutdown_grace = 1

[[listen]]
tcp = "127.0.0.1:{port}"

[tls]
cert_file = "{pki.server.cert}"
key_file = "{pki.server.key}"
ca_file = "{pki.ca.path}"
handshake_timeout = 2
{extra_tls}

[modules]
signing = "{SOFTHSM_MODULE}"
admin = "{SOFTHSM_MODULE}"

[policy]
preset = "none"
{identities}
"""


@pytest.fixture
def tls_server(pki: Pki, token: Token, tmp_path: Path) -> Iterator[Server]:
    port = free_tcp_port()
    server = start_toml_server(tmp_path / "srv", server_toml(pki, port), token.env,
                               wait=f"127.0.0.1:{port}")
    yield server
    server.stop()


def open_session(c: WireClient, alias: bytes) -> int:
    assert c.rv("SetupArch", 1) == 1
    assert c.rv("LoadModule", alias) == CKR_OK
    assert c.rv("Initialize") == CKR_OK
    rv, slots, count = c.call("GetSlotList", 1, 16)
    assert rv == CKR_OK and count >= 1
    rv, session = c.call("OpenSession", slots[0], CKF_SERIAL_SESSION)
    assert rv == CKR_OK
    return int(session)


def refused_before_rpc(server: Server, client: str | None, pki: Pki) -> None:
    """The connection fails in the handshake or is closed before the first reply."""
    ctx = tls_client_context(pki, client)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)), \
            tls_connect(server.address, ctx) as c:
        c.rv("SetupArch", 1)


def test_good_client_gets_a_session_over_tls13(tls_server: Server, pki: Pki) -> None:
    with tls_connect(tls_server.address, tls_client_context(pki, "good")) as c:
        assert isinstance(c.sock, ssl.SSLSocket) and c.sock.version() == "TLSv1.3"
        session = open_session(c, b"signing")
        rv, data = c.call("GenerateRandom", session, 32)
        assert rv == CKR_OK and len(data) == 32
    events = audit_events(tls_server)
    connected = [e for e in events if e["event"] == "connected"]
    assert connected and connected[0]["identity"] == "build-server"
    assert connected[0]["cert_sha256"] == pki.clients["good"].sha256
    assert connected[0]["spki_sha256"] == pki.clients["good"].spki_pin
    assert connected[0]["modules"] == ["signing"] and connected[0]["read_only"] is True


@pytest.mark.parametrize("client", ["expired", "wrongca", None])
def test_bad_client_certificates_are_refused(tls_server: Server, pki: Pki,
                                             client: str | None) -> None:
    refused_before_rpc(tls_server, client, pki)
    time.sleep(0.3)
    refused = [e for e in audit_events(tls_server) if e["event"] == "refused"]
    assert refused, tls_server.log_text()
    reason = str(refused[-1]["reason"])
    assert "handshake failed" in reason
    expected = {"expired": "certificate has expired",
                "wrongca": "unable to get local issuer certificate",
                None: "PEER_DID_NOT_RETURN_A_CERTIFICATE"}[client]
    assert expected in reason
    # The listener is unaffected: a good client still gets a session.
    with tls_connect(tls_server.address, tls_client_context(pki, "good")) as c:
        open_session(c, b"signing")


def test_valid_certificate_without_identity_rule_is_refused(pki: Pki, token: Token,
                                                           tmp_path: Path) -> None:
    port = free_tcp_port()
    only_admin = f"""
[[identity]]
name = "admin-host"
spki_sha256 = "{pki.clients['good2'].spki_pin}"
modules = ["admin"]
"""
    server = start_toml_server(tmp_path / "srv", server_toml(pki, port, identities=only_admin),
                               token.env, wait=f"127.0.0.1:{port}")
    try:
        refused_before_rpc(server, "good", pki)  # CA-valid, but no rule names it
        with tls_connect(server.address, tls_client_context(pki, "good2")) as c:
            open_session(c, b"admin")
        time.sleep(0.3)
        events = audit_events(server)
        refused = [e for e in events if e["event"] == "refused"]
        assert refused and refused[0]["reason"] == "no [[identity]] rule matches"
        assert refused[0]["cert_sha256"] == pki.clients["good"].sha256
        assert "build-01" in str(refused[0]["subject"])
        assert any(e["event"] == "connected" and e["identity"] == "admin-host" for e in events)
        # Refused before any PKCS#11 call: the worker never loaded a module.
        assert "module " not in server.log_text().split("no [[identity]] rule matches")[0]
    finally:
        server.stop()


def test_identity_allowed_alias_a_cannot_load_alias_b(tls_server: Server, pki: Pki) -> None:
    with tls_connect(tls_server.address, tls_client_context(pki, "good")) as c:
        assert c.rv("SetupArch", 1) == 1
        assert c.rv("LoadModule", b"admin") == CKR_GENERAL_ERROR
        assert c.rv("LoadModule", b"signing") == CKR_OK  # its own alias still loads
    with tls_connect(tls_server.address, tls_client_context(pki, "good2")) as c:
        open_session(c, b"admin")  # the admin host may use both
    time.sleep(0.3)
    refusals = [e for e in audit_events(tls_server) if e["event"] == "refused"]
    assert refusals[0]["alias"] == "admin" and refusals[0]["identity"] == "build-server"


def test_tls_1_1_and_plain_tcp_are_refused(tls_server: Server, pki: Pki) -> None:
    old = tls_client_context(pki, "good")
    with warnings.catch_warnings():  # TLS 1.1 is deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1_1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_connect(tls_server.address, old)
    # TLS 1.2 is still accepted (Caml Crush's client speaks 1.2).
    v12 = tls_client_context(pki, "good")
    v12.maximum_version = ssl.TLSVersion.TLSv1_2
    with tls_connect(tls_server.address, v12) as c:
        assert isinstance(c.sock, ssl.SSLSocket) and c.sock.version() == "TLSv1.2"
        open_session(c, b"signing")
    # A plain RPC client gets nothing back.
    with WireClient.connect(tls_server.address, timeout=10) as c, pytest.raises(
            (ConnectionError, OSError)):
        c.rv("SetupArch", 1)


def test_slow_handshake_times_out_without_blocking_the_listener(tls_server: Server,
                                                                pki: Pki) -> None:
    host, port = tls_server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as idle:
        # While this client sits silent, others are served: the handshake is the worker's.
        with tls_connect(tls_server.address, tls_client_context(pki, "good")) as c:
            open_session(c, b"signing")
        idle.settimeout(10)
        start = time.monotonic()
        assert idle.recv(1024) == b""  # closed by the server after handshake_timeout (2 s)
        assert time.monotonic() - start < 5
    time.sleep(0.2)
    assert any("handshake not finished after 2s" in str(e.get("reason"))
               for e in audit_events(tls_server))


def test_hostname_of_server_certificate(tls_server: Server, pki: Pki) -> None:
    """The server certificate made by tests.support.pki names localhost and 127.0.0.1;
    a client that checks another name refuses the server (the C client's default)."""
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_connect(tls_server.address, tls_client_context(pki, "good"),
                    server_hostname="other.example.org")
