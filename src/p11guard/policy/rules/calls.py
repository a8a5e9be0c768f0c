"""The function table of the policy engine: every backend method, its C name,
the *role* of each argument and the shape of a refusal.

Units never look at argument positions: they ask a :class:`Call` for a role
("key", "mechanism", "creation_template", ...).  Adding a function (a PKCS#11
3.0 one, say) is one line here, and every unit that acts on its roles covers it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from p11guard.pkcs11 import constants as c

CK_UNAVAILABLE_INFORMATION: Final = (1 << 64) - 1

# Roles of arguments.  A role says what the value *is*, so a unit written for a
# role covers every function that has it.
SESSION = "session"
SLOT = "slot"
OBJECT = "object"  # an existing object: hidden -> CKR_OBJECT_HANDLE_INVALID
KEY = "key"  # the key of a crypto Init / DigestKey / the key to wrap
WRAPPING_KEY = "wrapping_key"
UNWRAPPING_KEY = "unwrapping_key"
BASE_KEY = "base_key"
STATE_KEY = "state_key"  # SetOperationState keys: 0 means "none"
MECHANISM = "mechanism"  # (type, parameter)
MECHANISM_TYPE = "mechanism_type"  # a bare CKM_ value (GetMechanismInfo)
SEARCH_TEMPLATE = "search_template"
CREATION_TEMPLATE = "creation_template"  # values an object will get
USER_TYPE = "user_type"
SESSION_FLAGS = "session_flags"
PLAIN = "plain"  # data, lengths, PINs: no policy meaning

# Handle roles and the rv for a hidden object in that position (Caml Crush's
# codes; SetOperationState, which Caml Crush does not check, uses the generic one).
HANDLE_ROLES: Final[dict[str, int]] = {
    OBJECT: c.CKR_OBJECT_HANDLE_INVALID,
    KEY: c.CKR_OBJECT_HANDLE_INVALID,
    WRAPPING_KEY: c.CKR_WRAPPING_KEY_HANDLE_INVALID,
    UNWRAPPING_KEY: c.CKR_UNWRAPPING_KEY_HANDLE_INVALID,
    BASE_KEY: c.CKR_OBJECT_HANDLE_INVALID,
    STATE_KEY: c.CKR_OBJECT_HANDLE_INVALID,
}

# Result shapes, and the refusal each one takes (same shape as the backend's answer).
RV = "rv"  # rv
STRUCT = "struct"  # (rv, info | None)
LIST = "list"  # (rv, list, count)
HANDLE = "handle"  # (rv, handle or value)
PAIR = "pair"  # (rv, h1, h2)
OUT = "out"  # (rv, bytes | None, length)
ATTRS = "attrs"  # (rv, [(type, value | None, length)])
HANDLES = "handles"  # (rv, [handles])
RANDOM = "random"  # (rv, bytes)


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    role: str = PLAIN


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    """One backend method: ``method`` (binding name), ``function`` (C name)."""

    method: str
    function: str
    params: tuple[Param, ...]
    shape: str
    # role -> positions, computed once (a role may appear twice: GenerateKeyPair).
    positions: dict[str, tuple[int, ...]] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        found: dict[str, list[int]] = {}
        for i, p in enumerate(self.params):
            found.setdefault(p.role, []).append(i)
        self.positions.update({role: tuple(pos) for role, pos in found.items()})

    @property
    def session_pos(self) -> int | None:
        """Position of the session argument (hot path: units ask on every call)."""
        pos = self.positions.get(SESSION)
        return pos[0] if pos else None

    def has(self, role: str) -> bool:
        return role in self.positions

    def refusal(self, rv: int, args: tuple[Any, ...] | list[Any]) -> Any:
        """The backend's answer shape carrying ``rv`` and no output."""
        shape = self.shape
        if shape == RV:
            return rv
        if shape == STRUCT:
            return (rv, None)
        if shape == LIST:
            return (rv, [], 0)
        if shape == HANDLE:
            return (rv, 0)
        if shape == PAIR:
            return (rv, 0, 0)
        if shape == OUT:
            return (rv, None, 0)
        if shape == HANDLES:
            return (rv, [])
        if shape == RANDOM:
            return (rv, b"")
        if shape == ATTRS:
            # One entry per requested attribute: callers zip answers with requests.
            request = args[self.positions[PLAIN][0]] if PLAIN in self.positions else []
            return (rv, [(t, None, CK_UNAVAILABLE_INFORMATION) for t, _ in request])
        raise AssertionError(shape)

    @staticmethod
    def rv_of(result: Any) -> int:
        """The rv of a backend answer of any shape."""
        return int(result if isinstance(result, int) else result[0])


def _f(method: str, function: str, params: str, shape: str) -> FunctionSpec:
    """``params``: space-separated ``name`` or ``name:role``."""
    out = []
    for item in params.split():
        name, _, role = item.partition(":")
        out.append(Param(name, role or PLAIN))
    return FunctionSpec(method, function, tuple(out), shape)


_S, _MECH, _KEY = "session:session", "mechanism:mechanism", "key:key"
_CRYPT_INIT = f"{_S} {_MECH} {_KEY}"
_DATA_OUT = f"{_S} data out_len"

FUNCTIONS: Final[tuple[FunctionSpec, ...]] = (
    _f("initialize", "C_Initialize", "flags reserved", RV),
    _f("finalize", "C_Finalize", "", RV),
    _f("get_info", "C_GetInfo", "", STRUCT),
    _f("get_slot_list", "C_GetSlotList", "token_present count", LIST),
    _f("get_slot_info", "C_GetSlotInfo", "slot:slot", STRUCT),
    _f("get_token_info", "C_GetTokenInfo", "slot:slot", STRUCT),
    _f("wait_for_slot_event", "C_WaitForSlotEvent", "flags", HANDLE),
    _f("get_mechanism_list", "C_GetMechanismList", "slot:slot count", LIST),
    _f("get_mechanism_info", "C_GetMechanismInfo", "slot:slot mechanism:mechanism_type", STRUCT),
    _f("init_token", "C_InitToken", "slot:slot so_pin label", RV),
    _f("init_pin", "C_InitPIN", f"{_S} pin", RV),
    _f("set_pin", "C_SetPIN", f"{_S} old_pin new_pin", RV),
    _f("open_session", "C_OpenSession", "slot:slot flags:session_flags", HANDLE),
    _f("close_session", "C_CloseSession", _S, RV),
    _f("close_all_sessions", "C_CloseAllSessions", "slot:slot", RV),
    _f("get_session_info", "C_GetSessionInfo", _S, STRUCT),
    _f("get_operation_state", "C_GetOperationState", f"{_S} out_len", OUT),
    _f("set_operation_state", "C_SetOperationState",
       f"{_S} state encryption_key:state_key authentication_key:state_key", RV),
    _f("login", "C_Login", f"{_S} user_type:user_type pin", RV),
    _f("logout", "C_Logout", _S, RV),
    _f("create_object", "C_CreateObject", f"{_S} template:creation_template", HANDLE),
    _f("copy_object", "C_CopyObject", f"{_S} object:object template:creation_template", HANDLE),
    _f("destroy_object", "C_DestroyObject", f"{_S} object:object", RV),
    _f("get_object_size", "C_GetObjectSize", f"{_S} object:object", HANDLE),
    _f("get_attribute_value", "C_GetAttributeValue", f"{_S} object:object request", ATTRS),
    _f("set_attribute_value", "C_SetAttributeValue",
       f"{_S} object:object template:creation_template", RV),
    _f("find_objects_init", "C_FindObjectsInit", f"{_S} template:search_template", RV),
    _f("find_objects", "C_FindObjects", f"{_S} max_count", HANDLES),
    _f("find_objects_final", "C_FindObjectsFinal", _S, RV),
    _f("encrypt_init", "C_EncryptInit", _CRYPT_INIT, RV),
    _f("decrypt_init", "C_DecryptInit", _CRYPT_INIT, RV),
    _f("sign_init", "C_SignInit", _CRYPT_INIT, RV),
    _f("verify_init", "C_VerifyInit", _CRYPT_INIT, RV),
    _f("sign_recover_init", "C_SignRecoverInit", _CRYPT_INIT, RV),
    _f("verify_recover_init", "C_VerifyRecoverInit", _CRYPT_INIT, RV),
    _f("digest_init", "C_DigestInit", f"{_S} {_MECH}", RV),
    _f("encrypt", "C_Encrypt", _DATA_OUT, OUT),
    _f("encrypt_update", "C_EncryptUpdate", _DATA_OUT, OUT),
    _f("decrypt", "C_Decrypt", _DATA_OUT, OUT),
    _f("decrypt_update", "C_DecryptUpdate", _DATA_OUT, OUT),
    _f("digest", "C_Digest", _DATA_OUT, OUT),
    _f("sign", "C_Sign", _DATA_OUT, OUT),
    _f("sign_recover", "C_SignRecover", _DATA_OUT, OUT),
    _f("verify_recover", "C_VerifyRecover", _DATA_OUT, OUT),
    _f("digest_encrypt_update", "C_DigestEncryptUpdate", _DATA_OUT, OUT),
    _f("sign_encrypt_update", "C_SignEncryptUpdate", _DATA_OUT, OUT),
    _f("decrypt_digest_update", "C_DecryptDigestUpdate", _DATA_OUT, OUT),
    _f("decrypt_verify_update", "C_DecryptVerifyUpdate", _DATA_OUT, OUT),
    _f("encrypt_final", "C_EncryptFinal", f"{_S} out_len", OUT),
    _f("decrypt_final", "C_DecryptFinal", f"{_S} out_len", OUT),
    _f("digest_final", "C_DigestFinal", f"{_S} out_len", OUT),
    _f("sign_final", "C_SignFinal", f"{_S} out_len", OUT),
    _f("digest_update", "C_DigestUpdate", f"{_S} data", RV),
    _f("sign_update", "C_SignUpdate", f"{_S} data", RV),
    _f("verify_update", "C_VerifyUpdate", f"{_S} data", RV),
    _f("digest_key", "C_DigestKey", f"{_S} {_KEY}", RV),
    _f("verify", "C_Verify", f"{_S} data signature", RV),
    _f("verify_final", "C_VerifyFinal", f"{_S} signature", RV),
    _f("generate_key", "C_GenerateKey", f"{_S} {_MECH} template:creation_template", HANDLE),
    _f("generate_key_pair", "C_GenerateKeyPair",
       f"{_S} {_MECH} public_template:creation_template private_template:creation_template",
       PAIR),
    _f("wrap_key", "C_WrapKey",
       f"{_S} {_MECH} wrapping_key:wrapping_key {_KEY} out_len", OUT),
    _f("unwrap_key", "C_UnwrapKey",
       f"{_S} {_MECH} unwrapping_key:unwrapping_key wrapped template:creation_template",
       HANDLE),
    _f("derive_key", "C_DeriveKey",
       f"{_S} {_MECH} base_key:base_key template:creation_template", HANDLE),
    _f("seed_random", "C_SeedRandom", f"{_S} seed", RV),
    _f("generate_random", "C_GenerateRandom", f"{_S} length", RANDOM),
    _f("get_function_status", "C_GetFunctionStatus", _S, RV),
    _f("cancel_function", "C_CancelFunction", _S, RV),
    # PKCS#11 3.0: same roles, so every unit covers them.
    _f("login_user", "C_LoginUser", f"{_S} user_type:user_type pin username", RV),
    _f("session_cancel", "C_SessionCancel", f"{_S} flags", RV),
    # PKCS#11 3.0 message-based functions (protocol v4).  The Inits carry the
    # mechanism and the key; the per-message calls carry only a parameter.
    _f("message_encrypt_init", "C_MessageEncryptInit", _CRYPT_INIT, RV),
    _f("message_decrypt_init", "C_MessageDecryptInit", _CRYPT_INIT, RV),
    _f("message_sign_init", "C_MessageSignInit", _CRYPT_INIT, RV),
    _f("message_verify_init", "C_MessageVerifyInit", _CRYPT_INIT, RV),
    _f("message_encrypt_final", "C_MessageEncryptFinal", _S, RV),
    _f("message_decrypt_final", "C_MessageDecryptFinal", _S, RV),
    _f("message_sign_final", "C_MessageSignFinal", _S, RV),
    _f("message_verify_final", "C_MessageVerifyFinal", _S, RV),
    _f("encrypt_message", "C_EncryptMessage",
       f"{_S} parameter associated_data plaintext out_len", OUT),
    _f("decrypt_message", "C_DecryptMessage",
       f"{_S} parameter associated_data ciphertext out_len", OUT),
    _f("encrypt_message_begin", "C_EncryptMessageBegin",
       f"{_S} parameter associated_data", RV),
    _f("decrypt_message_begin", "C_DecryptMessageBegin",
       f"{_S} parameter associated_data", RV),
    _f("encrypt_message_next", "C_EncryptMessageNext",
       f"{_S} parameter plaintext out_len flags", OUT),
    _f("decrypt_message_next", "C_DecryptMessageNext",
       f"{_S} parameter ciphertext out_len flags", OUT),
    _f("sign_message", "C_SignMessage", f"{_S} parameter data out_len", OUT),
    _f("sign_message_begin", "C_SignMessageBegin", f"{_S} parameter", RV),
    _f("sign_message_next", "C_SignMessageNext", f"{_S} parameter data final out_len", OUT),
    _f("verify_message", "C_VerifyMessage", f"{_S} parameter data signature", RV),
    _f("verify_message_begin", "C_VerifyMessageBegin", f"{_S} parameter", RV),
    _f("verify_message_next", "C_VerifyMessageNext", f"{_S} parameter data signature", RV),
)

# get_attribute_value's request is PLAIN; the refusal needs its position.
BY_METHOD: Final[dict[str, FunctionSpec]] = {f.method: f for f in FUNCTIONS}
BY_FUNCTION: Final[dict[str, FunctionSpec]] = {f.function: f for f in FUNCTIONS}
FUNCTION_NAMES: Final[frozenset[str]] = frozenset(BY_FUNCTION)


class Done:
    """A unit's verdict "stop, and answer ``result``" (a full backend answer).

    Terminal patches (which make the backend call themselves) return this.
    """

    __slots__ = ("result",)

    def __init__(self, result: Any) -> None:
        self.result = result

    def __repr__(self) -> str:
        return f"Done({self.result!r})"


# What a unit or hook returns before the backend call: None (or "continue")
# goes on, an int stops the call with that rv, Done stops it with an answer.
Verdict = None | str | int | Done
CONTINUE: Final = "continue"


class Call:
    """One call going through the engine: the decoded arguments, by role and name.

    Units and hooks may read and rewrite arguments (``set``), e.g. the session
    flags of C_OpenSession.  ``state`` is the per-worker engine state (caches,
    backend access for attribute reads); see :class:`p11guard.policy.rules.base.EngineState`.
    """

    __slots__ = ("args", "notes", "spec", "state")

    def __init__(self, spec: FunctionSpec, args: list[Any], state: Any) -> None:
        self.spec = spec
        self.args = args
        self.state = state
        # Free-form per-call scratch space units can use to talk to their
        # ``after`` step (e.g. "flags were rewritten").
        self.notes: dict[str, Any] = {}

    @property
    def function(self) -> str:
        return self.spec.function

    @property
    def params(self) -> dict[str, Any]:
        """Arguments by parameter name (a copy)."""
        return {p.name: a for p, a in zip(self.spec.params, self.args, strict=False)}

    def get(self, name: str, default: Any = None) -> Any:
        for p, a in zip(self.spec.params, self.args, strict=False):
            if p.name == name:
                return a
        return default

    def set(self, name: str, value: Any) -> None:
        for i, p in enumerate(self.spec.params):
            if p.name == name:
                self.args[i] = value
                return
        raise KeyError(name)

    def role(self, role: str) -> Iterator[tuple[int, Any]]:
        """(position, value) of every argument with ``role``."""
        for i in self.spec.positions.get(role, ()):
            if i < len(self.args):
                yield i, self.args[i]

    def first(self, role: str, default: Any = None) -> Any:
        for _, value in self.role(role):
            return value
        return default

    @property
    def session(self) -> int | None:
        pos = self.spec.session_pos
        if pos is None or pos >= len(self.args):
            return None
        return int(self.args[pos])

    def __repr__(self) -> str:
        # Never the argument values: they may hold PINs or key material.
        return f"Call({self.function})"


Hook = Callable[[Call], Verdict]
