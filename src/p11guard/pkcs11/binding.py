"""cffi ABI-mode binding of a PKCS#11 module: one method per C function.

Every method has the exact semantics of its C function: it never raises for a
CK_RV other than CKR_OK, it returns that rv first (a plain int) followed by
the outputs, and it passes NULL where the C caller would (``None`` for an
output length means a NULL output pointer, i.e. a length query).  Policy and
protocol decisions belong to the layers above.

Speed notes (this is the server's hot path):
- function pointers are read from the function list once, at load time, into
  a ``__slots__`` holder, so a call is two attribute reads and one C call;
- input byte strings are passed to ``char *`` parameters without a copy;
- cffi releases the GIL for the duration of every C call, so calls on
  different sessions can run in parallel threads.  Nothing here is shared
  between calls, which keeps that safe (scratch objects are per call: a
  shared one would need a lock or a thread-local lookup that costs as much
  as allocating a CK_ULONG).

Integer arguments must already be CK_ULONG values (0 .. 2**64-1; the wire
carries signed hypers, converting them is the codec's job): anything else is
a programming error and cffi raises OverflowError.  Buffer lengths
(``out_len``, attribute lengths, ``generate_random``'s n) are allocated as
given, so the caller bounds them before they get here.

Output buffers are zero-filled before the call: a module that reports more
bytes than it wrote must not make the proxy send its own heap to a client.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any, Final

import cffi

from p11guard.pkcs11 import constants as c
from p11guard.pkcs11._cdef import CDEF, SIGNATURES_30, SIGNATURES_240
from p11guard.pkcs11._cdef_params import PARAMS_CDEF
from p11guard.pkcs11.types import (
    Info,
    Mechanism,
    MechanismInfo,
    NativeValue,
    SessionInfo,
    SlotInfo,
    Template,
    TemplateRequest,
    TokenInfo,
    Version,
)

ffi: Final = cffi.FFI()
ffi.cdef(CDEF)
# Mechanism parameter structures (protocol v4 builds them: pkcs11/cparams.py).
ffi.cdef(PARAMS_CDEF)
NULL: Final[Any] = ffi.NULL

CKR_OK: Final = c.CKR_OK
CKR_GENERAL_ERROR: Final = c.CKR_GENERAL_ERROR
_UNAVAILABLE: Final = c.CK_UNAVAILABLE_INFORMATION

NAMES_240: Final[tuple[str, ...]] = tuple(name for name, _ in SIGNATURES_240)
NAMES_30: Final[tuple[str, ...]] = tuple(name for name, _ in SIGNATURES_30)

# Loaded libraries are never dlclose()d behind the caller's back: unloading a
# module whose threads or atexit handlers are still registered crashes the
# process later, far from the cause.
_KEEP_LOADED: list[Any] = []

OutResult = tuple[int, bytes | None, int]


class ModuleLoadError(Exception):
    """The PKCS#11 module could not be loaded or did not give a function list."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot load PKCS#11 module {path!r}: {reason}")
        self.path = path
        self.reason = reason


def _stub(rv: int) -> Callable[..., int]:
    def missing(*_args: object) -> int:
        return rv

    return missing


class _Functions:
    """One slot per C function: the cffi pointer, or a stub returning an rv."""

    __slots__ = NAMES_240 + NAMES_30

    def __init__(self, source: Any, names: Iterable[str], absent_rv: int) -> None:
        for name in (*NAMES_240, *NAMES_30):
            setattr(self, name, _stub(absent_rv))
        for name in names:
            pointer = getattr(source, name)
            if pointer != NULL:
                setattr(self, name, pointer)


def _version(v: Any) -> Version:
    return (int(v.major), int(v.minor))


def _text(field: Any) -> bytes:
    return bytes(ffi.buffer(field))


def _mechanism(mech: Mechanism) -> tuple[Any, Any]:
    """A CK_MECHANISM* and the buffer it points to (keep both alive)."""
    cmech = ffi.new("CK_MECHANISM *")
    mtype, param = mech
    cmech.mechanism = mtype
    if not param:  # None and b"" both become NULL/0, as the design requires
        return cmech, None
    if isinstance(param, NativeValue):  # a structure built in native memory (v4)
        cmech.pParameter = param.pointer
        cmech.ulParameterLen = param.size
        return cmech, param
    buf = ffi.from_buffer(param)
    cmech.pParameter = buf
    cmech.ulParameterLen = len(param)
    return cmech, buf


_EMPTY: Final = ffi.new("char[1]")  # a valid pointer for zero-length values


def _template(template: Template) -> tuple[Any, int, list[Any]]:
    """A CK_ATTRIBUTE array (NULL when empty), its count, and buffers to keep alive."""
    count = len(template)
    if not count:
        return NULL, 0, []
    array = ffi.new("CK_ATTRIBUTE[]", count)
    keep: list[Any] = []
    for attr, (atype, value) in zip(array, template, strict=True):
        attr.type = atype
        if isinstance(value, NativeValue):  # a nested CK_ATTRIBUTE array (v4)
            keep.append(value)
            attr.pValue = value.pointer if value.size else _EMPTY
            attr.ulValueLen = value.size
            continue
        if value:
            buf = ffi.from_buffer(value)
            keep.append(buf)
            attr.pValue = buf
        else:
            attr.pValue = _EMPTY
        attr.ulValueLen = len(value)
    return array, count, keep


def _bytes_or_null(value: bytes | None) -> tuple[Any, int]:
    if value is None:
        return NULL, 0
    return value, len(value)


def _out_buffer(out_len: int) -> Any:
    # A zero-length request still gets a non-NULL pointer: in C, a non-NULL
    # buffer of length 0 is not the same call as a NULL length query.
    return ffi.new("char[]", out_len or 1)


def _collect(rv: int, buf: Any, out_len: int, got: int) -> OutResult:
    if rv != CKR_OK:
        return rv, None, got
    if got > out_len:  # the module claims to have written past our buffer
        return CKR_GENERAL_ERROR, None, got
    return rv, ffi.buffer(buf, got)[:], got


def _attribute_array(entries: list[tuple[int, int | None]]) -> tuple[Any, list[Any]]:
    """A CK_ATTRIBUTE[] for a nested GetAttributeValue request, and its buffers."""
    array = ffi.new("CK_ATTRIBUTE[]", max(len(entries), 1))
    bufs: list[Any] = [None] * len(entries)
    for i, (atype, length) in enumerate(entries):
        array[i].type = atype
        if length is not None:
            bufs[i] = ffi.new("char[]", length or 1)
            array[i].pValue = bufs[i]
            array[i].ulValueLen = length
    return array, bufs


def _read_attributes(array: Any, bufs: list[Any],
                     entries: list[tuple[int, int | None]]) -> list[tuple[int, bytes | None, int]]:
    out: list[tuple[int, bytes | None, int]] = []
    for i, (_, length) in enumerate(entries):
        got = int(array[i].ulValueLen)
        atype = int(array[i].type)  # the module writes the inner types
        buf = bufs[i]
        if buf is None or length is None or got == _UNAVAILABLE or got > length:
            out.append((atype, None, got))
        else:
            out.append((atype, ffi.buffer(buf, got)[:], got))
    return out


def _param(parameter: NativeValue | bytes | None) -> tuple[Any, int, Any]:
    """pParameter, ulParameterLen and what keeps them alive (message functions)."""
    if not parameter:
        return NULL, 0, None
    if isinstance(parameter, NativeValue):
        return parameter.pointer, parameter.size, parameter
    buf = ffi.from_buffer(parameter)
    return buf, len(parameter), buf


# -- table-driven families ----------------------------------------------------

DataOut = Callable[["Module", int, bytes, int | None], OutResult]
FinalOut = Callable[["Module", int, int | None], OutResult]
MechKeyInit = Callable[["Module", int, Mechanism, int], int]
DataIn = Callable[["Module", int, bytes], int]
SessionOnly = Callable[["Module", int], int]


def _data_out(name: str) -> DataOut:
    """(session, data, out_len) -> (rv, output | None, *pulOutLen)."""
    get = operator.attrgetter(name)

    def call(self: Module, session: int, data: bytes, out_len: int | None) -> OutResult:
        fn = get(self._f)
        plen = ffi.new("CK_ULONG *")
        if out_len is None:
            rv: int = fn(session, data, len(data), NULL, plen)
            return rv, None, int(plen[0])
        buf = _out_buffer(out_len)
        plen[0] = out_len
        rv = fn(session, data, len(data), buf, plen)
        return _collect(rv, buf, out_len, int(plen[0]))

    call.__name__ = call.__qualname__ = name
    return call


def _final_out(name: str) -> FinalOut:
    """(session, out_len) -> (rv, output | None, *pulOutLen)."""
    get = operator.attrgetter(name)

    def call(self: Module, session: int, out_len: int | None) -> OutResult:
        fn = get(self._f)
        plen = ffi.new("CK_ULONG *")
        if out_len is None:
            rv: int = fn(session, NULL, plen)
            return rv, None, int(plen[0])
        buf = _out_buffer(out_len)
        plen[0] = out_len
        rv = fn(session, buf, plen)
        return _collect(rv, buf, out_len, int(plen[0]))

    call.__name__ = call.__qualname__ = name
    return call


def _mech_key_init(name: str) -> MechKeyInit:
    """(session, mechanism, key) -> rv."""
    get = operator.attrgetter(name)

    def call(self: Module, session: int, mechanism: Mechanism, key: int) -> int:
        cmech, _keep = _mechanism(mechanism)
        rv: int = get(self._f)(session, cmech, key)
        return rv

    call.__name__ = call.__qualname__ = name
    return call


def _data_in(name: str) -> DataIn:
    """(session, data) -> rv."""
    get = operator.attrgetter(name)

    def call(self: Module, session: int, data: bytes) -> int:
        rv: int = get(self._f)(session, data, len(data))
        return rv

    call.__name__ = call.__qualname__ = name
    return call


def _session_only(name: str) -> SessionOnly:
    """(handle) -> rv."""
    get = operator.attrgetter(name)

    def call(self: Module, handle: int) -> int:
        rv: int = get(self._f)(handle)
        return rv

    call.__name__ = call.__qualname__ = name
    return call


# -- the module ---------------------------------------------------------------


class Module:
    """A loaded PKCS#11 module.

    Loading does not call C_Initialize; ``close()`` does not call C_Finalize.
    One process should hold one initialised instance per module.
    """

    __slots__ = ("_available", "_f", "_flist_address", "_lib", "interface_30", "path",
                 "version")

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            lib = ffi.dlopen(path, ffi.RTLD_NOW | ffi.RTLD_LOCAL)
        except OSError as exc:
            raise ModuleLoadError(path, str(exc)) from None
        _KEEP_LOADED.append(lib)
        self._lib = lib
        flist, version, is_30 = self._function_list(lib)
        self.version: Version = version
        self.interface_30: bool = is_30
        names = NAMES_240 + NAMES_30 if is_30 else NAMES_240
        self._f: Any = _Functions(flist, names, c.CKR_FUNCTION_NOT_SUPPORTED)
        self._available: frozenset[str] = frozenset(
            name for name in names if getattr(flist, name) != NULL
        )
        self._flist_address = int(ffi.cast("uintptr_t", flist))

    def _function_list(self, lib: Any) -> tuple[Any, Version, bool]:
        """Prefer C_GetInterface("PKCS 11", 3.0); fall back to C_GetFunctionList."""
        try:
            get_interface = lib.C_GetInterface
        except AttributeError:
            get_interface = None
        if get_interface is not None:
            found = self._interface(get_interface)
            if found is not None:
                return found
        try:
            get_function_list = lib.C_GetFunctionList
        except AttributeError:
            raise ModuleLoadError(
                self.path, "exports neither C_GetInterface nor C_GetFunctionList"
            ) from None
        pp = ffi.new("CK_FUNCTION_LIST **")
        rv = get_function_list(pp)
        if rv != CKR_OK or pp[0] == NULL:
            raise ModuleLoadError(self.path, f"C_GetFunctionList: {c.name_of('CKR', rv)}")
        flist = pp[0]
        return flist, _version(flist.version), False

    @staticmethod
    def _interface(get_interface: Any) -> tuple[Any, Version, bool] | None:
        pp = ffi.new("CK_INTERFACE **")
        wanted = ffi.new("CK_VERSION *", {"major": 3, "minor": 0})
        for name, version in ((b"PKCS 11", wanted), (NULL, NULL)):
            pp[0] = NULL
            if get_interface(name, version, pp, 0) != CKR_OK or pp[0] == NULL:
                continue
            iface = pp[0]
            if iface.pInterfaceName == NULL or iface.pFunctionList == NULL:
                continue
            # The default interface may be a vendor one; only "PKCS 11" has our layout.
            if ffi.string(iface.pInterfaceName, 16) != b"PKCS 11":
                continue
            head = ffi.cast("CK_FUNCTION_LIST *", iface.pFunctionList)
            got = _version(head.version)
            if got[0] >= 3:
                return ffi.cast("CK_FUNCTION_LIST_3_0 *", iface.pFunctionList), got, True
            return head, got, False
        return None

    # -- housekeeping -----------------------------------------------------------

    def has(self, name: str) -> bool:
        """Whether the module provides C function ``name`` (e.g. "C_LoginUser")."""
        return name in self._available

    def raw_function(self, name: str) -> Any:
        """The cffi function pointer for ``name`` (escape hatch, e.g. message-based
        3.0 functions), or None.  Build its arguments with ``ffi``."""
        if name not in self._available:
            return None
        return getattr(self._f, name)

    def close(self) -> None:
        """Stop using the module: every later call returns CKR_CRYPTOKI_NOT_INITIALIZED.

        Safe to call twice or on a half-built instance.  Does not call
        C_Finalize (the owner decides that) and does not unload the library.
        """
        self._f = _Functions(None, (), c.CKR_CRYPTOKI_NOT_INITIALIZED)
        self._available = frozenset()
        self._flist_address = 0

    def fast_path_functions(self) -> tuple[int, frozenset[str]] | None:
        """The CK_FUNCTION_LIST address and the functions it really has (non-NULL),
        for the worker's C fast path (server/fastpath.py); None once closed."""
        if not self._flist_address:
            return None
        return self._flist_address, self._available

    # -- general ----------------------------------------------------------------

    def initialize(self, flags: int = 0, reserved: bytes | None = None) -> int:
        if flags == 0 and reserved is None:
            rv: int = self._f.C_Initialize(NULL)
            return rv
        args = ffi.new("CK_C_INITIALIZE_ARGS *")
        args.flags = flags
        keep = None
        if reserved is not None:
            keep = ffi.from_buffer(reserved) if reserved else _EMPTY
            args.pReserved = keep
        rv = self._f.C_Initialize(args)
        del keep
        return rv

    def finalize(self) -> int:
        rv: int = self._f.C_Finalize(NULL)
        return rv

    def get_info(self) -> tuple[int, Info | None]:
        info = ffi.new("CK_INFO *")
        rv: int = self._f.C_GetInfo(info)
        if rv != CKR_OK:
            return rv, None
        return rv, Info(
            cryptoki_version=_version(info.cryptokiVersion),
            manufacturer_id=_text(info.manufacturerID),
            flags=int(info.flags),
            library_description=_text(info.libraryDescription),
            library_version=_version(info.libraryVersion),
        )

    # -- slots and tokens -------------------------------------------------------

    def _ulong_list(self, fn: Any, first: int, count: int | None) -> tuple[int, list[int], int]:
        pcount = ffi.new("CK_ULONG *")
        if count is None:
            rv: int = fn(first, NULL, pcount)
            return rv, [], int(pcount[0])
        buf = ffi.new("CK_ULONG[]", count or 1)
        pcount[0] = count
        rv = fn(first, buf, pcount)
        got = int(pcount[0])
        if rv != CKR_OK:
            return rv, [], got
        if got > count:
            return CKR_GENERAL_ERROR, [], got
        return rv, list(buf[0:got]), got

    def get_slot_list(self, token_present: bool, count: int | None) -> tuple[int, list[int], int]:
        return self._ulong_list(self._f.C_GetSlotList, 1 if token_present else 0, count)

    def get_mechanism_list(self, slot: int, count: int | None) -> tuple[int, list[int], int]:
        return self._ulong_list(self._f.C_GetMechanismList, slot, count)

    def get_slot_info(self, slot: int) -> tuple[int, SlotInfo | None]:
        info = ffi.new("CK_SLOT_INFO *")
        rv: int = self._f.C_GetSlotInfo(slot, info)
        if rv != CKR_OK:
            return rv, None
        return rv, SlotInfo(
            slot_description=_text(info.slotDescription),
            manufacturer_id=_text(info.manufacturerID),
            flags=int(info.flags),
            hardware_version=_version(info.hardwareVersion),
            firmware_version=_version(info.firmwareVersion),
        )

    def get_token_info(self, slot: int) -> tuple[int, TokenInfo | None]:
        info = ffi.new("CK_TOKEN_INFO *")
        rv: int = self._f.C_GetTokenInfo(slot, info)
        if rv != CKR_OK:
            return rv, None
        return rv, TokenInfo(
            label=_text(info.label),
            manufacturer_id=_text(info.manufacturerID),
            model=_text(info.model),
            serial_number=_text(info.serialNumber),
            flags=int(info.flags),
            max_session_count=int(info.ulMaxSessionCount),
            session_count=int(info.ulSessionCount),
            max_rw_session_count=int(info.ulMaxRwSessionCount),
            rw_session_count=int(info.ulRwSessionCount),
            max_pin_len=int(info.ulMaxPinLen),
            min_pin_len=int(info.ulMinPinLen),
            total_public_memory=int(info.ulTotalPublicMemory),
            free_public_memory=int(info.ulFreePublicMemory),
            total_private_memory=int(info.ulTotalPrivateMemory),
            free_private_memory=int(info.ulFreePrivateMemory),
            hardware_version=_version(info.hardwareVersion),
            firmware_version=_version(info.firmwareVersion),
            utc_time=_text(info.utcTime),
        )

    def wait_for_slot_event(self, flags: int) -> tuple[int, int]:
        slot = ffi.new("CK_SLOT_ID *")
        rv: int = self._f.C_WaitForSlotEvent(flags, slot, NULL)
        return rv, int(slot[0])

    def get_mechanism_info(self, slot: int, mechanism: int) -> tuple[int, MechanismInfo | None]:
        info = ffi.new("CK_MECHANISM_INFO *")
        rv: int = self._f.C_GetMechanismInfo(slot, mechanism, info)
        if rv != CKR_OK:
            return rv, None
        return rv, MechanismInfo(
            min_key_size=int(info.ulMinKeySize),
            max_key_size=int(info.ulMaxKeySize),
            flags=int(info.flags),
        )

    def init_token(self, slot: int, so_pin: bytes | None, label: bytes) -> int:
        pin, pin_len = _bytes_or_null(so_pin)
        padded = label[:32].ljust(32, b" ")  # the C argument is exactly 32 bytes
        rv: int = self._f.C_InitToken(slot, pin, pin_len, padded)
        return rv

    def init_pin(self, session: int, pin: bytes | None) -> int:
        value, length = _bytes_or_null(pin)
        rv: int = self._f.C_InitPIN(session, value, length)
        return rv

    def set_pin(self, session: int, old: bytes | None, new: bytes | None) -> int:
        old_value, old_len = _bytes_or_null(old)
        new_value, new_len = _bytes_or_null(new)
        rv: int = self._f.C_SetPIN(session, old_value, old_len, new_value, new_len)
        return rv

    # -- sessions ---------------------------------------------------------------

    def open_session(self, slot: int, flags: int) -> tuple[int, int]:
        handle = ffi.new("CK_SESSION_HANDLE *")
        rv: int = self._f.C_OpenSession(slot, flags, NULL, NULL, handle)
        return rv, int(handle[0])

    close_session = _session_only("C_CloseSession")
    close_all_sessions = _session_only("C_CloseAllSessions")

    def get_session_info(self, session: int) -> tuple[int, SessionInfo | None]:
        info = ffi.new("CK_SESSION_INFO *")
        rv: int = self._f.C_GetSessionInfo(session, info)
        if rv != CKR_OK:
            return rv, None
        return rv, SessionInfo(
            slot_id=int(info.slotID),
            state=int(info.state),
            flags=int(info.flags),
            device_error=int(info.ulDeviceError),
        )

    get_operation_state = _final_out("C_GetOperationState")

    def set_operation_state(
        self, session: int, state: bytes, encryption_key: int, authentication_key: int
    ) -> int:
        rv: int = self._f.C_SetOperationState(
            session, state, len(state), encryption_key, authentication_key
        )
        return rv

    def login(self, session: int, user_type: int, pin: bytes | None) -> int:
        value, length = _bytes_or_null(pin)
        rv: int = self._f.C_Login(session, user_type, value, length)
        return rv

    logout = _session_only("C_Logout")

    # -- objects ----------------------------------------------------------------

    def create_object(self, session: int, template: Template) -> tuple[int, int]:
        array, count, _keep = _template(template)
        handle = ffi.new("CK_OBJECT_HANDLE *")
        rv: int = self._f.C_CreateObject(session, array, count, handle)
        return rv, int(handle[0])

    def copy_object(self, session: int, obj: int, template: Template) -> tuple[int, int]:
        array, count, _keep = _template(template)
        handle = ffi.new("CK_OBJECT_HANDLE *")
        rv: int = self._f.C_CopyObject(session, obj, array, count, handle)
        return rv, int(handle[0])

    def destroy_object(self, session: int, obj: int) -> int:
        rv: int = self._f.C_DestroyObject(session, obj)
        return rv

    def get_object_size(self, session: int, obj: int) -> tuple[int, int]:
        size = ffi.new("CK_ULONG *")
        rv: int = self._f.C_GetObjectSize(session, obj, size)
        return rv, int(size[0])

    def get_attribute_value(
        self, session: int, obj: int, request: list[tuple[int, Any]]
    ) -> tuple[int, list[tuple[int, Any, int]]]:
        """Each request entry is (type, buffer length or None for a NULL pValue).

        A :class:`TemplateRequest` instead of a length asks for an array
        attribute through a CK_ATTRIBUTE array; that entry's value is then the
        list of inner (type, value or None, ulValueLen).

        Each result entry is (type, value or None, raw ulValueLen).  Values are
        returned whatever the rv: with CKR_ATTRIBUTE_SENSITIVE,
        CKR_ATTRIBUTE_TYPE_INVALID or CKR_BUFFER_TOO_SMALL the attributes that
        could be read are still valid, as in C.
        """
        count = len(request)
        array = ffi.new("CK_ATTRIBUTE[]", count) if count else NULL
        buffers: list[Any] = [None] * count
        nested: dict[int, Any] = {}
        for i, (atype, length) in enumerate(request):
            attr = array[i]
            attr.type = atype
            if isinstance(length, TemplateRequest):
                inner, inner_bufs = _attribute_array(length.entries)
                nested[i] = (inner, inner_bufs, length.entries)
                attr.pValue = inner
                attr.ulValueLen = len(length.entries) * ffi.sizeof("CK_ATTRIBUTE")
                continue
            if length is not None:
                buf = ffi.new("char[]", length or 1)
                buffers[i] = buf
                attr.pValue = buf
                attr.ulValueLen = length
        rv: int = self._f.C_GetAttributeValue(session, obj, array, count)
        result: list[tuple[int, Any, int]] = []
        for i, (atype, length) in enumerate(request):
            got = int(array[i].ulValueLen)
            if i in nested:
                inner, inner_bufs, entries = nested[i]
                if got == _UNAVAILABLE:
                    result.append((atype, None, got))
                else:
                    result.append((atype, _read_attributes(inner, inner_bufs, entries), got))
                continue
            buf = buffers[i]
            if buf is None or length is None or got == _UNAVAILABLE or got > length:
                result.append((atype, None, got))
            else:
                result.append((atype, ffi.buffer(buf, got)[:], got))
        return rv, result

    def set_attribute_value(self, session: int, obj: int, template: Template) -> int:
        array, count, _keep = _template(template)
        rv: int = self._f.C_SetAttributeValue(session, obj, array, count)
        return rv

    def find_objects_init(self, session: int, template: Template) -> int:
        array, count, _keep = _template(template)
        rv: int = self._f.C_FindObjectsInit(session, array, count)
        return rv

    def find_objects(self, session: int, max_count: int) -> tuple[int, list[int]]:
        handles = ffi.new("CK_OBJECT_HANDLE[]", max_count or 1)
        found = ffi.new("CK_ULONG *")
        rv: int = self._f.C_FindObjects(session, handles, max_count, found)
        got = int(found[0])
        if rv != CKR_OK:
            return rv, []
        if got > max_count:
            return CKR_GENERAL_ERROR, []
        return rv, list(handles[0:got])

    find_objects_final = _session_only("C_FindObjectsFinal")

    # -- cryptographic operations -------------------------------------------------

    encrypt_init = _mech_key_init("C_EncryptInit")
    decrypt_init = _mech_key_init("C_DecryptInit")
    sign_init = _mech_key_init("C_SignInit")
    verify_init = _mech_key_init("C_VerifyInit")
    sign_recover_init = _mech_key_init("C_SignRecoverInit")
    verify_recover_init = _mech_key_init("C_VerifyRecoverInit")

    def digest_init(self, session: int, mechanism: Mechanism) -> int:
        cmech, _keep = _mechanism(mechanism)
        rv: int = self._f.C_DigestInit(session, cmech)
        return rv

    encrypt = _data_out("C_Encrypt")
    encrypt_update = _data_out("C_EncryptUpdate")
    decrypt = _data_out("C_Decrypt")
    decrypt_update = _data_out("C_DecryptUpdate")
    digest = _data_out("C_Digest")
    sign = _data_out("C_Sign")
    sign_recover = _data_out("C_SignRecover")
    verify_recover = _data_out("C_VerifyRecover")
    digest_encrypt_update = _data_out("C_DigestEncryptUpdate")
    sign_encrypt_update = _data_out("C_SignEncryptUpdate")
    decrypt_digest_update = _data_out("C_DecryptDigestUpdate")
    decrypt_verify_update = _data_out("C_DecryptVerifyUpdate")

    encrypt_final = _final_out("C_EncryptFinal")
    decrypt_final = _final_out("C_DecryptFinal")
    digest_final = _final_out("C_DigestFinal")
    sign_final = _final_out("C_SignFinal")

    digest_update = _data_in("C_DigestUpdate")
    sign_update = _data_in("C_SignUpdate")
    verify_update = _data_in("C_VerifyUpdate")

    def digest_key(self, session: int, key: int) -> int:
        rv: int = self._f.C_DigestKey(session, key)
        return rv

    def verify(self, session: int, data: bytes, signature: bytes) -> int:
        rv: int = self._f.C_Verify(session, data, len(data), signature, len(signature))
        return rv

    def verify_final(self, session: int, signature: bytes) -> int:
        rv: int = self._f.C_VerifyFinal(session, signature, len(signature))
        return rv

    # -- keys -------------------------------------------------------------------

    def generate_key(
        self, session: int, mechanism: Mechanism, template: Template
    ) -> tuple[int, int]:
        cmech, _keep_m = _mechanism(mechanism)
        array, count, _keep_t = _template(template)
        key = ffi.new("CK_OBJECT_HANDLE *")
        rv: int = self._f.C_GenerateKey(session, cmech, array, count, key)
        return rv, int(key[0])

    def generate_key_pair(
        self, session: int, mechanism: Mechanism, public: Template, private: Template
    ) -> tuple[int, int, int]:
        cmech, _keep_m = _mechanism(mechanism)
        pub, pub_count, _keep_pub = _template(public)
        priv, priv_count, _keep_priv = _template(private)
        keys = ffi.new("CK_OBJECT_HANDLE[2]")
        rv: int = self._f.C_GenerateKeyPair(
            session, cmech, pub, pub_count, priv, priv_count, keys, keys + 1
        )
        return rv, int(keys[0]), int(keys[1])

    def wrap_key(
        self, session: int, mechanism: Mechanism, wrapping_key: int, key: int,
        out_len: int | None,
    ) -> OutResult:
        cmech, _keep = _mechanism(mechanism)
        plen = ffi.new("CK_ULONG *")
        if out_len is None:
            rv: int = self._f.C_WrapKey(session, cmech, wrapping_key, key, NULL, plen)
            return rv, None, int(plen[0])
        buf = _out_buffer(out_len)
        plen[0] = out_len
        rv = self._f.C_WrapKey(session, cmech, wrapping_key, key, buf, plen)
        return _collect(rv, buf, out_len, int(plen[0]))

    def unwrap_key(
        self, session: int, mechanism: Mechanism, unwrapping_key: int, wrapped: bytes,
        template: Template,
    ) -> tuple[int, int]:
        cmech, _keep_m = _mechanism(mechanism)
        array, count, _keep_t = _template(template)
        key = ffi.new("CK_OBJECT_HANDLE *")
        rv: int = self._f.C_UnwrapKey(
            session, cmech, unwrapping_key, wrapped, len(wrapped), array, count, key
        )
        return rv, int(key[0])

    def derive_key(
        self, session: int, mechanism: Mechanism, base_key: int, template: Template
    ) -> tuple[int, int]:
        cmech, _keep_m = _mechanism(mechanism)
        array, count, _keep_t = _template(template)
        key = ffi.new("CK_OBJECT_HANDLE *")
        rv: int = self._f.C_DeriveKey(session, cmech, base_key, array, count, key)
        return rv, int(key[0])

    # -- random, legacy parallel functions ------------------------------------------

    def seed_random(self, session: int, seed: bytes) -> int:
        rv: int = self._f.C_SeedRandom(session, seed, len(seed))
        return rv

    def generate_random(self, session: int, length: int) -> tuple[int, bytes]:
        buf = _out_buffer(length)
        rv: int = self._f.C_GenerateRandom(session, buf, length)
        if rv != CKR_OK:
            return rv, b""
        return rv, ffi.buffer(buf, length)[:]

    get_function_status = _session_only("C_GetFunctionStatus")
    cancel_function = _session_only("C_CancelFunction")

    # -- PKCS#11 3.0 (CKR_FUNCTION_NOT_SUPPORTED unless has() says otherwise) -------

    def login_user(
        self, session: int, user_type: int, pin: bytes | None, username: bytes | None
    ) -> int:
        pin_value, pin_len = _bytes_or_null(pin)
        name_value, name_len = _bytes_or_null(username)
        rv: int = self._f.C_LoginUser(session, user_type, pin_value, pin_len, name_value,
                                      name_len)
        return rv

    def session_cancel(self, session: int, flags: int) -> int:
        rv: int = self._f.C_SessionCancel(session, flags)
        return rv

    # -- PKCS#11 3.0 message-based functions ------------------------------------
    #
    # ``parameter``: None/b"" (NULL), a byte string, or a NativeValue built by
    # pkcs11/cparams.py (whose buffers the module may write: IV, tag).
    # ``out_len`` None means a NULL output pointer (a length query).

    message_encrypt_init = _mech_key_init("C_MessageEncryptInit")
    message_decrypt_init = _mech_key_init("C_MessageDecryptInit")
    message_sign_init = _mech_key_init("C_MessageSignInit")
    message_verify_init = _mech_key_init("C_MessageVerifyInit")
    message_encrypt_final = _session_only("C_MessageEncryptFinal")
    message_decrypt_final = _session_only("C_MessageDecryptFinal")
    message_sign_final = _session_only("C_MessageSignFinal")
    message_verify_final = _session_only("C_MessageVerifyFinal")

    def _crypt_message(self, fn: Any, session: int, parameter: NativeValue | bytes | None,
                       associated_data: bytes, data: bytes, out_len: int | None) -> OutResult:
        pparam, plen_param, _keep = _param(parameter)
        plen = ffi.new("CK_ULONG *")
        if out_len is None:
            rv: int = fn(session, pparam, plen_param, associated_data, len(associated_data),
                         data, len(data), NULL, plen)
            return rv, None, int(plen[0])
        buf = _out_buffer(out_len)
        plen[0] = out_len
        rv = fn(session, pparam, plen_param, associated_data, len(associated_data), data,
                len(data), buf, plen)
        return _collect(rv, buf, out_len, int(plen[0]))

    def encrypt_message(self, session: int, parameter: NativeValue | bytes | None,
                        associated_data: bytes, plaintext: bytes,
                        out_len: int | None) -> OutResult:
        return self._crypt_message(self._f.C_EncryptMessage, session, parameter,
                                   associated_data, plaintext, out_len)

    def decrypt_message(self, session: int, parameter: NativeValue | bytes | None,
                        associated_data: bytes, ciphertext: bytes,
                        out_len: int | None) -> OutResult:
        return self._crypt_message(self._f.C_DecryptMessage, session, parameter,
                                   associated_data, ciphertext, out_len)

    def encrypt_message_begin(self, session: int, parameter: NativeValue | bytes | None,
                              associated_data: bytes) -> int:
        pparam, plen_param, _keep = _param(parameter)
        rv: int = self._f.C_EncryptMessageBegin(session, pparam, plen_param, associated_data,
                                                len(associated_data))
        return rv

    def decrypt_message_begin(self, session: int, parameter: NativeValue | bytes | None,
                              associated_data: bytes) -> int:
        pparam, plen_param, _keep = _param(parameter)
        rv: int = self._f.C_DecryptMessageBegin(session, pparam, plen_param, associated_data,
                                                len(associated_data))
        return rv

    def _crypt_next(self, fn: Any, session: int, parameter: NativeValue | bytes | None,
                    data: bytes, out_len: int | None, flags: int) -> OutResult:
        pparam, plen_param, _keep = _param(parameter)
        plen = ffi.new("CK_ULONG *")
        if out_len is None:
            rv: int = fn(session, pparam, plen_param, data, len(data), NULL, plen, flags)
            return rv, None, int(plen[0])
        buf = _out_buffer(out_len)
        plen[0] = out_len
        rv = fn(session, pparam, plen_param, data, len(data), buf, plen, flags)
        return _collect(rv, buf, out_len, int(plen[0]))

    def encrypt_message_next(self, session: int, parameter: NativeValue | bytes | None,
                             plaintext: bytes, out_len: int | None, flags: int) -> OutResult:
        return self._crypt_next(self._f.C_EncryptMessageNext, session, parameter, plaintext,
                                out_len, flags)

    def decrypt_message_next(self, session: int, parameter: NativeValue | bytes | None,
                             ciphertext: bytes, out_len: int | None, flags: int) -> OutResult:
        return self._crypt_next(self._f.C_DecryptMessageNext, session, parameter, ciphertext,
                                out_len, flags)

    def sign_message(self, session: int, parameter: NativeValue | bytes | None, data: bytes,
                     out_len: int | None) -> OutResult:
        return self._sign_call(self._f.C_SignMessage, session, parameter, data, out_len)

    def sign_message_begin(self, session: int, parameter: NativeValue | bytes | None) -> int:
        pparam, plen_param, _keep = _param(parameter)
        rv: int = self._f.C_SignMessageBegin(session, pparam, plen_param)
        return rv

    def sign_message_next(self, session: int, parameter: NativeValue | bytes | None,
                          data: bytes, final: bool, out_len: int | None) -> OutResult:
        """Not ``final``: pulSignatureLen is NULL (more parts follow)."""
        if not final:
            pparam, plen_param, _keep = _param(parameter)
            rv: int = self._f.C_SignMessageNext(session, pparam, plen_param, data, len(data),
                                                NULL, NULL)
            return rv, None, 0
        return self._sign_call(self._f.C_SignMessageNext, session, parameter, data, out_len)

    def _sign_call(self, fn: Any, session: int, parameter: NativeValue | bytes | None,
                   data: bytes, out_len: int | None) -> OutResult:
        pparam, plen_param, _keep = _param(parameter)
        plen = ffi.new("CK_ULONG *")
        if out_len is None:
            rv: int = fn(session, pparam, plen_param, data, len(data), NULL, plen)
            return rv, None, int(plen[0])
        buf = _out_buffer(out_len)
        plen[0] = out_len
        rv = fn(session, pparam, plen_param, data, len(data), buf, plen)
        return _collect(rv, buf, out_len, int(plen[0]))

    def verify_message(self, session: int, parameter: NativeValue | bytes | None, data: bytes,
                       signature: bytes) -> int:
        pparam, plen_param, _keep = _param(parameter)
        rv: int = self._f.C_VerifyMessage(session, pparam, plen_param, data, len(data),
                                          signature, len(signature))
        return rv

    def verify_message_begin(self, session: int, parameter: NativeValue | bytes | None) -> int:
        pparam, plen_param, _keep = _param(parameter)
        rv: int = self._f.C_VerifyMessageBegin(session, pparam, plen_param)
        return rv

    def verify_message_next(self, session: int, parameter: NativeValue | bytes | None,
                            data: bytes, signature: bytes | None) -> int:
        """``signature`` None: pSignature NULL (more parts follow)."""
        pparam, plen_param, _keep = _param(parameter)
        sig, sig_len = _bytes_or_null(signature)
        rv: int = self._f.C_VerifyMessageNext(session, pparam, plen_param, data, len(data),
                                              sig, sig_len)
        return rv
