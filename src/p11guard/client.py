"""A small blocking Python client for the Caml Crush protocol.

Used by the tests (including clients that pretend to be 32-bit or big-endian)
and by health checks.  It is not a PKCS#11 module: it speaks the wire protocol
procedure by procedure, with the codec from :mod:`p11guard.wire`.
"""

from __future__ import annotations

import itertools
import socket
from typing import Any

from .wire import rpc
from .wire.codec import CODECS_BY_VERSION, Limits
from .wire.procedures import NAMES_BY_VERSION, PROGRAM, VERSION_CAMLCRUSH


class RpcCallError(RuntimeError):
    def __init__(self, reply: rpc.Reply) -> None:
        super().__init__(f"RPC call failed: {reply}")
        self.reply = reply


class WireClient:
    """One connection; ``call("Sign", session, data)`` returns the result tuple."""

    def __init__(self, sock: socket.socket, *, version: int = VERSION_CAMLCRUSH,
                 limits: Limits | None = None) -> None:
        self.sock = sock
        self.version = version
        self.limits = limits or Limits()
        self._reader = rpc.RecordReader(self.limits.max_record_size + 1024)
        self._xids = itertools.count(1)

    @classmethod
    def connect(cls, address: str, timeout: float = 30.0, *,
                version: int = VERSION_CAMLCRUSH) -> WireClient:
        """``address``: "host:port" or a Unix socket path (as PKCS11PROXY_SOCKET_PATH)."""
        if address.startswith("/") or address.startswith("."):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(address)
        else:
            host, _, port = address.rpartition(":")
            sock = socket.create_connection((host, int(port)), timeout=timeout)
        return cls(sock, version=version)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> WireClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_record(self) -> bytes:
        while True:
            record = self._reader.pop()
            if record is not None:
                return record
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self._reader.feed(data)

    def call_raw(self, procedure: int, body: bytes, *, program: int = PROGRAM,
                 version: int | None = None) -> tuple[rpc.Reply, bytes]:
        xid = next(self._xids)
        record = rpc.call(xid, program, self.version if version is None else version,
                          procedure, body)
        self.sock.sendall(rpc.frame(record))
        answer = self.recv_record()
        reply = rpc.parse_reply(answer)
        if reply.xid != xid:
            raise RuntimeError(f"reply xid {reply.xid} for call {xid}")
        return reply, answer[reply.body_offset :]

    def call(self, name: str, *args: Any) -> tuple[Any, ...]:
        """Call procedure ``name`` of the client's protocol version (3 or 4)."""
        proc = NAMES_BY_VERSION[self.version][name]
        codec = CODECS_BY_VERSION[self.version][proc.number]
        reply, body = self.call_raw(proc.number, codec.args.encode(args))
        if not reply.ok:
            raise RpcCallError(reply)
        return codec.result.decode(body, self.limits)

    def rv(self, name: str, *args: Any) -> int:
        value: int = self.call(name, *args)[0]
        return value
