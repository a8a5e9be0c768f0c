"""ONC RPC version 2 (RFC 5531) messages and record marking, sans-IO.

* :class:`RecordReader` turns a byte stream into complete records (reassembling
  multi-fragment records, bounded in size before anything is buffered).
* :func:`frame` turns a record into bytes for the stream (one or more fragments).
* :func:`parse_call` / :func:`parse_reply` and the ``*_reply`` / :func:`call`
  builders convert between records and messages.

Nothing here touches a socket: callers feed bytes in and write bytes out.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from .xdr import Packer, Unpacker, XdrError

RPC_VERSION = 2
CALL = 0
REPLY = 1

MSG_ACCEPTED = 0
MSG_DENIED = 1

AUTH_NONE = 0
MAX_AUTH_BYTES = 400

LAST_FRAGMENT = 0x80000000
MAX_FRAGMENT = 0x7FFFFFFF

_HDR = struct.Struct(">I")
_REPLY_HEAD = struct.Struct(">IIIIII")  # xid, REPLY, ACCEPTED, verf flavor, verf len, stat
_FRAMED_REPLY_HEAD = struct.Struct(">IIIIIII")  # record mark + the above
_CALL_HEAD = struct.Struct(">IIIIIIIIII")
_FRAMED_CALL_HEAD = struct.Struct(">IIIIIIIIIII")  # record mark + _CALL_HEAD
FRAMED_CALL_HEADER_SIZE = _FRAMED_CALL_HEAD.size  # where a framed simple call's body starts
FRAMED_REPLY_HEADER_SIZE = _FRAMED_REPLY_HEAD.size


class AcceptStat(enum.IntEnum):
    SUCCESS = 0
    PROG_UNAVAIL = 1
    PROG_MISMATCH = 2
    PROC_UNAVAIL = 3
    GARBAGE_ARGS = 4
    SYSTEM_ERR = 5


_SUCCESS = int(AcceptStat.SUCCESS)  # a plain int packs faster than the enum member


class RejectStat(enum.IntEnum):
    RPC_MISMATCH = 0
    AUTH_ERROR = 1


class AuthStat(enum.IntEnum):
    AUTH_OK = 0
    AUTH_BADCRED = 1
    AUTH_REJECTEDCRED = 2
    AUTH_BADVERF = 3
    AUTH_REJECTEDVERF = 4
    AUTH_TOOWEAK = 5


class RpcError(ValueError):
    """A record that is not a usable RPC message."""


class RecordTooLarge(RpcError):
    """A record (or fragment) longer than the configured bound."""


# --- record marking ----------------------------------------------------------

class RecordReader:
    """Reassembles RFC 5531 section 11 records from stream bytes.

    ``feed`` accepts any chunking of the stream; ``records`` yields each complete
    record once.  A fragment header announcing more than ``max_record_size``
    bytes in total raises :class:`RecordTooLarge` before any of it is buffered.
    """

    __slots__ = ("_buf", "_done", "_fragments", "_max", "_max_fragments", "_total")

    def __init__(self, max_record_size: int, max_fragments: int = 4096) -> None:
        self._max = max_record_size
        # Empty non-final fragments cost the peer 4 bytes each: bound their number too.
        self._max_fragments = max_fragments
        self._buf = bytearray()
        self._fragments: list[bytes] = []
        self._total = 0
        self._done: list[bytes] = []

    def feed(self, data: bytes) -> None:
        if not self._buf and not self._fragments and len(data) >= 4:
            # The common case: exactly one whole single-fragment record arrived.
            header = _HDR.unpack_from(data, 0)[0]
            length = header & MAX_FRAGMENT
            if header & LAST_FRAGMENT and len(data) == 4 + length and length <= self._max:
                self._done.append(data[4:])
                return
        self._buf += data
        buf = self._buf
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            header = _HDR.unpack_from(buf, pos)[0]
            length = header & MAX_FRAGMENT
            if self._total + length > self._max:
                raise RecordTooLarge(
                    f"record of at least {self._total + length} bytes exceeds {self._max}"
                )
            if end - pos - 4 < length:
                break
            fragment = bytes(buf[pos + 4 : pos + 4 + length])
            pos += 4 + length
            if header & LAST_FRAGMENT:
                if self._fragments:
                    self._fragments.append(fragment)
                    self._done.append(b"".join(self._fragments))
                    self._fragments = []
                else:
                    self._done.append(fragment)
                self._total = 0
            else:
                if len(self._fragments) >= self._max_fragments:
                    raise RecordTooLarge(f"record of more than {self._max_fragments} fragments")
                self._fragments.append(fragment)
                self._total += length
        if pos:
            del buf[:pos]

    def records(self) -> Iterator[bytes]:
        while self._done:
            yield self._done.pop(0)

    def pop(self) -> bytes | None:
        return self._done.pop(0) if self._done else None

    @property
    def ready(self) -> int:
        """Complete records waiting to be popped."""
        return len(self._done)

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a complete record."""
        return len(self._buf) + self._total


def frame(record: bytes, max_fragment: int = MAX_FRAGMENT) -> bytes:
    """Record-mark ``record``: one fragment unless it is longer than ``max_fragment``."""
    n = len(record)
    if n <= max_fragment:
        return _HDR.pack(LAST_FRAGMENT | n) + record
    parts = []
    for start in range(0, n, max_fragment):
        chunk = record[start : start + max_fragment]
        last = LAST_FRAGMENT if start + max_fragment >= n else 0
        parts.append(_HDR.pack(last | len(chunk)))
        parts.append(chunk)
    return b"".join(parts)


# --- calls -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Call:
    xid: int
    program: int
    version: int
    procedure: int
    cred_flavor: int
    verf_flavor: int
    body_offset: int  # where the procedure's arguments start in the record


class BadCall(RpcError):
    """A CALL message that must be answered with an error reply (not dropped)."""

    def __init__(self, xid: int, reply: bytes, why: str) -> None:
        super().__init__(why)
        self.xid = xid
        self.reply = reply


def parse_call(record: bytes) -> Call:
    """Parse a CALL header.

    Raises :class:`BadCall` (carrying the error reply to send) for an RPC version
    mismatch or a malformed credential, and :class:`RpcError` for a record that
    is not a call at all (nothing sensible to answer).
    """
    if len(record) >= 40:
        # Fast path: AUTH_NONE credential and verifier with empty bodies (every
        # Caml Crush and p11guard client), the whole header in one unpack.
        (xid, mtype, rpcvers, program, version, procedure,
         cflavor, clen, vflavor, vlen) = _CALL_HEAD.unpack_from(record, 0)
        if mtype == CALL and rpcvers == RPC_VERSION and clen == 0 and vlen == 0:
            return Call(xid, program, version, procedure, cflavor, vflavor, 40)
    u = Unpacker(record)
    try:
        xid = u.uint()
        if u.uint() != CALL:
            raise RpcError("not a CALL message")
        rpcvers = u.uint()
        if rpcvers != RPC_VERSION:
            raise BadCall(xid, rpc_mismatch_reply(xid), f"RPC version {rpcvers}")
        program, version, procedure = u.uint(), u.uint(), u.uint()
        cred_flavor = u.uint()
        u.opaque(MAX_AUTH_BYTES)
        verf_flavor = u.uint()
        u.opaque(MAX_AUTH_BYTES)
    except XdrError as exc:
        if len(record) >= 4:
            xid = _HDR.unpack_from(record, 0)[0]
            raise BadCall(xid, auth_error_reply(xid, AuthStat.AUTH_BADCRED), str(exc)) from None
        raise RpcError(str(exc)) from None
    return Call(xid, program, version, procedure, cred_flavor, verf_flavor, u.position)


def match_simple_call(data: bytes | bytearray, length: int,
                      program: int) -> tuple[int, int, int] | None:
    """``(xid, version, procedure)`` when ``data[:length]`` is exactly one whole
    single-fragment CALL of ``program`` with empty AUTH_NONE credentials, else None.

    The arguments then start at :data:`FRAMED_CALL_HEADER_SIZE`.  This is the
    shape of every call a Caml Crush or p11guard client sends one at a time; a
    server checks it with one unpack instead of reassembling and parsing the
    record (anything else goes through :class:`RecordReader` and
    :func:`parse_call`, which also produce the error replies).
    """
    if length < FRAMED_CALL_HEADER_SIZE:
        return None
    (mark, xid, mtype, rpcvers, prog, version, procedure,
     cflavor, clen, vflavor, vlen) = _FRAMED_CALL_HEAD.unpack_from(data, 0)
    if (mark != LAST_FRAGMENT | (length - 4) or mtype != CALL or rpcvers != RPC_VERSION
            or prog != program or cflavor != AUTH_NONE or clen or vflavor != AUTH_NONE
            or vlen):
        return None
    return xid, version, procedure


def new_reply_buffer() -> bytearray:
    """A buffer for one framed success reply: room for the record mark and the
    reply header, the result is appended after them (:func:`finish_reply`)."""
    return bytearray(FRAMED_REPLY_HEADER_SIZE)


def finish_reply(buf: bytearray, xid: int) -> bool:
    """Fill in the record mark and success header of a :func:`new_reply_buffer`
    buffer; False (buffer untouched) when the reply needs several fragments."""
    length = len(buf) - 4
    if length > MAX_FRAGMENT:
        return False
    _FRAMED_REPLY_HEAD.pack_into(buf, 0, LAST_FRAGMENT | length, xid, REPLY, MSG_ACCEPTED,
                                 AUTH_NONE, 0, _SUCCESS)
    return True


def call(xid: int, program: int, version: int, procedure: int, body: bytes) -> bytes:
    """A CALL record with AUTH_NONE credentials (what Caml Crush clients send)."""
    p = Packer()
    for word in (xid, CALL, RPC_VERSION, program, version, procedure, AUTH_NONE, 0, AUTH_NONE, 0):
        p.uint(word)
    p.raw(body)
    return p.getvalue()


# --- replies -----------------------------------------------------------------

def success_reply_header(xid: int) -> bytes:
    return _REPLY_HEAD.pack(xid, REPLY, MSG_ACCEPTED, AUTH_NONE, 0, AcceptStat.SUCCESS)


def framed_success_header(xid: int, body_len: int) -> bytes:
    """Record mark + accepted-reply header for a one-fragment reply of ``body_len``."""
    return _FRAMED_REPLY_HEAD.pack(LAST_FRAGMENT | (24 + body_len), xid, REPLY, MSG_ACCEPTED,
                                   AUTH_NONE, 0, AcceptStat.SUCCESS)


def success_reply(xid: int, body: bytes) -> bytes:
    return success_reply_header(xid) + body


def _accepted(xid: int, stat: AcceptStat, extra: tuple[int, ...] = ()) -> bytes:
    p = Packer()
    for word in (xid, REPLY, MSG_ACCEPTED, AUTH_NONE, 0, stat, *extra):
        p.uint(word)
    return p.getvalue()


def prog_unavail_reply(xid: int) -> bytes:
    return _accepted(xid, AcceptStat.PROG_UNAVAIL)


def prog_mismatch_reply(xid: int, low: int, high: int) -> bytes:
    return _accepted(xid, AcceptStat.PROG_MISMATCH, (low, high))


def proc_unavail_reply(xid: int) -> bytes:
    return _accepted(xid, AcceptStat.PROC_UNAVAIL)


def garbage_args_reply(xid: int) -> bytes:
    return _accepted(xid, AcceptStat.GARBAGE_ARGS)


def system_err_reply(xid: int) -> bytes:
    return _accepted(xid, AcceptStat.SYSTEM_ERR)


def rpc_mismatch_reply(xid: int) -> bytes:
    p = Packer()
    for word in (xid, REPLY, MSG_DENIED, RejectStat.RPC_MISMATCH, RPC_VERSION, RPC_VERSION):
        p.uint(word)
    return p.getvalue()


def auth_error_reply(xid: int, stat: AuthStat) -> bytes:
    p = Packer()
    for word in (xid, REPLY, MSG_DENIED, RejectStat.AUTH_ERROR, stat):
        p.uint(word)
    return p.getvalue()


@dataclass(frozen=True, slots=True)
class Reply:
    """A parsed REPLY.  ``accept_stat`` is None for a denied call."""

    xid: int
    accepted: bool
    accept_stat: AcceptStat | None
    reject_stat: RejectStat | None
    detail: tuple[int, ...]  # mismatch (low, high) or (auth_stat,)
    body_offset: int

    @property
    def ok(self) -> bool:
        return self.accept_stat is AcceptStat.SUCCESS


def parse_reply(record: bytes) -> Reply:
    u = Unpacker(record)
    try:
        xid = u.uint()
        if u.uint() != REPLY:
            raise RpcError("not a REPLY message")
        reply_stat = u.uint()
        if reply_stat == MSG_ACCEPTED:
            u.uint()
            u.opaque(MAX_AUTH_BYTES)
            try:
                stat = AcceptStat(u.uint())
            except ValueError as exc:
                raise RpcError(f"unknown accept_stat: {exc}") from None
            detail: tuple[int, ...] = ()
            if stat is AcceptStat.PROG_MISMATCH:
                detail = (u.uint(), u.uint())
            return Reply(xid, True, stat, None, detail, u.position)
        if reply_stat == MSG_DENIED:
            reject = RejectStat(u.uint())
            detail = (u.uint(), u.uint()) if reject is RejectStat.RPC_MISMATCH else (u.uint(),)
            return Reply(xid, False, None, reject, detail, u.position)
        raise RpcError(f"unknown reply_stat {reply_stat}")
    except (XdrError, ValueError) as exc:
        raise RpcError(str(exc)) from None
