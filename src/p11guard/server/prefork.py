"""Pre-forked spare workers: the client-independent part of a worker, done ahead.

A new connection used to pay, before its first result: the fork of the
listener, parsing the cffi types its first calls use, the dlopen() of the
module (and its first call, C_GetInterface), C_Initialize, and building the
seccomp program.  Of these only C_Initialize has to wait for the client.

So the listener keeps ``spare_workers`` processes forked ahead (after the
privilege drop and hardening, like every worker).  A spare loads the
configured modules (dlopen + C_GetInterface/C_GetFunctionList, never
C_Initialize; ``preload_modules = false`` turns this off), builds its seccomp
program, serves a pretend client over a socket pair
(``serve.WorkerProgram.rehearse``: the first write to each page shared with
the listener copies it, and a new connection's first calls paid ~1,000 such
faults), says it is ready on its control socket, and waits.  On accept the
listener passes it the connected socket (SCM_RIGHTS over the socket pair
made at the fork) with the listener's index and the peer's name, and keeps
the control socket only to route channels joining over TCP (server/channels.py):
from then on the spare is that connection's worker,
exactly like one forked on accept (TLS handshake and identity first), and is
never given another connection.

The cffi types are parsed in the listener (:func:`warm_cffi_types`): no module
is involved, and every worker, spare or not, inherits the parsed types.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import socket
from collections.abc import Callable, Iterable

from ..pkcs11.binding import Module, ffi
from ..wire import rpc
from ..wire.codec import CODECS_BY_VERSION
from ..wire.procedures import NAMES_BY_VERSION, PROGRAM, VERSION_P11GUARD
from .sandbox import PR_SET_NAME, prctl

log = logging.getLogger("p11guard.prefork")

READY = b"R"  # spare -> listener: prepared, waiting for a connection
_MAX_MESSAGE = 1024  # listener index (4 bytes) + the peer's name

# Every C type a worker names in a string literal (ffi.new/cast/sizeof).  cffi
# parses a type string on its first use in a process, ~3 ms each with our
# declarations: a worker's first calls paid that per call.  tests/unit/test_prefork.py
# checks that every such literal in src/ is listed here.  (The v4 mechanism parameter
# structures, named from a table in pkcs11/cparams.py, are left to their first use:
# the 22 of them would add ~130 ms to every start.)
C_TYPES: tuple[str, ...] = (
    "CK_ATTRIBUTE", "CK_ATTRIBUTE[]", "CK_BYTE[]", "CK_C_INITIALIZE_ARGS *",
    "CK_FUNCTION_LIST", "CK_FUNCTION_LIST *", "CK_FUNCTION_LIST **", "CK_FUNCTION_LIST_3_0 *",
    "CK_INFO *", "CK_INTERFACE **", "CK_MECHANISM *", "CK_MECHANISM_INFO *", "CK_OBJECT_HANDLE *",
    "CK_OBJECT_HANDLE[2]", "CK_OBJECT_HANDLE[]", "CK_RSA_PKCS_OAEP_PARAMS *",
    "CK_SESSION_HANDLE *", "CK_SESSION_INFO *", "CK_SLOT_ID *", "CK_SLOT_INFO *",
    "CK_TOKEN_INFO *", "CK_ULONG", "CK_ULONG *", "CK_ULONG[]", "CK_VERSION *", "char[1]",
    "char[]", "uintptr_t",
)


def warm_cffi_types(types: Iterable[str] = C_TYPES) -> None:
    """Parse ``types`` once, here, so that forked workers find them in cffi's cache."""
    for name in types:
        ffi.typeof(name)


def rehearsal_calls() -> bytes:
    """The calls a spare serves itself before it is ready (serve.WorkerProgram.rehearse):
    a version-4 client's first call, and one call that needs a module."""
    out = []
    for xid, (name, args) in enumerate((("SetupArch", (1,)), ("GetInfo", ()))):
        proc = NAMES_BY_VERSION[VERSION_P11GUARD][name]
        body = CODECS_BY_VERSION[VERSION_P11GUARD][proc.number].args.encode(args)
        out.append(rpc.frame(rpc.call(xid, PROGRAM, VERSION_P11GUARD, proc.number, body)))
    return b"".join(out)


def preload_modules(paths: Iterable[str]) -> dict[str, Module]:
    """dlopen() each module and read its function list; no C_Initialize.

    A module that does not load is left out: the client's LoadModule tries
    again and reports the error as it always did.
    """
    loaded: dict[str, Module] = {}
    for path in paths:
        if path in loaded:
            continue
        try:
            loaded[path] = Module(path)
        except Exception as exc:  # a bad module must not kill the spare
            log.debug("not preloading %s: %s", path, exc)
    return loaded


def set_process_name(name: str) -> None:
    """Name this process for ps/top (/proc/PID/comm, 15 bytes): an operator (and a
    test) tells a waiting spare ("p11guard-spare") from a worker ("p11guard-worker")."""
    buf = ctypes.create_string_buffer(name.encode()[:15])
    with contextlib.suppress(OSError, AttributeError):  # best effort (not Linux: no prctl)
        prctl(PR_SET_NAME, ctypes.addressof(buf))


# --- the hand-off ------------------------------------------------------------------------


def control_pair() -> tuple[socket.socket, socket.socket]:
    """(listener end, spare end): one message per send, EOF when either side goes."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def send_connection(ctrl: socket.socket, conn: socket.socket, index: int, peer: str) -> None:
    """Pass ``conn`` (accepted on listener ``index``) to the spare at the other end."""
    message = index.to_bytes(4, "big") + peer.encode("utf-8", "replace")[: _MAX_MESSAGE - 4]
    sent = socket.send_fds(ctrl, [message], [conn.fileno()])
    if sent != len(message):
        raise OSError(f"short hand-off message ({sent} of {len(message)} bytes)")


def receive_connection(ctrl: socket.socket) -> tuple[socket.socket, int, str] | None:
    """Wait for a connection; None when the listener closed the control socket."""
    try:
        message, fds, flags, _ = socket.recv_fds(ctrl, _MAX_MESSAGE, 1)
    except ConnectionResetError:  # closed with our READY unread (shutting down)
        return None
    if not message and not fds:
        return None
    if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(fds) != 1 or len(message) < 4:
        for fd in fds:
            with contextlib.suppress(OSError):
                socket.close(fd)
        raise OSError(f"malformed hand-off (flags {flags:#x}, {len(fds)} descriptor(s), "
                      f"{len(message)} bytes)")
    conn = socket.socket(fileno=fds[0])
    conn.setblocking(True)
    return conn, int.from_bytes(message[:4], "big"), message[4:].decode("utf-8", "replace")


def run_spare(ctrl: socket.socket, prepare: Callable[[], None] | None,
              serve: Callable[[socket.socket, int, str, socket.socket], None]) -> None:
    """The life of a spare: prepare, report ready, wait, then serve one connection
    (keeping the control socket: channels join through it)."""
    if prepare is not None:
        prepare()
    with contextlib.suppress(OSError):  # the listener may already have sent a connection
        ctrl.sendall(READY)
    received = receive_connection(ctrl)
    if received is None:
        ctrl.close()
        log.debug("spare worker: the listener went away")
        return
    conn, index, peer = received
    serve(conn, index, peer, ctrl)


# --- channels joining over TCP (server/channels.py) ------------------------------------
#
# A worker whose connection's first call is JoinChannel sends JOIN + the call's XID +
# the ticket, with the connection, to the listener; the listener sends the same to
# the worker the ticket names.  Nothing else travels on a worker's control socket.

JOIN = b"J"
TICKET_SIZE = 32  # the worker's pid (4 bytes, big-endian) + 28 random bytes
JOIN_MESSAGE_SIZE = 1 + 4 + TICKET_SIZE  # JOIN, XID, ticket


def ticket_pid(ticket: bytes) -> int | None:
    """The worker a ticket names (the listener routes by it); None if malformed."""
    return int.from_bytes(ticket[:4], "big") if len(ticket) == TICKET_SIZE else None


def send_join(ctrl: socket.socket, xid: int, ticket: bytes, conn: socket.socket) -> None:
    message = JOIN + xid.to_bytes(4, "big") + ticket
    if len(message) != JOIN_MESSAGE_SIZE:
        raise ValueError("malformed ticket")
    if socket.send_fds(ctrl, [message], [conn.fileno()]) != len(message):
        raise OSError("short join message")


def parse_join(message: bytes, fds: list[int], flags: int) -> tuple[int, bytes] | None:
    """(XID, ticket) of a well-formed join message with its one descriptor; None
    otherwise (the caller closes whatever descriptors came)."""
    if (flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(fds) != 1
            or len(message) != JOIN_MESSAGE_SIZE or message[:1] != JOIN):
        return None
    return int.from_bytes(message[1:5], "big"), message[5:]


def receive_join(ctrl: socket.socket) -> tuple[int, bytes, socket.socket] | None:
    """In a worker: wait for a joining connection; None when the listener is gone.
    A malformed message is dropped (with its descriptors)."""
    while True:
        try:
            message, fds, flags, _ = socket.recv_fds(ctrl, _MAX_MESSAGE, 2)
        except ConnectionResetError:
            return None
        if not message and not fds:
            return None
        parsed = parse_join(message, fds, flags)
        if parsed is None:
            for fd in fds:
                with contextlib.suppress(OSError):
                    socket.close(fd)
            log.warning("dropping a malformed message on the control socket")
            continue
        conn = socket.socket(fileno=fds[0])
        conn.setblocking(True)
        return parsed[0], parsed[1], conn
