"""Identities ([[identity]] rules, matching, per-identity policy), TLS configuration,
and the worker's TLS stream over a socket pair."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from p11guard.config import ConfigError, load_server_config, parse_server_config
from p11guard.config.model import IdentityRule, Listener, TlsConfig
from p11guard.policy.model import ModuleEntry, Policy, Rule
from p11guard.server import identity as ident
from p11guard.server.tls import TlsError, TlsStream, listener_uses_tls, server_context
from tests.support.pki import Pki, make_pki

DATA = Path(__file__).parent.parent / "data" / "config"
MIN = ('[[listen]]\ntcp = "127.0.0.1:1"\n[modules]\nsigning = "/x.so"\nadmin = "/y.so"\n')


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_identity_rules_are_read(pki: Pki) -> None:
    fp = pki.clients["good"].sha256
    colon_fp = ":".join(fp[i:i + 2] for i in range(0, 64, 2)).upper()
    cfg = parse_server_config(MIN + f"""
[[identity]]
name = "build"
cert_sha256 = "{colon_fp}"
spki_sha256 = "sha256//{pki.clients['good'].spki_pin}"
subject_cn = ["build-*", "ci-*"]
modules = ["signing"]
read_only = true

[[identity]]
name = "root"
uid = 0
user = "root"
group = "root"
modules = ["*"]
admin = true
""", "/etc/p11guard/server.toml")
    build, root = cfg.identities
    assert build.cert_sha256 == (fp,) and build.spki_sha256 == (pki.clients["good"].spki_pin,)
    assert build.subject_cn == ("build-*", "ci-*") and build.read_only and not build.admin
    assert build.line == 7
    assert root.uids == (0, 0) and root.gids == (0,) and root.modules == ("*",) and root.admin


@pytest.mark.parametrize(("body", "message"), [
    ('name = "x"\nmodules = ["signing"]\n', "needs at least one of"),
    ('name = "x"\nuid = 1\n', "needs modules"),
    ('name = "x"\nuid = 1\nmodules = ["nope"]\n', "module 'nope' is not a configured alias"),
    ('name = "x"\ncert_sha256 = "abcd"\nmodules = ["*"]\n', "bad SHA-256 fingerprint"),
    ('name = "x"\nspki_sha256 = "abcd"\nmodules = ["*"]\n', "bad SPKI pin"),
    ('name = "x"\nuser = "no-such-user-p11guard"\nmodules = ["*"]\n', "unknown user"),
    ('name = "x"\nuid = 1\nmodules = ["*"]\ncolour = 1\n', "unknown key"),
    ('uid = 1\nmodules = ["*"]\n', "name"),
    ('name = "x"\nuid = -1\nmodules = ["*"]\n', "uid must be"),
    ('name = "x"\nuid = 1\nmodules = ["*"]\nread_only = "yes"\n', "read_only must be"),
])
def test_identity_errors_are_located(body: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_server_config(MIN + "\n[[identity]]\n" + body, "s.toml")
    assert message in str(info.value)
    assert str(info.value).startswith("s.toml:7: identity:")


def test_duplicate_identity() -> None:
    rule = '\n[[identity]]\nname = "x"\nuid = 1\nmodules = ["*"]\n'
    with pytest.raises(ConfigError, match="defined twice"):
        parse_server_config(MIN + rule + rule, "s.toml")


def peer(**kw: object) -> ident.PeerIdentity:
    return ident.PeerIdentity(address="1.2.3.4:5", **kw)  # type: ignore[arg-type]


def test_matching_and_first_match() -> None:
    rules = (
        IdentityRule("a", subject_cn=("build-*",), san=("*.example.org",), modules=("signing",)),
        IdentityRule("b", cert_sha256=("ab" * 32,), modules=("*",)),
        IdentityRule("c", uids=(1000,), gids=(50,), modules=("*",)),
    )
    ok = ident.authorize(rules, peer(subject_cn=("build-7",), sans=("b7.example.org",)), None)
    assert ok.allowed and ok.rule is rules[0]
    # Every matcher of a rule must hold: a SAN outside the pattern fails rule a.
    no = ident.authorize(rules, peer(subject_cn=("build-7",), sans=("evil.test",)), None)
    assert not no.allowed and no.reason == "no [[identity]] rule matches"
    assert ident.authorize(rules, peer(cert_sha256="ab" * 32), None).rule is rules[1]
    assert ident.authorize(rules, peer(uid=1000, gid=7, groups=(50,)), None).rule is rules[2]
    assert not ident.authorize(rules, peer(uid=1000, gid=7, groups=(51,)), None).allowed
    # Caml Crush's allowed_clients_cert_path comes first; no rules = everyone it lets in.
    assert not ident.authorize((), peer(cert_sha256="cd" * 32), frozenset({"ab" * 32})).allowed
    assert ident.authorize((), peer(), None).allowed


def test_policy_and_modules_for_an_identity() -> None:
    base = Policy(modules=(ModuleEntry("signing", "/x.so"), ModuleEntry("admin", "/y.so")),
                  forbid_admin_operations=(Rule("admin", False),))
    ro = IdentityRule("ro", uids=(1,), modules=("signing",), read_only=True)
    admin = IdentityRule("adm", uids=(0,), modules=("*",), admin=True)
    p = ident.policy_for(ro, base)
    assert p.enforce_ro_sessions[0] == Rule(".*", True)
    assert p.forbid_admin_operations[0] == Rule(".*", True)  # admin defaults to false
    assert ident.policy_for(admin, base) == base
    assert ident.policy_for(None, base) is base
    mods = {"signing": "/x.so", "admin": "/y.so"}
    assert ident.modules_for(ro, mods) == {"signing": "/x.so"}
    assert ident.modules_for(admin, mods) == mods == ident.modules_for(None, mods)


def test_certificate_facts_and_allowed_dir(pki: Pki, tmp_path: Path) -> None:
    good = pki.clients["good"]
    facts = ident.certificate_facts(good.der)
    assert facts["cert_sha256"] == good.sha256 and facts["spki_sha256"] == good.spki_pin
    assert facts["subject_cn"] == ("build-01",) and facts["sans"] == ("build-01.example.org",)
    (tmp_path / "a.pem").write_bytes(good.cert.read_bytes())
    (tmp_path / "junk.txt").write_text("not a certificate")
    assert ident.load_allowed_certs(str(tmp_path)) == frozenset({good.sha256})


def test_tls_settings_and_listeners(tmp_path: Path) -> None:
    cfg = parse_server_config(MIN.replace('tcp = "127.0.0.1:1"\n', 'tcp = "127.0.0.1:1"\n'
                                          '[[listen]]\nunix = "/tmp/a.sock"\ntls = true\n'
                                          '[[listen]]\nunix = "/tmp/b.sock"\n')
                              + '[tls]\ncert_file = "c"\nkey_file = "k"\nca_file = "ca"\n'
                              'min_version = "1.3"\nciphers = "ECDHE+AESGCM"\n'
                              'handshake_timeout = 3\n', "/etc/p11guard/s.toml")
    assert cfg.tls is not None and cfg.tls.min_version == "1.3"
    assert cfg.tls.handshake_timeout == 3.0 and cfg.tls.ciphers == "ECDHE+AESGCM"
    assert [listener_uses_tls(spec, cfg) for spec in cfg.listeners] == [True, True, False]
    with pytest.raises(ConfigError, match="needs ca_file"):
        parse_server_config(MIN + '[tls]\ncert_file = "c"\nkey_file = "k"\n', "s.toml")
    with pytest.raises(ConfigError, match="min_version"):
        parse_server_config(MIN + '[tls]\ncert_file = "c"\nkey_file = "k"\nca_file = "a"\n'
                            'min_version = "1.1"\n', "s.toml")
    # Caml Crush: use_ssl wraps every address of the service.
    netplex = load_server_config(DATA / "pkcs11proxyd-tls.conf", mode="compat")
    assert all(spec.tls for spec in netplex.listeners)
    assert listener_uses_tls(Listener("unix", path="/x"), netplex) is False  # spec.tls unset


def pair(pki: Pki, client: str | None, timeout: float = 5.0,
         **tls: object) -> tuple[ssl.SSLSocket | BaseException, TlsStream | BaseException]:
    """Handshake a Python client against TlsStream over a socket pair."""
    cfg = TlsConfig(cert_file=str(pki.server.cert), key_file=str(pki.server.key),
                    ca_file=str(pki.ca.path), **tls)  # type: ignore[arg-type]
    a, b = socket.socketpair()
    stream = TlsStream(b, server_context(cfg))
    result: list[TlsStream | BaseException] = []

    def serve() -> None:
        try:
            stream.handshake(timeout)
            result.append(stream)
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki.ca.path))
    if client:
        ctx.load_cert_chain(str(pki.clients[client].cert), str(pki.clients[client].key))
    try:
        side: ssl.SSLSocket | BaseException = ctx.wrap_socket(a, server_hostname="localhost")
    except BaseException as exc:
        side = exc
    t.join()
    return side, result[0]


def test_tls_stream_round_trip_and_concurrency(pki: Pki) -> None:
    client, stream = pair(pki, "good")
    assert isinstance(client, ssl.SSLSocket) and isinstance(stream, TlsStream)
    assert stream.version() == "TLSv1.3" and stream.peer_certificate() == pki.clients["good"].der
    # One thread blocked in recv while another sends: the worker's pattern.
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(stream.recv(1000)))
    reader.start()
    stream.sendall(b"reply-1" * 1000)
    data = b""
    while len(data) < 7000:
        data += client.recv(65536)
    assert data == b"reply-1" * 1000
    client.sendall(b"call-2")
    reader.join(5)
    assert got == [b"call-2"]
    client.close()
    assert stream.recv(10) == b""
    stream.close()


def server_config(pki: Pki) -> TlsConfig:
    return TlsConfig(str(pki.server.cert), str(pki.server.key), str(pki.ca.path))


def test_tls_stream_refusals(pki: Pki) -> None:
    _, stream = pair(pki, None)
    assert isinstance(stream, TlsError) and "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(stream)
    _, stream = pair(pki, "expired")
    assert isinstance(stream, TlsError) and "certificate has expired" in str(stream)
    a, b = socket.socketpair()
    with a:
        ts = TlsStream(b, server_context(server_config(pki)))
        with pytest.raises(TlsError, match=r"not finished after 0\.2s") as info:
            ts.handshake(0.2)
        assert not info.value.probe
    a, b = socket.socketpair()
    a.close()
    ts = TlsStream(b, server_context(server_config(pki)))
    with pytest.raises(TlsError) as info:
        ts.handshake(1)
    assert info.value.probe  # closed without a byte: a port check, not audited
