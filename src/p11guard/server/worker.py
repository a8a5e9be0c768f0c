"""One worker process serves exactly one client connection.

Threading model (leader/follower): at any moment one thread of the worker is
the *leader*; it alone reads the socket until it holds one complete call.  It
then hands leadership to another thread (spawning one, up to ``max_threads``,
when none is waiting) and executes the call itself, so calls on different
sessions run in parallel in the module (cffi releases the GIL for the
duration of each PKCS#11 call).  Calls on one session stay ordered: the leader
takes the session's lock *before* giving up leadership.  Replies carry the
call's XID and are written whole under a send lock, possibly out of order.

A client that sends one call at a time (Caml Crush's) sees a plain serial server.

Fast path: while no call runs on another thread, the leader reads each call
straight from its receive buffer (one whole single-fragment record is checked
with one unpack, :func:`p11guard.wire.rpc.match_simple_call`), runs it and
sends the reply without taking any lock.  A call that should run on its own
thread, and everything unusual (several records in one read, fragments,
protocol errors, TLS), goes through :class:`~p11guard.wire.rpc.RecordReader`.

The C fast path (:mod:`p11guard.server.fastpath`) goes further while nothing else
runs: it reads the socket itself, answers the simple calls in C and, while the
client overlaps calls, runs long ones on C threads of its own (with the same
per-session order); it returns here at the first call only Python serves.

When to run a long call on its own (Python) thread: only while the client has shown
recently (:data:`CONCURRENCY_MEMORY`) that it keeps several calls in flight:
a call arrived while another one was running, or data was waiting when a long
call finished.  A single-threaded client never pays a thread hand-over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..wire import rpc
from ..wire.codec import CODECS_BY_VERSION, Limits, ProcedureCodec, rv_only_result
from ..wire.procedures import BY_NAME, PROGRAM, TABLES, VERSION_CAMLCRUSH, VERSION_P11GUARD
from ..wire.rpc import RecordReader
from ..wire.xdr import Packer, XdrError
from . import fastpath
from .channels import DEFAULT_MAX_CHANNELS, Channels, join_reply

log = logging.getLogger("p11guard.worker")

CKR_GENERAL_ERROR = 0x5
CKR_FUNCTION_NOT_SUPPORTED = 0x54
OPEN_CHANNEL, JOIN_CHANNEL = TABLES[VERSION_P11GUARD][94], TABLES[VERSION_P11GUARD][95]
assert (OPEN_CHANNEL.name, JOIN_CHANNEL.name) == ("OpenChannel", "JoinChannel")
CHANNEL_PROCEDURES = frozenset({OPEN_CHANNEL.number, JOIN_CHANNEL.number})
RECV_SIZE = 256 * 1024

# Procedures that only read or set bookkeeping in the module (no cryptography,
# no token writes, no blocking): the leader always runs them itself.  Everything
# else (signatures, encryption, key generation, PIN checks, WaitForSlotEvent,
# the 3.0 message functions, ...) also runs on the leader until the client shows
# it pipelines calls; from then on the leader hands leadership to another thread
# first, so calls on other sessions proceed meanwhile.
QUICK_PROCEDURES = frozenset(
    BY_NAME[name].number for name in (
        "SetupArch", "LoadModule", "GetInfo", "GetSlotList", "GetSlotInfo", "GetTokenInfo",
        "GetMechanismList", "GetMechanismInfo", "OpenSession", "CloseSession",
        "GetSessionInfo", "GetAttributeValue", "GetObjectSize", "FindObjectsInit",
        "FindObjects", "FindObjectsFinal", "DigestInit", "SignInit", "VerifyInit",
        "EncryptInit", "DecryptInit", "SignRecoverInit", "VerifyRecoverInit",
        "GetFunctionStatus", "CancelFunction", "SeedRandom", "Logout",
    )
)
SWITCH_INTERVAL = 0.0002
# A call that ran at least this long on the leader, with the next call already
# waiting when it finished, shows that the client overlaps calls.
LONG_CALL = 0.0002
# How long (seconds) that evidence keeps long calls running on their own threads.
CONCURRENCY_MEMORY = 1.0


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    limits: Limits
    max_threads: int = 4
    # Channels (server/channels.py) one connection may open.
    max_channels: int = DEFAULT_MAX_CHANNELS
    # Versions offered when a handler exists for them (Connection.more_handlers).
    supported_versions: tuple[int, int] = (VERSION_CAMLCRUSH, VERSION_P11GUARD)


Handler = Callable[[int, tuple[Any, ...]], tuple[Any, ...]]
# (version, procedures that may take long) -> (key, plan) or None: what the C fast
# path may serve now (Dispatcher.fast_plan).
FastPlanSource = Callable[[int, frozenset[int]], tuple[object, fastpath.Plan] | None]
# Per protocol version, the procedures that are not quick.
LONG_PROCEDURES: dict[int, frozenset[int]] = {
    version: frozenset(n for n in table if n not in QUICK_PROCEDURES)
    for version, table in TABLES.items()
}


class Stream(Protocol):
    """What a connection needs of its transport: a socket, or a TLS stream over one."""

    def recv(self, bufsize: int, /) -> bytes: ...
    def sendall(self, data: bytes | bytearray, /) -> None: ...
    def shutdown(self, how: int, /) -> None: ...


class Connection:
    """The RPC loop for one connected client.

    ``handler`` serves protocol version 3; ``more_handlers`` other versions
    (4: :mod:`p11guard.server.dispatch_v4`).  A connection speaks the version
    of its first accepted call: a call of another version gets PROG_MISMATCH
    naming that version.
    """

    def __init__(self, sock: Stream, handler: Handler, settings: WorkerSettings,
                 more_handlers: dict[int, Handler] | None = None, *,
                 fast_plan: FastPlanSource | None = None, channels: Channels | None = None,
                 version: int | None = None) -> None:
        self.sock = sock
        self.handler = handler
        self.settings = settings
        self.handlers: dict[int, Handler] = {VERSION_CAMLCRUSH: handler, **(more_handlers or {})}
        # Fixed by the first accepted call, or from the start (a channel: version 4).
        self.version: int | None = version
        self._codecs: dict[int, ProcedureCodec] = CODECS_BY_VERSION[version or VERSION_CAMLCRUSH]
        self._rbuf = bytearray(RECV_SIZE)
        self._rview = memoryview(self._rbuf)
        self._recv_into = getattr(sock, "recv_into", None)
        # The handler of self.version.
        self._handler = handler if version is None else self.handlers[version]
        # OpenChannel and JoinChannel (version 4) are answered here, on plain
        # sockets only: a TLS session cannot move (server/channels.py).
        self._channels = channels if isinstance(sock, socket.socket) else None
        self._concurrent_until = 0.0  # monotonic time until which long calls are handed off
        # Calls running on threads other than the leader (until their reply is
        # sent), and those of them whose reply is not computed yet.
        self._busy = 0
        self._unanswered = 0
        self._handed_off = 0  # calls run on a thread of their own (statistics)
        self.reader = RecordReader(settings.limits.max_record_size)
        self._leader = threading.Lock()
        self._send = threading.Lock()
        self._state = threading.Lock()  # guards the counters and session locks
        self._session_locks: dict[int, threading.Lock] = {}
        self._waiting = 0
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._python_calls = 0
        # The C fast path (fastpath.py): plain sockets only (TLS is read in Python).
        self._fast_plan = fast_plan
        self._fast: fastpath.FastPath | None = None
        if fast_plan is not None and isinstance(sock, socket.socket):
            library = fastpath.load()
            if library is not None:
                self._fast = library.connection()
                self._fast.attach(sock.fileno(), self._rbuf)

    @property
    def calls(self) -> int:
        """Calls answered so far (in Python and in C)."""
        return self._python_calls + (self._fast.served_calls if self._fast else 0)

    # -- life cycle ---------------------------------------------------------------

    def run(self) -> None:
        """Serve until the client disconnects (or sends something unrecoverable)."""
        if self.settings.max_threads > 1:
            # A thread returning from a socket call or a PKCS#11 call waits for the
            # GIL up to the switch interval (5 ms by default) while another thread
            # runs Python code; calls are ~20 us of Python, so hand over sooner.
            sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            self._loop()
        finally:
            for t in list(self._threads):
                t.join()
            fast = self._fast
            if fast is not None:
                fast.close()
            log.debug("%d calls answered, %d of them by the C fast path (%d on its threads), "
                      "%d on Python threads", self.calls, fast.served_calls if fast else 0,
                      fast.pooled_calls if fast else 0, self._handed_off)

    def shutdown(self) -> None:
        """Make the loop end soon (SIGTERM): the leader's recv returns EOF."""
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    # -- the leader/follower loop ---------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._state:
                self._waiting += 1
            self._leader.acquire()
            with self._state:
                self._waiting -= 1
            try:
                work = None if self._closed else self._lead()
                if work is None:
                    self._closed = True
                    return
                xid, number, body, framed, session_lock = work
                # Unanswered until its reply is computed, unless C may answer it: C
                # reports an overlap itself (_call_in_c), and counting the call until
                # C's reply is out would make a client that stopped overlapping look
                # as if it still did.
                counted = framed is None or self._fast is None
                with self._state:
                    self._busy += 1
                    self._handed_off += 1
                    if counted:
                        self._unanswered += 1
                self._maybe_spawn()
            finally:
                self._leader.release()
            try:
                if not self._call_in_c(framed):
                    try:
                        reply = self._reply(xid, number, body)
                    finally:
                        if counted:
                            with self._state:
                                self._unanswered -= 1
                    self._send_bytes(reply)
            finally:
                if session_lock is not None:
                    session_lock.release()
                with self._state:
                    self._busy -= 1

    def _lead(self) -> tuple[int, int, memoryview, bytes | None,
                             threading.Lock | None] | None:
        """As the leader, serve calls until one should run on its own thread.

        Returns that call with its session lock held, or None when the
        connection is over.
        """
        recv_into = self._recv_into
        rbuf = self._rbuf
        program = PROGRAM
        while not self._closed:
            work: tuple[int, int, memoryview] | None = None
            framed: bytes | None = None  # the whole record, when it came in alone
            if (recv_into is not None and self.version is not None
                    and not self.reader.ready and not self.reader.buffered):
                # The fast path (module docstring); lock-free while nothing else runs.
                alone = not self._busy
                if alone and self._fast is not None and self._fast_ready():
                    # In C until a call needs Python: then its bytes are in rbuf.
                    n = self._fast.serve()
                    if n <= 0:
                        if n == fastpath.INTERRUPTED:
                            continue  # a signal: its handler has run; check _closed
                        if n != fastpath.EOF_ and not self._closed:
                            log.debug("connection error in the C fast path (%d): %s", n,
                                      os.strerror(self._fast.error))
                        return None
                else:
                    n = self._receive()
                    if not n:
                        return None
                simple = rpc.match_simple_call(rbuf, n, program)
                if simple is not None and simple[1] == self.version and simple[2] in self._codecs:
                    xid, _, number = simple
                    if alone and self._runs_inline(number):
                        body = self._rview[rpc.FRAMED_CALL_HEADER_SIZE:n]
                        self._run_inline(xid, number, body, self._send_unlocked)
                        continue
                    # Other calls are running, or this one will: the record must
                    # outlive the receive buffer (the next leader reads into it).
                    framed = self._rview[:n].tobytes()
                    work = (xid, number, memoryview(framed)[rpc.FRAMED_CALL_HEADER_SIZE:])
                elif not self._feed(self._rview[:n].tobytes()):
                    return None
            if work is None:
                record = self._next_record()
                if record is None:
                    return None
                work, framed = record
            xid, number, body = work
            session_lock = self._session_lock(number, body)
            if session_lock is not None:
                session_lock.acquire()
            if self._unanswered:
                # A call arrived before the answer to another one: the client
                # overlaps calls.
                self._concurrent_until = time.monotonic() + CONCURRENCY_MEMORY
            if not self._runs_inline(number):
                return xid, number, body, framed, session_lock
            try:
                if not self._call_in_c(framed):
                    self._run_inline(xid, number, body, self._send_bytes)
            finally:
                if session_lock is not None:
                    session_lock.release()
        return None

    def _call_in_c(self, framed: bytes | None) -> bool:
        """Answer one whole record with the C fast path while other calls run
        (p11g_fast_call; the caller holds the session lock).  False: Python's
        path answers it (nothing ran)."""
        fast = self._fast
        if fast is None or framed is None or fast.plan_key is None:
            return False
        found = self._current_plan()
        if found is None or found[0] != fast.plan_key:
            return False  # the plan changed: reconfigured only while alone
        result = fast.call(framed)
        if result < 0:
            log.error("C fast path failed (%d): closing the connection", result)
            self.shutdown()
            return True
        if result == 2:
            self._concurrent_until = time.monotonic() + CONCURRENCY_MEMORY
        return result > 0

    def _fast_ready(self) -> bool:
        """May the C fast path take the socket now?  (Configures it when the
        dispatcher's plan changed: module loaded, initialised, finalised.)"""
        assert self._fast is not None
        found = self._current_plan()
        if found is None:
            return False
        key, plan = found
        self._fast.configure(self.version or VERSION_CAMLCRUSH, plan, self.settings.limits,
                             long_call=LONG_CALL, memory=CONCURRENCY_MEMORY,
                             max_threads=self.settings.max_threads, key=key)
        return True

    def _current_plan(self) -> tuple[object, fastpath.Plan] | None:
        """The dispatcher's fast-path plan for this connection now (cached there)."""
        assert self._fast_plan is not None
        version = self.version or VERSION_CAMLCRUSH
        return self._fast_plan(version, LONG_PROCEDURES[version])

    def _runs_inline(self, number: int) -> bool:
        """Run this call on the leader itself (rather than hand leadership over)?

        Handing over costs a thread wake-up and a GIL hand-over (~60 us): worth
        it only for a call that may take long while the client has other calls
        in flight.
        """
        if number in QUICK_PROCEDURES or self.settings.max_threads == 1:
            return True
        return time.monotonic() >= self._concurrent_until

    def _run_inline(self, xid: int, number: int, body: memoryview,
                    send: Callable[[bytes | bytearray], None]) -> None:
        """Run a call on the leader; note when the client overlapped a long one."""
        if number in QUICK_PROCEDURES:
            send(self._reply(xid, number, body))
            return
        started = time.monotonic()
        reply = self._reply(xid, number, body)
        finished = time.monotonic()
        # Before the reply goes out: afterwards a serial client's next call may
        # already be there, and would look like an overlapping one.
        if (finished - started >= LONG_CALL and self.settings.max_threads > 1
                and self._more_pending()):
            self._concurrent_until = finished + CONCURRENCY_MEMORY
        send(reply)

    def _more_pending(self) -> bool:
        """Did the client send another call while we ran a long one?

        Then it keeps several calls in flight (a multi-threaded application on
        a pipelining client) and long calls are worth running in parallel.  A
        client that waits for each reply (Caml Crush's) never gets here with
        data pending, and all its calls run on the leader.
        """
        if self.reader.buffered or self.reader.ready:
            return True
        # A TLS stream is read through its socket (`.sock`); a plain socket directly.
        fileno = getattr(getattr(self.sock, "sock", self.sock), "fileno", None)
        if fileno is None:
            return False
        try:
            readable, _, _ = select.select([fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        if readable:
            log.debug("client pipelines calls: long calls now run in parallel")
        return bool(readable)

    def _maybe_spawn(self) -> None:
        with self._state:
            if self._waiting or len(self._threads) + 1 >= self.settings.max_threads:
                return
            t = threading.Thread(target=self._loop, name="p11guard-call", daemon=True)
            self._threads.append(t)
        t.start()

    def _session_lock(self, number: int, body: memoryview) -> threading.Lock | None:
        proc = self._codecs[number].procedure
        if not proc.args or proc.args[0].name != "session" or len(body) < 8:
            return None
        session = int.from_bytes(body[:8], "big")
        with self._state:
            lock = self._session_locks.get(session)
            if lock is None:
                if len(self._session_locks) > 4096:
                    # Closed sessions leave idle locks behind: drop the unlocked ones.
                    for key in [k for k, v in self._session_locks.items() if not v.locked()]:
                        del self._session_locks[key]
                lock = self._session_locks[session] = threading.Lock()
            return lock

    # -- reading --------------------------------------------------------------------

    def _next_record(self) -> tuple[tuple[int, int, memoryview], bytes | None] | None:
        """The next call, and its record framed as one fragment for the C fast
        path when it has the simple shape C takes (None otherwise)."""
        work = self._next_call()
        if work is None:
            return None
        body = work[2]
        framed = None
        if self._fast is not None and body.obj is not None:
            record = bytes(body.obj)  # _check_call's record (bytes: no copy)
            if len(record) - len(body) == rpc.FRAMED_CALL_HEADER_SIZE - 4:
                framed = rpc.frame(record)
        return work, framed

    def _next_call(self) -> tuple[int, int, memoryview] | None:
        """Read until one valid call is available; answer protocol errors on the way.

        Returns None when the connection is over (EOF, socket error, or a
        stream that cannot be resynchronised).
        """
        while True:
            record = self.reader.pop()
            if record is None:
                if self._recv_into is not None:
                    n = self._receive()
                    data = self._rview[:n].tobytes()
                else:
                    try:
                        data = self.sock.recv(RECV_SIZE)
                    except OSError as exc:
                        if not self._closed:
                            log.debug("connection error: %s", exc)
                        return None
                if not data or not self._feed(data):
                    return None
                continue
            work = self._check_call(record)
            if work is not None:
                return work

    def _receive(self) -> int:
        """Read into the reused receive buffer (sock.recv(N) would allocate, mremap
        and free N bytes on every call): the byte count, 0 at the end (EOF, error)."""
        assert self._recv_into is not None
        try:
            n: int = self._recv_into(self._rbuf)
        except OSError as exc:
            if not self._closed:
                log.debug("connection error: %s", exc)
            return 0
        return n

    def _feed(self, data: bytes) -> bool:
        """Give the record reader more bytes; False when the connection must end."""
        try:
            self.reader.feed(data)
        except rpc.RecordTooLarge as exc:
            log.warning("closing connection: %s", exc)
            return False
        return True

    def _check_call(self, record: bytes) -> tuple[int, int, memoryview] | None:
        try:
            call = rpc.parse_call(record)
        except rpc.BadCall as bad:
            log.warning("bad RPC call: %s", bad)
            self._send_record(bad.reply)
            return None
        except rpc.RpcError as exc:
            log.warning("ignoring a record that is not an RPC call: %s", exc)
            return None
        xid = call.xid
        if call.cred_flavor != rpc.AUTH_NONE or call.verf_flavor != rpc.AUTH_NONE:
            self._send_record(rpc.auth_error_reply(xid, rpc.AuthStat.AUTH_TOOWEAK))
            return None
        if call.program != PROGRAM:
            self._send_record(rpc.prog_unavail_reply(xid))
            return None
        low, high = self.settings.supported_versions
        high = min(high, max(self.handlers))
        if self.version is not None and call.version != self.version:
            # One connection, one protocol version: the one it started with.
            self._send_record(rpc.prog_mismatch_reply(xid, self.version, self.version))
            return None
        if not low <= call.version <= high or call.version not in self.handlers:
            self._send_record(rpc.prog_mismatch_reply(xid, low, high))
            return None
        codecs = CODECS_BY_VERSION[call.version]
        if call.procedure not in codecs:
            self._send_record(rpc.proc_unavail_reply(xid))
            return None
        if self.version is None:
            # Set by the leader before any call runs: later calls see it.
            self.version = call.version
            self._codecs = codecs
            self._handler = self.handlers[call.version]
        return xid, call.procedure, memoryview(record)[call.body_offset :]

    # -- executing ------------------------------------------------------------------

    def _execute(self, xid: int, number: int, body: memoryview) -> None:
        self._send_bytes(self._reply(xid, number, body))

    def _reply(self, xid: int, number: int, body: memoryview) -> bytes | bytearray:
        """Decode, run and encode one call: the framed reply, ready to send (empty:
        sent already)."""
        if number in CHANNEL_PROCEDURES and self.version == VERSION_P11GUARD:
            if number == OPEN_CHANNEL.number:
                return self._open_channel(xid)
            return self._join_channel(xid, body)
        codec = self._codecs[number]
        try:
            args = codec.args.decode(body, self.settings.limits)
        except XdrError as exc:
            log.warning("%s: garbage arguments: %s", codec.procedure.c_name, exc)
            return rpc.frame(rpc.garbage_args_reply(xid))
        try:
            result = self._handler(number, args)
        except Exception:  # one bad call must not end the worker
            log.exception("%s failed unexpectedly", codec.procedure.c_name)
            result = rv_only_result(codec.procedure, CKR_GENERAL_ERROR)
        # Record mark, reply header and result in one buffer: one send.
        buf = rpc.new_reply_buffer()
        try:
            codec.result.encode_into(Packer(buf), result)
        except Exception:  # a malformed backend answer becomes an error code
            log.exception("%s: cannot encode the result", codec.procedure.c_name)
            buf = rpc.new_reply_buffer()
            codec.result.encode_into(Packer(buf),
                                     rv_only_result(codec.procedure, CKR_GENERAL_ERROR))
        self._python_calls += 1
        if rpc.finish_reply(buf, xid):
            return buf
        return rpc.frame(rpc.success_reply_header(xid) +
                         bytes(buf[rpc.FRAMED_REPLY_HEADER_SIZE:]))

    def _open_channel(self, xid: int) -> bytes | bytearray:
        """OpenChannel: a further connection to this worker for one client thread.
        Unix: its client end goes with the reply (SCM_RIGHTS), which is sent here
        (b"" returned).  TCP: a ticket for JoinChannel.  Otherwise (TLS, limit
        reached) CKR_FUNCTION_NOT_SUPPORTED: the client goes on sharing this one."""
        channels = self._channels
        theirs: socket.socket | None = None
        ticket: bytes | None = None
        if channels is not None and isinstance(self.sock, socket.socket):
            if self.sock.family == socket.AF_UNIX:
                theirs = channels.open()
            else:
                ticket = channels.ticket()
        ok = theirs is not None or ticket is not None
        buf = rpc.new_reply_buffer()
        CODECS_BY_VERSION[VERSION_P11GUARD][OPEN_CHANNEL.number].result.encode_into(
            Packer(buf), (0 if ok else CKR_FUNCTION_NOT_SUPPORTED, ticket or b""))
        self._python_calls += 1
        if not rpc.finish_reply(buf, xid):
            raise AssertionError("a short reply is one fragment")
        if theirs is None:
            return buf
        try:
            with self._send:
                if self._fast is not None:  # under C's send lock: its replies too
                    self._fast.send_fd(buf, theirs.fileno())
                else:
                    assert isinstance(self.sock, socket.socket)
                    sent = socket.send_fds(self.sock, [buf], [theirs.fileno()])
                    if sent < len(buf):
                        self.sock.sendall(buf[sent:])
        except OSError as exc:
            log.debug("send failed: %s", exc)
            self.shutdown()
        finally:
            theirs.close()  # the client's now (or nobody's: its thread sees EOF)
        return b""

    def _join_channel(self, xid: int, body: memoryview) -> bytes | bytearray:
        """JoinChannel, the first call of a TCP connection: pass the connection to
        the worker its ticket names (it answers there); this one is then done, and
        must not shut the socket down (the other worker has it now)."""
        codec = self._codecs[JOIN_CHANNEL.number]
        self._python_calls += 1
        try:
            (ticket,) = codec.args.decode(body, self.settings.limits)
        except XdrError:
            return rpc.frame(rpc.garbage_args_reply(xid))
        if (self.calls == 1 and self._channels is not None and isinstance(self.sock, socket.socket)
                and self.sock.family != socket.AF_UNIX
                and self._channels.forward(xid, bytes(ticket), self.sock)):
            self._closed = True  # the loop ends; our descriptor is closed, not shut down
            return b""
        return join_reply(xid, CKR_FUNCTION_NOT_SUPPORTED)

    def _send_record(self, record: bytes) -> None:
        self._send_bytes(rpc.frame(record))

    def _send_bytes(self, data: bytes | bytearray) -> None:
        with self._send:
            self._send_unlocked(data)

    def _send_unlocked(self, data: bytes | bytearray) -> None:
        """Send without the send lock: only when no other thread can be sending."""
        if not data:
            return  # the reply went out already (OpenChannel)
        try:
            if self._fast is not None:
                # The C fast path's own lock: its replies may go out from other threads.
                self._fast.send(data)
            else:
                self.sock.sendall(data)
        except OSError as exc:
            log.debug("send failed: %s", exc)
            self.shutdown()
