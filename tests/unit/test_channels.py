"""Channels, worker side (server/channels.py) and the control-socket messages that
route a joining TCP connection (server/prefork.py).  In-process, with real sockets;
the path through libp11guard.so and a real server is tests/integration/test_client_channels.py."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from p11guard.server import channels as ch
from p11guard.server import prefork
from p11guard.wire import rpc
from p11guard.wire.codec import CODECS_BY_VERSION


class FakeServed:
    """Stands for a worker.Connection: runs until shut down (or its peer closes)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.ran = threading.Event()

    def run(self) -> None:
        self.ran.set()
        while self.sock.recv(64):
            pass

    def shutdown(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client end, server end) of a real TCP connection over 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    yield client, server
    client.close()
    server.close()


def _eventually(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


def _rv_of_join_reply(data: bytes) -> int:
    reply = rpc.parse_reply(data[4:])
    (rv,) = CODECS_BY_VERSION[4][ch.JOIN_CHANNEL].result.decode(data[4 + reply.body_offset:])
    return int(rv)


# -- control-socket messages ------------------------------------------------------------


def test_join_message_round_trip(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp_pair
    a, b = prefork.control_pair()
    try:
        ticket = bytes(range(32))
        prefork.send_join(a, 0xDEADBEEF, ticket, server)
        got = prefork.receive_join(b)
        assert got is not None
        xid, got_ticket, sock = got
        assert (xid, got_ticket) == (0xDEADBEEF, ticket)
        sock.sendall(b"x")  # the same connection
        assert client.recv(1) == b"x"
        sock.close()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("message, nfds", [
    (prefork.JOIN + bytes(35), 1),           # one byte short
    (b"X" + bytes(36), 1),                   # not a join
    (prefork.JOIN + bytes(36), 0),           # no connection
    (prefork.JOIN + bytes(36), 2),           # two
])
def test_malformed_join_messages_are_dropped(message: bytes, nfds: int) -> None:
    a, b = prefork.control_pair()
    pairs = [socket.socketpair() for _ in range(nfds)]
    try:
        socket.send_fds(a, [message], [p[0].fileno() for p in pairs])
        data, fds, flags, _ = socket.recv_fds(b, 256, 4)
        assert prefork.parse_join(data, fds, flags) is None
        for fd in fds:
            os.close(fd)
    finally:
        a.close()
        for p in pairs:
            p[0].close()
            p[1].close()
        b.close()


def test_receive_join_skips_a_malformed_message_and_sees_the_end() -> None:
    a, b = prefork.control_pair()
    x, y = socket.socketpair()
    try:
        socket.send_fds(a, [b"junk"], [x.fileno()])
        a.close()
        assert prefork.receive_join(b) is None
    finally:
        for s in (x, y, b):
            s.close()


# -- tickets ------------------------------------------------------------------------------


def _channels(**kw: object) -> tuple[ch.Channels, list[FakeServed]]:
    made: list[FakeServed] = []

    def serve_on(sock: socket.socket) -> FakeServed:
        made.append(FakeServed(sock))
        return made[-1]

    return ch.Channels(serve_on, **kw), made  # type: ignore[arg-type]


def test_a_ticket_names_this_worker_and_is_random() -> None:
    a, b = prefork.control_pair()
    channels, _ = _channels(control=b, host="127.0.0.1")
    try:
        t1, t2 = channels.ticket(), channels.ticket()
        assert t1 is not None and t2 is not None and t1 != t2
        assert len(t1) == prefork.TICKET_SIZE and prefork.ticket_pid(t1) == os.getpid()
    finally:
        channels.close()
        a.close()
        b.close()


def test_no_tickets_without_a_control_socket_or_beyond_the_limit() -> None:
    assert _channels(host="127.0.0.1")[0].ticket() is None  # forked without one
    a, b = prefork.control_pair()
    channels, _ = _channels(control=b, host="127.0.0.1", limit=2)
    try:
        assert channels.ticket() and channels.ticket()
        assert channels.ticket() is None  # two outstanding tickets fill the limit
    finally:
        channels.close()
        a.close()
        b.close()


@contextlib.contextmanager
def _worker(host: str) -> Iterator[tuple[ch.Channels, list[FakeServed], socket.socket]]:
    """A worker's Channels (first connection from ``host``) and the listener's end of
    its control socket."""
    listener_end, worker_end = prefork.control_pair()
    channels, made = _channels(control=worker_end, host=host)
    try:
        yield channels, made, listener_end
    finally:
        channels.close()
        listener_end.close()
        worker_end.close()


def _present(listener_end: socket.socket, ticket: bytes,
             pair: tuple[socket.socket, socket.socket]) -> int:
    """Pass the server end of ``pair`` with ``ticket``, as the listener would; the rv
    its client end reads."""
    client, server = pair
    prefork.send_join(listener_end, 7, ticket, server)
    client.settimeout(10)
    return _rv_of_join_reply(client.recv(256))


def test_a_join_with_our_ticket_becomes_a_channel_once(
        tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    with _worker("127.0.0.1") as (channels, made, listener_end):
        ticket = channels.ticket()
        assert ticket is not None
        assert _present(listener_end, ticket, tcp_pair) == 0
        assert _eventually(lambda: bool(made)) and made[0].ran.wait(10)
        assert channels.opened == 1
        # The same ticket again: refused, and that connection is closed.
        with socket.create_server(("127.0.0.1", 0)) as lsn:
            again = socket.create_connection(lsn.getsockname())
            their_end, _ = lsn.accept()
        assert _present(listener_end, ticket, (again, their_end)) == \
            ch.CKR_FUNCTION_NOT_SUPPORTED
        their_end.close()
        assert again.recv(1) == b""
        again.close()


def test_a_join_from_another_host_is_refused(
        tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    with _worker("192.0.2.7") as (channels, made, listener_end):
        ticket = channels.ticket()
        assert ticket is not None
        assert _present(listener_end, ticket, tcp_pair) == ch.CKR_FUNCTION_NOT_SUPPORTED
        assert made == []


def test_an_expired_ticket_is_refused(monkeypatch: pytest.MonkeyPatch,
                                      tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    monkeypatch.setattr(ch, "TICKET_LIFETIME", -1.0)
    with _worker("127.0.0.1") as (channels, made, listener_end):
        ticket = channels.ticket()
        assert ticket is not None
        assert _present(listener_end, ticket, tcp_pair) == ch.CKR_FUNCTION_NOT_SUPPORTED
        assert made == []


# -- socket pairs (Unix) and the end of the worker ------------------------------------------


def test_open_serves_our_end_and_respects_limit_and_availability() -> None:
    allowed = [True]
    channels, made = _channels(limit=1, available=lambda: allowed[0])
    theirs = channels.open()
    assert theirs is not None and made[0].ran.wait(10)
    assert channels.open() is None  # the limit
    theirs.close()  # the client's thread ended: the channel's thread ends
    assert _eventually(lambda: len(channels) == 0)
    allowed[0] = False  # a serialised module
    assert channels.open() is None
    channels.close()


def test_close_ends_every_channel_and_waits() -> None:
    channels, made = _channels()
    ends = [channels.open() for _ in range(3)]
    assert all(made[i].ran.wait(10) for i in range(3))
    channels.close()
    assert len(channels) == 0
    assert channels.open() is None  # closed for good
    for end in ends:
        assert end is not None
        end.close()
