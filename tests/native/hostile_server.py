"""A fake proxy server that answers the handshake correctly and then feeds the
client malformed replies: wrong lengths, truncated records, huge counts, wrong
XIDs, garbage, stalls and hang-ups.  Used by the robustness tests to show that
libp11guard.so never crashes, never writes past a caller's buffer and recovers
through C_Initialize.

Protocol versions: a connection answers the client's first call either as
Caml Crush does (PROG_MISMATCH 3..3, so the client falls back to version 3) or
in the version asked (4), and then shapes its hostile replies from that
version's table: typed templates and typed parameters are fuzzed too.

Run standalone: ``python tests/native/hostile_server.py PORT [SEED]``.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from p11guard.wire import procedures as P

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


def _opaque(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data + b"\0" * (-len(data) % 4)


def _accepted(xid: int, body: bytes) -> bytes:
    return _U32.pack(xid) + _U32.pack(1) + b"\0" * 4 + b"\0" * 8 + _U32.pack(0) + body


def _prog_mismatch(xid: int) -> bytes:
    """What Caml Crush answers to a version it does not speak."""
    return (_U32.pack(xid) + _U32.pack(1) + b"\0" * 4 + b"\0" * 8 + _U32.pack(2)
            + _U32.pack(3) + _U32.pack(3))


class _Listening:
    """A listening socket served by a thread; ``_handle`` takes each connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.listen(16)
        self.connections = 0
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        raise NotImplementedError


class Hostile(_Listening):
    """One listening socket; every connection gets its own random stream."""

    def __init__(self, seed: int = 1, stall: float = 3.0) -> None:
        self.seed = seed
        self.stall = stall
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        super().__init__(sock)
        self.port: int = self.sock.getsockname()[1]

    def _handle(self, conn: socket.socket) -> None:
        rng = random.Random(self.seed * 7919 + self.connections)
        threading.Thread(target=self._serve, args=(conn, rng), daemon=True).start()

    # -- wire ------------------------------------------------------------------
    @staticmethod
    def _read_record(conn: socket.socket) -> bytes | None:
        data = b""
        while True:
            hdr = _recv_exact(conn, 4)
            if hdr is None:
                return None
            mark = _U32.unpack(hdr)[0]
            body = _recv_exact(conn, mark & 0x7FFFFFFF)
            if body is None:
                return None
            data += body
            if mark & 0x80000000:
                return data

    def _serve(self, conn: socket.socket, rng: random.Random) -> None:
        camlcrush = rng.random() < 0.5  # speaks version 3 only
        with conn:
            while True:
                rec = self._read_record(conn)
                if rec is None or len(rec) < 24:
                    return
                xid, _mtype, _rpcv, _prog, vers, proc = struct.unpack(">6I", rec[:24])
                if vers != 3 and camlcrush:
                    out = _prog_mismatch(xid)
                elif proc == 2:
                    out = _accepted(xid, _U64.pack(1))
                elif proc in (70, 3):
                    out = _accepted(xid, _U64.pack(0))
                else:
                    try:
                        action = self._hostile(conn, rng, xid, proc, vers)
                    except OSError:
                        return
                    if action is None:
                        return
                    out = action
                try:
                    if out:
                        conn.sendall(_U32.pack(0x80000000 | len(out)) + out)
                except OSError:
                    return

    # -- hostility -------------------------------------------------------------
    def _value(self, rng: random.Random, kind: P.Kind) -> bytes:
        if kind is P.Kind.HYPER:
            values = [0, 0, 0, 0x150, 0x7, 2**63, 2**64 - 1, rng.getrandbits(64)]
            return _U64.pack(rng.choice(values))
        if kind is P.Kind.OPAQUE:
            n = rng.choice([0, 1, 3, 32, 100, 513, 600, 5000, 70000])
            return _opaque(rng.randbytes(n))
        if kind is P.Kind.HYPER_LIST:
            n = rng.choice([0, 1, 4, 5, 10, 1000])
            body = b"".join(_U64.pack(rng.getrandbits(64)) for _ in range(n))
            if rng.random() < 0.2:
                return _U32.pack(rng.choice([0x7FFFFFFF, 0xFFFFFFFF, n + 1])) + body
            return _U32.pack(n) + body
        if kind is P.Kind.TEMPLATE:
            n = rng.choice([0, 1, 2, 3, 4, 1 << 30])
            if n > 10:
                return _U32.pack(n)
            items = b""
            for _ in range(n):
                items += _U64.pack(rng.choice([0x3, 0x11, 0x102, rng.getrandbits(64)]))
                items += _opaque(rng.randbytes(rng.choice([0, 1, 7, 8, 9, 16, 17, 100])))
                items += _U64.pack(rng.choice([0, 8, 100, 2**64 - 1, rng.getrandbits(64)]))
            return _U32.pack(n) + items
        if kind is P.Kind.TYPED_TEMPLATE:
            return self._typed_template(rng, 0)
        if kind is P.Kind.TYPED_PARAM:
            return self._typed_param(rng)
        # structs
        out = b""
        for _name, shape in P.STRUCTS[kind]:
            if shape == "hyper":
                out += _U64.pack(rng.getrandbits(64))
            elif shape == "version":
                out += _opaque(rng.randbytes(rng.choice([0, 1, 1, 1, 2])))
                out += _opaque(rng.randbytes(rng.choice([0, 1, 1, 1, 2])))
            else:
                out += _opaque(rng.randbytes(rng.choice([0, 5, 16, 32, 33, 64, 65, 300])))
        return out

    def _typed_template(self, rng: random.Random, depth: int) -> bytes:
        n = rng.choice([0, 1, 2, 3, 5, 1 << 20, 0xFFFFFFFF])
        if n > 10:
            return _U32.pack(n)
        out = _U32.pack(n)
        for _ in range(n):
            # Mostly the client's own types (0x3 label, 0x11 value, 0x100 key type,
            # 0x40000211 wrap template, 0x40000600 allowed mechanisms).
            out += _U64.pack(rng.choice([0x3, 0x11, 0x100, 0x40000211, 0x40000600,
                                         rng.getrandbits(64)]))
            kind = rng.choice([0, 1, 2, 3, 4, 4, 5, 0xFFFFFFFF])
            out += _U32.pack(kind)
            if kind == 0:
                out += _opaque(rng.randbytes(rng.choice([0, 1, 8, 9, 100, 600])))
            elif kind == 1:
                out += _U64.pack(rng.choice([0, 1, 2**32, 2**64 - 1, rng.getrandbits(64)]))
            elif kind == 2:
                out += self._typed_template(rng, depth + 1) if depth < 2 else _U32.pack(0)
            elif kind == 3:
                m = rng.choice([0, 1, 3, 70, 0x7FFFFFFF])
                out += _U32.pack(m) + b"".join(
                    _U64.pack(rng.getrandbits(64)) for _ in range(min(m, 70)))
        return out

    def _typed_param(self, rng: random.Random) -> bytes:
        tag = rng.choice([0, 1, 5, 21, 22, 23, 24, 25, 0xFFFFFFFF])
        out = _U32.pack(tag)
        for _ in range(rng.choice([0, 1, 2, 4, 5, 6])):
            if rng.random() < 0.5:
                out += _U64.pack(rng.getrandbits(64))
            else:
                out += _opaque(rng.randbytes(rng.choice([0, 8, 12, 16, 17, 600])))
        return out

    def _hostile(
        self, conn: socket.socket, rng: random.Random, xid: int, proc: int, vers: int = 3
    ) -> bytes | None:
        spec = P.TABLES.get(vers, P.BY_NUMBER).get(proc)
        choice = rng.random()
        if spec is None or choice < 0.03:
            return None  # hang up
        if choice < 0.035:
            time.sleep(self.stall)  # beyond the client's timeout
            return None
        if choice < 0.08:  # a record mark far beyond any bound
            conn.sendall(_U32.pack(0xFFFFFFFF) + b"x" * 64)
            return None
        if choice < 0.10:  # a reply for nobody
            return _accepted(xid ^ 0x5A5A, _U64.pack(0))
        if choice < 0.12:  # refused at the RPC level
            return _U32.pack(xid) + _U32.pack(1) + _U32.pack(rng.choice([0, 1])) + rng.randbytes(12)
        if choice < 0.14:  # shorter than a header
            return rng.randbytes(rng.choice([1, 3, 5, 11]))
        if choice < 0.16:  # many tiny fragments
            body = _accepted(xid, _U64.pack(0x150))
            for i in range(0, len(body) - 1, 2):
                conn.sendall(_U32.pack(2) + body[i : i + 2])
            last = body[len(body) - len(body) % 2 or len(body) - 2 :]
            conn.sendall(_U32.pack(0x80000000 | len(last)) + last)
            return b""
        body = b"".join(self._value(rng, f.kind) for f in spec.result)
        if rng.random() < 0.5:
            body = _U64.pack(0) + body[8:]  # rv OK, so the client looks at the rest
        mutation = rng.random()
        if mutation < 0.15 and body:
            body = body[: rng.randrange(len(body))]  # truncated
        elif mutation < 0.25:
            body += rng.randbytes(rng.choice([1, 4, 8, 100]))  # trailing garbage
        elif mutation < 0.35 and body:
            b = bytearray(body)
            for _ in range(3):
                b[rng.randrange(len(b))] = rng.getrandbits(8)
            body = bytes(b)
        return _accepted(xid, body)


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = conn.recv(min(n - len(buf), 1 << 20))
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


if __name__ == "__main__":
    h = Hostile(seed=int(sys.argv[2]) if len(sys.argv) > 2 else 1).start()
    print(h.port, flush=True)
    while True:
        time.sleep(3600)


class Reorder(Hostile):
    """A well-behaved server that holds GenerateRandom calls until it has two of
    them, then answers the second one first.  A client that kept one call in
    flight at a time would stall here until its timeout; a pipelining client
    gets both answers, each to the right caller."""

    def _serve(self, conn: socket.socket, rng: random.Random) -> None:
        held: list[tuple[int, int]] = []
        with conn:
            while True:
                rec = self._read_record(conn)
                if rec is None or len(rec) < 24:
                    return
                xid, _m, _r, _p, _v, proc = struct.unpack(">6I", rec[:24])
                if proc == 2:
                    replies = [_accepted(xid, _U64.pack(1))]
                elif proc == 22:  # GenerateRandom(session, length)
                    length = _U64.unpack(rec[40 + 8 : 40 + 16])[0]
                    held.append((xid, length))
                    if len(held) < 2:
                        continue
                    replies = [
                        _accepted(x, _U64.pack(0) + _opaque(bytes([n & 0xFF]) * n))
                        for x, n in reversed(held)
                    ]
                    held.clear()
                elif proc == 11:  # OpenSession -> handle 1
                    replies = [_accepted(xid, _U64.pack(0) + _U64.pack(1))]
                else:
                    replies = [_accepted(xid, _U64.pack(0))]
                try:
                    for out in replies:
                        conn.sendall(_U32.pack(0x80000000 | len(out)) + out)
                except OSError:
                    return


class FdPasser(_Listening):
    """A version-4 server on a Unix socket whose OpenChannel replies pass what
    ``mode`` says: "good" (a working channel, served here too), "file" (a regular
    file instead of a socket), "two" (a socket pair end and a file), "datagram" (a
    Unix datagram socket), "none" (rv 0 with neither a descriptor nor a ticket),
    "short-ticket" (rv 0 and a 5-byte ticket), or "refuse" (CKR_FUNCTION_NOT_SUPPORTED).
    GenerateRandom(session, n) answers n bytes of value n after ``delay`` seconds,
    so that two client threads overlap and one of them asks for a channel."""

    def __init__(self, path: Path, mode: str, delay: float = 0.01) -> None:
        self.mode = mode
        self.delay = delay
        self.path = path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        super().__init__(sock)
        self.channels_passed = 0

    def _handle(self, conn: socket.socket) -> None:
        threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                rec = Hostile._read_record(conn)
                if rec is None or len(rec) < 24:
                    return
                xid, _m, _r, _p, _v, proc = struct.unpack(">6I", rec[:24])
                fds: list[int] = []
                close_after: list[int] = []
                if proc == 2:
                    out = _accepted(xid, _U64.pack(1))
                elif proc == 22:
                    time.sleep(self.delay)
                    length = _U64.unpack(rec[40 + 8 : 40 + 16])[0]
                    out = _accepted(xid, _U64.pack(0) + _opaque(bytes([length & 0xFF]) * length))
                elif proc == 94:
                    out, fds, close_after = self._open_channel(xid)
                else:
                    out = _accepted(xid, _U64.pack(0))
                data = _U32.pack(0x80000000 | len(out)) + out
                try:
                    if fds:
                        socket.send_fds(conn, [data], fds)
                        self.channels_passed += 1
                    else:
                        conn.sendall(data)
                except OSError:
                    return
                finally:
                    for fd in close_after:
                        os.close(fd)

    def _open_channel(self, xid: int) -> tuple[bytes, list[int], list[int]]:
        """(reply, descriptors to pass, descriptors to close once sent)."""
        ok = _accepted(xid, _U64.pack(0) + _opaque(b""))
        if self.mode == "refuse":
            return _accepted(xid, _U64.pack(0x54) + _opaque(b"")), [], []
        if self.mode == "none":
            return ok, [], []
        if self.mode == "short-ticket":
            return _accepted(xid, _U64.pack(0) + _opaque(b"12345")), [], []
        a, b = socket.socketpair()
        threading.Thread(target=self._serve, args=(a,), daemon=True).start()
        file = os.open(self.path.parent / "not-a-socket", os.O_CREAT | os.O_WRONLY, 0o600)
        dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).detach()
        pair_end = b.detach()
        fds = {"good": [pair_end], "file": [file], "two": [pair_end, file],
               "datagram": [dgram]}[self.mode]
        return ok, fds, [pair_end, file, dgram]
