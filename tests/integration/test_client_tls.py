"""libp11guard.so over TLS (OpenSSL), against real servers.

* A p11guard TLS listener (TOML configuration, mutual authentication, SoftHSM2
  behind it): pkcs11-tool lists, generates keys, signs and verifies, over
  ``tls://``, plain ``host:port`` + ``PKCS11PROXY_CA_FILE`` (Caml Crush's way)
  and ``tls+unix://``; threads and fork; the ASan build.
* Server authentication is the client's job: a server whose chain does not
  lead to our CA is refused, and so is one whose certificate names another
  host, unless ``PKCS11PROXY_TLS_VERIFY_HOSTNAME=0`` (or the right
  ``PKCS11PROXY_TLS_SERVER_NAME``) says otherwise.
* Client authentication is the server's: an expired client certificate, one
  from another CA, or none, is refused, and ``C_Initialize`` says why in one
  line.
* Bad TLS files: ``C_Initialize`` fails with one clear line, never exits.

Debian's ``pkcs11proxyd`` with ``use_ssl = true`` is in test_client_tls_camlcrush.py.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.native.support import (
    LIB,
    build_all,
    run_driver,
    run_restart_scenario,
    sanitizer_report,
)
from tests.support.net import free_tcp_port
from tests.support.pki import Pki, audit_events, issue, make_pki, start_toml_server
from tests.support.servers import Server, start_server
from tests.support.softhsm import SOFTHSM_MODULE, Token

CKR_OK = 0
CKR_GENERAL_ERROR = 0x5
CKR_DEVICE_ERROR = 0x30
LOGIN = ("--token-label", "test", "--login", "--pin", "1234")


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    build_all()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    pki = make_pki(tmp_path / "pki")
    # A server certificate from the right CA for a name we never dial.
    pki.clients["server-elsewhere"] = issue(pki.ca, pki.root, "server-elsewhere",
                                            "elsewhere.example.org", server=True,
                                            sans=("elsewhere.example.org",))
    return pki


def server_toml(pki: Pki, port: int, *, unix: Path | None = None,
                cert: str = "server", peer_auth: str = "required") -> str:
    issued = pki.server if cert == "server" else pki.clients[cert]
    listen = f'[[listen]]\ntcp = "127.0.0.1:{port}"\n'
    if unix is not None:
        listen += f'\n[[listen]]\nunix = "{unix}"\ntls = true\n'
    return f"""
[server]
shutdown_grace = 1

{listen}
[tls]
cert_file = "{issued.cert}"
key_file = "{issued.key}"
ca_file = "{pki.ca.path}"
peer_auth = "{peer_auth}"
handshake_timeout = 5

[modules]
softhsm = "{SOFTHSM_MODULE}"

[policy]
preset = "none"
"""


def start(pki: Pki, token: Token, workdir: Path, port: int | None = None,
          **kw: object) -> Server:
    port = port or free_tcp_port()
    return start_toml_server(workdir, server_toml(pki, port, **kw),  # type: ignore[arg-type]
                             token.env, wait=f"127.0.0.1:{port}")


@pytest.fixture
def tls_server(pki: Pki, token: Token, tmp_path: Path) -> Iterator[Server]:
    server = start(pki, token, tmp_path / "srv", unix=tmp_path / "srv" / "p11.sock")
    yield server
    server.stop()


def tls_env(server: Server, pki: Pki, client: str | None = "good", *,
            address: str | None = None, ca: Path | None = None, **extra: str) -> dict[str, str]:
    env = server.client_env(PKCS11PROXY_CA_FILE=str(ca or pki.ca.path), **extra)
    env["PKCS11PROXY_SOCKET_PATH"] = address or f"tls://{server.address}"
    env["PKCS11PROXY_RPC_TIMEOUT"] = "20"
    if client is not None:
        env["PKCS11PROXY_CERT_FILE"] = str(pki.clients[client].cert)
        env["PKCS11PROXY_PRIVKEY_FILE"] = str(pki.clients[client].key)
    return env


def tool(env: dict[str, str], *args: str, check: bool = True,
         module: Path = LIB) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["pkcs11-tool", "--module", str(module), *args], env=env,
                          capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"pkcs11-tool {args} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def init(env: dict[str, str], *, asan: bool = False) -> tuple[str, list[str]]:
    """C_Initialize through the driver: its output line and our stderr lines."""
    proc = run_driver(["init"], env, asan=asan, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if asan:
        assert sanitizer_report(proc) is None, sanitizer_report(proc)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("p11guard:")]
    return proc.stdout.strip(), ours


def refused(env: dict[str, str], rv: int = CKR_DEVICE_ERROR) -> str:
    """C_Initialize fails with rv and exactly one p11guard line, which is returned."""
    out, lines = init(env)
    assert out.startswith(f"init rv=0x{rv:x} "), out
    assert len(lines) == 1, lines
    return lines[0]


# ---- the real path: pkcs11-tool through TLS ------------------------------------------------

def test_pkcs11_tool_over_tls_list_keygen_sign_verify(tls_server: Server, pki: Pki,
                                                     tmp_path: Path) -> None:
    env = tls_env(tls_server, pki)
    assert "token label        : test" in tool(env, "-L").stdout
    tool(env, *LOGIN, "--keypairgen", "--key-type", "rsa:2048", "--id", "01", "--label", "rsa1")
    tool(env, *LOGIN, "--keypairgen", "--key-type", "EC:prime256v1", "--id", "02",
         "--label", "ec1")
    data = tmp_path / "data.bin"
    data.write_bytes(b"signed over TLS by libp11guard" * 50)
    digest = tmp_path / "digest.bin"  # SoftHSM2 2.6 has plain CKM_ECDSA only
    digest.write_bytes(hashlib.sha256(data.read_bytes()).digest())
    for key_id, mech, src in (("01", "SHA256-RSA-PKCS", data), ("02", "ECDSA", digest)):
        sig = tmp_path / f"{key_id}.sig"
        tool(env, *LOGIN, "--sign", "--id", key_id, "-m", mech, "-i", str(src), "-o", str(sig))
        out = tool(env, *LOGIN, "--verify", "--id", key_id, "-m", mech, "-i", str(src),
                   "--signature-file", str(sig))
        assert "Signature is valid" in out.stdout
    # A large record (several 64 KiB fragments) both ways: a 300 KB digest.
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 1200)
    out = tool(env, "--hash", "-m", "SHA256", "-i", str(big), "-o", str(tmp_path / "h"))
    assert (tmp_path / "h").read_bytes() == hashlib.sha256(big.read_bytes()).digest(), out
    connected = [e for e in audit_events(tls_server) if e["event"] == "connected"]
    assert connected and all(e["tls_version"] == "TLSv1.3" for e in connected)
    assert connected[0]["cert_sha256"] == pki.clients["good"].sha256


def test_caml_crush_style_address_and_tls_unix(tls_server: Server, pki: Pki,
                                              tmp_path: Path) -> None:
    # host:port with PKCS11PROXY_CA_FILE set means TLS (libp11clienttcpssl.so's convention),
    # and the host name is still checked: "localhost" is in the certificate.
    port = tls_server.address.rsplit(":", 1)[1]
    env = tls_env(tls_server, pki, address=f"localhost:{port}")
    assert "token label        : test" in tool(env, "-L").stdout
    # TLS over the Unix socket; the name checked is "localhost" by default.
    env = tls_env(tls_server, pki, address=f"tls+unix://{tmp_path / 'srv' / 'p11.sock'}")
    assert "token label        : test" in tool(env, "-L").stdout
    env["PKCS11PROXY_TLS_SERVER_NAME"] = "wrong.example.org"
    assert "not for 'wrong.example.org'" in refused(env)


def test_threads_fork_and_tls13_only(tls_server: Server, pki: Pki) -> None:
    env = tls_env(tls_server, pki, PKCS11PROXY_TLS_MIN_VERSION="1.3")
    out = tool(env, "--use-locking", "--test-threads", "IN", "--test-threads", "GISLGT",
               "--test-threads", "SLGTGI", "--test-threads", "GIGIGI", "-L")
    assert "token label        : test" in out.stdout
    # The child drops the parent's TLS session without a close_notify and opens its own;
    # the parent's session keeps working (the driver checks both).
    out = tool(env, "--test-fork")
    assert "Calling C_Initialize in forked child process" in out.stdout
    drv = run_driver(["fork"], env | {"P11G_TOKEN": "test", "P11G_PIN": "1234"})
    assert drv.returncode == 0 and "fork done, 0 failures" in drv.stdout, drv.stdout + drv.stderr


def test_asan_build_clean_over_tls(tls_server: Server, pki: Pki) -> None:
    env = tls_env(tls_server, pki) | {"P11G_TOKEN": "test", "P11G_PIN": "1234"}
    out, lines = init(env, asan=True)
    assert out == "init rv=0x0 slotlist rv=0x0" and lines == []
    # Concurrent pipelined calls on one TLS session: one writer, one reader at a time.
    proc = run_driver(["threads", "6", "120"], env, asan=True, timeout=300)
    assert sanitizer_report(proc) is None, sanitizer_report(proc)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_driver(["fork"], env, asan=True, timeout=300)
    assert sanitizer_report(proc) is None, sanitizer_report(proc)
    assert proc.returncode == 0 and "fork done, 0 failures" in proc.stdout, proc.stdout
    # A refused handshake in the ASan build: no leak, no crash.
    bad = tls_env(tls_server, pki, ca=pki.other_ca.path)
    out, lines = init(bad, asan=True)
    assert out.startswith("init rv=0x30 ") and len(lines) == 1


def test_server_restart_and_reconnect_under_asan(pki: Pki, token: Token,
                                                 tmp_path: Path) -> None:
    server = start(pki, token, tmp_path / "srv")
    port = int(server.address.rsplit(":", 1)[1])
    env = tls_env(server, pki, PKCS11PROXY_RPC_TIMEOUT="5")
    env |= {"P11G_TOKEN": "test", "P11G_PIN": "1234"}
    # server.stop(): the worker holding our TLS session goes with it.
    try:
        result, restarted = run_restart_scenario(
            env, server.stop, lambda: start(pki, token, tmp_path / "srv", port=port))
    finally:
        server.stop()  # already stopped unless the driver failed before
    restarted.stop()
    assert sanitizer_report(result) is None, sanitizer_report(result)
    assert result.returncode == 0 and "restart done, 0 failures" in result.stdout, \
        result.stdout + result.stderr
    assert result.stderr.count("p11guard: connection to the proxy lost") == 1, result.stderr


EXIT_WITHOUT_FINALIZE = """
import ctypes, sys
if sys.argv[2] == "ssl-first":
    import ssl  # OpenSSL initialised (and its exit handler registered) before us
lib = ctypes.CDLL(sys.argv[1])
rv = lib.C_Initialize(None)
print("rv", rv, flush=True)
sys.exit(0 if rv == 0 else 3)
"""


@pytest.mark.parametrize("order", ["ssl-first", "us-first"])
def test_exit_without_finalize(tls_server: Server, pki: Pki, order: str) -> None:
    # At exit the session must be closed before OpenSSL tears itself down,
    # whoever initialised OpenSSL first: no crash, no hang.
    proc = subprocess.run(["python3", "-c", EXIT_WITHOUT_FINALIZE, str(LIB), order],
                          env=tls_env(tls_server, pki), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "rv 0", proc.stdout + proc.stderr
    assert proc.stderr == ""


def test_valgrind_clean_over_tls(tls_server: Server, pki: Pki) -> None:
    env = tls_env(tls_server, pki) | {"P11G_TOKEN": "test", "P11G_PIN": "1234"}
    for args in (["init"], ["threads", "3", "10"]):
        proc = run_driver(args, env, valgrind=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "==" not in proc.stderr, proc.stderr  # valgrind -q prints only errors


# ---- server authentication (ours) ---------------------------------------------------------

def test_server_from_another_ca_is_refused(tls_server: Server, pki: Pki) -> None:
    line = refused(tls_env(tls_server, pki, ca=pki.other_ca.path))
    assert "TLS handshake with 127.0.0.1:" in line and "server certificate rejected: " in line
    # Not even the host name opt-out accepts an unknown chain.
    line = refused(tls_env(tls_server, pki, ca=pki.other_ca.path,
                           PKCS11PROXY_TLS_VERIFY_HOSTNAME="0"))
    assert "server certificate rejected: " in line


def test_server_name_mismatch_refused_by_default_accepted_with_opt_out(
        pki: Pki, token: Token, tmp_path: Path) -> None:
    server = start(pki, token, tmp_path / "elsewhere", cert="server-elsewhere")
    try:
        env = tls_env(server, pki)
        line = refused(env)
        assert "the server certificate is not for '127.0.0.1'" in line
        assert "PKCS11PROXY_TLS_VERIFY_HOSTNAME=0" in line
        port = server.address.rsplit(":", 1)[1]
        line = refused(tls_env(server, pki, address=f"tls://localhost:{port}"))
        assert "not for 'localhost'" in line
        # The opt-out: chain still verified, name not.
        out, lines = init(tls_env(server, pki, PKCS11PROXY_TLS_VERIFY_HOSTNAME="0"))
        assert out == "init rv=0x0 slotlist rv=0x0" and lines == []
        # Better: name the host the certificate is for.
        ok = tls_env(server, pki, PKCS11PROXY_TLS_SERVER_NAME="elsewhere.example.org")
        assert "token label        : test" in tool(ok, "-L").stdout
        # Only whole-label wildcards, no CN fallback: a near miss is refused.
        line = refused(tls_env(server, pki, PKCS11PROXY_TLS_SERVER_NAME="example.org"))
        assert "not for 'example.org'" in line
    finally:
        server.stop()


@pytest.mark.parametrize("value", ["maybe", "2"])
def test_unreadable_verify_setting_is_an_error(tls_server: Server, pki: Pki, value: str) -> None:
    line = refused(tls_env(tls_server, pki, PKCS11PROXY_TLS_VERIFY_HOSTNAME=value),
                   CKR_GENERAL_ERROR)
    assert "bad PKCS11PROXY_TLS_VERIFY_HOSTNAME" in line


# ---- client authentication (the server's) --------------------------------------------------

@pytest.mark.parametrize("client,alert", [
    ("expired", "certificate expired"),
    ("wrongca", "unknown ca"),
    (None, "certificate required"),
])
def test_server_refuses_bad_client_certificates(tls_server: Server, pki: Pki,
                                                client: str | None, alert: str) -> None:
    line = refused(tls_env(tls_server, pki, client))
    assert "TLS session with 127.0.0.1 failed during SetupArch" in line or \
        "TLS handshake with 127.0.0.1" in line, line
    assert alert in line, line
    # pkcs11-tool gets an error, not a crash or a hang.
    out = tool(tls_env(tls_server, pki, client), "-L", check=False)
    assert out.returncode != 0 and "token label" not in out.stdout


def test_plain_server_is_refused(pki: Pki, token: Token, tmp_path: Path) -> None:
    # A plain (non-TLS) p11guard listener: the handshake fails, in one line.
    plain = start_server("p11guard", token, tmp_path / "plain")
    try:
        line = refused(tls_env(plain, pki, PKCS11PROXY_RPC_TIMEOUT="3"))
        assert "TLS handshake with 127.0.0.1:" in line
    finally:
        plain.stop()


# ---- bad files: one line, an error code, no exit -------------------------------------------

def test_bad_tls_files(tls_server: Server, pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    line = refused(tls_env(tls_server, pki, ca=missing))
    assert "PKCS11PROXY_CA_FILE" in line and "No such file" in line
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    line = refused(tls_env(tls_server, pki, ca=garbage))
    assert "PKCS11PROXY_CA_FILE" in line and "no usable CA certificate" in line
    env = tls_env(tls_server, pki)
    env["PKCS11PROXY_CERT_FILE"] = str(missing)
    assert "PKCS11PROXY_CERT_FILE" in refused(env)
    env = tls_env(tls_server, pki)
    env["PKCS11PROXY_PRIVKEY_FILE"] = str(pki.clients["good2"].key)
    assert "does not match the certificate" in refused(env)
    # An encrypted key: an error, never a passphrase prompt on the application's terminal.
    enc = tmp_path / "enc.key"
    subprocess.run(["openssl", "pkey", "-in", str(pki.clients["good"].key), "-aes256",
                    "-passout", "pass:secret", "-out", str(enc)], check=True)
    env = tls_env(tls_server, pki)
    env["PKCS11PROXY_PRIVKEY_FILE"] = str(enc)
    assert "cannot load the private key" in refused(env)
    env = tls_env(tls_server, pki, None)
    env["PKCS11PROXY_PRIVKEY_FILE"] = str(pki.clients["good"].key)
    assert "PKCS11PROXY_CERT_FILE is not" in refused(env, CKR_GENERAL_ERROR)
    env = tls_env(tls_server, pki)
    del env["PKCS11PROXY_CA_FILE"]
    assert "TLS needs PKCS11PROXY_CA_FILE" in refused(env, CKR_GENERAL_ERROR)
    line = refused(tls_env(tls_server, pki, PKCS11PROXY_TLS_MIN_VERSION="1.1"), CKR_GENERAL_ERROR)
    assert "bad PKCS11PROXY_TLS_MIN_VERSION" in line
    # A combined PEM (certificate + key) in PKCS11PROXY_CERT_FILE alone works.
    both = tmp_path / "both.pem"
    both.write_bytes(pki.clients["good"].cert.read_bytes() + pki.clients["good"].key.read_bytes())
    env = tls_env(tls_server, pki, None, PKCS11PROXY_CERT_FILE=str(both))
    out, lines = init(env)
    assert out == "init rv=0x0 slotlist rv=0x0" and lines == []
