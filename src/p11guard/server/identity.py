"""Who is on the other end of a connection, and what may they use.

An identity is the TLS client certificate (SHA-256 fingerprint, SPKI pin,
subject CN, subject alternative names) and, on a Unix socket, the peer's
credentials (SO_PEERCRED uid/gid, SO_PEERGROUPS).  The worker determines it
before it serves a single RPC; :func:`authorize` then picks the first
``[[identity]]`` rule that matches.  With rules configured, a peer that matches
none is refused before any PKCS#11 call.  Every decision goes to the audit log
(logger ``p11guard.audit``) as one JSON object per line.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import fnmatch
import grp
import hashlib
import json
import logging
import os
import pwd
import socket
import ssl
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.model import IdentityRule, ServerConfig, resolve_path
from ..config.policyfile import load_policy_file
from ..policy.model import ConfigError, Policy, Rule

audit_log = logging.getLogger("p11guard.audit")
log = logging.getLogger("p11guard.identity")

CKR_GENERAL_ERROR = 0x5
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
MAX_PEER_GROUPS = 256
IDENTITY_KEYS = frozenset({"name", "cert_sha256", "spki_sha256", "subject_cn", "san", "uid",
                           "user", "gid", "group", "modules", "read_only", "admin", "policy"})
MATCH_KEYS = ("cert_sha256", "spki_sha256", "subject_cn", "san", "uid", "user", "gid", "group")


# --- what we know about the peer ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Facts about one connected peer, gathered before any RPC is served."""

    address: str  # "ip:port" or "unix"
    tls: bool = False
    cert_sha256: str | None = None  # lower-case hex
    spki_sha256: str | None = None  # base64
    subject: str | None = None  # RFC 4514 string, for logs
    subject_cn: tuple[str, ...] = ()
    sans: tuple[str, ...] = ()
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    groups: tuple[int, ...] = ()

    def summary(self) -> dict[str, Any]:
        """The audit-log view (no certificate bytes, nothing secret)."""
        out: dict[str, Any] = {"peer": self.address, "tls": self.tls}
        for key in ("cert_sha256", "spki_sha256", "subject", "uid", "gid"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.pid is not None:
            out["peer_pid"] = self.pid  # "pid" is the worker's
        if self.sans:
            out["san"] = list(self.sans)
        return out


def certificate_facts(der: bytes) -> dict[str, Any]:
    """Fingerprint, SPKI pin, subject, CNs and SANs of a DER certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(der)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    cns = tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    sans: list[str] = []
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    else:
        for kind in (x509.DNSName, x509.RFC822Name, x509.UniformResourceIdentifier):
            sans.extend(str(v) for v in ext.get_values_for_type(kind))
        sans.extend(str(v) for v in ext.get_values_for_type(x509.IPAddress))
    return {
        "cert_sha256": hashlib.sha256(der).hexdigest(),
        "spki_sha256": base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii"),
        "subject": cert.subject.rfc4514_string(),
        "subject_cn": cns,
        "sans": tuple(sans),
    }


def unix_peer_credentials(sock: socket.socket) -> tuple[int, int, int, tuple[int, ...]] | None:
    """(pid, uid, gid, supplementary gids) of a Unix socket peer, as of connect()."""
    if sock.family != socket.AF_UNIX:
        return None
    try:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET,
                                                             socket.SO_PEERCRED, 12))
    except OSError:
        return None
    groups: tuple[int, ...] = ()
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * MAX_PEER_GROUPS)
        groups = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    except OSError:  # older kernels, or more groups than we asked room for
        pass
    return pid, uid, gid, groups


def peer_identity(sock: socket.socket, peer: str, cert_der: bytes | None,
                  tls: bool) -> PeerIdentity:
    facts: dict[str, Any] = certificate_facts(cert_der) if cert_der else {}
    creds = unix_peer_credentials(sock)
    if creds is not None:
        pid, uid, gid, groups = creds
        facts.update(pid=pid, uid=uid, gid=gid, groups=groups)
    address = "unix" if sock.family == socket.AF_UNIX else peer
    return PeerIdentity(address=address, tls=tls, **facts)


# --- matching ----------------------------------------------------------------------


def _matches(rule: IdentityRule, peer: PeerIdentity) -> bool:
    """All matchers given in ``rule`` hold for ``peer`` (each matcher: any of its values)."""
    checks: list[bool] = []
    if rule.cert_sha256:
        checks.append(peer.cert_sha256 in rule.cert_sha256)
    if rule.spki_sha256:
        checks.append(peer.spki_sha256 in rule.spki_sha256)
    if rule.subject_cn:
        checks.append(any(fnmatch.fnmatchcase(cn, pat)
                          for cn in peer.subject_cn for pat in rule.subject_cn))
    if rule.san:
        checks.append(any(fnmatch.fnmatchcase(san, pat)
                          for san in peer.sans for pat in rule.san))
    if rule.uids:
        checks.append(peer.uid is not None and peer.uid in rule.uids)
    if rule.gids:
        gids = set(peer.groups) | ({peer.gid} if peer.gid is not None else set())
        checks.append(bool(gids & set(rule.gids)))
    return bool(checks) and all(checks)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    rule: IdentityRule | None = None


def authorize(rules: Iterable[IdentityRule], peer: PeerIdentity,
              allowed_certs: frozenset[str] | None) -> Decision:
    """May ``peer`` be served at all, and under which rule?

    ``allowed_certs``: SHA-256 fingerprints from Caml Crush's
    ``allowed_clients_cert_path`` (None when that option is not used).
    """
    if allowed_certs is not None and peer.cert_sha256 not in allowed_certs:
        return Decision(False, "client certificate is not in allowed_clients_cert_path")
    rules = tuple(rules)
    if not rules:
        return Decision(True, "no identity rules configured")
    for rule in rules:
        if _matches(rule, peer):
            return Decision(True, f"identity {rule.name!r}", rule)
    return Decision(False, "no [[identity]] rule matches")


def alias_allowed(rule: IdentityRule | None, alias: str) -> bool:
    """May the identity load the configured alias ``alias``?  (No rule: yes, as Caml Crush.)"""
    return rule is None or "*" in rule.modules or alias in rule.modules


def modules_for(rule: IdentityRule | None, modules: Mapping[str, str]) -> dict[str, str]:
    return {alias: path for alias, path in modules.items() if alias_allowed(rule, alias)}


def policy_for(rule: IdentityRule | None, policy: Policy) -> Policy:
    """The identity's policy: ``policy`` with its read-only / admin restrictions first.

    enforce_ro_sessions and forbid_admin_operations are first-match rules, so a
    leading ``.*`` rule wins over whatever the base policy says for an alias.
    """
    if rule is None:
        return policy
    changes: dict[str, Any] = {}
    if rule.read_only:
        changes["enforce_ro_sessions"] = (Rule(".*", True), *policy.enforce_ro_sessions)
    if not rule.admin:
        changes["forbid_admin_operations"] = (Rule(".*", True), *policy.forbid_admin_operations)
    return dataclasses.replace(policy, **changes) if changes else policy


# --- allowed_clients_cert_path -----------------------------------------------------------


def load_allowed_certs(directory: str) -> frozenset[str]:
    """SHA-256 fingerprints of every certificate in the PEM/DER files of ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    out: set[str] = set()
    for path in sorted(Path(directory).iterdir()):
        if not path.is_file():
            continue
        data = path.read_bytes()
        try:
            certs = (x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data
                     else [x509.load_der_x509_certificate(data)])
        except ValueError:
            log.warning("allowed_clients_cert_path: %s is not a certificate (skipped)", path)
            continue
        for cert in certs:
            out.add(hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest())
    if not out:
        log.warning("allowed_clients_cert_path %s holds no certificate: every client "
                    "will be refused", directory)
    return frozenset(out)


# --- audit -------------------------------------------------------------------------


def audit(event: str, **fields: Any) -> None:
    """One JSON object per line on the ``p11guard.audit`` logger."""
    record = {"event": event, "pid": os.getpid(), **fields}
    audit_log.info("%s", json.dumps(record, sort_keys=True, default=str))


# --- configuration ([[identity]] tables) ----------------------------------------------

Fail = Callable[..., ConfigError]


def _strings(value: object, what: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(
            isinstance(v, str) and v for v in items):
        raise ValueError(f"{what} must be a non-empty string or list of strings")
    return tuple(str(v) for v in items)


def _ints(value: object, what: str) -> tuple[int, ...]:
    items = [value] if isinstance(value, int) else value
    if not isinstance(items, list) or not items or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 for v in items):
        raise ValueError(f"{what} must be an id or a non-empty list of ids")
    return tuple(int(v) for v in items)


def normalise_fingerprint(text: str) -> str:
    hexdigits = text.replace(":", "").strip().lower()
    if len(hexdigits) != 64 or any(c not in "0123456789abcdef" for c in hexdigits):
        raise ValueError(f"bad SHA-256 fingerprint {text!r} (64 hex digits, colons allowed)")
    return hexdigits


def normalise_pin(text: str) -> str:
    body = text.removeprefix("sha256//").removeprefix("pin-sha256:").strip().strip('"')
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"bad SPKI pin {text!r} (base64 of a SHA-256 digest, as openssl "
                         "pkey -pubout -outform DER | openssl dgst -sha256 -binary | base64)")
    return base64.b64encode(raw).decode("ascii")


def _user_ids(names: tuple[str, ...]) -> tuple[int, ...]:
    out = []
    for name in names:
        try:
            out.append(pwd.getpwnam(name).pw_uid)
        except KeyError:
            raise ValueError(f"unknown user {name!r}") from None
    return tuple(out)


def _group_ids(names: tuple[str, ...]) -> tuple[int, ...]:
    out = []
    for name in names:
        try:
            out.append(grp.getgrnam(name).gr_gid)
        except KeyError:
            raise ValueError(f"unknown group {name!r}") from None
    return tuple(out)


def _identity(entry: Mapping[str, Any], aliases: tuple[str, ...], base: str) -> IdentityRule:
    unknown = set(entry) - IDENTITY_KEYS
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("name (a non-empty string) is required")
    if not any(k in entry for k in MATCH_KEYS):
        raise ValueError(f"identity {name!r} needs at least one of {', '.join(MATCH_KEYS)}")
    if "modules" not in entry:
        raise ValueError(f"identity {name!r} needs modules = [aliases it may load] "
                         "(or [\"*\"])")
    modules = _strings(entry["modules"], "modules")
    policy_file = entry.get("policy")
    if policy_file is not None and (not isinstance(policy_file, str) or not policy_file):
        raise ValueError("policy must be the path of a filter.conf or .toml policy")
    if policy_file is None:
        for alias in modules:
            if alias != "*" and alias not in aliases:
                raise ValueError(f"identity {name!r}: module {alias!r} is not a configured "
                                 f"alias ({', '.join(aliases)})")
    flags = {}
    for key in ("read_only", "admin"):
        value = entry.get(key, False)
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false")
        flags[key] = value
    return IdentityRule(
        name=name,
        cert_sha256=tuple(normalise_fingerprint(v)
                          for v in _strings(entry["cert_sha256"], "cert_sha256"))
        if "cert_sha256" in entry else (),
        spki_sha256=tuple(normalise_pin(v) for v in _strings(entry["spki_sha256"], "spki_sha256"))
        if "spki_sha256" in entry else (),
        subject_cn=_strings(entry["subject_cn"], "subject_cn") if "subject_cn" in entry else (),
        san=_strings(entry["san"], "san") if "san" in entry else (),
        # Names are resolved once, at start-up: a worker (possibly chrooted) needs no
        # passwd lookup, and a typo fails loudly instead of matching nobody.
        uids=(_ints(entry["uid"], "uid") if "uid" in entry else ())
        + (_user_ids(_strings(entry["user"], "user")) if "user" in entry else ()),
        gids=(_ints(entry["gid"], "gid") if "gid" in entry else ())
        + (_group_ids(_strings(entry["group"], "group")) if "group" in entry else ()),
        users=_strings(entry["user"], "user") if "user" in entry else (),
        groups=_strings(entry["group"], "group") if "group" in entry else (),
        modules=modules,
        read_only=flags["read_only"],
        admin=flags["admin"],
        policy_file=resolve_path(policy_file, base) if policy_file else None,
    )


def read_identities(raw: object, aliases: tuple[str, ...], *, fail: Fail, base: str,
                    line_of: Callable[[str, int], int | None]) -> tuple[IdentityRule, ...]:
    """The ``[[identity]]`` array of a TOML server file (see docs/deployment.md)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise fail("identity", "must be an array of tables: [[identity]]")
    out: list[IdentityRule] = []
    seen: set[str] = set()
    for index, entry in enumerate(raw):
        line = line_of(r"\s*\[\[\s*identity\s*\]\]", index)
        if not isinstance(entry, dict):
            raise fail("identity", "each identity must be a table", line)
        try:
            rule = _identity(entry, aliases, base)
        except ValueError as exc:
            raise fail("identity", str(exc), line) from None
        if rule.name in seen:
            raise fail("identity", f"identity {rule.name!r} defined twice", line)
        seen.add(rule.name)
        out.append(dataclasses.replace(rule, line=line))
    return tuple(out)


# --- the gate: everything between accept() and the first RPC ----------------------------


@dataclass
class Admission:
    """A peer that may be served, and what it may use."""

    stream: Any  # the socket, or a TlsStream over it (worker.Stream)
    peer: PeerIdentity
    rule: IdentityRule | None
    policy: Policy
    modules: dict[str, str]

    @property
    def identity(self) -> str | None:
        return self.rule.name if self.rule else None

    def close(self) -> None:
        self.stream.close()


class Gate:
    """Built in the listener (reads certificates and policies as root); used in workers."""

    def __init__(self, config: ServerConfig, tls_context: ssl.SSLContext | None) -> None:
        self.config = config
        self.tls_context = tls_context
        self.rules = config.identities
        self.allowed_certs: frozenset[str] | None = None
        tls = config.tls
        if tls is not None and tls.allowed_clients_cert_path:
            self.allowed_certs = load_allowed_certs(tls.allowed_clients_cert_path)
        self.timeout = tls.handshake_timeout if tls is not None else 10.0
        self.policies: dict[str, Policy] = {}
        for rule in self.rules:
            if rule.policy_file is not None:
                own = load_policy_file(rule.policy_file, mode=config.policy.mode).policy
                aliases = {m.alias for m in own.modules}
                missing = [a for a in rule.modules if a != "*" and a not in aliases]
                if missing:
                    raise ConfigError(f"identity {rule.name!r}: module(s) {', '.join(missing)} "
                                      f"not configured in {rule.policy_file}",
                                      file=config.source, line=rule.line, option="identity")
                self.policies[rule.name] = own

    def admit(self, conn: socket.socket, peer: str, use_tls: bool) -> Admission | None:
        """Handshake (TLS listeners), identify, authorise; None = refused (and audited)."""
        from .tls import TlsError, TlsStream

        stream: Any = conn
        cert: bytes | None = None
        extra: dict[str, Any] = {}
        if use_tls:
            assert self.tls_context is not None
            tls_stream = TlsStream(conn, self.tls_context)
            try:
                tls_stream.handshake(self.timeout)
            except TlsError as exc:
                if exc.probe:
                    log.debug("%s connected and closed without a TLS handshake", peer)
                else:
                    audit("refused", peer=peer, reason=str(exc))
                return None
            stream = tls_stream
            cert = tls_stream.peer_certificate()
            extra = {"tls_version": tls_stream.version(), "cipher": tls_stream.cipher()}
        try:
            identity = peer_identity(conn, peer, cert, use_tls)
        except ValueError as exc:  # a certificate our parser rejects
            audit("refused", peer=peer, reason=f"unreadable client certificate: {exc}")
            return None
        decision = authorize(self.rules, identity, self.allowed_certs)
        if not decision.allowed:
            audit("refused", reason=decision.reason, **identity.summary(), **extra)
            return None
        rule = decision.rule
        policy = policy_for(rule, self.policies.get(rule.name, self.config.policy)
                            if rule else self.config.policy)
        modules = modules_for(rule, {m.alias: m.path for m in policy.modules})
        audit("connected", identity=rule.name if rule else None, modules=sorted(modules),
              read_only=bool(rule and rule.read_only), **identity.summary(), **extra)
        return Admission(stream, identity, rule, policy, modules)


Handler = Callable[[int, tuple[Any, ...]], tuple[Any, ...]]


def guard_load_module(handler: Handler, admission: Admission,
                      matcher: Callable[[str, str], bool]) -> Handler:
    """Audit (and refuse) a LoadModule of an alias the identity may not use.

    The dispatcher only knows the identity's own aliases, so it would refuse
    anyway; this adds the audit line saying who asked for what.
    """
    from ..wire.procedures import BY_NAME

    load_module = BY_NAME["LoadModule"].number
    every = {m.alias for m in admission.policy.modules}

    def guarded(number: int, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if number == load_module:
            name = bytes(args[0]).decode("ascii", "replace")
            if not any(a == name or matcher(a, name) for a in admission.modules) and any(
                    a == name or matcher(a, name) for a in every):
                audit("refused", identity=admission.identity, peer=admission.peer.address,
                      reason="module alias not allowed for this identity", alias=name)
                return (CKR_GENERAL_ERROR,)
        return handler(number, args)

    return guarded
