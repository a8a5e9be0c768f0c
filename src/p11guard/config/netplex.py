"""Reader for Caml Crush's ``pkcs11proxyd.conf`` (OCamlnet Netplex syntax), unchanged.

Syntax: ``name { ... }`` sections and ``name = value`` parameters, each
optionally followed by ``;``; values are strings, integers, floats or
``true``/``false``; ``(* *)`` comments.  Netplex-only settings (process
management, admin socket, log levels) are accepted and reported as notices;
anything unknown is an error, so that a misspelt security setting never goes
unnoticed.
"""

from __future__ import annotations

import os
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

from p11guard.config.model import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_SPARE_WORKERS,
    MAX_SPARE_WORKERS,
    Listener,
    LogTarget,
    PeerAuth,
    ServerConfig,
    TlsConfig,
    parse_host_port,
    parse_mode,
    resolve_path,
)
from p11guard.config.policyfile import load_policy_file
from p11guard.policy.model import ConfigError, Mode
from p11guard.policy.readers.ocamllex import Lexer, Token, decode_source

MAX_DEPTH = 32
Scalar = str | int | float | bool


@dataclass(slots=True)
class Node:
    """A parameter (``value`` set) or a section (``children`` set)."""

    name: str
    line: int
    path: str  # dotted, for messages: "netplex.service.processor"
    value: Scalar | None = None
    children: list[Node] | None = None


class _Parser:
    def __init__(self, text: str, file: str) -> None:
        self.tokens = Lexer(text, file).tokens()
        self.i = 0
        self.file = file

    def error(self, message: str, tok: Token) -> ConfigError:
        return ConfigError(message, file=self.file, line=tok.line)

    def take(self) -> Token:
        tok = self.tokens[self.i]
        if tok.kind != "eof":
            self.i += 1
        return tok

    def peek(self) -> Token:
        return self.tokens[self.i]

    def section(self, prefix: str, closing: bool, depth: int) -> list[Node]:
        if depth > MAX_DEPTH:
            raise self.error("sections nested too deeply", self.peek())
        nodes: list[Node] = []
        while True:
            tok = self.take()
            if tok.kind == "eof":
                if closing:
                    raise self.error("missing '}' before the end of the file", tok)
                return nodes
            if tok.kind == "punct" and tok.value == "}" and closing:
                return nodes
            if tok.kind != "ident":
                raise self.error(f"expected a parameter or section name, found {_show(tok)}", tok)
            name = str(tok.value)
            path = f"{prefix}.{name}" if prefix else name
            op = self.take()
            if op.kind == "punct" and op.value == "{":
                children = self.section(path, True, depth + 1)
                nodes.append(Node(name, tok.line, path, children=children))
            elif op.kind == "punct" and op.value == "=":
                nodes.append(Node(name, tok.line, path, value=self.value()))
            else:
                raise self.error(f"expected '=' or '{{' after {name}, found {_show(op)}", op)
            nxt = self.peek()
            if nxt.kind == "punct" and nxt.value == ";":
                self.take()

    def value(self) -> Scalar:
        tok = self.take()
        if tok.kind in ("string", "int", "float"):
            return tok.value
        if tok.kind == "ident" and tok.value in ("true", "false"):
            return tok.value == "true"
        raise self.error(f"expected a string, number, true or false, found {_show(tok)}", tok)


def _show(tok: Token) -> str:
    if tok.kind == "eof":
        return "the end of the file"
    if tok.kind == "punct":
        return f"'{tok.value}'"
    return f"{tok.kind} {tok.value!r}"


def parse_netplex(text: str, file: str) -> list[Node]:
    """Parse Netplex syntax into a tree; raises :class:`ConfigError`."""
    return _Parser(text, file).section("", False, 0)


# --- interpretation ------------------------------------------------------------


@dataclass
class _Reader:
    """Walks the tree: typed getters, notices, errors, all located."""

    file: str
    notices: list[str] = field(default_factory=list)

    def fail(self, node: Node, message: str) -> ConfigError:
        return ConfigError(message, file=self.file, line=node.line, option=node.path)

    def notice(self, node: Node, message: str = "not applicable to p11guard (ignored)") -> None:
        self.notices.append(str(ConfigError(message, file=self.file, line=node.line,
                                            option=node.path)))

    def split(
        self,
        section: Node,
        allowed_params: AbstractSet[str],
        allowed_sections: AbstractSet[str],
        not_applicable: AbstractSet[str] = frozenset(),
    ) -> tuple[dict[str, Node], list[Node]]:
        """Check the children of ``section``; return its parameters (first of each) and sections.

        Names in ``not_applicable`` (parameters or sections) are reported as notices.
        """
        params: dict[str, Node] = {}
        sections: list[Node] = []
        for child in section.children or []:
            if child.name in not_applicable:
                self.notice(child)
                continue
            if child.children is not None:
                if child.name not in allowed_sections:
                    kind = "parameter" if child.name in allowed_params else "section"
                    raise self.fail(child, f"unknown section {child.name!r}"
                                    + (f" ({child.name} is a {kind})" if kind == "parameter"
                                       else ""))
                sections.append(child)
                continue
            if child.name not in allowed_params:
                raise self.fail(child, f"unknown parameter {child.name!r}"
                                + (" (expected a section)" if child.name in allowed_sections
                                   else ""))
            if child.name in params:
                raise self.fail(child, f"{child.name} given twice (first at line "
                                f"{params[child.name].line})")
            params[child.name] = child
        return params, sections

    def string(self, node: Node) -> str:
        if not isinstance(node.value, str):
            raise self.fail(node, f"expected a string, found {node.value!r}")
        return node.value

    def integer(self, node: Node) -> int:
        if isinstance(node.value, bool) or not isinstance(node.value, int):
            raise self.fail(node, f"expected an integer, found {node.value!r}")
        return node.value

    def boolean(self, node: Node) -> bool:
        if not isinstance(node.value, bool):
            raise self.fail(node, f"expected true or false, found {node.value!r}")
        return node.value


_LEGACY_TLS = {"cafile", "certfile", "certkey", "cipher_suite", "dh_params", "ec_curve_name",
               "verify_depth"}


def _controller(rd: _Reader, node: Node) -> LogTarget:
    params, sections = rd.split(node, set(), {"logging"}, {"max_level", "socket_directory"})
    target: LogTarget = "stderr"
    for i, logging in enumerate(sections):
        lparams, _ = rd.split(logging, {"type"}, set(),
                              {"file", "format", "component", "subchannel", "max_level",
                               "facility", "identifier", "directory"})
        if i > 0:
            rd.notice(logging, "only the first logging section is used (ignored)")
            continue
        if "type" in lparams:
            kind = rd.string(lparams["type"])
            if kind not in ("stderr", "syslog"):
                raise rd.fail(lparams["type"], f"unsupported logging type {kind!r} "
                              "(p11guard logs to stderr or syslog)")
            target = cast(LogTarget, kind)
    del params
    return target


def _address(rd: _Reader, node: Node, base: str, chmod: int | None) -> Listener:
    params, _ = rd.split(node, {"type", "bind", "path", "local_chmod"}, set(), {"local_chown"})
    if "type" not in params:
        raise rd.fail(node, "address needs a type (\"internet\" or \"local\")")
    kind = rd.string(params["type"])
    if "local_chmod" in params:
        try:
            chmod = parse_mode(params["local_chmod"].value)
        except ValueError as exc:
            raise rd.fail(params["local_chmod"], str(exc)) from None
    if kind == "internet":
        if "bind" not in params:
            raise rd.fail(node, "an internet address needs bind = \"host:port\"")
        if "path" in params:
            raise rd.fail(params["path"], "path belongs to a local address")
        try:
            host, port = parse_host_port(rd.string(params["bind"]))
        except ValueError as exc:
            raise rd.fail(params["bind"], str(exc)) from None
        return Listener("tcp", host=host, port=port)
    if kind == "local":
        if "path" not in params:
            raise rd.fail(node, "a local address needs path = \"/socket/path\"")
        if "bind" in params:
            raise rd.fail(params["bind"], "bind belongs to an internet address")
        path = rd.string(params["path"])
        if not path:
            raise rd.fail(params["path"], "empty socket path")
        return Listener("unix", path=resolve_path(path, base), mode=chmod)
    raise rd.fail(params["type"], f"unsupported address type {kind!r} (internet or local)")


def _protocol(rd: _Reader, node: Node, base: str) -> list[Listener]:
    params, sections = rd.split(
        node, {"name", "local_chmod"}, {"address"},
        {"lstn_backlog", "lstn_reuseaddr", "so_keepalive", "tcp_nodelay", "local_chown"})
    if "name" in params and rd.string(params["name"]) != "rpc_pkcs11":
        rd.notice(params["name"], "protocol name is not \"rpc_pkcs11\"; p11guard serves "
                  "the PKCS#11 protocol anyway")
    chmod = None
    if "local_chmod" in params:
        try:
            chmod = parse_mode(params["local_chmod"].value)
        except ValueError as exc:
            raise rd.fail(params["local_chmod"], str(exc)) from None
    if not sections:
        raise rd.fail(node, "protocol has no address section")
    return [_address(rd, s, base, chmod) for s in sections]


def _tls(rd: _Reader, node: Node, base: str, allowed: str | None) -> TlsConfig:
    params, sections = rd.split(node, {"algorithms", "peer_auth"}, {"x509"}, {"dh_params"})
    cert = key = ca = None
    for x509 in sections:
        _, parts = rd.split(x509, set(), {"key", "trust"}, {"revoke"})
        for part in parts:
            if part.name == "key":
                kp, _ = rd.split(part, {"crt_file", "key_file"}, set(), {"password"})
                if "crt_file" in kp:
                    cert = resolve_path(rd.string(kp["crt_file"]), base)
                if "key_file" in kp:
                    key = resolve_path(rd.string(kp["key_file"]), base)
            else:
                tp, _ = rd.split(part, {"crt_file"}, set(), {"crl_file"})
                if "crt_file" in tp:
                    ca = resolve_path(rd.string(tp["crt_file"]), base)
    if cert is None or key is None:
        raise rd.fail(node, "tls needs x509 { key { crt_file = ...; key_file = ...; } }")
    peer_auth = "required"
    if "peer_auth" in params:
        peer_auth = rd.string(params["peer_auth"])
        if peer_auth not in ("required", "optional", "none"):
            raise rd.fail(params["peer_auth"], f"unknown peer_auth {peer_auth!r} "
                          "(required, optional or none)")
    algorithms = rd.string(params["algorithms"]) if "algorithms" in params else None
    return TlsConfig(cert_file=cert, key_file=key, ca_file=ca, algorithms=algorithms,
                     peer_auth=cast(PeerAuth, peer_auth), allowed_clients_cert_path=allowed)


def load_netplex_config(path: str | Path, *, mode: Mode = "strict") -> ServerConfig:
    """Read a pkcs11proxyd.conf and the filter configuration it names.

    Relative paths are resolved against the configuration file's directory.
    ``mode`` is the matching mode for the filter.conf patterns.
    """
    file = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", file=file) from None
    return netplex_to_config(decode_source(data), file, mode=mode)


def _spare_workers(rd: _Reader, node: Node) -> int:
    """Netplex's idle job slots kept ready: with one connection per process, the
    same thing as p11guard's pre-forked spare workers."""
    count = rd.integer(node)
    if count < 0:
        raise rd.fail(node, "min_free_jobs_capacity must be 0 or more")
    if count > MAX_SPARE_WORKERS:
        rd.notice(node, f"{count} spare workers is more than p11guard keeps: "
                  f"using {MAX_SPARE_WORKERS}")
        return MAX_SPARE_WORKERS
    return count


def netplex_to_config(text: str, file: str, *, mode: Mode = "strict") -> ServerConfig:
    """Interpret Netplex ``text`` (``file`` is used for messages and relative paths)."""
    base = os.path.dirname(os.path.abspath(file))
    rd = _Reader(file)
    root = Node("", 0, "", children=parse_netplex(text, file))
    _, tops = rd.split(root, set(), {"netplex"})
    if len(tops) != 1:
        raise ConfigError("expected exactly one netplex { ... } section", file=file,
                          line=tops[1].line if tops else None)
    _, sections = rd.split(tops[0], set(), {"controller", "service"})
    log_target: LogTarget = "stderr"
    services = [s for s in sections if s.name == "service"]
    for s in sections:
        if s.name == "controller":
            log_target = _controller(rd, s)
    if len(services) != 1:
        raise ConfigError("expected exactly one service section", file=file,
                          line=services[1].line if services else tops[0].line)
    service = services[0]
    sparams, ssections = rd.split(service, {"name", "user", "group", "conn_limit"},
                                  {"protocol", "processor", "workload_manager"})
    if "conn_limit" in sparams:
        limit = rd.integer(sparams["conn_limit"])
        rd.notice(sparams["conn_limit"], "not applicable: p11guard always serves one "
                  "connection per worker process" + (" (the value here is unsafe in Caml "
                                                     "Crush)" if limit != 1 else ""))
    if "name" in sparams:
        rd.string(sparams["name"])
    user = rd.string(sparams["user"]) if "user" in sparams else None
    group = rd.string(sparams["group"]) if "group" in sparams else None

    listeners: list[Listener] = []
    processor: Node | None = None
    max_connections = DEFAULT_MAX_CONNECTIONS
    spare_workers = DEFAULT_SPARE_WORKERS
    for sec in ssections:
        if sec.name == "protocol":
            listeners.extend(_protocol(rd, sec, base))
        elif sec.name == "processor":
            if processor is not None:
                raise rd.fail(sec, "processor given twice")
            processor = sec
        else:
            wparams, _ = rd.split(
                sec, {"max_threads", "min_free_jobs_capacity"}, set(),
                {"type", "max_jobs_per_thread", "max_free_jobs_capacity",
                 "recommended_jobs_per_thread", "greedy_accepts", "inactivity_timeout",
                 "jobs"})
            if "max_threads" in wparams:
                max_connections = rd.integer(wparams["max_threads"])
                if max_connections < 1:
                    raise rd.fail(wparams["max_threads"], "max_threads must be at least 1")
            if "min_free_jobs_capacity" in wparams:
                spare_workers = _spare_workers(rd, wparams["min_free_jobs_capacity"])
    if not listeners:
        raise rd.fail(service, "the service has no protocol { address { ... } } section")
    if processor is None:
        raise rd.fail(service, "the service has no processor section")

    pparams, psections = rd.split(
        processor, {"type", "filter_config", "use_ssl", "allowed_clients_cert_path"}, {"tls"},
        {"libnames"} | _LEGACY_TLS)
    if "type" in pparams and rd.string(pparams["type"]) != "rpc_pkcs11":
        raise rd.fail(pparams["type"], f"unsupported processor type "
                      f"{rd.string(pparams['type'])!r} (expected \"rpc_pkcs11\")")
    if "filter_config" not in pparams:
        raise rd.fail(processor, "filter_config is required (the path of filter.conf)")
    use_ssl = rd.boolean(pparams["use_ssl"]) if "use_ssl" in pparams else False
    allowed = None
    if "allowed_clients_cert_path" in pparams:
        allowed = resolve_path(rd.string(pparams["allowed_clients_cert_path"]), base)
    tls = None
    if use_ssl:
        if not psections:
            raise rd.fail(processor, "use_ssl = true needs a tls { x509 { ... } } section")
        tls = _tls(rd, psections[0], base, allowed)
        # Caml Crush wraps every address of the service in TLS, Unix sockets included.
        listeners = [replace(listener, tls=True) for listener in listeners]
    else:
        for sec in psections:
            rd.notice(sec, "ignored because use_ssl is false")
        if allowed is not None:
            rd.notice(pparams["allowed_clients_cert_path"], "ignored because use_ssl is false")

    policy_path = resolve_path(rd.string(pparams["filter_config"]), base)
    result = load_policy_file(policy_path, mode=mode)
    return ServerConfig(
        listeners=tuple(listeners),
        policy=result.policy,
        max_connections=max_connections,
        spare_workers=spare_workers,
        user=user,
        group=group,
        tls=tls,
        log_target=log_target,
        source_format="camlcrush",
        source=file,
        notices=tuple(rd.notices),
        warnings=result.warnings,
    )
