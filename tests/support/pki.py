"""A throwaway PKI for TLS tests, made with the `cryptography` package.

``make_pki(dir)`` writes a CA, a server certificate (for ``localhost`` and
127.0.0.1) and client certificates: two good ones, an expired one and one from
another CA.  Every file is PEM; keys are unencrypted (as Caml Crush's client
requires).  ``start_toml_server`` runs p11guard from a TOML file (for the TLS
and hardening tests) and ``tls_client`` opens a Python TLS client connection.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import socket
import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p11guard.client import WireClient

from .net import wait_for_tcp, wait_for_unix
from .servers import P11GUARD, REPO, Server

Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass
class Issued:
    """A certificate and its key on disk."""

    cert: Path
    key: Path
    der: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.der).hexdigest()

    @property
    def spki_pin(self) -> str:
        import base64

        cert = x509.load_der_x509_certificate(self.der)
        spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@dataclass
class Authority:
    name: str
    key: Key
    cert: x509.Certificate
    path: Path


@dataclass
class Pki:
    root: Path
    ca: Authority
    other_ca: Authority
    server: Issued
    clients: dict[str, Issued] = field(default_factory=dict)


def _key(kind: str) -> Key:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: Key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def make_ca(root: Path, name: str) -> Authority:
    key = _key("ec")
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    path = root / f"{name.replace(' ', '_')}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Authority(name, key, cert, path)


def issue(ca: Authority, root: Path, stem: str, cn: str, *, server: bool = False,
          sans: tuple[str, ...] = (), expired: bool = False, key_kind: str = "ec") -> Issued:
    key = _key(key_kind)
    now = dt.datetime.now(dt.UTC)
    if expired:
        start, end = now - dt.timedelta(days=30), now - dt.timedelta(days=1)
    else:
        start, end = now - dt.timedelta(days=1), now + dt.timedelta(days=30)
    names: list[x509.GeneralName] = []
    for san in sans:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            names.append(x509.RFC822Name(san) if "@" in san else x509.DNSName(san))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca.key.public_key()), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    cert_path, key_path = root / f"{stem}.pem", root / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return Issued(cert_path, key_path, cert.public_bytes(serialization.Encoding.DER))


def make_pki(root: Path, *, key_kind: str = "ec") -> Pki:
    """CA + server (localhost, 127.0.0.1) + clients: good, good2, expired, wrongca."""
    root.mkdir(parents=True, exist_ok=True)
    ca = make_ca(root, "p11guard test CA")
    other = make_ca(root, "some other CA")
    server = issue(ca, root, "server", "localhost", server=True,
                   sans=("localhost", "127.0.0.1"), key_kind=key_kind)
    pki = Pki(root, ca, other, server)
    pki.clients["good"] = issue(ca, root, "client-good", "build-01",
                                sans=("build-01.example.org",), key_kind=key_kind)
    pki.clients["good2"] = issue(ca, root, "client-good2", "admin-host",
                                 sans=("admin.example.org",), key_kind=key_kind)
    pki.clients["expired"] = issue(ca, root, "client-expired", "build-01", expired=True,
                                   key_kind=key_kind)
    pki.clients["wrongca"] = issue(other, root, "client-wrongca", "build-01",
                                   key_kind=key_kind)
    return pki


# --- servers from a TOML configuration, and Python TLS clients -----------------------------


def start_toml_server(workdir: Path, toml_text: str, env: dict[str, str], *,
                      wait: str | Path, extra_args: tuple[str, ...] = ()) -> Server:
    """Start ``p11guard serve`` on ``toml_text``; ``wait``: "127.0.0.1:PORT" or a socket path."""
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "server.toml"
    conf.write_text(toml_text)
    log = workdir / "p11guard.log"
    env = dict(env)
    env.setdefault("PYTHONPATH", str(REPO / "src"))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*P11GUARD, "serve", "--config", str(conf), "--foreground", *extra_args],
            cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = Server(proc, str(wait), "softhsm", log, workdir)
    try:
        if isinstance(wait, Path) or str(wait).startswith("/"):
            wait_for_unix(Path(wait))
        else:
            wait_for_tcp(int(str(wait).rsplit(":", 1)[1]))
    except TimeoutError:
        server.stop()
        raise RuntimeError(f"p11guard did not start:\n{server.log_text()}") from None
    return server


def tls_client_context(pki: Pki, client: str | None = "good", *,
                       check_hostname: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(pki.ca.path))
    ctx.check_hostname = check_hostname
    if client is not None:
        issued = pki.clients[client]
        ctx.load_cert_chain(str(issued.cert), str(issued.key))
    return ctx


def tls_connect(address: str, ctx: ssl.SSLContext, server_hostname: str = "localhost",
                timeout: float = 10.0) -> WireClient:
    """A WireClient over TLS to "host:port" or a Unix socket path."""
    if address.startswith("/"):
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.settimeout(timeout)
        raw.connect(address)
    else:
        host, _, port = address.rpartition(":")
        raw = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        sock = ctx.wrap_socket(raw, server_hostname=server_hostname)
    except BaseException:
        raw.close()
        raise
    return WireClient(sock)


def audit_events(server: Server) -> list[dict[str, object]]:
    """The JSON objects the server wrote to its audit log (p11guard.audit)."""
    out = []
    for line in server.log_text().splitlines():
        if line.startswith("{"):  # the audit log: one bare JSON object per line
            out.append(json.loads(line))
    return out
