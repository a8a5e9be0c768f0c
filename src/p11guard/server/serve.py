"""`p11guard serve`: configuration -> bound listeners -> accept loop -> workers."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import logging.handlers
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.server import ConfigError, ServerConfig
from ..policy.engine import EngineContext, wrap_module
from ..wire.codec import Limits
from . import prefork, sandbox, systemd
from .channels import Channels, peer_host
from .dispatch import Dispatcher
from .dispatch_v4 import DispatcherV4
from .identity import Gate, guard_load_module
from .listener import BoundListener, Server, adopt, bind
from .tls import listener_uses_tls, server_context
from .worker import Connection, Handler, WorkerSettings

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
    # The audit log is one bare JSON object per line, for machines to read.
    audit = logging.getLogger("p11guard.audit")
    audit.handlers.clear()
    if isinstance(handler, logging.handlers.SysLogHandler):
        audit_handler: logging.Handler = logging.handlers.SysLogHandler(address="/dev/log")
        audit_handler.setFormatter(logging.Formatter("p11guard-audit[%(process)d]: %(message)s"))
    else:
        audit_handler = logging.StreamHandler(sys.stderr)
        audit_handler.setFormatter(logging.Formatter("%(message)s"))
    audit.addHandler(audit_handler)
    audit.setLevel(logging.INFO)
    audit.propagate = False


def limits_of(config: ServerConfig) -> Limits:
    return Limits(max_record_size=config.max_record_size, max_opaque=config.max_record_size)


def _alias_matcher(config: ServerConfig) -> Any:
    """How a requested module name is matched against the configured aliases.

    Strict (default): the requested name must be a configured alias, exactly
    (a pattern alias would let a client pick a name that no rule covers,
    Caml Crush's bug B5; the policy engine refuses such a name too).
    Compat: Caml Crush's prefix-anchored Str matching.
    """
    from ..policy import strregex

    if getattr(config.policy, "mode", "strict") == "compat":
        return strregex.camlcrush_match
    return lambda pattern, name: pattern == name


class WorkerProgram:
    """What a worker process runs for its one connection.

    ``prepare`` is the client-independent part, run ahead in a spare worker
    (:mod:`p11guard.server.prefork`): load the configured modules (no
    C_Initialize) and build the seccomp program.  A worker forked on accept
    skips it and does the same on demand.
    """

    def __init__(self, config: ServerConfig, options: ServeOptions, gate: Gate | None = None,
                 seccomp: bool = False) -> None:
        self.config = config
        self.options = options
        self.gate = gate or Gate(config, None)
        self.seccomp = seccomp
        self.limits = limits_of(config)
        # Threads per worker (calls on different sessions in parallel); 1 = serial.
        threads = int(os.environ.get("P11GUARD_WORKER_THREADS", "4"))
        self.settings = WorkerSettings(limits=self.limits, max_threads=max(1, threads))
        self.matcher = _alias_matcher(config)
        self._preloaded: dict[str, Any] = {}  # module path -> pkcs11.binding.Module

    def module_paths(self) -> list[str]:
        """Every configured module path, the identities' own policy files included."""
        policies = [self.config.policy, *self.gate.policies.values()]
        return list(dict.fromkeys(m.path for policy in policies for m in policy.modules))

    def prepare(self) -> None:
        if self.config.preload_modules:
            self._preloaded = prefork.preload_modules(self.module_paths())
        if self.seccomp:
            sandbox.prepare_seccomp(self.config.sandbox)
        self.rehearse()

    def rehearse(self) -> None:
        """Serve a pretend client over a socket pair, in the spare, before it is ready.

        After the fork every first write to a page of the listener's Python heap
        copies the page: a new connection's first calls took ~1,000 such faults
        and ~5 ms.  Taking them here (SetupArch, GetInfo without a module: the
        dispatcher, both protocol versions' handlers, the connection loop and the
        codecs) leaves the real client only its own work.  No module is loaded,
        nothing is logged or audited.
        """
        ours, theirs = socket.socketpair()
        quiet = logging.getLogger("p11guard.worker")
        quiet.disabled = True  # its "N calls answered" would read like a client's
        try:
            dispatcher = Dispatcher({}, self.load_module, self.limits)
            handlers: dict[int, Handler] = {4: DispatcherV4(dispatcher).handle}
            connection = Connection(ours, dispatcher.handle, self.settings, handlers)
            theirs.sendall(prefork.rehearsal_calls())
            theirs.shutdown(socket.SHUT_WR)
            connection.run()
        except Exception as exc:  # a rehearsal only: never fatal
            log.debug("spare worker rehearsal failed: %s", exc)
        finally:
            quiet.disabled = False
            ours.close()
            theirs.close()

    def load_module(self, path: str) -> Any:
        """The dispatcher's loader: the preloaded module, else dlopen now."""
        from ..pkcs11.binding import Module

        module = self._preloaded.pop(path, None)
        return module if module is not None else Module(path)

    def __call__(self, conn: socket.socket, peer: str, bl: BoundListener,
                 control: socket.socket | None = None) -> None:
        config, options, limits, matcher = self.config, self.options, self.limits, self.matcher
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pid = os.getpid()
        # TLS handshake, identity and its rights: before any RPC is read.
        admission = self.gate.admit(conn, peer, bl.tls)
        if admission is None:
            conn.close()
            return

        def on_call(name: str, rv: int) -> None:
            log.info("[%d] %s -> 0x%x", pid, name, rv)

        context = EngineContext(peer=peer, pid=pid)
        dispatcher = Dispatcher(
            admission.modules, self.load_module, limits, alias_matcher=matcher,
            on_call=on_call if options.debug_pkcs11 else None,
            wrap_backend=lambda module, alias: wrap_module(module, admission.policy, alias,
                                                           context),
            module_init=config.module_init,
        )
        # Protocol v4 (p11guard's own) shares the dispatcher's state; the same
        # wrappers apply (LoadModule and Initialize keep their numbers in v4).
        handlers: dict[int, Handler] = {3: dispatcher.handle,
                                         4: DispatcherV4(dispatcher).handle}
        for version, handle in list(handlers.items()):
            wrapped = guard_load_module(handle, admission, matcher)
            if self.seccomp:
                wrapped = sandbox.sandbox_after_initialize(
                    wrapped, config.sandbox, lambda: connection.shutdown())
            handlers[version] = wrapped
        handler = handlers.pop(3)
        v4_handler = handlers[4]
        # A channel (server/channels.py): version 4, one call at a time, same state.
        channel_settings = dataclasses.replace(self.settings, max_threads=1)

        def serve_channel(sock: socket.socket) -> Connection:
            return Connection(sock, v4_handler, channel_settings, {4: v4_handler},
                              fast_plan=dispatcher.fast_plan, version=4)

        # A module that cannot take calls from several threads gets no channels.
        channels = Channels(serve_channel, limit=self.settings.max_channels,
                            available=lambda: not dispatcher.serial, control=control,
                            host=peer_host(conn) if not bl.tls else None)
        connection = Connection(admission.stream, handler, self.settings, handlers,
                                fast_plan=dispatcher.fast_plan, channels=channels)
        signal.signal(signal.SIGTERM, lambda *_: connection.shutdown())
        log.debug("worker serving %s", peer)
        try:
            connection.run()
        finally:
            channels.close()  # their calls end before the module is finalized
            dispatcher.close()
            admission.close()
            log.debug("worker for %s done: %d calls, %d channel(s)", peer, connection.calls,
                      channels.opened)


def make_worker_main(config: ServerConfig, options: ServeOptions, gate: Gate | None = None,
                     seccomp: bool = False) -> WorkerProgram:
    return WorkerProgram(config, options, gate, seccomp)


def _daemonize() -> int:
    """Detach; the original process exits only once the daemon says it is ready.

    Returns the write end of a pipe: the daemon writes one byte to it when it
    serves (pid file written, privileges dropped).  If the daemon dies first,
    the original process exits with status 1, so `p11guard serve` without
    --foreground fails visibly instead of "succeeding" into nothing.
    """
    read_fd, write_fd = os.pipe()
    if os.fork():
        os.close(write_fd)
        ready = os.read(read_fd, 1)
        os._exit(0 if ready == b"1" else 1)
    os.close(read_fd)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return write_fd


def _signal_ready(write_fd: int | None) -> None:
    if write_fd is not None:
        with contextlib.suppress(OSError):
            os.write(write_fd, b"1")
        os.close(write_fd)


def serve(config: ServerConfig, options: ServeOptions) -> int:
    # A daemon has no stderr: it logs to syslog whatever the configuration says.
    target = config.log_target if options.foreground else "syslog"
    setup_logging(target, options.verbose or config.policy.debug >= 2)
    for notice in config.notices:
        log.info("config: %s", notice)
    # The filter engine's own start-up checks: an action (patch) that does not
    # resolve is an error, never silently ignored.
    from ..policy.engine import check_startup

    errors, warnings = check_startup(config.policy)
    for warning in warnings:
        log.warning("config: %s", warning)
    if errors:
        for error in errors:
            log.error("config: %s", error)
        return 2
    # Importing the binding builds cffi's type declarations once, in the listener:
    # workers inherit them.  No PKCS#11 module is loaded here.
    _preload()
    # The order of these steps is documented in sandbox.py and docs/deployment.md.
    bound = _listen(config)
    try:
        tls_context = (server_context(config.tls) if config.tls and any(bl.tls for bl in bound)
                       else None)
        gate = Gate(config, tls_context)
    except (ValueError, ConfigError) as exc:  # reported by the CLI as "cannot start"
        raise OSError(str(exc)) from None
    if config.tls is not None and tls_context is None:
        log.warning("a [tls] section is configured but no listener uses TLS")
    creds = sandbox.resolve_user(config.user, config.group)
    notifier = systemd.Notifier()
    ready_fd = None if options.foreground else _daemonize()
    pid_file = options.pid_file or config.pid_file
    if pid_file:
        Path(pid_file).write_text(f"{os.getpid()}\n")
    sandbox.drop_privileges(creds, config.chroot)
    sandbox.harden_process()
    seccomp = config.sandbox.seccomp
    if seccomp:
        why_not = sandbox.seccomp_supported()
        if why_not is not None:
            log.warning("sandbox off: %s", why_not)
            seccomp = False
    else:
        log.warning("sandbox off: [sandbox] seccomp = false")
    program = WorkerProgram(config, options, gate, seccomp)
    if config.spare_workers:
        log.info("%d spare worker(s) kept ready%s", config.spare_workers,
                 ", modules preloaded" if config.preload_modules else "")
    server = Server(config, bound, program, program.prepare)
    # Everything allocated so far lives as long as the listener: keep it out of the
    # collector's reach, so that a worker's collections do not write to (and copy)
    # the pages it shares with the listener.
    gc.freeze()
    notifier.ready(f"serving {len(bound)} listener(s)")
    _signal_ready(ready_fd)
    try:
        server.serve_forever()
    finally:
        notifier.stopping()
        if pid_file:
            # After the privilege drop the pid file's directory may not be ours.
            with contextlib.suppress(OSError):
                Path(pid_file).unlink(missing_ok=True)
    return 0


def _listen(config: ServerConfig) -> list[BoundListener]:
    """Sockets passed by systemd (LISTEN_FDS) first, then bind the configured rest."""
    pending = list(config.listeners)
    bound: list[BoundListener] = []
    for sock in systemd.listen_sockets():
        bl, spec = adopt(sock, pending)
        if spec is not None:
            pending.remove(spec)
        else:
            log.info("serving %s from systemd although it is not in the configuration",
                     bl.description)
        bound.append(bl)
    bound += [bind(spec) for spec in pending]
    for bl in bound:
        bl.tls = listener_uses_tls(bl.spec, config)
    return bound


def _preload() -> None:
    """Import what a worker may need later: after a chroot or the privilege drop the
    Python installation may not be readable any more."""
    import cryptography.hazmat.primitives.serialization
    import cryptography.x509
    import cryptography.x509.oid  # noqa: F401

    from ..pkcs11 import binding  # noqa: F401
    from ..policy import strregex  # noqa: F401
    from ..wire import procedures  # noqa: F401

    # The C types the first calls of every worker name (no module is loaded).
    prefork.warm_cffi_types()
    # p11guard's own C fast path (not a PKCS#11 module): loaded here once, as its
    # docstring says, instead of in every worker (~8 ms: cdef, dlopen, offsets).
    from . import fastpath

    fastpath.load()
