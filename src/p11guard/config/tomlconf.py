"""Reader for p11guard's own TOML server configuration (see docs/configuration.md)."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from p11guard.config.model import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_RECORD_SIZE,
    DEFAULT_SHUTDOWN_GRACE,
    DEFAULT_SPARE_WORKERS,
    MAX_RECORD_SIZE,
    MAX_SPARE_WORKERS,
    MIN_RECORD_SIZE,
    Listener,
    LogTarget,
    ModuleInit,
    PeerAuth,
    ServerConfig,
    TlsConfig,
    TlsVersion,
    parse_host_port,
    parse_mode,
    resolve_path,
)
from p11guard.config.policyfile import load_policy_file
from p11guard.policy.model import MODES, ConfigError, Mode
from p11guard.policy.readers.common import ReadResult, nth_matching_line
from p11guard.policy.readers.toml import policy_from_mapping, toml_error

TOP_KEYS = frozenset({"server", "listen", "tls", "modules", "policy", "identity", "sandbox"})
SERVER_KEYS = frozenset({"max_connections", "max_record_size", "shutdown_grace", "user", "group",
                         "pid_file", "log", "chroot", "spare_workers", "preload_modules"})
TLS_KEYS = frozenset({"cert_file", "key_file", "ca_file", "algorithms", "peer_auth",
                      "allowed_clients_cert_path", "min_version", "ciphers",
                      "handshake_timeout"})


class _Ctx:
    def __init__(self, text: str, file: str) -> None:
        self.lines = text.splitlines()
        self.file = file
        self.base = os.path.dirname(os.path.abspath(file))

    def line_of(self, pattern: str, nth: int = 0) -> int | None:
        return nth_matching_line(self.lines, pattern, nth)

    def key_line(self, key: str) -> int | None:
        return self.line_of(rf"\s*{re.escape(key)}\s*=")

    def fail(self, option: str, message: str, line: int | None = None) -> ConfigError:
        if line is None:
            line = self.key_line(option.rsplit(".", 1)[-1])
        return ConfigError(message, file=self.file, line=line, option=option)


def _table(ctx: _Ctx, doc: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ctx.fail(name, "must be a table")
    return value


def _check_keys(ctx: _Ctx, table: Mapping[str, Any], allowed: frozenset[str], prefix: str) -> None:
    for key in table:
        if key not in allowed:
            raise ctx.fail(f"{prefix}.{key}" if prefix else key, f"unknown key {key!r}")


def _int(ctx: _Ctx, table: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    if key not in table:
        return default
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ctx.fail(f"server.{key}", "must be an integer")
    if not lo <= value <= hi:
        raise ctx.fail(f"server.{key}", f"must be between {lo} and {hi}, got {value}")
    return value


def _opt_str(ctx: _Ctx, table: Mapping[str, Any], key: str, prefix: str) -> str | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, str) or not value:
        raise ctx.fail(f"{prefix}.{key}", "must be a non-empty string")
    return value


def _listeners(ctx: _Ctx, raw: object) -> tuple[Listener, ...]:
    if not isinstance(raw, list) or not raw:
        raise ctx.fail("listen", "at least one [[listen]] table is required "
                       "(tcp = \"host:port\" or unix = \"/path\")",
                       ctx.line_of(r"\s*\[\[\s*listen\s*\]\]"))
    out: list[Listener] = []
    for index, entry in enumerate(raw):
        line = ctx.line_of(r"\s*\[\[\s*listen\s*\]\]", index)
        if not isinstance(entry, dict):
            raise ctx.fail("listen", "each listener must be a table", line)
        unknown = set(entry) - {"tcp", "unix", "mode", "tls"}
        if unknown:
            raise ctx.fail("listen", f"unknown key(s) {', '.join(sorted(unknown))}", line)
        if ("tcp" in entry) == ("unix" in entry):
            raise ctx.fail("listen", "a listener needs exactly one of tcp or unix", line)
        tls = entry.get("tls")
        if tls is not None and not isinstance(tls, bool):
            raise ctx.fail("listen", "tls must be true or false", line)
        if "tcp" in entry:
            if "mode" in entry:
                raise ctx.fail("listen", "mode only applies to unix listeners", line)
            if not isinstance(entry["tcp"], str):
                raise ctx.fail("listen", "tcp must be a \"host:port\" string", line)
            try:
                host, port = parse_host_port(entry["tcp"])
            except ValueError as exc:
                raise ctx.fail("listen", str(exc), line) from None
            out.append(Listener("tcp", host=host, port=port, tls=tls))
        else:
            path = entry["unix"]
            if not isinstance(path, str) or not path:
                raise ctx.fail("listen", "unix must be a non-empty path", line)
            mode = None
            if "mode" in entry:
                try:
                    mode = parse_mode(entry["mode"])
                except ValueError as exc:
                    raise ctx.fail("listen", str(exc), line) from None
            out.append(Listener("unix", path=resolve_path(path, ctx.base), mode=mode, tls=tls))
    return tuple(out)


def _tls(ctx: _Ctx, raw: dict[str, Any]) -> TlsConfig:
    _check_keys(ctx, raw, TLS_KEYS, "tls")
    cert = _opt_str(ctx, raw, "cert_file", "tls")
    key = _opt_str(ctx, raw, "key_file", "tls")
    if cert is None or key is None:
        raise ctx.fail("tls", "cert_file and key_file are required",
                       ctx.line_of(r"\s*\[\s*tls\s*\]"))
    peer_auth = _opt_str(ctx, raw, "peer_auth", "tls") or "required"
    if peer_auth not in ("required", "optional", "none"):
        raise ctx.fail("tls.peer_auth", f"unknown value {peer_auth!r} (required, optional, none)")
    ca = _opt_str(ctx, raw, "ca_file", "tls")
    allowed = _opt_str(ctx, raw, "allowed_clients_cert_path", "tls")
    min_version = _opt_str(ctx, raw, "min_version", "tls") or "1.2"
    if min_version not in ("1.2", "1.3"):
        raise ctx.fail("tls.min_version", f"must be \"1.2\" or \"1.3\", got {min_version!r}")
    timeout = raw.get("handshake_timeout", DEFAULT_HANDSHAKE_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 600:
        raise ctx.fail("tls.handshake_timeout", "must be a number of seconds in (0, 600]")
    if peer_auth == "required" and ca is None:
        raise ctx.fail("tls.ca_file", "peer_auth = \"required\" needs ca_file (the CA that "
                       "signs client certificates)", ctx.line_of(r"\s*\[\s*tls\s*\]"))
    return TlsConfig(
        cert_file=resolve_path(cert, ctx.base),
        key_file=resolve_path(key, ctx.base),
        ca_file=resolve_path(ca, ctx.base) if ca else None,
        algorithms=_opt_str(ctx, raw, "algorithms", "tls"),
        peer_auth=cast(PeerAuth, peer_auth),
        allowed_clients_cert_path=resolve_path(allowed, ctx.base) if allowed else None,
        min_version=cast(TlsVersion, min_version),
        ciphers=_opt_str(ctx, raw, "ciphers", "tls"),
        handshake_timeout=float(timeout),
    )


def _policy(ctx: _Ctx, doc: Mapping[str, Any], text: str) -> ReadResult:
    policy = doc.get("policy")
    modules = doc.get("modules")
    if policy is not None and not isinstance(policy, dict):
        raise ctx.fail("policy", "must be a table")
    if policy is not None and "file" in policy:
        others = set(policy) - {"file", "mode"}
        if others or modules is not None:
            raise ctx.fail("policy.file", "a policy file holds the whole policy: remove "
                           + (", ".join(f"policy.{k}" for k in sorted(others)) or "[modules]"))
        file = policy["file"]
        mode = policy.get("mode", "strict")
        if not isinstance(file, str) or not file:
            raise ctx.fail("policy.file", "must be a non-empty path")
        if mode not in MODES:
            raise ctx.fail("policy.mode", f"unknown mode {mode!r} (strict or compat)")
        if file.endswith(".toml") and "mode" in policy:
            raise ctx.fail("policy.mode", "a TOML policy file sets its own mode")
        return load_policy_file(resolve_path(file, ctx.base), mode=cast(Mode, mode))
    merged: dict[str, Any] = dict(policy or {})
    if modules is not None:
        if "modules" in merged:
            raise ctx.fail("modules", "modules given both in [modules] and [policy.modules]")
        merged["modules"] = modules
    # No [policy] at all: the secure default (policy_from_mapping's default preset).
    return policy_from_mapping(merged, file=ctx.file, text=text, prefix="policy.")


MODULE_TABLE_KEYS = frozenset({"path", "os_locking", "init_reserved", "raw_mechanism_params"})


def _module_tables(ctx: _Ctx, doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, ModuleInit]]:
    """``[modules.<alias>]`` tables: the path goes to the policy reader (as the
    plain ``alias = "path"`` form), the C_Initialize options stay here."""
    modules = doc.get("modules")
    if not isinstance(modules, dict) or not any(isinstance(v, dict) for v in modules.values()):
        return doc, {}
    plain: dict[str, Any] = {}
    init: dict[str, ModuleInit] = {}
    for alias, value in modules.items():
        if not isinstance(value, dict):
            plain[alias] = value
            continue
        where = f"modules.{alias}"
        _check_keys(ctx, value, MODULE_TABLE_KEYS, where)
        if not isinstance(value.get("path"), str) or not value["path"]:
            raise ctx.fail(f"{where}.path", "must be the module's path")
        for key in ("os_locking", "raw_mechanism_params"):
            if key in value and not isinstance(value[key], bool):
                raise ctx.fail(f"{where}.{key}", "must be true or false")
        reserved = value.get("init_reserved")
        if reserved is not None and (not isinstance(reserved, str) or "\0" in reserved):
            raise ctx.fail(f"{where}.init_reserved", "must be a string (no NUL)")
        plain[alias] = value["path"]
        init[alias] = ModuleInit(
            os_locking=value.get("os_locking", True),
            init_reserved=reserved,
            raw_mechanism_params=value.get("raw_mechanism_params", False),
        )
    return {**doc, "modules": plain}, init


def toml_to_config(text: str, file: str) -> ServerConfig:
    """Interpret p11guard TOML server configuration ``text``."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise toml_error(exc, file) from None
    ctx = _Ctx(text, file)
    _check_keys(ctx, doc, TOP_KEYS, "")
    server = _table(ctx, doc, "server")
    _check_keys(ctx, server, SERVER_KEYS, "server")
    grace = server.get("shutdown_grace", DEFAULT_SHUTDOWN_GRACE)
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 <= grace <= 3600:
        raise ctx.fail("server.shutdown_grace", "must be a number of seconds between 0 and 3600")
    log = server.get("log", "stderr")
    if log not in ("stderr", "syslog"):
        raise ctx.fail("server.log", f"must be \"stderr\" or \"syslog\", got {log!r}")
    pid_file = _opt_str(ctx, server, "pid_file", "server")
    preload = server.get("preload_modules", True)
    if not isinstance(preload, bool):
        raise ctx.fail("server.preload_modules", "must be true or false")
    tls_raw = doc.get("tls")
    if tls_raw is not None and not isinstance(tls_raw, dict):
        raise ctx.fail("tls", "must be a table")
    doc, module_init = _module_tables(ctx, doc)
    result = _policy(ctx, doc, text)
    # The identity and sandbox tables are read by their own modules (imported here:
    # they import the config model).
    from p11guard.server.identity import read_identities
    from p11guard.server.sandbox import read_sandbox

    aliases = tuple(m.alias for m in result.policy.modules)
    identities = read_identities(doc.get("identity"), aliases, fail=ctx.fail, base=ctx.base,
                                 line_of=ctx.line_of)
    sandbox = read_sandbox(doc.get("sandbox"), fail=ctx.fail)
    chroot = _opt_str(ctx, server, "chroot", "server")
    if chroot is not None and not os.path.isabs(chroot):
        raise ctx.fail("server.chroot", "must be an absolute path")
    return ServerConfig(
        listeners=_listeners(ctx, doc.get("listen")),
        policy=result.policy,
        max_connections=_int(ctx, server, "max_connections", DEFAULT_MAX_CONNECTIONS, 1, 100_000),
        max_record_size=_int(ctx, server, "max_record_size", DEFAULT_MAX_RECORD_SIZE,
                             MIN_RECORD_SIZE, MAX_RECORD_SIZE),
        shutdown_grace=float(grace),
        spare_workers=_int(ctx, server, "spare_workers", DEFAULT_SPARE_WORKERS, 0,
                           MAX_SPARE_WORKERS),
        preload_modules=preload,
        user=_opt_str(ctx, server, "user", "server"),
        group=_opt_str(ctx, server, "group", "server"),
        tls=_tls(ctx, tls_raw) if tls_raw is not None else None,
        identities=identities,
        sandbox=sandbox,
        chroot=chroot,
        module_init=module_init,
        log_target=cast(LogTarget, log),
        pid_file=resolve_path(pid_file, ctx.base) if pid_file else None,
        source_format="toml",
        source=file,
        warnings=result.warnings,
    )


def load_toml_config(path: str | Path) -> ServerConfig:
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the file: {exc}", file=file) from None
    return toml_to_config(text, file)
