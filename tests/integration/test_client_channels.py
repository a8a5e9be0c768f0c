"""Channels (server/channels.py, native/client/channels.c): a client thread that
overlaps calls with another gets a connection of its own to the same worker.

Through the real path: libp11guard.so -> p11guard over a Unix socket or TCP ->
SoftHSM2, and OpenChannel / JoinChannel on the wire by hand."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from p11guard.client import WireClient
from p11guard.pkcs11 import constants as c
from p11guard.wire import rpc
from p11guard.wire.codec import CODECS_BY_VERSION
from p11guard.wire.procedures import ARCH_LITTLE_ENDIAN_64, BY_NAME_V4, PROGRAM
from tests.native.hostile_server import FdPasser
from tests.native.support import build_all, run_driver, sanitizer_report
from tests.support.servers import Server, start_server
from tests.support.softhsm import Token

OPEN_CHANNEL = BY_NAME_V4["OpenChannel"].number


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    build_all()


def _start(token: Token, workdir: Path, *, unix: bool = True) -> Server:
    return start_server("p11guard", token, workdir, unix=unix, extra_args=("--verbose",))


@pytest.fixture
def unix_server(token: Token, tmp_path: Path) -> Iterator[Server]:
    server = _start(token, tmp_path / "unix")
    yield server
    server.stop()


def _channels_opened(server: Server) -> list[int]:
    """Per finished worker, the channels it opened (from its debug line)."""
    return [int(n) for n in re.findall(r"done: \d+ calls, (\d+) channel\(s\)", server.log_text())]


def _driver_env(server: Server, token: Token, **extra: str) -> dict[str, str]:
    return server.client_env(P11G_TOKEN=token.label, P11G_PIN=token.user_pin, **extra)


def test_overlapping_threads_get_channels(unix_server: Server, token: Token) -> None:
    """Four threads of checked digests (ASan build): they overlap, so they get channels,
    and every result is right."""
    proc = run_driver(["threads", "4", "150"], _driver_env(unix_server, token), asan=True)
    assert sanitizer_report(proc) is None, sanitizer_report(proc)
    assert "threads done, 0 bad results, 0 failures" in proc.stdout, proc.stdout + proc.stderr
    unix_server.stop()
    opened = _channels_opened(unix_server)
    assert opened and max(opened) >= 1, unix_server.log_text()[-3000:]


def test_channels_survive_fork_finalize_and_initialize(unix_server: Server, token: Token) -> None:
    """Threads keep their channels while the main thread forks a child that uses the
    module (the child drops the parent's channels without touching them), then
    C_Finalize + C_Initialize (the threads' channels are closed; they get new ones)."""
    proc = run_driver(["chanlife", "3", "150"], _driver_env(unix_server, token), asan=True)
    assert sanitizer_report(proc) is None, sanitizer_report(proc)
    assert "chanlife done, 0 bad results, 0 failures" in proc.stdout, proc.stdout + proc.stderr


def test_two_signing_threads(unix_server: Server, token: Token) -> None:
    """RSA signs from two threads: right answers, on channels (the benchmark's case)."""
    proc = run_driver(["bench", "2", "1.5"], _driver_env(unix_server, token))
    assert re.search(r"rate=[\d.]+ bad=0", proc.stdout), proc.stdout + proc.stderr
    unix_server.stop()
    assert max(_channels_opened(unix_server), default=0) >= 1, unix_server.log_text()[-3000:]


def test_channels_off_by_environment(unix_server: Server, token: Token) -> None:
    proc = run_driver(["threads", "4", "100"],
                      _driver_env(unix_server, token, PKCS11PROXY_CHANNELS="0"))
    assert "threads done, 0 bad results, 0 failures" in proc.stdout, proc.stdout + proc.stderr
    unix_server.stop()
    assert _channels_opened(unix_server) and max(_channels_opened(unix_server)) == 0


def test_bad_channels_setting_is_a_clear_error(unix_server: Server, token: Token) -> None:
    proc = run_driver(["init"], _driver_env(unix_server, token, PKCS11PROXY_CHANNELS="maybe"))
    assert "init rv=0x5 " in proc.stdout, proc.stdout
    assert "bad PKCS11PROXY_CHANNELS" in proc.stderr


def test_channels_over_tcp(token: Token, tmp_path: Path) -> None:
    """Over TCP a thread's channel is a new connection, routed by the listener to the
    same worker (ticket + JoinChannel); checked results, ASan build."""
    server = _start(token, tmp_path / "tcp", unix=False)
    try:
        proc = run_driver(["chanlife", "3", "150"], _driver_env(server, token), asan=True)
        assert sanitizer_report(proc) is None, sanitizer_report(proc)
        assert "chanlife done, 0 bad results, 0 failures" in proc.stdout, proc.stdout
    finally:
        server.stop()
    assert max(_channels_opened(server), default=0) >= 1, server.log_text()[-3000:]


# -- OpenChannel on the wire --------------------------------------------------------------


def _ready(address: str) -> tuple[WireClient, int]:
    """A version-4 connection with the module initialised and a session open."""
    client = WireClient.connect(address, version=4)
    assert client.rv("SetupArch", ARCH_LITTLE_ENDIAN_64) == ARCH_LITTLE_ENDIAN_64
    assert client.rv("LoadModule", b"softhsm") == c.CKR_OK
    assert client.rv("Initialize", 0) == c.CKR_OK
    _, slots, _ = client.call("GetSlotList", 1, 16)
    rv, session = client.call("OpenSession", slots[0], c.CKF_SERIAL_SESSION)
    assert rv == c.CKR_OK
    return client, int(session)


def _open_channel(client: WireClient, xid: int = 77) -> tuple[int, socket.socket | None]:
    """Send OpenChannel over a Unix socket; (rv, the passed socket or None)."""
    client.send_raw(rpc.frame(rpc.call(xid, PROGRAM, 4, OPEN_CHANNEL, b"")))
    data, fds, _, _ = socket.recv_fds(client.sock, 4096, 2)
    chan = socket.socket(fileno=fds[0]) if fds else None
    for extra in fds[1:]:
        socket.close(extra)
    reply = rpc.parse_reply(data[4:])
    assert reply.xid == xid and reply.accept_stat == rpc.AcceptStat.SUCCESS
    rv, ticket = CODECS_BY_VERSION[4][OPEN_CHANNEL].result.decode(
        data[4 + reply.body_offset:], client.limits)
    assert ticket == b""  # over a Unix socket the channel itself comes
    return int(rv), chan


def test_open_channel_on_the_wire(unix_server: Server) -> None:
    """The reply carries a connected socket; on it version 4 works at once (no
    SetupArch) with the worker's state: the session opened on the first
    connection.  Closing the first connection ends the channel too."""
    client, session = _ready(unix_server.address)
    rv, chan = _open_channel(client)
    assert rv == c.CKR_OK and chan is not None
    with WireClient(chan, version=4) as channel:
        rv, _ = channel.call("GetSessionInfo", session)
        assert rv == c.CKR_OK
        assert client.call("GetSessionInfo", session)[0] == c.CKR_OK  # both at once
        client.close()
        chan.settimeout(10)
        assert chan.recv(1) == b""  # the worker ended, and its channels with it


def _join(address: str, ticket: bytes) -> tuple[int, WireClient]:
    """A new connection whose first call is JoinChannel(ticket): (rv, the connection)."""
    joining = WireClient.connect(address, version=4)
    return joining.rv("JoinChannel", ticket), joining


def test_join_channel_over_tcp_on_the_wire(token: Token, tmp_path: Path) -> None:
    """OpenChannel answers a ticket; a new connection presenting it joins the same
    worker (the session is there).  A ticket is good once; a made-up one, or one
    presented as a later call, is refused and the connection closed."""
    server = _start(token, tmp_path / "tcp", unix=False)
    try:
        client, session = _ready(server.address)
        rv, ticket = client.call("OpenChannel")
        assert rv == c.CKR_OK and len(ticket) == 32
        rv, channel = _join(server.address, ticket)
        assert rv == c.CKR_OK
        assert channel.call("GetSessionInfo", session)[0] == c.CKR_OK
        # Used up: the same ticket again is refused.
        rv, again = _join(server.address, ticket)
        assert rv == c.CKR_FUNCTION_NOT_SUPPORTED
        again.sock.settimeout(10)
        assert again.sock.recv(1) == b""
        # A made-up ticket naming the worker's pid (its first four bytes).
        rv, _ = _join(server.address, ticket[:4] + bytes(28))
        assert rv == c.CKR_FUNCTION_NOT_SUPPORTED
        # A ticket naming no worker of this listener: the connection is dropped.
        with pytest.raises(ConnectionError):
            _join(server.address, (1).to_bytes(4, "big") + ticket[4:])
        # JoinChannel after another call is not a join.
        rv, fresh = client.call("OpenChannel")
        assert client.rv("JoinChannel", fresh) == c.CKR_FUNCTION_NOT_SUPPORTED
        assert client.call("GetSessionInfo", session)[0] == c.CKR_OK
        channel.close()
        client.close()
    finally:
        server.stop()
    assert "unknown or expired ticket" in server.log_text()


# -- a server that passes the wrong things ------------------------------------------------


@pytest.mark.parametrize("mode", ["good", "file", "two", "datagram", "none", "short-ticket",
                                  "refuse"])
def test_client_copes_with_whatever_a_server_passes(mode: str, tmp_path: Path) -> None:
    """Two threads overlap GenerateRandom calls (results checked) against a fake
    server whose OpenChannel reply passes a channel, a file, two descriptors, a
    datagram socket, nothing, a short ticket, or a refusal: the client uses the
    channel when it is one and the shared connection otherwise, under ASan."""
    server = FdPasser(tmp_path / "fake.sock", mode).start()
    try:
        env = dict(os.environ, PKCS11PROXY_SOCKET_PATH=str(server.path),
                   PKCS11PROXY_LIBNAME="x", PKCS11PROXY_RPC_TIMEOUT="5")
        proc = run_driver(["pair", "15"], env, asan=True)
    finally:
        server.stop()
    assert sanitizer_report(proc) is None, sanitizer_report(proc)
    assert "pair done, 0 bad, 0 failures" in proc.stdout, proc.stdout + proc.stderr
    if mode in ("good", "file", "two", "datagram"):
        assert server.channels_passed >= 1  # the client did ask, and got the descriptor(s)
