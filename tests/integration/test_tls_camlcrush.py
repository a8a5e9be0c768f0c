"""TLS interoperability with Debian's Caml Crush 1.0.12, both directions.

* Debian's ``libp11clienttcpssl.so`` (OpenSSL, TLS >= 1.2, no host name check)
  against a p11guard TLS listener configured from an unchanged Caml Crush
  ``pkcs11proxyd.conf`` (``use_ssl = true; tls { ... }`` and
  ``allowed_clients_cert_path``): pkcs11-tool lists, generates and signs.
* Debian's ``pkcs11proxyd`` with ``use_ssl = true`` against a Python ``ssl``
  client speaking the wire protocol: the peer our C client will talk to.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.net import free_tcp_port, wait_for_tcp
from tests.support.pki import Pki, audit_events, make_pki, tls_client_context, tls_connect
from tests.support.servers import CAMLCRUSH_TLS, P11GUARD, PKCS11PROXYD, REPO, Server
from tests.support.softhsm import Token

pytestmark = pytest.mark.camlcrush

CKR_OK = 0


def netplex_tls_conf(workdir: Path, pki: Pki, token: Token, port: int, *,
                     allowed_dir: Path | None) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "netplex").mkdir(exist_ok=True)
    filter_conf = workdir / "filter.conf"
    filter_conf.write_text(f'debug = 0\nmodules = [("softhsm", "{token.module}")]\n'
                           "log_subchannel = filter\n")
    allowed = f'allowed_clients_cert_path = "{allowed_dir}";' if allowed_dir else ""
    conf = workdir / "pkcs11proxyd.conf"
    conf.write_text(f"""netplex {{
  controller {{ max_level = "debug"; socket_directory = "{workdir / 'netplex'}";
               logging {{ type = "stderr"; }}; }};
  service {{
    name = "PKCS#11 Filtering Proxy";
    conn_limit = 1;
    protocol {{ name = "rpc_pkcs11";
               address {{ type = "internet"; bind = "127.0.0.1:{port}"; }}; }};
    processor {{ type = "rpc_pkcs11"; filter_config = "{filter_conf}"; use_ssl = true;
                {allowed}
                tls {{ algorithms = "NORMAL:-VERS-ALL:+VERS-TLS1.2"; peer_auth = "required";
                      x509 {{ key {{ crt_file = "{pki.server.cert}";
                                   key_file = "{pki.server.key}"; }};
                             trust {{ crt_file = "{pki.ca.path}"; }}; }}; }};
    }};
    workload_manager {{ type = "dynamic"; max_jobs_per_thread = 1; min_free_jobs_capacity = 1;
                       max_free_jobs_capacity = 1; max_threads = 20; }};
  }}
}}
""")
    return conf


def start(kind: str, conf: Path, token: Token, port: int) -> Server:
    log = conf.parent / f"{kind}.log"
    cmd = ([*P11GUARD, "serve", "--config", str(conf), "--foreground"] if kind == "p11guard"
           else [PKCS11PROXYD, "-fg", "-conf", str(conf)])
    env = token.env
    env.setdefault("PYTHONPATH", str(REPO / "src"))
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=conf.parent, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(proc, f"127.0.0.1:{port}", "softhsm", log, conf.parent)
    try:
        wait_for_tcp(port)
    except TimeoutError:
        server.stop()
        raise RuntimeError(f"{kind} did not start:\n{server.log_text()}") from None
    return server


def tls_env(server: Server, pki: Pki, client: str) -> dict[str, str]:
    issued = pki.clients[client]
    return server.client_env(PKCS11PROXY_CA_FILE=str(pki.ca.path),
                             PKCS11PROXY_CERT_FILE=str(issued.cert),
                             PKCS11PROXY_PRIVKEY_FILE=str(issued.key))


def tool(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["pkcs11-tool", "--module", CAMLCRUSH_TLS, *args], env=env,
                         capture_output=True, text=True, timeout=120)
    if check and out.returncode != 0:
        raise AssertionError(f"pkcs11-tool {args}: {out.returncode}\n{out.stdout}{out.stderr}")
    return out


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    # RSA keys: the same files also serve Debian's GnuTLS-based pkcs11proxyd.
    return make_pki(tmp_path / "pki", key_kind="rsa")


@pytest.fixture
def p11guard_netplex_tls(pki: Pki, token: Token, tmp_path: Path) -> Iterator[Server]:
    allowed = tmp_path / "clients"
    allowed.mkdir()
    shutil.copy(pki.clients["good"].cert, allowed / "build-01.pem")
    port = free_tcp_port()
    conf = netplex_tls_conf(tmp_path / "srv", pki, token, port, allowed_dir=allowed)
    server = start("p11guard", conf, token, port)
    yield server
    server.stop()


def test_debian_tls_client_against_p11guard(p11guard_netplex_tls: Server, pki: Pki,
                                            tmp_path: Path) -> None:
    env = tls_env(p11guard_netplex_tls, pki, "good")
    assert "token label        : test" in tool(env, "-L").stdout
    login = ("--token-label", "test", "--login", "--pin", "1234")
    tool(env, *login, "--keypairgen", "--key-type", "rsa:2048", "--id", "01", "--label", "k")
    data = tmp_path / "data.bin"
    data.write_bytes(b"signed through TLS" * 4)
    sig = tmp_path / "sig.bin"
    tool(env, *login, "--sign", "--id", "01", "-m", "SHA256-RSA-PKCS", "-i", str(data),
         "-o", str(sig))
    out = tool(env, *login, "--verify", "--id", "01", "-m", "SHA256-RSA-PKCS", "-i", str(data),
               "--signature-file", str(sig))
    assert "Signature is valid" in out.stdout
    connected = [e for e in audit_events(p11guard_netplex_tls) if e["event"] == "connected"]
    # Debian's client allows TLS 1.3 and p11guard prefers it (Caml Crush's GnuTLS
    # priority string in the same file limits pkcs11proxyd to 1.2).
    assert connected and connected[0]["tls_version"] == "TLSv1.3"
    assert connected[0]["cert_sha256"] == pki.clients["good"].sha256


def test_client_missing_from_allowed_clients_cert_path_is_refused(
        p11guard_netplex_tls: Server, pki: Pki) -> None:
    out = tool(tls_env(p11guard_netplex_tls, pki, "good2"), "-L", check=False)
    assert out.returncode != 0 or "token label" not in out.stdout
    time.sleep(0.3)
    refused = [e for e in audit_events(p11guard_netplex_tls) if e["event"] == "refused"]
    assert refused and "allowed_clients_cert_path" in str(refused[0]["reason"])
    assert refused[0]["cert_sha256"] == pki.clients["good2"].sha256


def test_python_tls_client_against_debian_pkcs11proxyd(pki: Pki, token: Token,
                                                       tmp_path: Path) -> None:
    port = free_tcp_port()
    conf = netplex_tls_conf(tmp_path / "cc", pki, token, port, allowed_dir=None)
    server = start("camlcrush", conf, token, port)
    try:
        ctx = tls_client_context(pki, "good")
        with tls_connect(server.address, ctx) as c:
            assert c.sock.version() == "TLSv1.2"  # type: ignore[attr-defined]
            assert c.rv("SetupArch", 1) == 1
            assert c.rv("LoadModule", b"softhsm") == CKR_OK
            assert c.rv("Initialize") == CKR_OK
            rv, slots, count = c.call("GetSlotList", 1, 16)
            assert rv == CKR_OK and count >= 1
            rv, session = c.call("OpenSession", slots[0], 4)
            assert rv == CKR_OK
            rv, data = c.call("GenerateRandom", session, 16)
            assert rv == CKR_OK and len(data) == 16
        # Caml Crush's server requires a client certificate too.
        with pytest.raises(OSError), \
                tls_connect(server.address, tls_client_context(pki, None)) as c:
            c.rv("SetupArch", 1)
    finally:
        server.stop()
