"""Procedure -> backend call, for one connection (protocol version 3).

The dispatcher owns the connection's protocol state (client architecture,
loaded module, ordering rules) and turns decoded argument tuples into calls on
the backend (:class:`p11guard.pkcs11.binding.Module`), and backend answers into
result tuples for :mod:`p11guard.wire.codec`.

It is table-driven: :data:`_SPECS` says, for each procedure, which backend
method to call, how to convert each wire argument and what shape the answer
has.  Only the procedures whose semantics are genuinely special (SetupArch,
LoadModule, the list calls, GetAttributeValue, ...) have their own handler.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config.model import ModuleInit
from ..pkcs11 import attributes as attrs
from ..pkcs11.mechparams import NATIVE_ARCH, Arch, ParamRefused, native_parameter
from ..wire import procedures as procs
from ..wire.codec import Limits, rv_only_result
from ..wire.procedures import BY_NAME, VERSION_CAMLCRUSH, Procedure
from . import fastpath

log = logging.getLogger("p11guard.dispatch")

CKR_OK = 0x0
CKR_GENERAL_ERROR = 0x5
CKR_ARGUMENTS_BAD = 0x7
CKR_ATTRIBUTE_TYPE_INVALID = 0x12
CKR_ATTRIBUTE_VALUE_INVALID = 0x13
CKR_BUFFER_TOO_SMALL = 0x150
CKR_CRYPTOKI_NOT_INITIALIZED = 0x190
CKR_DATA_LEN_RANGE = 0x21
CKR_HOST_MEMORY = 0x2
CKR_CANT_LOCK = 0xA
CKF_OS_LOCKING_OK = 0x2
CKF_PROTECTED_AUTH_PATH = 0x100  # token flag
CKF_LIBRARY_CANT_CREATE_OS_THREADS = 0x1
CK_UNAVAILABLE_INFORMATION = (1 << 64) - 1
RV_PROTOCOL_ERROR = CK_UNAVAILABLE_INFORMATION  # Caml Crush's "-1"

ARCHES: dict[int, Arch] = {
    procs.ARCH_LITTLE_ENDIAN_64: Arch(8, "little"),
    procs.ARCH_LITTLE_ENDIAN_32: Arch(4, "little"),
    procs.ARCH_BIG_ENDIAN_64: Arch(8, "big"),
    procs.ARCH_BIG_ENDIAN_32: Arch(4, "big"),
}
SERVER_ARCH_CODE = next(code for code, arch in ARCHES.items() if arch == NATIVE_ARCH)

# First guess for an output buffer: most outputs (signatures, MACs, digests,
# ciphertext of a block mode) fit, so the module is called once.  A module
# answering CKR_BUFFER_TOO_SMALL tells the exact size and is called again; the
# operation stays active across that answer (PKCS#11 section 5.2).
OUTPUT_SLACK = 4096


BackendLoader = Callable[[str], Any]


class ModuleNotConfigured(LookupError):
    pass


@dataclass
class ConnectionState:
    arch: Arch = NATIVE_ARCH
    arch_set: bool = False
    alias: str | None = None
    module: Any = None
    initialized: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


# --- argument converters -----------------------------------------------------

class _Refuse(Exception):
    """Refuse the call with ``rv`` before it reaches the module."""

    def __init__(self, rv: int) -> None:
        super().__init__(hex(rv))
        self.rv = rv


def _pin(value: bytes) -> bytes | None:
    # Protocol v3 carries a NULL PIN and an empty PIN alike.  An empty PIN is
    # passed as a zero-length (non-NULL) buffer; `_protected_path_pins` turns it
    # into NULL for tokens with a protected authentication path.
    return value


class Dispatcher:
    """Serves the procedures of one connection."""

    def __init__(
        self,
        modules: dict[str, str],
        loader: BackendLoader,
        limits: Limits,
        *,
        alias_matcher: Callable[[str, str], bool] | None = None,
        on_call: Callable[[str, int], None] | None = None,
        wrap_backend: Callable[[Any, str], Any] | None = None,
        module_init: Mapping[str, ModuleInit] | None = None,
    ) -> None:
        self.modules = modules
        # Per alias C_Initialize arguments (OS locking, pReserved), [modules.<alias>].
        self.module_init = dict(module_init or {})
        self.loader = loader
        self.limits = limits
        self.state = ConnectionState()
        self._alias_matcher = alias_matcher or (lambda pattern, name: pattern == name)
        self._on_call = on_call
        # The policy engine: wraps the loaded module in an object with the same
        # methods that applies the alias's policy before (and after) each call.
        self._wrap_backend = wrap_backend
        # Set when the module refused CKF_OS_LOCKING_OK: the worker must then not
        # call it from two threads at once.
        self.serial = False
        self._serial_lock = threading.Lock()
        self._fast_cache: tuple[object, fastpath.Plan] | None = None
        self._handlers: dict[int, Callable[[tuple[Any, ...]], tuple[Any, ...]]] = {}
        self._build_handlers()

    # -- public ---------------------------------------------------------------

    def handle(self, number: int, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Run procedure ``number``; always returns a well-formed result tuple."""
        return self.run_handler(procs.BY_NUMBER[number], self._handlers[number], args)

    def run_handler(self, proc: Procedure, handler: Callable[[tuple[Any, ...]], tuple[Any, ...]],
                    args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Run one procedure's handler: refusals become rv-only results (v3 and v4)."""
        try:
            if self.serial:
                with self._serial_lock:
                    result = handler(args)
            else:
                result = handler(args)
        except _Refuse as refused:
            result = rv_only_result(proc, refused.rv)
        except ParamRefused as exc:
            log.debug("%s: mechanism parameter refused: %s", proc.c_name, exc)
            result = rv_only_result(proc, exc.rv)
        if self._on_call is not None:
            self._on_call(proc.c_name, result[0])
        return result

    def fast_plan(self, version: int, long_procedures: frozenset[int]
                  ) -> tuple[object, fastpath.Plan] | None:
        """What the worker may serve in C now (server/fastpath.py), with a key that
        changes when the plan does; None: every call goes through Python."""
        st = self.state
        library = fastpath.load()
        # A serialised module (no OS locking) takes one call at a time: the serial
        # lock is Python's, so C (which would run calls beside it) stays out.
        if library is None or st.module is None or not st.initialized \
                or self._on_call is not None or self.serial:
            return None
        native = st.arch.is_native
        key = (st.module, version, native)  # the module itself: an id() may be reused
        if self._fast_cache is not None and self._fast_cache[0] == key:
            return self._fast_cache
        functions = getattr(st.module, "fast_path_functions", None)
        found = functions() if functions is not None else None
        if found is None:  # a module the policy denies, or a closed one
            return None
        address, available = found
        if version == VERSION_CAMLCRUSH and not native:
            # A v3 template's values are in the client's layout: converted in Python.
            available = available - {"C_FindObjectsInit"}
        plan = library.plan(version, address, available, long_procedures,
                            output_slack=OUTPUT_SLACK, max_list=self.limits.max_list_count)
        self._fast_cache = (key, plan)
        return self._fast_cache

    def close(self) -> None:
        """The client went away: finalize the module if the client did not."""
        st = self.state
        if st.module is not None and st.initialized:
            try:
                st.module.finalize()
            except Exception:  # best effort on the way out
                log.exception("C_Finalize on disconnect failed")
            st.initialized = False

    # -- handler construction ---------------------------------------------------

    def _build_handlers(self) -> None:
        special: dict[str, Callable[[tuple[Any, ...]], tuple[Any, ...]]] = {
            "SetupArch": self._setup_arch,
            "LoadModule": self._load_module,
            "Initialize": self._initialize,
            "Finalize": self._finalize,
            "GetSlotList": self._list_call("get_slot_list", lambda a: (bool(a[0]),)),
            "GetMechanismList": self._list_call("get_mechanism_list", lambda a: (a[0],)),
            "GetAttributeValue": self._get_attribute_value,
            "FindObjects": self._find_objects,
            "GenerateRandom": self._generate_random,
            "InitToken": self._init_token,
        }
        for proc in procs.PROCEDURES:
            if proc.name in special:
                self._handlers[proc.number] = special[proc.name]
            else:
                self._handlers[proc.number] = self._generic(proc)

    def _generic(self, proc: Procedure) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
        spec = _SPECS[proc.name]
        method_name = spec.method
        converters = [self._converter(c) for c in spec.args]
        shape = spec.shape
        result_len = len(proc.result)
        pin_positions = tuple(i for i, c in enumerate(spec.args) if c == "pin")

        # Most procedures take handles and data as they are: no conversion pass.
        as_is = all(c is _identity for c in converters)

        def handler(args: tuple[Any, ...]) -> tuple[Any, ...]:
            module = self.state.module
            if module is None:
                raise _Refuse(CKR_CRYPTOKI_NOT_INITIALIZED)
            call_args: Sequence[Any]
            if as_is:
                call_args = args
            else:
                converted = [conv(a) for conv, a in zip(converters, args, strict=True)]
                if pin_positions:
                    self._protected_path_pins(module, converted, pin_positions,
                                              session=args[0])
                call_args = converted
            method = getattr(module, method_name)
            if shape == "rv":
                return (method(*call_args),)
            if shape == "out":
                return self._output_call(method, call_args)
            answer = method(*call_args)
            if shape == "struct":
                rv, obj = answer
                if obj is None:
                    return rv_only_result(proc, rv)
                return (rv, obj)
            # "values": the backend returns exactly the result fields.
            if len(answer) != result_len:
                raise _Refuse(CKR_GENERAL_ERROR)
            return tuple(answer)

        return handler

    def _converter(self, code: str) -> Callable[[Any], Any]:
        if code == "h":
            return _identity
        if code == "data":
            return _identity
        if code == "pin":
            return _pin
        if code == "mech":
            return self._mechanism
        if code == "tmpl":
            return self._template_in
        raise AssertionError(code)

    # -- state checks -------------------------------------------------------------

    def _require_module(self) -> Any:
        module = self.state.module
        if module is None:
            raise _Refuse(CKR_CRYPTOKI_NOT_INITIALIZED)
        return module

    # -- special procedures ---------------------------------------------------------

    def _setup_arch(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        st = self.state
        if st.arch_set:
            return (RV_PROTOCOL_ERROR,)  # at most once, as Caml Crush
        arch = ARCHES.get(args[0])
        if arch is None:
            return (procs.ARCH_UNSUPPORTED,)  # state stays unset: a retry is allowed
        st.arch = arch
        st.arch_set = True
        return (SERVER_ARCH_CODE,)

    def _load_module(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        st = self.state
        if st.module is not None:
            return (RV_PROTOCOL_ERROR,)
        try:
            name = bytes(args[0]).decode("ascii")
        except UnicodeDecodeError:
            log.warning("LoadModule: alias is not ASCII")
            return (CKR_GENERAL_ERROR,)
        path = self._resolve_alias(name)
        if path is None:
            log.warning("LoadModule: alias %r is not configured", name)
            return (CKR_GENERAL_ERROR,)
        try:
            module = self.loader(path)
        except Exception as exc:  # a broken module must not kill the worker
            log.error("LoadModule: cannot load %s for alias %r: %s", path, name, exc)
            return (CKR_GENERAL_ERROR,)
        if self._wrap_backend is not None:
            module = self._wrap_backend(module, name)
        st.module = module
        st.alias = name
        log.debug("module %s loaded for alias %r", path, name)
        return (CKR_OK,)

    def _resolve_alias(self, name: str) -> str | None:
        if name in self.modules:
            return self.modules[name]
        for pattern, path in self.modules.items():
            if self._alias_matcher(pattern, name):
                return path
        return None

    def _initialize(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self.initialize_module(),)

    def initialize_module(self, client_flags: int = 0) -> int:
        """C_Initialize with the alias's configured arguments (shared with v4).

        ``client_flags``: CK_C_INITIALIZE_ARGS flags the client passed (v4 only);
        only CKF_LIBRARY_CANT_CREATE_OS_THREADS is forwarded, the locking
        choice is the server's.
        """
        module = self.state.module
        if module is None:
            return CKR_GENERAL_ERROR  # Caml Crush: Initialize before LoadModule
        init = self.module_init.get(self.state.alias or "") or ModuleInit()
        reserved = (init.init_reserved.encode() + b"\0"
                    if init.init_reserved is not None else None)
        extra = client_flags & CKF_LIBRARY_CANT_CREATE_OS_THREADS
        # The worker runs calls on different sessions in parallel threads, which
        # PKCS#11 allows only when the module was told it may use OS locking.
        if init.os_locking:
            rv = module.initialize(CKF_OS_LOCKING_OK | extra, reserved)
            if rv == CKR_CANT_LOCK:
                rv = module.initialize(extra, reserved)
                if rv == CKR_OK:
                    log.info("module cannot use OS locking: calls are serialised")
                    self.serial = True
        else:
            rv = module.initialize(extra, reserved)
            if rv == CKR_OK:
                self.serial = True
        if rv == CKR_OK:
            self.state.initialized = True
        return int(rv)

    def _finalize(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        module = self._require_module()
        rv = module.finalize()
        if rv == CKR_OK:
            self.state.initialized = False
        return (rv,)

    def _list_call(
        self, method_name: str, lead: Callable[[tuple[Any, ...]], tuple[Any, ...]]
    ) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
        """GetSlotList / GetMechanismList with Caml Crush's count semantics.

        count 0: a length query (OK, empty list, N); count >= N: the list and N;
        count < N: CKR_BUFFER_TOO_SMALL, empty list, N.
        """

        def handler(args: tuple[Any, ...]) -> tuple[Any, ...]:
            module = self._require_module()
            method = getattr(module, method_name)
            first = lead(args)
            count = args[1]
            rv, _, needed = method(*first, None)
            if rv != CKR_OK or count == 0:
                return (rv, [], needed if rv == CKR_OK else 0)
            if count < needed:
                return (CKR_BUFFER_TOO_SMALL, [], needed)
            # The list may have grown between the two calls: ask with its real size.
            rv, items, n = method(*first, min(max(needed, 1), self.limits.max_list_count))
            if rv == CKR_BUFFER_TOO_SMALL:
                return (rv, [], n)
            if rv != CKR_OK:
                return (rv, [], 0)
            if n > count:
                return (CKR_BUFFER_TOO_SMALL, [], n)
            return (rv, list(items), n)

        return handler

    def _find_objects(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        module = self._require_module()
        session, max_count = args
        max_count = min(max_count, self.limits.max_list_count)
        rv, handles = module.find_objects(session, max_count)
        if rv != CKR_OK:
            return (rv, [], 0)
        return (rv, list(handles), len(handles))

    def _generate_random(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        module = self._require_module()
        session, length = args
        if length > self.limits.max_opaque:
            return (CKR_DATA_LEN_RANGE, b"")
        rv, data = module.generate_random(session, length)
        return (rv, data if rv == CKR_OK else b"")

    def _init_token(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        module = self._require_module()
        slot, so_pin, label = args
        label = bytes(label[:32]).ljust(32, b" ")
        if not so_pin and self._has_protected_path(module, slot):
            return (module.init_token(slot, None, label),)
        return (module.init_token(slot, so_pin, label),)

    # -- PINs -------------------------------------------------------------------

    def _protected_path_pins(self, module: Any, call_args: list[Any],
                             positions: tuple[int, ...], *, session: int) -> None:
        """An empty PIN on a token with a protected authentication path is NULL."""
        if all(call_args[i] for i in positions):
            return
        rv, info = module.get_session_info(session)
        if rv != CKR_OK or info is None or not self._has_protected_path(module, info.slot_id):
            return
        for i in positions:
            if not call_args[i]:
                call_args[i] = None

    @staticmethod
    def _has_protected_path(module: Any, slot: int) -> bool:
        rv, token = module.get_token_info(slot)
        return rv == CKR_OK and token is not None and bool(token.flags & CKF_PROTECTED_AUTH_PATH)

    # -- output buffers ---------------------------------------------------------

    def _output_call(self, method: Callable[..., Any],
                     call_args: Sequence[Any]) -> tuple[Any, ...]:
        data = call_args[-1] if call_args and isinstance(call_args[-1], bytes) else b""
        guess = len(data) + OUTPUT_SLACK
        rv, out, needed = method(*call_args, guess)
        if rv == CKR_BUFFER_TOO_SMALL and guess < needed <= self.limits.max_opaque:
            rv, out, needed = method(*call_args, needed)
        if rv != CKR_OK or out is None:
            return (rv, b"")
        return (rv, out)

    # -- mechanisms and templates -------------------------------------------------

    def _mechanism(self, mech: tuple[int, bytes]) -> tuple[int, bytes | None]:
        mech_type, raw = mech
        return (mech_type, native_parameter(mech_type, raw, self.state.arch))

    def _template_in(self, template: Sequence[tuple[int, bytes, int]]) -> list[tuple[int, bytes]]:
        arch = self.state.arch
        out: list[tuple[int, bytes]] = []
        for attr_type, value, _value_len in template:
            kind = attrs.kind_of(attr_type)
            if kind is attrs.AttrKind.TEMPLATE and value:
                # Raw client memory holding pointers: never hand it to the module.
                raise _Refuse(CKR_ATTRIBUTE_VALUE_INVALID)
            if not arch.is_native and value:
                value = _ulong_to_native(kind, value, arch)
            out.append((attr_type, value))
        return out

    def _get_attribute_value(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """GetAttributeValue: an empty opaque asks for the length (pValue NULL)."""
        module = self._require_module()
        session, obj, template = args
        arch = self.state.arch
        native = arch.is_native
        request: list[tuple[int, int | None]] = []
        kinds: list[attrs.AttrKind] = []
        for attr_type, value, _value_len in template:
            kind = attrs.kind_of(attr_type)
            kinds.append(kind)
            if not value:
                request.append((attr_type, None))
            elif native:
                request.append((attr_type, len(value)))
            else:
                request.append((attr_type, _native_request_len(kind, len(value), arch)))
        rv, answers = module.get_attribute_value(session, obj, request)
        out: list[tuple[int, bytes, int]] = []
        unavailable = False
        for (attr_type, data, length), kind in zip(answers, kinds, strict=True):
            if kind is attrs.AttrKind.TEMPLATE and data is not None:
                # The module wrote CK_ATTRIBUTEs pointing into our memory: nothing
                # a v3 client could use.
                out.append((attr_type, b"", CK_UNAVAILABLE_INFORMATION))
                unavailable = True
                continue
            if length == CK_UNAVAILABLE_INFORMATION:
                out.append((attr_type, b"", CK_UNAVAILABLE_INFORMATION))
                continue
            if data is None:
                if not native:
                    length = _client_len(kind, length, arch)
                out.append((attr_type, b"", length))
                continue
            if not native:
                converted = _ulong_to_client(kind, data, arch)
                if converted is None:
                    out.append((attr_type, b"", CK_UNAVAILABLE_INFORMATION))
                    unavailable = True
                    continue
                data = converted
            out.append((attr_type, data, len(data)))
        if unavailable and rv == CKR_OK:
            rv = CKR_ATTRIBUTE_TYPE_INVALID
        return (rv, out)


def _identity(value: Any) -> Any:
    return value


# --- architecture conversion of attribute values ------------------------------

def _ulong_to_native(kind: attrs.AttrKind, value: bytes, arch: Arch) -> bytes:
    if kind is attrs.AttrKind.ULONG:
        converted = attrs.convert_ulong(
            value, arch.ulong_size, arch.byteorder, NATIVE_ARCH.ulong_size, NATIVE_ARCH.byteorder
        )
        return value if converted is None else converted
    if kind is attrs.AttrKind.ULONG_ARRAY and len(value) % arch.ulong_size == 0:
        return _convert_array(value, arch, NATIVE_ARCH) or value
    return value


def _ulong_to_client(kind: attrs.AttrKind, value: bytes, arch: Arch) -> bytes | None:
    if kind is attrs.AttrKind.ULONG:
        return attrs.convert_ulong(
            value, NATIVE_ARCH.ulong_size, NATIVE_ARCH.byteorder, arch.ulong_size, arch.byteorder
        )
    if kind is attrs.AttrKind.ULONG_ARRAY:
        return _convert_array(value, NATIVE_ARCH, arch)
    return value


def _convert_array(value: bytes, src: Arch, dst: Arch) -> bytes | None:
    if len(value) % src.ulong_size:
        return None
    out = bytearray()
    for i in range(0, len(value), src.ulong_size):
        item = attrs.convert_ulong(
            value[i : i + src.ulong_size], src.ulong_size, src.byteorder,
            dst.ulong_size, dst.byteorder,
        )
        if item is None:
            return None
        out += item
    return bytes(out)


def _native_request_len(kind: attrs.AttrKind, client_len: int, arch: Arch) -> int:
    if kind is attrs.AttrKind.ULONG:
        if client_len >= arch.ulong_size:
            return max(client_len, NATIVE_ARCH.ulong_size)
        return client_len
    if kind is attrs.AttrKind.ULONG_ARRAY:
        return client_len // arch.ulong_size * NATIVE_ARCH.ulong_size
    return client_len


def _client_len(kind: attrs.AttrKind, native_len: int, arch: Arch) -> int:
    if kind is attrs.AttrKind.ULONG and native_len == NATIVE_ARCH.ulong_size:
        return arch.ulong_size
    if kind is attrs.AttrKind.ULONG_ARRAY:
        return native_len // NATIVE_ARCH.ulong_size * arch.ulong_size
    return native_len


# --- the table -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Spec:
    method: str  # Module method
    args: tuple[str, ...]  # converter per wire argument
    shape: str  # "rv" | "values" | "struct" | "out"


def _s(method: str, args: str, shape: str) -> _Spec:
    return _Spec(method, tuple(args.split()), shape)


_SPECS: dict[str, _Spec] = {
    "GetInfo": _s("get_info", "", "struct"),
    "GetSlotInfo": _s("get_slot_info", "h", "struct"),
    "GetTokenInfo": _s("get_token_info", "h", "struct"),
    "GetSessionInfo": _s("get_session_info", "h", "struct"),
    "GetMechanismInfo": _s("get_mechanism_info", "h h", "struct"),
    "WaitForSlotEvent": _s("wait_for_slot_event", "h", "values"),
    "CloseAllSessions": _s("close_all_sessions", "h", "rv"),
    "OpenSession": _s("open_session", "h h", "values"),
    "Login": _s("login", "h h pin", "rv"),
    "Logout": _s("logout", "h", "rv"),
    "CloseSession": _s("close_session", "h", "rv"),
    "FindObjectsFinal": _s("find_objects_final", "h", "rv"),
    "GetFunctionStatus": _s("get_function_status", "h", "rv"),
    "CancelFunction": _s("cancel_function", "h", "rv"),
    "InitPIN": _s("init_pin", "h pin", "rv"),
    "SetPIN": _s("set_pin", "h pin pin", "rv"),
    "SeedRandom": _s("seed_random", "h data", "rv"),
    "DigestUpdate": _s("digest_update", "h data", "rv"),
    "SignUpdate": _s("sign_update", "h data", "rv"),
    "VerifyUpdate": _s("verify_update", "h data", "rv"),
    "VerifyFinal": _s("verify_final", "h data", "rv"),
    "Verify": _s("verify", "h data data", "rv"),
    "FindObjectsInit": _s("find_objects_init", "h tmpl", "rv"),
    "GenerateKey": _s("generate_key", "h mech tmpl", "values"),
    "GenerateKeyPair": _s("generate_key_pair", "h mech tmpl tmpl", "values"),
    "CreateObject": _s("create_object", "h tmpl", "values"),
    "CopyObject": _s("copy_object", "h h tmpl", "values"),
    "DestroyObject": _s("destroy_object", "h h", "rv"),
    "DigestKey": _s("digest_key", "h h", "rv"),
    "SetAttributeValue": _s("set_attribute_value", "h h tmpl", "rv"),
    "GetObjectSize": _s("get_object_size", "h h", "values"),
    "WrapKey": _s("wrap_key", "h mech h h", "out"),
    "UnwrapKey": _s("unwrap_key", "h mech h data tmpl", "values"),
    "DeriveKey": _s("derive_key", "h mech h tmpl", "values"),
    "DigestInit": _s("digest_init", "h mech", "rv"),
    "SignInit": _s("sign_init", "h mech h", "rv"),
    "VerifyInit": _s("verify_init", "h mech h", "rv"),
    "EncryptInit": _s("encrypt_init", "h mech h", "rv"),
    "DecryptInit": _s("decrypt_init", "h mech h", "rv"),
    "SignRecoverInit": _s("sign_recover_init", "h mech h", "rv"),
    "VerifyRecoverInit": _s("verify_recover_init", "h mech h", "rv"),
    "Digest": _s("digest", "h data", "out"),
    "Sign": _s("sign", "h data", "out"),
    "Encrypt": _s("encrypt", "h data", "out"),
    "EncryptUpdate": _s("encrypt_update", "h data", "out"),
    "Decrypt": _s("decrypt", "h data", "out"),
    "DecryptUpdate": _s("decrypt_update", "h data", "out"),
    "SignRecover": _s("sign_recover", "h data", "out"),
    "VerifyRecover": _s("verify_recover", "h data", "out"),
    "DigestEncryptUpdate": _s("digest_encrypt_update", "h data", "out"),
    "SignEncryptUpdate": _s("sign_encrypt_update", "h data", "out"),
    "DecryptDigestUpdate": _s("decrypt_digest_update", "h data", "out"),
    "DecryptVerifyUpdate": _s("decrypt_verify_update", "h data", "out"),
    "DigestFinal": _s("digest_final", "h", "out"),
    "SignFinal": _s("sign_final", "h", "out"),
    "EncryptFinal": _s("encrypt_final", "h", "out"),
    "DecryptFinal": _s("decrypt_final", "h", "out"),
    "GetOperationState": _s("get_operation_state", "h", "out"),
    "SetOperationState": _s("set_operation_state", "h data h h", "rv"),
}

_SPECIAL = {
    "SetupArch", "LoadModule", "Initialize", "Finalize", "GetSlotList", "GetMechanismList",
    "GetAttributeValue", "FindObjects", "GenerateRandom", "InitToken",
}
assert set(_SPECS) | _SPECIAL == set(BY_NAME), set(BY_NAME) ^ (set(_SPECS) | _SPECIAL)
assert not set(_SPECS) & _SPECIAL
