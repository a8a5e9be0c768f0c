"""The worker's call loop in C for the simplest calls (``native/server/fastpath.c``).

A proxy's cost is the round trip; for calls such as GetSessionInfo, GenerateRandom,
the single-part cryptographic calls and the ``*Init`` calls without a mechanism
parameter, CPython's interpreter loop is most of it.  While nothing else runs
in the worker, :class:`~p11guard.server.worker.Connection` lets
``p11g_fast_serve`` (GIL released) read the socket, and answer in C every call
whose answer would be exactly the Python path's:

* the procedure has a shape here (:data:`SHAPES`, checked against the procedure
  table at import);
* the policy has no unit for the PKCS#11 function (``fast_path_functions`` of the
  policy-wrapped module: those methods *are* the backend's), and the module has
  the function;
* the module is loaded and initialised, and ``--debug-pkcs11`` is off (it logs
  every call).

Everything else (other procedures, mechanisms with a parameter, oversized or
malformed arguments, fragments, TLS) is returned to Python untouched, with the
bytes read after it.  While the client keeps several calls in flight (a
multi-threaded application on a pipelining client), C runs long calls on its
own threads (``native/server/pool.c``, at most ``max_threads - 1`` of them) and
goes on reading; calls on one session keep their order, and those threads have
finished before Python gets the socket back.  ``P11GUARD_FASTPATH=off``
disables it; ``P11GUARD_FASTPATH_LIB`` names the library (default: the
repository's ``native/server/build``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cffi import FFI

from ..wire.codec import Limits
from ..wire.mechanisms import TAG_NONE
from ..wire.procedures import PROGRAM, TABLES, Kind, Procedure

log = logging.getLogger("p11guard.fastpath")

_CDEF = """
struct p11g_fast_proc { uint8_t shape; uint8_t flags; uint16_t fn; };
struct p11g_fast {
    int32_t fd; uint32_t program; uint32_t version; uint32_t tag_none;
    uint64_t functions; uint64_t max_opaque; uint64_t max_list; uint64_t output_slack;
    uint64_t long_call_ns; uint64_t memory_ns; uint32_t max_threads; uint32_t reserved;
    struct p11g_fast_proc procs[128];
    uint64_t calls; uint64_t pooled; uint64_t concurrent_until_ns; void *pool;
    int32_t error; int32_t failed;
};
long p11g_fast_serve(struct p11g_fast *st, uint8_t *buf, size_t cap);
long p11g_fast_call(struct p11g_fast *st, const uint8_t *record, size_t n);
long p11g_fast_send(struct p11g_fast *st, const uint8_t *data, size_t n);
long p11g_fast_send_fd(struct p11g_fast *st, const uint8_t *data, size_t n, int32_t fd);
void p11g_fast_close(struct p11g_fast *st);
size_t p11g_fast_struct_size(void);
"""
MAX_PROC: Final = 128
FLAG_LONG: Final = 1

# p11g_fast_serve() results other than "n bytes for Python" (n > 0).
EOF_: Final = 0
SOCKET_ERROR: Final = -1
INTERRUPTED: Final = -3
NO_MEMORY: Final = -4

# enum p11g_fast_shape (fastpath.h), and the wire shape each expects:
# (argument kinds, result kinds) for protocol versions 3 and 4.
_H, _O, _L = Kind.HYPER, Kind.OPAQUE, Kind.HYPER_LIST
_M3, _M4 = Kind.MECHANISM, Kind.TYPED_MECHANISM
_SHAPE_WIRE: Final[dict[int, dict[int, tuple[tuple[Kind, ...], tuple[Kind, ...]]]]] = {
    1: {3: ((_H,), (_H,)), 4: ((_H,), (_H,))},                              # HANDLE
    2: {3: ((_H,), (_H, Kind.SESSION_INFO)), 4: ((_H,), (_H, Kind.SESSION_INFO))},
    3: {3: ((_H, _H), (_H, _H)), 4: ((_H, _H), (_H, _H))},                  # OPEN_SESSION
    4: {3: ((_H, _H), (_H, _O)), 4: ((_H, _H), (_H, _O))},                  # RANDOM
    5: {3: ((_H, _O), (_H, _O)), 4: ((_H, _O, _H), (_H, _O, _H))},          # DATA_OUT
    6: {3: ((_H,), (_H, _O)), 4: ((_H, _H), (_H, _O, _H))},                 # FINAL_OUT
    7: {3: ((_H, _O), (_H,)), 4: ((_H, _O), (_H,))},                        # DATA_IN
    8: {3: ((_H, _O, _O), (_H,)), 4: ((_H, _O, _O), (_H,))},                # DATA2_IN
    9: {3: ((_H, _M3), (_H,)), 4: ((_H, _M4), (_H,))},                      # MECH
    10: {3: ((_H, _M3, _H), (_H,)), 4: ((_H, _M4, _H), (_H,))},             # MECH_KEY
    11: {3: ((_H, _H), (_H, _L, _H)), 4: ((_H, _H), (_H, _L, _H))},         # FIND
    12: {3: ((_H, Kind.TEMPLATE), (_H,)), 4: ((_H, Kind.TYPED_TEMPLATE), (_H,))},  # FIND_INIT
}
HANDLE, SESSION_INFO, OPEN_SESSION, RANDOM, DATA_OUT, FINAL_OUT = 1, 2, 3, 4, 5, 6
DATA_IN, DATA2_IN, MECH, MECH_KEY, FIND, FIND_INIT = 7, 8, 9, 10, 11, 12

# Procedure name -> shape.  Only procedures whose dispatcher handler is the plain
# table-driven one (or FindObjects/GenerateRandom, whose bounds fastpath.c repeats):
# no PINs, no templates, no mechanism parameters, no attribute conversion.
SHAPES: Final[dict[str, int]] = {
    "CloseSession": HANDLE, "CloseAllSessions": HANDLE, "Logout": HANDLE,
    "FindObjectsFinal": HANDLE,
    "GetSessionInfo": SESSION_INFO,
    "OpenSession": OPEN_SESSION,
    "GenerateRandom": RANDOM,
    **dict.fromkeys(("Digest", "Sign", "Encrypt", "Decrypt", "EncryptUpdate", "DecryptUpdate",
                     "SignRecover", "VerifyRecover"), DATA_OUT),
    **dict.fromkeys(("DigestFinal", "SignFinal", "EncryptFinal", "DecryptFinal"), FINAL_OUT),
    **dict.fromkeys(("DigestUpdate", "SignUpdate", "VerifyUpdate", "VerifyFinal", "SeedRandom"),
                    DATA_IN),
    "Verify": DATA2_IN,
    "DigestInit": MECH,
    **dict.fromkeys(("SignInit", "VerifyInit", "EncryptInit", "DecryptInit", "SignRecoverInit",
                     "VerifyRecoverInit"), MECH_KEY),
    "FindObjects": FIND,
    # fastpath.c takes plain templates (v4: BYTES/ULONG values; v3: only while the
    # client's layout is the module's, see Dispatcher.fast_plan) and declines any
    # one-byte value other than 0/1, so the canonical-booleans unit would leave
    # these calls alone (Unit.fast_path_checked).
    "FindObjectsInit": FIND_INIT,
}


def _kinds(fields: tuple[Any, ...]) -> tuple[Kind, ...]:
    return tuple(f.kind for f in fields)


def _check_shapes() -> dict[int, dict[int, tuple[int, str]]]:
    """version -> procedure number -> (shape, C function name); the wire table must
    agree with each shape's decoder in fastpath.c (a table change fails here)."""
    out: dict[int, dict[int, tuple[int, str]]] = {}
    for version in (3, 4):
        by_name: dict[str, Procedure] = {p.name: p for p in TABLES[version].values()}
        table: dict[int, tuple[int, str]] = {}
        for name, shape in SHAPES.items():
            if version not in _SHAPE_WIRE[shape]:
                continue
            proc = by_name[name]
            wire = (_kinds(proc.args), _kinds(proc.result))
            if wire != _SHAPE_WIRE[shape][version]:
                raise AssertionError(f"v{version} {name}: wire shape {wire} is not shape {shape}")
            if proc.number >= MAX_PROC:
                raise AssertionError(f"{name}: procedure number {proc.number} >= {MAX_PROC}")
            table[proc.number] = (shape, "C_" + name)
        out[version] = table
    return out


PROCEDURE_SHAPES: Final = _check_shapes()


@dataclass(frozen=True)
class Plan:
    """What a connection may serve in C: the module's function list and the
    procedures (number -> (shape, flags, offset)) answered there."""

    functions: int
    procs: dict[int, tuple[int, int, int]]
    output_slack: int  # the dispatcher's first output buffer: input length + this
    max_list: int  # the dispatcher's bound of FindObjects' max_count


class FastPath:
    """The loaded library and one connection's ``struct p11g_fast``."""

    def __init__(self, lib: Any, ffi: FFI) -> None:
        self._lib = lib
        self._ffi = ffi
        self._state = ffi.new("struct p11g_fast *")
        self._plan_key: object = None
        self._buf: Any = None
        self._cap = 0

    @property
    def plan_key(self) -> object:
        """The key of the plan the state holds (None: not configured yet)."""
        return self._plan_key

    def configure(self, version: int, plan: Plan, limits: Limits, *, long_call: float,
                  memory: float, max_threads: int, key: object) -> None:
        """Fill the state for ``plan`` (skipped when ``key`` did not change).

        Only while no call runs in C on another thread (the worker's leader,
        alone): the C side reads the table without a lock."""
        if key == self._plan_key:
            return
        st = self._state
        st.program = PROGRAM
        st.version = version
        st.tag_none = TAG_NONE
        st.functions = plan.functions
        st.max_opaque = limits.max_opaque
        st.max_list = plan.max_list
        st.output_slack = plan.output_slack
        st.long_call_ns = int(long_call * 1e9)
        st.memory_ns = int(memory * 1e9)
        st.max_threads = max(1, max_threads)
        for number in range(MAX_PROC):
            shape, flags, offset = plan.procs.get(number, (0, 0, 0))
            st.procs[number].shape = shape
            st.procs[number].flags = flags
            st.procs[number].fn = offset
        self._plan_key = key

    def attach(self, fd: int, buf: bytearray) -> None:
        """The connection's socket, and its receive buffer (never resized)."""
        self._state.fd = fd
        self._buf = self._ffi.from_buffer("uint8_t[]", buf)
        self._cap = len(buf)

    def serve(self) -> int:
        """Serve calls in C until one needs Python (see the module constants)."""
        result: int = self._lib.p11g_fast_serve(self._state, self._buf, self._cap)
        return result

    def close(self) -> None:
        """Stop the C threads of long calls (the connection is over)."""
        self._lib.p11g_fast_close(self._state)

    def call(self, record: bytes) -> int:
        """Serve one whole framed record (any thread): 1 served and answered (2: and
        the next call was already waiting when this long one ended), 0 not for C
        (nothing ran: Python answers it), < 0 an error (end the connection)."""
        result: int = self._lib.p11g_fast_call(self._state, record, len(record))
        return result

    def send(self, data: bytes | bytearray) -> None:
        """Send under the lock C's replies go out under; OSError on failure."""
        result: int = self._lib.p11g_fast_send(self._state, self._ffi.from_buffer(data),
                                               len(data))
        if result < 0:
            raise OSError(-result, os.strerror(-result))

    def send_fd(self, data: bytes | bytearray, fd: int) -> None:
        """send() with descriptor ``fd`` passed along (SCM_RIGHTS); OSError on failure."""
        result: int = self._lib.p11g_fast_send_fd(self._state, self._ffi.from_buffer(data),
                                                  len(data), fd)
        if result < 0:
            raise OSError(-result, os.strerror(-result))

    @property
    def served_calls(self) -> int:
        """Calls answered in C so far."""
        return int(self._state.calls)

    @property
    def pooled_calls(self) -> int:
        """Of them, calls run on the C threads of long calls."""
        return int(self._state.pooled)

    @property
    def error(self) -> int:
        return int(self._state.error)


class FastPathLibrary:
    """``libp11guard-fast.so``, loaded once (in the listener, before workers fork)."""

    def __init__(self, path: Path) -> None:
        self.ffi = FFI()
        self.ffi.cdef(_CDEF)
        self.lib = self.ffi.dlopen(str(path))
        size = int(self.lib.p11g_fast_struct_size())
        if size != self.ffi.sizeof("struct p11g_fast"):
            raise OSError(f"{path}: struct p11g_fast is {size} bytes in C, "
                          f"{self.ffi.sizeof('struct p11g_fast')} here (rebuild it)")
        self.path = path
        # Parse the C types a connection uses now (pycparser costs milliseconds per
        # type): loaded in the listener, workers inherit the parsed types.
        for ctype in ("struct p11g_fast *", "uint8_t[]"):
            self.ffi.typeof(ctype)
        from ..pkcs11.binding import ffi as pkcs11_ffi
        # Byte offsets of the functions in CK_FUNCTION_LIST (same in the 3.0 list).
        self.offsets = {
            name: pkcs11_ffi.offsetof("CK_FUNCTION_LIST", name)
            for table in PROCEDURE_SHAPES.values() for _, name in table.values()
        }

    def connection(self) -> FastPath:
        return FastPath(self.lib, self.ffi)

    def plan(self, version: int, functions: int, available: frozenset[str],
             long_procedures: frozenset[int], *, output_slack: int, max_list: int) -> Plan:
        """The procedures of ``version`` served in C given the functions the policy
        leaves alone (``available``); ``long_procedures`` may take long."""
        procs = {
            number: (shape, FLAG_LONG if number in long_procedures else 0, self.offsets[name])
            for number, (shape, name) in PROCEDURE_SHAPES[version].items()
            if name in available
        }
        return Plan(functions, procs, output_slack, max_list)


def default_library_path() -> Path:
    return Path(__file__).resolve().parents[3] / "native" / "server" / "build" / \
        "libp11guard-fast.so"


_loaded: FastPathLibrary | None = None
_load_error: str | None = None


def load() -> FastPathLibrary | None:
    """The library, or None (disabled, missing, or unusable: logged once)."""
    global _loaded, _load_error
    if _loaded is not None or _load_error is not None:
        return _loaded
    setting = os.environ.get("P11GUARD_FASTPATH", "on").strip().lower()
    if setting in ("0", "off", "no", "false"):
        _load_error = "disabled by P11GUARD_FASTPATH"
        log.info("C fast path off: %s", _load_error)
        return None
    path = Path(os.environ.get("P11GUARD_FASTPATH_LIB") or default_library_path())
    try:
        _loaded = FastPathLibrary(path)
    except (OSError, AttributeError) as exc:
        _load_error = str(exc)
        log.warning("C fast path unavailable (every call served in Python): %s "
                    "(build it with `make -C native/server`)", _load_error)
        return None
    log.debug("C fast path: %s", path)
    return _loaded
