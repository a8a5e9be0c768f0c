"""Channels: further connections of one client to its own worker, one per client thread.

Two application threads sharing one connection pay for it under load: each reply
wakes the worker's reading thread, then the thread that runs the call, then the
client's reading thread, then the caller (perf sched: 0.10-0.17 ms of waiting for
a CPU per wake-up while both CPUs sign).  Two *processes* each have their own
connection and scale like the module does.  A channel gives a client thread that
state of affairs without giving up the worker it shares with its other threads:
the same module, sessions and login.

Protocol version 4 (docs/protocol.md):

* **Unix socket** -- ``OpenChannel``: the worker makes a socket pair, keeps one end
  and sends the other with the reply (SCM_RIGHTS).  The client's end can reach
  only the process that asked; no address or secret is involved.
* **TCP** -- ``OpenChannel`` answers a *ticket*: this worker's pid and 28 random
  bytes, good for one join within :data:`TICKET_LIFETIME` seconds.  The client
  connects to the same address as before and sends ``JoinChannel(ticket)`` as the
  new connection's first call.  That connection reaches a spare worker like any
  other (admission first: identity, authorisation); the spare passes it, with the
  call's XID, to the listener, which passes it on to the worker named by the
  ticket (:mod:`p11guard.server.prefork` control sockets).  The worker checks
  the ticket and that the new connection comes from the same host as the first,
  answers the JoinChannel call, and serves it.  Otherwise the connection is
  answered CKR_FUNCTION_NOT_SUPPORTED and closed.
* **TLS**: a TLS session cannot move to another process: no channels; the client
  keeps sharing its connection (so does it with a server that has no channels).

Each channel is served on a thread of its own, as a version-4 connection of one
call at a time (C fast path included), until the client closes it (its thread
ended, C_Finalize, exit) or the worker ends.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

from ..wire import rpc
from ..wire.codec import CODECS_BY_VERSION
from ..wire.procedures import BY_NAME_V4, VERSION_P11GUARD
from ..wire.xdr import Packer
from . import prefork
from .prefork import TICKET_SIZE, ticket_pid

log = logging.getLogger("p11guard.worker")

# Channels per connection: beyond this a client thread shares the connection.
DEFAULT_MAX_CHANNELS = 32
TICKET_LIFETIME = 10.0  # seconds
CKR_FUNCTION_NOT_SUPPORTED = 0x54
JOIN_CHANNEL = BY_NAME_V4["JoinChannel"].number


class Served(Protocol):
    """What a channel runs: a worker.Connection (run() until EOF; shutdown())."""

    def run(self) -> None: ...
    def shutdown(self) -> None: ...


def join_reply(xid: int, rv: int) -> bytearray:
    """The framed reply to a JoinChannel call."""
    buf = rpc.new_reply_buffer()
    CODECS_BY_VERSION[VERSION_P11GUARD][JOIN_CHANNEL].result.encode_into(Packer(buf), (rv,))
    if not rpc.finish_reply(buf, xid):
        raise AssertionError("an rv-only reply is one fragment")
    return buf


def peer_host(sock: socket.socket) -> str | None:
    try:
        name = sock.getpeername()
    except OSError:
        return None
    return str(name[0]) if isinstance(name, tuple) else None


class Channels:
    """The channels of one worker: opened on request, served on threads, closed at
    the end.  ``serve_on`` makes the connection object that serves one channel.

    ``control``: this worker's control socket to the listener (None: no TCP
    channels); ``host``: the address the first connection came from (TCP).
    """

    def __init__(self, serve_on: Callable[[socket.socket], Served],
                 limit: int = DEFAULT_MAX_CHANNELS,
                 available: Callable[[], bool] = lambda: True, *,
                 control: socket.socket | None = None, host: str | None = None) -> None:
        self._serve_on = serve_on
        self.limit = limit
        self._available = available
        self._control = control
        self._host = host
        self._lock = threading.Lock()
        self._open: dict[int, Served] = {}  # serving thread's ident -> its connection
        self._threads: list[threading.Thread] = []
        self._tickets: dict[bytes, float] = {}  # ticket -> monotonic expiry
        self._joins: threading.Thread | None = None
        self._closed = False
        self.opened = 0  # statistics

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    # -- Unix: a socket pair ------------------------------------------------------

    def open(self) -> socket.socket | None:
        """A new channel: the client's end (the caller sends it and closes it), or
        None when none may be opened (limit reached, closing, out of descriptors)."""
        with self._lock:
            if not self._room_locked():
                return None
            try:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("cannot open a channel: %s", exc)
                return None
            self._start_locked(ours)
        return theirs

    # -- TCP: a ticket, then the connection through the listener -------------------------

    def ticket(self) -> bytes | None:
        """A ticket for one JoinChannel, or None when no channel may be opened."""
        with self._lock:
            if self._control is None or self._host is None or not self._room_locked():
                return None
            now = time.monotonic()
            self._tickets = {t: end for t, end in self._tickets.items() if end > now}
            if len(self._open) + len(self._tickets) >= self.limit:
                return None
            ticket = os.getpid().to_bytes(4, "big") + secrets.token_bytes(TICKET_SIZE - 4)
            self._tickets[ticket] = now + TICKET_LIFETIME
            if self._joins is None:
                self._joins = threading.Thread(target=self._receive_joins,
                                               name="p11guard-joins", daemon=True)
                self._joins.start()
        return ticket

    def forward(self, xid: int, ticket: bytes, sock: socket.socket) -> bool:
        """In the worker a JoinChannel reached: pass ``sock`` (and the call's XID)
        to the worker the ticket names, through the listener.  True: it is not ours
        any more (close our descriptor, never shut it down)."""
        if self._control is None or ticket_pid(ticket) is None:
            return False
        try:
            prefork.send_join(self._control, xid, ticket, sock)
        except OSError as exc:
            log.debug("cannot pass a joining connection on: %s", exc)
            return False
        return True

    def _receive_joins(self) -> None:
        """The worker's side of the control socket: connections joining as channels."""
        assert self._control is not None
        while True:
            try:
                joined = prefork.receive_join(self._control)
            except OSError as exc:
                log.debug("control socket: %s", exc)
                joined = None
            if joined is None:
                return  # the listener is gone (shutting down)
            xid, ticket, sock = joined
            rv = self._admit(ticket, sock)
            try:
                sock.sendall(join_reply(xid, rv))
            except OSError:
                rv = -1
            if rv != 0:
                sock.close()
                continue
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._start_locked(sock)

    def _admit(self, ticket: bytes, sock: socket.socket) -> int:
        """CKR_OK when ``ticket`` is one of ours (used up now) and ``sock`` comes from
        the first connection's host."""
        now = time.monotonic()
        with self._lock:
            found = None
            for known in self._tickets:  # constant-time comparisons
                if hmac.compare_digest(known, ticket):
                    found = known
            end = self._tickets.pop(found, 0.0) if found is not None else 0.0
            room = self._room_locked()
        if end <= now:
            log.warning("refusing a channel: unknown or expired ticket")
            return CKR_FUNCTION_NOT_SUPPORTED
        if peer_host(sock) != self._host:
            log.warning("refusing a channel from %s: the connection came from %s",
                        peer_host(sock), self._host)
            return CKR_FUNCTION_NOT_SUPPORTED
        return 0 if room else CKR_FUNCTION_NOT_SUPPORTED

    # -- both -----------------------------------------------------------------------

    def close(self) -> None:
        """The worker ends: end every channel (their calls finish) and wait for them."""
        with self._lock:
            self._closed = True
            open_now = list(self._open.values())
            threads = list(self._threads)
        for served in open_now:
            served.shutdown()
        for thread in threads:
            thread.join()

    def _room_locked(self) -> bool:
        return not self._closed and len(self._open) < self.limit and self._available()

    def _start_locked(self, ours: socket.socket) -> None:
        served = self._serve_on(ours)
        thread = threading.Thread(target=self._serve, args=(ours, served),
                                  name="p11guard-channel", daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()]
        self._threads.append(thread)
        self.opened += 1
        thread.start()
        assert thread.ident is not None
        self._open[thread.ident] = served

    def _serve(self, ours: socket.socket, served: Served) -> None:
        try:
            served.run()
        except Exception:  # one channel's failure must not end the worker
            log.exception("channel failed")
        finally:
            with self._lock:
                self._open.pop(threading.get_ident(), None)
            with contextlib.suppress(OSError):
                ours.close()
