"""Channels: further connections of one client to its own worker, one per client thread.

Two application threads sharing one connection pay for it under load: each reply
wakes the worker's reading thread, then the thread that runs the call, then the
client's reading thread, then the caller (perf sched: 0.10-0.17 ms of waiting for
a CPU per wake-up while both CPUs sign).  Two *processes* each have their own
connection and scale like the module does.  A channel gives a client thread that
state of affairs without giving up the worker it shares with its other threads:
the same module, sessions and login.

How (protocol version 4, ``OpenChannel``; docs/protocol.md): the worker makes a
socket pair, keeps one end and sends the other to the client with the reply
(SCM_RIGHTS).  So the client's end can only reach the process that asked, and no
listener, address or secret is involved.  This needs a Unix-socket connection;
on TCP and TLS the call answers CKR_FUNCTION_NOT_SUPPORTED and the client keeps
sharing its connection.  The worker serves each channel on a thread of its own,
as a version-4 connection of one call at a time (C fast path included), until
the client closes it (its thread ended, C_Finalize, exit) or the worker ends.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("p11guard.worker")

# Channels per connection: beyond this a client thread shares the connection.
DEFAULT_MAX_CHANNELS = 32


class Served(Protocol):
    """What a channel runs: a worker.Connection (run() until EOF; shutdown())."""

    def run(self) -> None: ...
    def shutdown(self) -> None: ...


class Channels:
    """The channels of one worker: opened on request, served on threads, closed at
    the end.  ``serve_on`` makes the connection object that serves one channel."""

    def __init__(self, serve_on: Callable[[socket.socket], Served],
                 limit: int = DEFAULT_MAX_CHANNELS,
                 available: Callable[[], bool] = lambda: True) -> None:
        self._serve_on = serve_on
        self.limit = limit
        self._available = available
        self._lock = threading.Lock()
        self._open: dict[int, tuple[socket.socket, Served]] = {}  # thread ident -> ...
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.opened = 0  # statistics

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    def open(self) -> socket.socket | None:
        """A new channel: the client's end (the caller sends it and closes it), or
        None when none may be opened (limit reached, closing, out of descriptors)."""
        with self._lock:
            if self._closed or len(self._open) >= self.limit or not self._available():
                return None
            try:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("cannot open a channel: %s", exc)
                return None
            served = self._serve_on(ours)
            thread = threading.Thread(target=self._serve, args=(ours, served),
                                      name="p11guard-channel", daemon=True)
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            self.opened += 1
            thread.start()
            assert thread.ident is not None
            self._open[thread.ident] = (ours, served)
        return theirs

    def close(self) -> None:
        """The worker ends: end every channel (their calls finish) and wait for them."""
        with self._lock:
            self._closed = True
            open_now = list(self._open.values())
            threads = list(self._threads)
        for _, served in open_now:
            served.shutdown()
        for thread in threads:
            thread.join()

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
