"""The server configuration model, whatever file it came from."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from p11guard.policy.model import Policy

ListenerKind = Literal["tcp", "unix"]
LogTarget = Literal["stderr", "syslog"]
SourceFormat = Literal["toml", "camlcrush"]
PeerAuth = Literal["required", "optional", "none"]
TlsVersion = Literal["1.2", "1.3"]

DEFAULT_MAX_CONNECTIONS = 100
DEFAULT_MAX_RECORD_SIZE = 16 * 1024 * 1024
DEFAULT_SHUTDOWN_GRACE = 10.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_SPARE_WORKERS = 1
MAX_SPARE_WORKERS = 64
# Sanity bounds: a record bigger than this is a bug or an attack, not a PKCS#11 call.
MIN_RECORD_SIZE = 4096
MAX_RECORD_SIZE = 1 << 30


@dataclass(frozen=True, slots=True)
class Listener:
    """One socket to listen on: TCP ``host:port`` or a Unix socket ``path``."""

    kind: ListenerKind
    host: str | None = None
    port: int | None = None
    path: str | None = None
    mode: int | None = None  # permissions of the Unix socket file (e.g. 0o660)
    # TLS on this listener: None = the default (TCP listeners when [tls] is set).
    tls: bool | None = None

    def __str__(self) -> str:
        if self.kind == "tcp":
            host = f"[{self.host}]" if self.host and ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        suffix = f" (mode {self.mode:04o})" if self.mode is not None else ""
        return f"unix:{self.path}{suffix}"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Server-side TLS: certificate chain, key, client CA, options."""

    cert_file: str
    key_file: str
    ca_file: str | None = None
    # Caml Crush passes a GnuTLS priority string; kept verbatim for the TLS layer.
    algorithms: str | None = None
    peer_auth: PeerAuth = "required"
    # A directory of client certificates (PEM) allowed to connect (exact match).
    allowed_clients_cert_path: str | None = None
    min_version: TlsVersion = "1.2"
    # OpenSSL cipher string for TLS 1.2 (TLS 1.3 suites are OpenSSL's defaults).
    ciphers: str | None = None
    # Seconds a client has to finish the handshake (done in the worker).
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT


@dataclass(frozen=True, slots=True)
class IdentityRule:
    """One ``[[identity]]``: who (all given matchers must hold) -> what they may use.

    Within one matcher the values are alternatives.  Certificate matchers need a
    TLS client certificate; uid/user/gid/group need a Unix socket peer.
    """

    name: str
    cert_sha256: tuple[str, ...] = ()  # lower-case hex, no colons
    spki_sha256: tuple[str, ...] = ()  # standard base64 of SHA-256(SubjectPublicKeyInfo)
    subject_cn: tuple[str, ...] = ()  # shell-style patterns (fnmatch, case-sensitive)
    san: tuple[str, ...] = ()  # patterns over DNS, e-mail, URI and IP SAN entries
    uids: tuple[int, ...] = ()
    users: tuple[str, ...] = ()
    gids: tuple[int, ...] = ()
    groups: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()  # configured aliases this identity may load; "*" = all
    read_only: bool = False  # adds enforce_ro_sessions for every alias
    admin: bool = False  # False adds forbid_admin_operations for every alias
    policy_file: str | None = None  # a whole policy of its own (filter.conf or .toml)
    line: int | None = None


SeccompAction = Literal["kill", "trap", "errno", "log"]


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    """Worker hardening: seccomp allow-list installed after C_Initialize."""

    seccomp: bool = True
    action: SeccompAction = "kill"
    allow: tuple[str, ...] = ()  # syscalls added to the built-in list (unrestricted)
    deny: tuple[str, ...] = ()  # syscalls removed from the built-in list


@dataclass(frozen=True, slots=True)
class ModuleInit:
    """How the worker initialises one module alias (``[modules.<alias>]`` tables).

    ``os_locking``: pass CKF_OS_LOCKING_OK (needed for parallel calls; a module
    that refuses it is called serially).  ``init_reserved``: the
    CK_C_INITIALIZE_ARGS.pReserved string (NSS softokn's ``configdir=...``),
    NUL-terminated.  ``raw_mechanism_params``: protocol v4 may forward a RAW
    (client-memory) parameter for a mechanism p11guard does not know, from a
    client of the server's own architecture.
    """

    os_locking: bool = True
    init_reserved: str | None = None
    raw_mechanism_params: bool = False


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listeners: tuple[Listener, ...]
    policy: Policy
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_record_size: int = DEFAULT_MAX_RECORD_SIZE
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    # Pre-forked spare workers kept ready for the next connections (0: fork on accept),
    # and whether a spare loads the configured modules (dlopen, no C_Initialize) early.
    spare_workers: int = DEFAULT_SPARE_WORKERS
    preload_modules: bool = True
    user: str | None = None
    group: str | None = None
    tls: TlsConfig | None = None
    identities: tuple[IdentityRule, ...] = ()
    sandbox: SandboxConfig = SandboxConfig()
    chroot: str | None = None
    # Per module alias: C_Initialize arguments and v4 options ([modules.<alias>]).
    module_init: dict[str, ModuleInit] = field(default_factory=dict)
    log_target: LogTarget = "stderr"
    pid_file: str | None = None
    source_format: SourceFormat = "toml"
    source: str = ""
    # Keys accepted for compatibility but with no effect ("not applicable").
    notices: tuple[str, ...] = field(default=(), compare=False)
    # Suspicious but valid settings (duplicate options, unused key, ...).
    warnings: tuple[str, ...] = field(default=(), compare=False)


def resolve_path(path: str, base_dir: str) -> str:
    """``path`` relative to the directory of the file that names it."""
    expanded = os.path.expanduser(path)
    if os.path.isabs(expanded):
        return expanded
    return os.path.normpath(os.path.join(base_dir, expanded))


def parse_host_port(text: str) -> tuple[str, int]:
    """``"127.0.0.1:4444"``, ``"[::1]:4444"``, ``"*:4444"`` -> (host, port); ValueError if bad."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise ValueError(f"bad address {text!r} (expected [ipv6]:port)")
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"bad address {text!r} (expected host:port)")
    if not host:
        raise ValueError(f"bad address {text!r}: missing host")
    if host == "*":
        host = "0.0.0.0"
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bad port {port_text!r} in {text!r} (expected 0..65535)")
    return host, int(port_text)


def parse_mode(value: object) -> int:
    """A socket file mode: an int, or an octal string ``"0660"``/``"0o660"``/``"660"``."""
    if isinstance(value, bool):
        raise ValueError("a file mode must be an octal string or an integer")
    if isinstance(value, int):
        mode = value
    elif isinstance(value, str):
        text = value.lower().removeprefix("0o")
        if not text or any(c not in "01234567" for c in text):
            raise ValueError(f"bad file mode {value!r} (expected octal, e.g. \"0660\")")
        mode = int(text, 8)
    else:
        raise ValueError("a file mode must be an octal string or an integer")
    if not 0 <= mode <= 0o777:
        raise ValueError(f"file mode {value!r} out of range (0..0777)")
    return mode
