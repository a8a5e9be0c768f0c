"""Use-time patches: checks on a key each time it is used.

* ``conflicting_attributes_patch_on_existing_objects`` (patchset 1 and 2):
  a key whose own attributes conflict (reference §7.2 pairs) cannot be used;
  in strict mode also a public/private RSA or EC key whose *other half*
  completes a conflicting pair (wrap with the public key, decrypt with the
  private one: Caml Crush's bug B2).
* ``dangerous_sensitive_keys_paranoid`` / ``_escrow_encrypt`` / ``_escrow_all``
  (patchset 1 and 2): a key that is sensitive now but was not always
  (SENSITIVE=TRUE, ALWAYS_SENSITIVE=FALSE) may have leaked before it was
  protected.

Both refuse with CKR_OBJECT_HANDLE_INVALID (Caml Crush's code) and hide the
keys they refuse from C_FindObjects.
"""

from __future__ import annotations

from typing import Any, Final

from p11guard.pkcs11 import constants as c
from p11guard.policy.patches.common import (
    Patch,
    View,
    conflict,
    pair_conflict,
    pairs,
    prune_find_objects,
    read,
    segregated,
    strict,
)
from p11guard.policy.rules.base import EngineState
from p11guard.policy.rules.calls import (
    BASE_KEY,
    KEY,
    UNWRAPPING_KEY,
    WRAPPING_KEY,
    Call,
    FunctionSpec,
)

CRYPTO_INITS: Final = frozenset({
    "C_EncryptInit", "C_DecryptInit", "C_SignInit", "C_SignRecoverInit", "C_VerifyInit",
    "C_VerifyRecoverInit", "C_MessageEncryptInit", "C_MessageDecryptInit",
    "C_MessageSignInit", "C_MessageVerifyInit",
})
USE_FUNCTIONS: Final = CRYPTO_INITS | {
    "C_DigestKey", "C_DeriveKey", "C_WrapKey", "C_UnwrapKey", "C_FindObjects"}
_KEY_ROLES: Final = (KEY, WRAPPING_KEY, UNWRAPPING_KEY, BASE_KEY)
# Strict key-pair check: (function, role) pairs where a public key encrypts
# or wraps, or a private key decrypts or unwraps.
_PAIR_USES: Final = frozenset({
    ("C_EncryptInit", KEY), ("C_MessageEncryptInit", KEY), ("C_WrapKey", WRAPPING_KEY),
    ("C_DecryptInit", KEY), ("C_MessageDecryptInit", KEY), ("C_UnwrapKey", UNWRAPPING_KEY),
})


class _UseTime(Patch):
    functions = USE_FUNCTIONS
    after_functions = frozenset({"C_FindObjects"})
    has_after = True

    def __init__(self, state: EngineState) -> None:
        super().__init__(state)
        self._plans: dict[str, tuple[tuple[int, str], ...]] = {}
        self._memo: dict[int, tuple[View, bool, str | None]] = {}

    def refused(self, call: Call, session: int, handle: int, role: str) -> str | None:
        """Why the key may not be used here, or None."""
        rv, view = read(self.state, session, handle)
        if rv != c.CKR_OK:
            return "attributes unreadable"
        # The verdict on a key's own attributes is memoised with its decoded
        # view (the same object while the attribute cache holds the key): the
        # hot path of C_SignInit is two dict look-ups.
        memo = self._memo.get(handle)
        if memo is not None and memo[0] is view and memo[1] == segregated(self.state):
            why = memo[2]
        else:
            why = self.judge(view)
            if len(self._memo) >= 4096:
                self._memo.clear()
            self._memo[handle] = (view, segregated(self.state), why)
        if why is None and role:
            why = self.judge_use(call, session, handle, role, view)
        return why

    def judge(self, view: View) -> str | None:
        raise NotImplementedError

    def judge_use(self, call: Call, session: int, handle: int, role: str,
                  view: View) -> str | None:
        return None

    def applies(self, spec: FunctionSpec) -> bool:
        if not super().applies(spec):
            return False
        self._plans[spec.function] = tuple(
            (pos, role) for role in _KEY_ROLES for pos in spec.positions.get(role, ()))
        return True

    def check(self, call: Call) -> int | None:
        session = call.session
        if session is None:
            return None
        args = call.args
        for pos, role in self._plans.get(call.function, ()):
            why = self.refused(call, session, int(args[pos]), role)
            if why is not None:
                return self.block(call, c.CKR_OBJECT_HANDLE_INVALID, why)
        return None

    def after(self, call: Call, result: Any) -> Any:
        if call.function != "C_FindObjects":
            return result
        return prune_find_objects(
            self, call, result,
            lambda s, h: self.refused(call, s, h, "") is not None)


class ConflictingOnExisting(_UseTime):
    name = "conflicting_attributes_patch_on_existing_objects"

    def judge(self, view: View) -> str | None:
        return "key in attribute conflict" if conflict(view, pairs(self.state)) else None

    def judge_use(self, call: Call, session: int, handle: int, role: str,
                  view: View) -> str | None:
        if strict(self.state) and (call.function, role) in _PAIR_USES:
            found = pair_conflict(self.state, session, handle, view)
            if found is not None:
                return ("key pair in attribute conflict (other half)" if found == -1
                        else "key pair look-up failed")
        return None


def dangerous(view: View) -> bool:
    return view.get(c.CKA_SENSITIVE) is True and view.get(c.CKA_ALWAYS_SENSITIVE) is False


class DangerousParanoid(_UseTime):
    """Every key that was once not sensitive is refused."""

    name = "dangerous_sensitive_keys_paranoid"

    def allowed_dangerous(self, view: View) -> bool:
        return False

    def judge(self, view: View) -> str | None:
        if dangerous(view) and not self.allowed_dangerous(view):
            return "sensitive key that was not always sensitive"
        return None


class DangerousEscrowAll(DangerousParanoid):
    """Imported (non-local) keys may have been known outside anyway: allowed."""

    name = "dangerous_sensitive_keys_escrow_all"

    def allowed_dangerous(self, view: View) -> bool:
        return view.get(c.CKA_LOCAL) is False


class DangerousEscrowEncrypt(DangerousParanoid):
    """Imported keys allowed only for encryption/decryption (escrowed data keys)."""

    name = "dangerous_sensitive_keys_escrow_encrypt"

    def allowed_dangerous(self, view: View) -> bool:
        return view.get(c.CKA_LOCAL) is False and (
            view.get(c.CKA_ENCRYPT) is True or view.get(c.CKA_DECRYPT) is True)
