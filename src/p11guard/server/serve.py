"""`p11guard serve`: configuration -> bound listeners -> accept loop -> workers."""

from __future__ import annotations

import logging
import logging.handlers
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.server import ServerConfig
from ..policy.engine import EngineContext, wrap_module
from ..wire.codec import Limits
from .dispatch import Dispatcher
from .listener import Server, bind
from .worker import Connection, WorkerSettings

log = logging.getLogger("p11guard")


@dataclass(frozen=True)
class ServeOptions:
    foreground: bool = True
    pid_file: str | None = None
    debug_pkcs11: bool = False
    verbose: bool = False


def setup_logging(target: str, verbose: bool) -> None:
    root = logging.getLogger("p11guard")
    root.handlers.clear()
    if target == "syslog" and Path("/dev/log").exists():
        handler: logging.Handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("p11guard[%(process)d]: %(levelname)s %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s p11guard[%(process)d] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def limits_of(config: ServerConfig) -> Limits:
    return Limits(max_record_size=config.max_record_size, max_opaque=config.max_record_size)


def _alias_matcher(config: ServerConfig) -> Any:
    """How a requested module name is matched against the configured aliases.

    Strict (default): the alias pattern must match the whole name, with no
    newline tricks.  Compat: Caml Crush's prefix-anchored Str matching.
    """
    from ..policy import strregex

    if getattr(config.policy, "mode", "strict") == "compat":
        return strregex.camlcrush_match
    return strregex.strict_match


def make_worker_main(config: ServerConfig, options: ServeOptions) -> Any:
    limits = limits_of(config)
    settings = WorkerSettings(limits=limits, max_threads=getattr(config, "worker_threads", 4))
    modules = {m.alias: m.path for m in config.policy.modules}
    matcher = _alias_matcher(config)

    def worker_main(conn: socket.socket, peer: str) -> None:
        from ..pkcs11.binding import Module

        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pid = os.getpid()

        def on_call(name: str, rv: int) -> None:
            log.info("[%d] %s -> 0x%x", pid, name, rv)

        context = EngineContext(peer=peer, pid=pid)
        dispatcher = Dispatcher(
            modules, Module, limits, alias_matcher=matcher,
            on_call=on_call if options.debug_pkcs11 else None,
            wrap_backend=lambda module, alias: wrap_module(module, config.policy, alias, context),
        )
        connection = Connection(conn, dispatcher.handle, settings)
        signal.signal(signal.SIGTERM, lambda *_: connection.shutdown())
        log.debug("worker serving %s", peer)
        try:
            connection.run()
        finally:
            dispatcher.close()
            conn.close()
            log.debug("worker for %s done: %d calls", peer, connection.calls)

    return worker_main


def _daemonize() -> None:
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def serve(config: ServerConfig, options: ServeOptions) -> int:
    # A daemon has no stderr: it logs to syslog whatever the configuration says.
    target = config.log_target if options.foreground else "syslog"
    setup_logging(target, options.verbose or config.policy.debug >= 2)
    for notice in config.notices:
        log.info("config: %s", notice)
    # Importing the binding builds cffi's type declarations once, in the listener:
    # workers inherit them.  No PKCS#11 module is loaded here.
    from ..pkcs11 import binding  # noqa: F401

    bound = [bind(spec) for spec in config.listeners]
    if not options.foreground:
        _daemonize()
    pid_file = options.pid_file or config.pid_file
    if pid_file:
        Path(pid_file).write_text(f"{os.getpid()}\n")
    server = Server(config, bound, make_worker_main(config, options))
    try:
        server.serve_forever()
    finally:
        if pid_file:
            Path(pid_file).unlink(missing_ok=True)
    return 0
