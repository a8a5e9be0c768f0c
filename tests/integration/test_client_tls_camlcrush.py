"""libp11guard.so over TLS against Debian's Caml Crush ``pkcs11proxyd`` (``use_ssl = true``).

pkcs11proxyd speaks TLS through GnuTLS, limited to TLS 1.2 by the priority
string of its ``tls { ... }`` block, and requires a client certificate: the
handshake, the TLS 1.2 cipher choice, client authentication and server
authentication (chain and name) are all exercised against a foreign
implementation here.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_tls_camlcrush import netplex_tls_conf, start
from tests.native.support import LIB, build_all, run_driver
from tests.support.net import free_tcp_port
from tests.support.pki import Pki, make_pki
from tests.support.servers import Server
from tests.support.softhsm import Token

pytestmark = pytest.mark.camlcrush

LOGIN = ("--token-label", "test", "--login", "--pin", "1234")


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    build_all()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    # RSA: the same files serve GnuTLS (pkcs11proxyd) and OpenSSL (us).
    return make_pki(tmp_path / "pki", key_kind="rsa")


@pytest.fixture
def camlcrush_tls(pki: Pki, token: Token, tmp_path: Path) -> Iterator[Server]:
    port = free_tcp_port()
    conf = netplex_tls_conf(tmp_path / "cc", pki, token, port, allowed_dir=None)
    server = start("camlcrush", conf, token, port)
    yield server
    server.stop()


def env_for(server: Server, pki: Pki, client: str = "good", *, ca: Path | None = None,
            scheme: str = "tls://", **extra: str) -> dict[str, str]:
    issued = pki.clients[client]
    env = server.client_env(PKCS11PROXY_CA_FILE=str(ca or pki.ca.path),
                            PKCS11PROXY_CERT_FILE=str(issued.cert),
                            PKCS11PROXY_PRIVKEY_FILE=str(issued.key), **extra)
    env["PKCS11PROXY_SOCKET_PATH"] = scheme + server.address
    return env


def tool(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["pkcs11-tool", "--module", str(LIB), *args], env=env,
                          capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"pkcs11-tool {args} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def one_line_refusal(env: dict[str, str]) -> str:
    proc = run_driver(["init"], env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("init rv=0x30 "), proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.startswith("p11guard:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_list_keygen_sign_verify_against_pkcs11proxyd(camlcrush_tls: Server, pki: Pki,
                                                     tmp_path: Path) -> None:
    env = env_for(camlcrush_tls, pki)
    assert "token label        : test" in tool(env, "-L").stdout
    tool(env, *LOGIN, "--keypairgen", "--key-type", "rsa:2048", "--id", "01", "--label", "k")
    data = tmp_path / "data.bin"
    data.write_bytes(b"signed through Caml Crush over TLS" * 40)
    sig = tmp_path / "sig.bin"
    tool(env, *LOGIN, "--sign", "--id", "01", "-m", "SHA256-RSA-PKCS", "-i", str(data),
         "-o", str(sig))
    out = tool(env, *LOGIN, "--verify", "--id", "01", "-m", "SHA256-RSA-PKCS", "-i", str(data),
               "--signature-file", str(sig))
    assert "Signature is valid" in out.stdout
    # The same through the Caml Crush spelling: host:port + PKCS11PROXY_CA_FILE means TLS.
    assert "token label        : test" in tool(env_for(camlcrush_tls, pki, scheme=""),
                                                "-L").stdout
    # A forked child opens its own session; the parent's GnuTLS session is not disturbed.
    out = tool(env, "--test-fork")
    assert "Calling C_Initialize in forked child process" in out.stdout


def test_pkcs11proxyd_authentication_both_ways(camlcrush_tls: Server, pki: Pki) -> None:
    # Our side: a server from another CA, then a name that is not in its certificate.
    line = one_line_refusal(env_for(camlcrush_tls, pki, ca=pki.other_ca.path))
    assert "server certificate rejected" in line
    line = one_line_refusal(env_for(camlcrush_tls, pki,
                                    PKCS11PROXY_TLS_SERVER_NAME="hsm.example.org"))
    assert "not for 'hsm.example.org'" in line
    # ... which the opt-out accepts (the chain is still checked).
    out = tool(env_for(camlcrush_tls, pki, PKCS11PROXY_TLS_SERVER_NAME="hsm.example.org",
                       PKCS11PROXY_TLS_VERIFY_HOSTNAME="0"), "-L")
    assert "token label        : test" in out.stdout
    # The server's side: an expired client certificate fails the TLS 1.2 handshake.
    line = one_line_refusal(env_for(camlcrush_tls, pki, "expired"))
    assert "TLS handshake with 127.0.0.1:" in line, line
    # TLS 1.3 only cannot meet pkcs11proxyd's TLS 1.2.
    line = one_line_refusal(env_for(camlcrush_tls, pki, PKCS11PROXY_TLS_MIN_VERSION="1.3"))
    assert "TLS handshake with 127.0.0.1:" in line, line
