"""The listener: binds, accepts, forks one worker per connection, reaps them.

The listener never loads a PKCS#11 module.  It imports the cffi binding (type
declarations only) before forking so that workers share those pages and do not
pay the import on every connection.

Signals: SIGCHLD reaps workers; SIGTERM/SIGINT stop accepting, give workers
``shutdown_grace`` seconds to finish with their clients, then SIGTERM them
(a worker finalizes its module on SIGTERM) and SIGKILL what is left.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import signal
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..config.server import Listener, ServerConfig
from .sandbox import sigsys_hint

log = logging.getLogger("p11guard.listener")


@dataclass
class BoundListener:
    spec: Listener
    sock: socket.socket
    path: Path | None = None  # Unix socket file we created (removed on exit)
    tls: bool = False  # workers handshake TLS on this listener's connections
    inherited: bool = False  # passed by systemd (LISTEN_FDS), not bound by us

    @property
    def description(self) -> str:
        suffix = (" (TLS)" if self.tls else "") + (" (from systemd)" if self.inherited else "")
        if self.spec.kind == "unix":
            return f"unix:{self.spec.path}{suffix}"
        host, port = self.sock.getsockname()[:2]
        return f"tcp:{host}:{port}{suffix}"


@dataclass
class ListenerStats:
    accepted: int = 0
    refused: int = 0
    workers: dict[int, float] = field(default_factory=dict)  # pid -> start time


def bind(spec: Listener) -> BoundListener:
    """Create and bind one listening socket (before any privilege drop)."""
    if spec.kind == "unix":
        assert spec.path is not None
        path = Path(spec.path)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()  # a stale socket from an earlier run
            else:
                raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        if spec.mode is not None:
            os.chmod(path, spec.mode)
        sock.listen(128)
        return BoundListener(spec, sock, path)
    assert spec.host is not None and spec.port is not None
    infos = socket.getaddrinfo(spec.host, spec.port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(128)
    return BoundListener(spec, sock)


def adopt(sock: socket.socket, specs: list[Listener]) -> tuple[BoundListener, Listener | None]:
    """Wrap a socket systemd passed us; match it to a configured listener if one has
    its address (that listener is then not bound again)."""
    name = sock.getsockname()
    for spec in specs:
        if spec.kind == "unix" and sock.family == socket.AF_UNIX:
            if spec.path == (name.decode() if isinstance(name, bytes) else name):
                return BoundListener(spec, sock, inherited=True), spec
        elif spec.kind == "tcp" and sock.family != socket.AF_UNIX:
            host, port = name[:2]
            wanted = socket.getaddrinfo(spec.host, spec.port, type=socket.SOCK_STREAM)
            if port == spec.port and any(info[4][0] == host for info in wanted):
                return BoundListener(spec, sock, inherited=True), spec
    if sock.family == socket.AF_UNIX:
        path = name.decode() if isinstance(name, bytes) else str(name)
        return BoundListener(Listener("unix", path=path), sock, inherited=True), None
    host, port = name[:2]
    return BoundListener(Listener("tcp", host=host, port=port), sock, inherited=True), None


WorkerMain = Callable[[socket.socket, str, BoundListener], None]


class Server:
    """Accept loop with fork-per-connection."""

    def __init__(self, config: ServerConfig, listeners: list[BoundListener],
                 worker_main: WorkerMain) -> None:
        self.config = config
        self.listeners = listeners
        self.worker_main = worker_main
        self.stats = ListenerStats()
        self._stopping = False
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()

    def serve_forever(self) -> None:
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        old_fd = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the selector via the fd
        for bl in self.listeners:
            bl.sock.setblocking(False)
            self._selector.register(bl.sock, selectors.EVENT_READ, bl)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        for bl in self.listeners:
            log.info("listening on %s", bl.description)
        try:
            while not self._stopping:
                for key, _ in self._selector.select(timeout=1.0):
                    if key.data is None:
                        self._drain_wakeups()
                    else:
                        self._accept(key.data)
                self._reap()
        finally:
            self._close_listeners()
            self._drain_workers()
            signal.set_wakeup_fd(old_fd)

    # -- accepting --------------------------------------------------------------

    def _accept(self, bl: BoundListener) -> None:
        while True:
            try:
                conn, addr = bl.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed on %s: %s", bl.description, exc)
                return
            peer = _peer_name(conn, addr)
            if len(self.stats.workers) >= self.config.max_connections:
                self.stats.refused += 1
                log.warning("refusing %s: %d connections already (max_connections)",
                            peer, len(self.stats.workers))
                conn.close()
                continue
            self.stats.accepted += 1
            self._fork_worker(conn, peer, bl)

    def _fork_worker(self, conn: socket.socket, peer: str, bl: BoundListener) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                self._become_worker()
                conn.setblocking(True)
                self.worker_main(conn, peer, bl)
            except BaseException:  # never return into the listener's loop
                log.exception("worker for %s failed", peer)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        conn.close()
        self.stats.workers[pid] = time.monotonic()
        log.debug("worker %d serves %s", pid, peer)

    def _become_worker(self) -> None:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        self._selector.close()
        for bl in self.listeners:
            bl.sock.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- signals and reaping --------------------------------------------------------

    def _on_stop(self, signum: int, _frame: object) -> None:
        if not self._stopping:
            log.info("received %s: no new connections", signal.Signals(signum).name)
        self._stopping = True

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._wake_r.recv(512):
                pass

    def _reap(self) -> None:
        while self.stats.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.stats.workers.clear()
                return
            if pid == 0:
                return
            started = self.stats.workers.pop(pid, None)
            if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS:
                log.error("worker %d killed by SIGSYS: %s", pid, sigsys_hint())
            elif os.WIFSIGNALED(status):
                log.warning("worker %d killed by %s", pid,
                            signal.Signals(os.WTERMSIG(status)).name)
            elif os.waitstatus_to_exitcode(status) != 0:
                log.warning("worker %d exited with status %d", pid,
                            os.waitstatus_to_exitcode(status))
            elif started is not None:
                log.debug("worker %d done after %.1fs", pid, time.monotonic() - started)

    def _close_listeners(self) -> None:
        for bl in self.listeners:
            with contextlib.suppress(OSError):
                self._selector.unregister(bl.sock)
            bl.sock.close()
            if bl.path is not None and not bl.inherited:
                with contextlib.suppress(OSError):
                    bl.path.unlink()

    def _drain_workers(self) -> None:
        """Let workers finish for shutdown_grace seconds, then stop them."""
        deadline = time.monotonic() + self.config.shutdown_grace
        if self.stats.workers:
            log.info("waiting up to %.0fs for %d worker(s)", self.config.shutdown_grace,
                     len(self.stats.workers))
        while self.stats.workers and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 1.0)):
            if not self.stats.workers:
                break
            for pid in list(self.stats.workers):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            end = time.monotonic() + wait
            while self.stats.workers and time.monotonic() < end:
                self._reap()
                time.sleep(0.02)
        log.info("stopped: %d connection(s) served, %d refused",
                 self.stats.accepted, self.stats.refused)


def _peer_name(conn: socket.socket, addr: object) -> str:
    if conn.family == socket.AF_UNIX:
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            pid, uid, gid = (int.from_bytes(creds[i : i + 4], "little") for i in (0, 4, 8))
            return f"unix:pid={pid},uid={uid},gid={gid}"
        except OSError:
            return "unix"
    if isinstance(addr, tuple):
        return f"{addr[0]}:{addr[1]}"
    return str(addr)
