"""Procedure -> backend call for protocol version 4 (p11guard's own).

A :class:`DispatcherV4` sits beside the connection's version-3
:class:`~p11guard.server.dispatch.Dispatcher` and shares its state (client
architecture, loaded module, serial lock).  Procedures whose wire shape is the
same in both versions go to the version-3 handler unchanged; the others are
here:

* mechanisms arrive typed (wire/mechanisms.py): the parameter is rebuilt in
  native memory (pkcs11/cparams.py), only with a mechanism that takes that
  structure (pkcs11/paramtable.py); RAW client memory only where configured;
* templates arrive typed and may nest (CKA_WRAP_TEMPLATE...), CK_ULONG values
  are hypers whatever the client's architecture;
* output calls carry the caller's buffer size (or "NULL") and answer the
  length, as C does;
* PKCS#11 3.0 functions.

Every backend call goes through the (policy-wrapped) module's methods, so the
policy applies; a method the policy engine does not expose is
CKR_FUNCTION_NOT_SUPPORTED, never a way around it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..pkcs11 import attributes as attrs
from ..pkcs11 import cparams, paramtable
from ..pkcs11.binding import ffi
from ..pkcs11.mechparams import ParamRefused
from ..pkcs11.types import NativeValue, TemplateRequest
from ..wire import mechanisms as m4
from ..wire import procedures as procs
from ..wire.procedures import OUT_LEN_NULL, Procedure
from ..wire.templates import TypedTemplate, ValueKind
from .dispatch import (
    _SPECS,
    CK_UNAVAILABLE_INFORMATION,
    CKR_ARGUMENTS_BAD,
    CKR_ATTRIBUTE_TYPE_INVALID,
    CKR_ATTRIBUTE_VALUE_INVALID,
    CKR_BUFFER_TOO_SMALL,
    CKR_OK,
    OUTPUT_SLACK,
    Dispatcher,
    _identity,
    _pin,
    _Refuse,
)

log = logging.getLogger("p11guard.dispatch")

CKR_FUNCTION_NOT_SUPPORTED = 0x54
CKF_ARRAY_ATTRIBUTE = 0x40000000
ULONG_SIZE = ffi.sizeof("CK_ULONG")
ATTRIBUTE_SIZE = ffi.sizeof("CK_ATTRIBUTE")
_ULONG_MAX = (1 << (8 * ULONG_SIZE)) - 1
# GetInterfaceInfo flags.
INTERFACE_30 = 0x1

Handler = Callable[[tuple[Any, ...]], tuple[Any, ...]]
V4 = procs.TABLES[procs.VERSION_P11GUARD]
V3 = procs.TABLES[procs.VERSION_CAMLCRUSH]

# Message-based families: (procedure name -> (module method, operation kind)).
_MSG_INIT = {
    "MessageEncryptInit": ("message_encrypt_init", "encrypt"),
    "MessageDecryptInit": ("message_decrypt_init", "decrypt"),
    "MessageSignInit": ("message_sign_init", "sign"),
    "MessageVerifyInit": ("message_verify_init", "verify"),
}
_MSG_FINAL = {
    "MessageEncryptFinal": ("message_encrypt_final", "encrypt"),
    "MessageDecryptFinal": ("message_decrypt_final", "decrypt"),
    "MessageSignFinal": ("message_sign_final", "sign"),
    "MessageVerifyFinal": ("message_verify_final", "verify"),
}


def _is_array_attribute(attr_type: int) -> bool:
    """A CK_ATTRIBUTE-array attribute: the known ones, and unknown (vendor)
    types with CKF_ARRAY_ATTRIBUTE set (CKA_ALLOWED_MECHANISMS has the bit
    too, but holds CK_MECHANISM_TYPEs)."""
    kind = attrs.kind_of(attr_type)
    return kind is attrs.AttrKind.TEMPLATE or (
        kind is attrs.AttrKind.BYTES and bool(attr_type & CKF_ARRAY_ATTRIBUTE))


class DispatcherV4:
    """Serves the version-4 procedures of one connection."""

    def __init__(self, base: Dispatcher) -> None:
        self.base = base
        self.state = base.state
        self.limits = base.limits
        # (session, "encrypt"|"decrypt"|"sign"|"verify") -> mechanism of the
        # active message-based operation: per-message parameters are checked
        # against it (a structure of the wrong type is never handed over).
        self._message_ops: dict[tuple[int, str], int] = {}
        self._ops_lock = threading.Lock()
        self._handlers: dict[int, Handler] = {}
        self._build()

    # -- public ---------------------------------------------------------------

    def handle(self, number: int, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return self.base.run_handler(V4[number], self._handlers[number], args)

    def close(self) -> None:
        self.base.close()

    # -- construction -------------------------------------------------------------

    def _build(self) -> None:
        special: dict[str, Handler] = {
            "Initialize": self._initialize,
            "GetAttributeValue": self._get_attribute_value,
            "GetInterfaceInfo": self._interface_info,
            "LoginUser": self._login_user,
            "SessionCancel": self._session_cancel,
            "EncryptMessage": self._crypt_message("encrypt_message", "encrypt"),
            "DecryptMessage": self._crypt_message("decrypt_message", "decrypt"),
            "EncryptMessageBegin": self._crypt_begin("encrypt_message_begin", "encrypt"),
            "DecryptMessageBegin": self._crypt_begin("decrypt_message_begin", "decrypt"),
            "EncryptMessageNext": self._crypt_next("encrypt_message_next", "encrypt"),
            "DecryptMessageNext": self._crypt_next("decrypt_message_next", "decrypt"),
            "SignMessage": self._sign_message,
            "SignMessageBegin": self._param_only("sign_message_begin", "sign"),
            "SignMessageNext": self._sign_message_next,
            "VerifyMessage": self._verify_message,
            "VerifyMessageBegin": self._param_only("verify_message_begin", "verify"),
            "VerifyMessageNext": self._verify_message_next,
            # Answered by the connection itself (worker.py, server/channels.py);
            # reached only where it offers no channels.
            "OpenChannel": lambda args: (CKR_FUNCTION_NOT_SUPPORTED, b""),
            "JoinChannel": lambda args: (CKR_FUNCTION_NOT_SUPPORTED,),
        }
        for name, (method, op) in _MSG_INIT.items():
            special[name] = self._message_init(method, op)
        for name, (method, op) in _MSG_FINAL.items():
            special[name] = self._message_final(method, op)
        for number, proc in V4.items():
            if proc.name in special:
                self._handlers[number] = special[proc.name]
            elif number in V3 and V3[number].args == proc.args and \
                    V3[number].result == proc.result:
                # Same wire shape in both versions: the version-3 handler.
                self._handlers[number] = self.base._handlers[number]
            else:
                self._handlers[number] = self._generic(proc)

    def _generic(self, proc: Procedure) -> Handler:
        """Procedures with typed mechanisms/templates or an output buffer."""
        spec = _SPECS[proc.name]
        converters = [self._converter(code) for code in spec.args]
        method_name = spec.method
        shape = spec.shape
        result_len = len(proc.result)

        # Handles and data pass as they are: then no conversion pass per call.
        as_is = all(c is _identity for c in converters)

        def handler(args: tuple[Any, ...]) -> tuple[Any, ...]:
            module = self.base._require_module()
            method = getattr(module, method_name)
            if shape == "out":
                out_args = [c(a) for c, a in zip(converters, args[:-1], strict=True)]
                return self._output_call(method, out_args, args[-1])
            call_args: Sequence[Any] = (
                args if as_is else [c(a) for c, a in zip(converters, args, strict=True)])
            if shape == "rv":
                return (method(*call_args),)
            answer = method(*call_args)
            if len(answer) != result_len:
                raise _Refuse(0x5)
            return tuple(answer)

        return handler

    def _converter(self, code: str) -> Callable[[Any], Any]:
        if code in ("h", "data"):
            return _identity
        if code == "pin":
            return _pin
        if code == "mech":
            return self._mechanism
        if code == "tmpl":
            return self._template_in
        raise AssertionError(code)

    # -- typed arguments ------------------------------------------------------------

    def _mechanism(self, mech: m4.TypedMechanism) -> tuple[int, Any]:
        mech_type, value = mech
        return mech_type, self._param_for(mech_type, value).native

    def _param_for(self, mech_type: int, value: m4.ParamValue) -> cparams.BuiltParam:
        tag = value[0]
        if tag == m4.TAG_RAW:
            init = self.base.module_init.get(self.state.alias or "")
            enabled = bool(init and init.raw_mechanism_params)
            if not paramtable.raw_allowed(mech_type, enabled, self.state.arch.is_native):
                raise ParamRefused("RAW parameter not allowed for this mechanism/client")
        elif not paramtable.tag_accepted(mech_type, tag):
            raise ParamRefused(f"{m4.PARAMS[tag].name} is not the parameter of 0x{mech_type:x}")
        return cparams.build(value)

    def _template_in(self, template: TypedTemplate) -> list[tuple[int, bytes | NativeValue]]:
        out: list[tuple[int, bytes | NativeValue]] = []
        for attr_type, kind, value in template:
            out.append((attr_type, self._value_in(attr_type, kind, value, nested_ok=True)))
        return out

    def _value_in(self, attr_type: int, kind: ValueKind, value: Any,
                  nested_ok: bool) -> bytes | NativeValue:
        if kind is ValueKind.BYTES:
            if value and _is_array_attribute(attr_type):
                # Bytes standing for a CK_ATTRIBUTE array would be client pointers.
                raise _Refuse(CKR_ATTRIBUTE_VALUE_INVALID)
            return bytes(value)
        if kind is ValueKind.ULONG:
            if value > _ULONG_MAX:
                raise _Refuse(CKR_ATTRIBUTE_VALUE_INVALID)
            return int(value).to_bytes(ULONG_SIZE, attrs.NATIVE_ENDIAN)
        if kind is ValueKind.ULONG_ARRAY:
            if any(v > _ULONG_MAX for v in value):
                raise _Refuse(CKR_ATTRIBUTE_VALUE_INVALID)
            return b"".join(int(v).to_bytes(ULONG_SIZE, attrs.NATIVE_ENDIAN) for v in value)
        if kind is ValueKind.TEMPLATE and nested_ok and _is_array_attribute(attr_type):
            return self._nested(value)
        raise _Refuse(CKR_ATTRIBUTE_VALUE_INVALID)

    def _nested(self, template: TypedTemplate) -> NativeValue:
        """A CK_ATTRIBUTE array in native memory for a nested template."""
        count = len(template)
        array = ffi.new("CK_ATTRIBUTE[]", max(count, 1))
        keep: list[Any] = [array]
        for i, (attr_type, kind, value) in enumerate(template):
            native = self._value_in(attr_type, kind, value, nested_ok=False)
            assert isinstance(native, bytes)
            array[i].type = attr_type
            if native:
                buf = ffi.new("char[]", native)
                keep.append(buf)
                array[i].pValue = buf
            array[i].ulValueLen = len(native)
        return NativeValue(array, count * ATTRIBUTE_SIZE, keep)

    # -- outputs ---------------------------------------------------------------------

    def _output_call(self, method: Callable[..., Any], call_args: list[Any],
                     out_len: int) -> tuple[Any, ...]:
        """The caller's buffer (``out_len`` bytes, or NULL) as C has it.

        The module is first given a buffer of a likely size, never more than the
        caller's; CKR_BUFFER_TOO_SMALL with a size the caller's buffer holds
        means a second call with that exact size (the operation stays active
        across that answer), anything else goes back to the caller as it is.
        """
        if out_len == OUT_LEN_NULL:
            rv, _, needed = method(*call_args, None)
            return (rv, b"", needed)
        data = call_args[-1] if call_args and isinstance(call_args[-1], bytes) else b""
        cap = min(out_len, self.limits.max_opaque)
        guess = min(cap, len(data) + OUTPUT_SLACK)
        rv, out, got = method(*call_args, guess)
        if rv == CKR_BUFFER_TOO_SMALL and guess < got <= cap:
            rv, out, got = method(*call_args, got)
        if rv != CKR_OK or out is None:
            return (rv, b"", got)
        return (rv, out, got)

    # -- special procedures ------------------------------------------------------------

    def _initialize(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self.base.initialize_module(args[0]),)

    def _get_attribute_value(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Types in, typed values out.  The server does C's "ask the length,
        allocate, ask again" itself, for nested templates too; the client fills
        its caller's buffers (and reports CKR_BUFFER_TOO_SMALL) locally."""
        module = self.base._require_module()
        session, obj, types = args
        lim = self.limits
        if len(types) > lim.max_attributes:
            raise _Refuse(CKR_ARGUMENTS_BAD)
        rv, sizes = module.get_attribute_value(session, obj, [(t, None) for t in types])
        result: dict[int, tuple[ValueKind, Any]] = {}
        request: list[tuple[int, Any]] = []
        index: list[int] = []
        for i, (attr_type, _, length) in enumerate(sizes):
            if length == CK_UNAVAILABLE_INFORMATION or length > lim.max_opaque:
                result[i] = (ValueKind.UNAVAILABLE, None)
            elif _is_array_attribute(attr_type):
                count = length // ATTRIBUTE_SIZE
                if count > lim.max_attributes:
                    result[i] = (ValueKind.UNAVAILABLE, None)
                    continue
                request.append((attr_type, TemplateRequest([(0, None)] * count)))
                index.append(i)
            else:
                request.append((attr_type, length))
                index.append(i)
        if request:
            rv2, answers = module.get_attribute_value(session, obj, request)
            rv = rv if rv != CKR_OK else rv2
            third: list[tuple[int, Any]] = []
            third_index: list[int] = []
            for i, (attr_type, value, length) in zip(index, answers, strict=True):
                if isinstance(value, list):
                    # Inner types and lengths known: now the inner values.
                    entries = [(t, None if n == CK_UNAVAILABLE_INFORMATION or n > lim.max_opaque
                                else n) for t, _, n in value]
                    third.append((attr_type, TemplateRequest(entries)))
                    third_index.append(i)
                else:
                    result[i] = self._typed_out(attr_type, value, length)
            if third:
                rv3, answers3 = module.get_attribute_value(session, obj, third)
                rv = rv if rv != CKR_OK else rv3
                for i, (attr_type, value, length) in zip(third_index, answers3, strict=True):
                    result[i] = self._typed_out(attr_type, value, length)
        out: TypedTemplate = []
        unavailable_type = False
        for i, attr_type in enumerate(types):
            kind, value = result.get(i, (ValueKind.UNAVAILABLE, None))
            if kind is ValueKind.UNAVAILABLE and i in result and result[i][1] == "type":
                unavailable_type = True
                value = None
            out.append((attr_type, kind, value))
        if unavailable_type and rv == CKR_OK:
            rv = CKR_ATTRIBUTE_TYPE_INVALID
        return (rv, out)

    def _typed_out(self, attr_type: int, value: Any,
                   length: int) -> tuple[ValueKind, Any]:
        if value is None:
            return (ValueKind.UNAVAILABLE, None)
        if isinstance(value, list):
            inner: TypedTemplate = []
            for t, v, n in value:
                k, iv = self._typed_out(t, v, n)
                if k is ValueKind.TEMPLATE:
                    k, iv = ValueKind.UNAVAILABLE, None
                inner.append((t, k, iv))
            return (ValueKind.TEMPLATE, inner)
        kind = attrs.kind_of(attr_type)
        if kind is attrs.AttrKind.ULONG:
            if len(value) != ULONG_SIZE:  # a module answering nonsense
                return (ValueKind.UNAVAILABLE, "type")
            return (ValueKind.ULONG, int.from_bytes(value, attrs.NATIVE_ENDIAN))
        if kind is attrs.AttrKind.ULONG_ARRAY:
            if len(value) % ULONG_SIZE:
                return (ValueKind.UNAVAILABLE, "type")
            return (ValueKind.ULONG_ARRAY, [
                int.from_bytes(value[j:j + ULONG_SIZE], attrs.NATIVE_ENDIAN)
                for j in range(0, len(value), ULONG_SIZE)])
        return (ValueKind.BYTES, value)

    def _interface_info(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        module = self.base._require_module()
        major, minor = module.version
        flags = INTERFACE_30 if module.interface_30 else 0
        available: list[int] = []
        for number, proc in V4.items():
            if number < 72:
                continue
            method = _METHODS.get(proc.name)
            if method and getattr(module, method, None) is not None and module.has(proc.c_name):
                available.append(number)
        return (CKR_OK, major, minor, flags, available)

    def _method(self, name: str) -> Callable[..., Any]:
        module = self.base._require_module()
        method = getattr(module, name, None)
        if method is None:  # the policy engine does not cover it: not available
            raise _Refuse(CKR_FUNCTION_NOT_SUPPORTED)
        return method  # type: ignore[no-any-return]

    def _login_user(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        session, user_type, pin, username = args
        return (self._method("login_user")(session, user_type, _pin(pin), username or None),)

    def _session_cancel(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        session, flags = args
        return (self._method("session_cancel")(session, flags),)

    # -- message-based functions (PKCS#11 3.0) -------------------------------------------

    def _message_init(self, method_name: str, op: str) -> Handler:
        def handler(args: tuple[Any, ...]) -> tuple[Any, ...]:
            session, mech, key = args
            method = self._method(method_name)
            rv = method(session, self._mechanism(mech), key)
            if rv == CKR_OK:
                with self._ops_lock:
                    self._message_ops[(session, op)] = mech[0]
            return (rv,)

        return handler

    def _message_final(self, method_name: str, op: str) -> Handler:
        def handler(args: tuple[Any, ...]) -> tuple[Any, ...]:
            rv = self._method(method_name)(args[0])
            if rv == CKR_OK:
                with self._ops_lock:
                    self._message_ops.pop((args[0], op), None)
            return (rv,)

        return handler

    def _message_param(self, session: int, op: str, value: m4.ParamValue) -> cparams.BuiltParam:
        with self._ops_lock:
            mech = self._message_ops.get((session, op))
        tag = value[0]
        if tag == m4.TAG_NONE:
            return cparams.build(value)
        if mech is None:
            # No message operation of ours on this session: the module will say
            # so; the structure must still not be guessed.
            raise _Refuse(0x91)  # CKR_OPERATION_NOT_INITIALIZED
        return self._param_for(mech, value)

    def _crypt_message(self, method_name: str, op: str) -> Handler:
        def handler(args: tuple[Any, ...]) -> tuple[Any, ...]:
            session, value, aad, data, out_len = args
            method = self._method(method_name)
            built = self._message_param(session, op, value)
            rv, out, length = self._message_output(
                lambda n: method(session, built.native, aad, data, n), out_len, len(data))
            return (rv, built.read_back(), out, length)

        return handler

    def _crypt_begin(self, method_name: str, op: str) -> Handler:
        def handler(args: tuple[Any, ...]) -> tuple[Any, ...]:
            session, value, aad = args
            method = self._method(method_name)
            built = self._message_param(session, op, value)
            rv = method(session, built.native, aad)
            return (rv, built.read_back())

        return handler

    def _crypt_next(self, method_name: str, op: str) -> Handler:
        def handler(args: tuple[Any, ...]) -> tuple[Any, ...]:
            session, value, data, out_len, flags = args
            method = self._method(method_name)
            built = self._message_param(session, op, value)
            rv, out, length = self._message_output(
                lambda n: method(session, built.native, data, n, flags), out_len, len(data))
            return (rv, built.read_back(), out, length)

        return handler

    def _message_output(self, call: Callable[[int | None], Any], out_len: int,
                        data_len: int) -> tuple[int, bytes, int]:
        """_output_call for the message functions (the operation also stays
        active across CKR_BUFFER_TOO_SMALL, so the same two steps apply)."""
        if out_len == OUT_LEN_NULL:
            rv, _, needed = call(None)
            return rv, b"", needed
        cap = min(out_len, self.limits.max_opaque)
        guess = min(cap, data_len + OUTPUT_SLACK)
        rv, out, got = call(guess)
        if rv == CKR_BUFFER_TOO_SMALL and guess < got <= cap:
            rv, out, got = call(got)
        if rv != CKR_OK or out is None:
            return rv, b"", got
        return rv, out, got

    def _param_only(self, method_name: str, op: str) -> Handler:
        def handler(args: tuple[Any, ...]) -> tuple[Any, ...]:
            session, value = args
            method = self._method(method_name)
            built = self._message_param(session, op, value)
            return (method(session, built.native),)

        return handler

    def _sign_message(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        session, value, data, out_len = args
        method = self._method("sign_message")
        built = self._message_param(session, "sign", value)
        return self._message_output(lambda n: method(session, built.native, data, n),
                                    out_len, len(data))

    def _sign_message_next(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        session, value, data, final, out_len = args
        method = self._method("sign_message_next")
        built = self._message_param(session, "sign", value)
        if not final:
            rv, _, _ = method(session, built.native, data, False, None)
            return (rv, b"", 0)
        return self._message_output(lambda n: method(session, built.native, data, True, n),
                                    out_len, len(data))

    def _verify_message(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        session, value, data, signature = args
        method = self._method("verify_message")
        built = self._message_param(session, "verify", value)
        return (method(session, built.native, data, signature),)

    def _verify_message_next(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        session, value, data, final, signature = args
        method = self._method("verify_message_next")
        built = self._message_param(session, "verify", value)
        return (method(session, built.native, data, signature if final else None),)


# v4 procedure name -> the module method that serves it (GetInterfaceInfo lists
# a 3.0 function only when both the backend and the policy engine provide it).
_METHODS: dict[str, str] = {
    "LoginUser": "login_user",
    "SessionCancel": "session_cancel",
    "EncryptMessage": "encrypt_message",
    "EncryptMessageBegin": "encrypt_message_begin",
    "EncryptMessageNext": "encrypt_message_next",
    "DecryptMessage": "decrypt_message",
    "DecryptMessageBegin": "decrypt_message_begin",
    "DecryptMessageNext": "decrypt_message_next",
    "SignMessage": "sign_message",
    "SignMessageBegin": "sign_message_begin",
    "SignMessageNext": "sign_message_next",
    "VerifyMessage": "verify_message",
    "VerifyMessageBegin": "verify_message_begin",
    "VerifyMessageNext": "verify_message_next",
    **{name: method for name, (method, _) in _MSG_INIT.items()},
    **{name: method for name, (method, _) in _MSG_FINAL.items()},
}

# Every v4 procedure has a handler: a v3 one (same shape), a generic one or a special one.
assert all(
    p.name in _SPECS or p.name in _METHODS or p.name in {
        "SetupArch", "LoadModule", "Initialize", "Finalize", "GetSlotList",
        "GetMechanismList", "GetAttributeValue", "FindObjects", "GenerateRandom",
        "InitToken", "GetInterfaceInfo", "OpenChannel", "JoinChannel"}
    for p in procs.PROCEDURES_V4
)
