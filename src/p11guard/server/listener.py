"""The listener: binds, accepts, gives each connection its own worker, reaps them.

The listener never loads a PKCS#11 module.  It imports the cffi binding (type
declarations only) before forking so that workers share those pages and do not
pay the import on every connection.

Workers: the listener keeps ``spare_workers`` *spares* forked ahead
(:mod:`p11guard.server.prefork`); an accepted connection is passed to a ready
spare, which becomes its worker, and the next spare is forked after the
hand-off.  Without a usable spare the listener forks a worker on accept.  A
worker serves one connection and is never reused.  Spares do not count
against ``max_connections``; a spare that dies is replaced after a back-off
(doubling up to 30 s, reset by a successful hand-off).

Signals: SIGCHLD reaps workers and spares; SIGTERM/SIGINT stop accepting, stop
the spares, give workers ``shutdown_grace`` seconds to finish with their
clients, then SIGTERM them (a worker finalizes its module on SIGTERM) and
SIGKILL what is left.
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
from . import prefork
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
class Spare:
    """A pre-forked worker waiting for a connection (listener side)."""

    pid: int
    ctrl: socket.socket | None  # our end of its control socket; None once let go
    started: float
    ready: bool = False  # it said it has prepared (prefork.READY)


@dataclass
class WorkerLink:
    """Our end of a worker's control socket, kept after the hand-off: connections
    joining as channels are routed through it (server/channels.py)."""

    pid: int
    ctrl: socket.socket


@dataclass
class ListenerStats:
    accepted: int = 0
    refused: int = 0
    workers: dict[int, float] = field(default_factory=dict)  # pid -> start time
    spares: dict[int, Spare] = field(default_factory=dict)  # pid -> spare
    handed_off: int = 0  # connections served by a spare
    forked_on_accept: int = 0
    spares_lost: int = 0  # spares that died without a connection (not at shutdown)
    joins_routed: int = 0  # connections passed on to the worker they join as a channel
    links: dict[int, WorkerLink] = field(default_factory=dict)  # pid -> its control socket


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


# (connection, peer, listener, the worker's control socket to the listener)
WorkerMain = Callable[[socket.socket, str, BoundListener, socket.socket | None], None]

# Process names (ps, /proc/PID/comm): a spare waiting for its connection, a worker.
SPARE_NAME = "p11guard-spare"
WORKER_NAME = "p11guard-worker"
SPARE_BACKOFF_FIRST = 0.1  # seconds before replacing a spare that died
SPARE_BACKOFF_MAX = 30.0


class Server:
    """Accept loop: one worker process per connection, pre-forked or forked on accept.

    ``prepare`` runs in each spare before it reports ready (module preloading,
    the seccomp program); ``worker_main`` serves one connection in either kind
    of worker.
    """

    def __init__(self, config: ServerConfig, listeners: list[BoundListener],
                 worker_main: WorkerMain, prepare: Callable[[], None] | None = None) -> None:
        self.config = config
        self.listeners = listeners
        self.worker_main = worker_main
        self.prepare = prepare
        self.spare_workers = config.spare_workers
        self.stats = ListenerStats()
        self._stopping = False
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._spare_failures = 0  # spares lost in a row (back-off exponent)
        self._next_spare_at = 0.0  # monotonic time before which no spare is forked

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
            self._replenish()
            while not self._stopping:
                events = self._selector.select(timeout=self._select_timeout())
                # A spare's READY first: a connection in the same round may use it.
                events.sort(key=lambda event: not isinstance(event[0].data, Spare))
                for key, _ in events:
                    if key.data is None:
                        self._drain_wakeups()
                    elif isinstance(key.data, Spare):
                        self._spare_says(key.data)
                    elif isinstance(key.data, WorkerLink):
                        self._worker_says(key.data)
                    else:
                        self._accept(key.data)
                self._reap()
                # After the hand-offs: forking the next spare is not on their path.
                self._replenish()
        finally:
            self._close_listeners()
            self._stop_spares()
            self._drain_workers()
            for pid in list(self.stats.links):
                self._drop_link(pid)
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
            if not self._hand_off(conn, peer, bl):
                self._fork_worker(conn, peer, bl)

    def _hand_off(self, conn: socket.socket, peer: str, bl: BoundListener) -> bool:
        """Give ``conn`` to a ready spare; False when there is none (fork instead)."""
        spare = self._ready_spare()
        if spare is None or spare.ctrl is None:
            return False
        try:
            prefork.send_connection(spare.ctrl, conn, self.listeners.index(bl), peer)
        except OSError as exc:
            log.warning("spare worker %d could not take %s (%s): forking a worker instead",
                        spare.pid, peer, exc)
            self._let_go(spare)
            with contextlib.suppress(ProcessLookupError):
                os.kill(spare.pid, signal.SIGKILL)  # reaped (and replaced) as a lost spare
            return False
        conn.close()
        self._keep_link(spare.pid, spare.ctrl)
        spare.ctrl = None
        del self.stats.spares[spare.pid]
        self.stats.workers[spare.pid] = time.monotonic()
        self.stats.handed_off += 1
        self._spare_failures = 0
        log.debug("spare worker %d serves %s", spare.pid, peer)
        return True

    def _ready_spare(self) -> Spare | None:
        ready = [s for s in self.stats.spares.values() if s.ready and s.ctrl is not None]
        return min(ready, key=lambda s: s.started) if ready else None

    def _fork_worker(self, conn: socket.socket, peer: str, bl: BoundListener) -> None:
        ours, theirs = prefork.control_pair()
        try:
            pid = os.fork()
        except OSError as exc:
            log.error("cannot fork a worker for %s: %s", peer, exc)
            for sock in (ours, theirs, conn):
                sock.close()
            return
        if pid == 0:  # the worker
            ours.close()

            def serve() -> None:
                prefork.set_process_name(WORKER_NAME)
                conn.setblocking(True)
                self.worker_main(conn, peer, bl, theirs)

            self._child(serve, f"worker for {peer}")
        theirs.close()
        conn.close()
        self._keep_link(pid, ours)
        self.stats.workers[pid] = time.monotonic()
        self.stats.forked_on_accept += 1
        log.debug("worker %d serves %s", pid, peer)

    def _child(self, body: Callable[[], None], what: str) -> None:
        """Run ``body`` in a freshly forked child and exit; never returns."""
        code = 0
        try:
            self._become_worker()
            body()
        except BaseException:  # never return into the listener's loop
            log.exception("%s failed", what)
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)

    def _become_worker(self) -> None:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        self._selector.close()
        for bl in self.listeners:
            bl.sock.close()
        self._wake_r.close()
        self._wake_w.close()
        # The other spares' and workers' control sockets: a worker must not be able
        # to feed them.
        for spare in self.stats.spares.values():
            if spare.ctrl is not None:
                spare.ctrl.close()
        self.stats.spares.clear()
        for link in self.stats.links.values():
            link.ctrl.close()
        self.stats.links.clear()
        self.stats.workers.clear()

    # -- spares -------------------------------------------------------------------

    def _replenish(self) -> None:
        """Fork spares up to ``spare_workers`` unless a lost spare's back-off runs."""
        while (not self._stopping and len(self.stats.spares) < self.spare_workers
               and time.monotonic() >= self._next_spare_at):
            if not self._fork_spare():
                return

    def _fork_spare(self) -> bool:
        ours, theirs = prefork.control_pair()
        try:
            pid = os.fork()
        except OSError as exc:
            ours.close()
            theirs.close()
            self._spare_lost(f"could not be forked: {exc}")
            return False
        if pid == 0:  # the spare
            ours.close()

            def live() -> None:
                prefork.set_process_name(SPARE_NAME)
                prefork.run_spare(theirs, self.prepare, self._serve_handed)

            self._child(live, "spare worker")
        theirs.close()
        ours.setblocking(False)
        spare = Spare(pid, ours, time.monotonic())
        self.stats.spares[pid] = spare
        self._selector.register(ours, selectors.EVENT_READ, spare)
        return True

    def _serve_handed(self, conn: socket.socket, index: int, peer: str,
                      ctrl: socket.socket) -> None:
        """In a spare: serve the connection the listener passed (listener ``index``)."""
        if not 0 <= index < len(self.listeners):
            raise ValueError(f"hand-off names listener {index}, there are {len(self.listeners)}")
        prefork.set_process_name(WORKER_NAME)
        self.worker_main(conn, peer, self.listeners[index], ctrl)

    # -- workers' control sockets: channels joining over TCP --------------------------

    def _keep_link(self, pid: int, ctrl: socket.socket | None) -> None:
        if ctrl is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(ctrl)
        ctrl.setblocking(False)
        link = WorkerLink(pid, ctrl)
        self.stats.links[pid] = link
        self._selector.register(ctrl, selectors.EVENT_READ, link)

    def _reaped_link(self, pid: int) -> None:
        """A worker exited: what it sent before (a joining connection, passed on
        just before it exits) is routed, then its control socket closed."""
        link = self.stats.links.get(pid)
        if link is not None:
            while link.ctrl.fileno() >= 0 and self._worker_says(link):
                pass
        self._drop_link(pid)

    def _drop_link(self, pid: int) -> None:
        link = self.stats.links.pop(pid, None)
        if link is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(link.ctrl)
            link.ctrl.close()

    def _worker_says(self, link: WorkerLink) -> bool:
        """A worker passes a connection that joins another worker as a channel: route
        it by the pid in its ticket (the target checks the ticket itself).  Anything
        else, or a message for nobody, is dropped with its descriptors.  True when a
        message was read (there may be another)."""
        try:
            message, fds, flags, _ = socket.recv_fds(link.ctrl, 256, 2)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            message, fds, flags = b"", [], 0
        try:
            if not message and not fds:  # EOF: the worker is exiting
                self._drop_link(link.pid)
                return False
            parsed = prefork.parse_join(message, fds, flags)
            pid = prefork.ticket_pid(parsed[1]) if parsed is not None else None
            target = self.stats.links.get(pid) if pid is not None else None
            if target is None or target.pid == link.pid:
                log.debug("worker %d passed a connection for no worker: dropped", link.pid)
                return True
            try:
                socket.send_fds(target.ctrl, [message], fds[:1], socket.MSG_DONTWAIT)
            except OSError as exc:
                log.debug("cannot pass a joining connection to worker %d: %s", target.pid, exc)
                return True
            self.stats.joins_routed += 1
            return True
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _spare_says(self, spare: Spare) -> None:
        if spare.ctrl is None:  # handed a connection earlier in this round of events
            return
        try:
            message = spare.ctrl.recv(16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            message = b""
        if message == prefork.READY:
            spare.ready = True
            log.debug("spare worker %d ready after %.1f ms", spare.pid,
                      (time.monotonic() - spare.started) * 1000)
            return
        # EOF: it is exiting (reaped below).  Anything else: it is not well.
        self._let_go(spare)
        if message:
            log.warning("spare worker %d sent %r: stopping it", spare.pid, message[:16])
            with contextlib.suppress(ProcessLookupError):
                os.kill(spare.pid, signal.SIGKILL)

    def _let_go(self, spare: Spare) -> None:
        """Forget ``spare``'s control socket (closing it ends a waiting spare)."""
        if spare.ctrl is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(spare.ctrl)
            spare.ctrl.close()
            spare.ctrl = None

    def _spare_lost(self, how: str, pid: int | None = None) -> None:
        self.stats.spares_lost += 1
        self._spare_failures += 1
        doublings = min(self._spare_failures - 1, 16)  # the cap is reached long before
        delay = min(SPARE_BACKOFF_MAX, SPARE_BACKOFF_FIRST * 2 ** doublings)
        self._next_spare_at = time.monotonic() + delay
        name = f"spare worker {pid}" if pid is not None else "a spare worker"
        log.warning("%s %s; next spare in %.1fs (connections meanwhile get a worker "
                    "forked on accept)", name, how, delay)

    def _stop_spares(self) -> None:
        for spare in self.stats.spares.values():
            self._let_go(spare)
            with contextlib.suppress(ProcessLookupError):
                os.kill(spare.pid, signal.SIGTERM)

    def _select_timeout(self) -> float:
        if self._stopping or len(self.stats.spares) >= self.spare_workers:
            return 1.0
        # Wake up when the back-off of a lost spare is over.
        return min(1.0, max(0.01, self._next_spare_at - time.monotonic()))

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
        while self.stats.workers or self.stats.spares:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                for pid in list(self.stats.links):
                    self._drop_link(pid)
                self.stats.workers.clear()
                for gone in self.stats.spares.values():
                    self._let_go(gone)
                self.stats.spares.clear()
                return
            if pid == 0:
                return
            spare = self.stats.spares.pop(pid, None)
            if spare is not None:
                self._let_go(spare)
                if self._stopping:
                    log.debug("spare worker %d stopped", pid)
                else:
                    self._spare_lost(_exit_description(status) or "exited", pid)
                continue
            started = self.stats.workers.pop(pid, None)
            self._reaped_link(pid)
            how = _exit_description(status)
            if how is None:
                if started is not None:
                    log.debug("worker %d done after %.1fs", pid, time.monotonic() - started)
            elif os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS:
                log.error("worker %d %s: %s", pid, how, sigsys_hint())
            else:
                log.warning("worker %d %s", pid, how)

    def _close_listeners(self) -> None:
        for bl in self.listeners:
            with contextlib.suppress(OSError):
                self._selector.unregister(bl.sock)
            bl.sock.close()
            if bl.path is not None and not bl.inherited:
                with contextlib.suppress(OSError):
                    bl.path.unlink()

    def _drain_workers(self) -> None:
        """Let workers finish for shutdown_grace seconds, then stop them (and spares)."""
        deadline = time.monotonic() + self.config.shutdown_grace
        if self.stats.workers:
            log.info("waiting up to %.0fs for %d worker(s)", self.config.shutdown_grace,
                     len(self.stats.workers))
        while self.stats.workers and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 1.0)):
            if not self.stats.workers and not self.stats.spares:
                break
            for pid in [*self.stats.workers, *self.stats.spares]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            end = time.monotonic() + wait
            while (self.stats.workers or self.stats.spares) and time.monotonic() < end:
                self._reap()
                time.sleep(0.02)
        log.info("stopped: %d connection(s) served, %d refused; %d by a spare worker, "
                 "%d by a worker forked on accept, %d spare(s) lost; %d passed on to the "
                 "worker they joined as a channel", self.stats.accepted, self.stats.refused,
                 self.stats.handed_off, self.stats.forked_on_accept, self.stats.spares_lost,
                 self.stats.joins_routed)


def _exit_description(status: int) -> str | None:
    """How a child ended, for the log; None for a clean exit."""
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    code = os.waitstatus_to_exitcode(status)
    return f"exited with status {code}" if code != 0 else None


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
