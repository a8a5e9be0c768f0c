"""``forbid_admin_operations``: no Security Officer work through the proxy.

* C_Login / C_LoginUser as CKU_SO -> CKR_USER_TYPE_INVALID (as Caml Crush);
* C_InitToken (takes the SO PIN directly: a PIN-guessing oracle and a
  token-wipe primitive), C_InitPIN, and C_SetPIN in an SO session ->
  CKR_FUNCTION_NOT_SUPPORTED.  Caml Crush lets these through (bug B11).

Caml Crush also refuses CKU_CONTEXT_SPECIFIC, which breaks keys with
CKA_ALWAYS_AUTHENTICATE and protects nothing (the user re-enters the *user*
PIN): p11guard allows it in ``strict`` mode and refuses it in ``compat`` mode.
"""

from __future__ import annotations

from typing import Final

from p11guard.pkcs11 import constants as c
from p11guard.policy.model import EffectivePolicy
from p11guard.policy.rules.base import STAGE_SESSION, Unit
from p11guard.policy.rules.calls import USER_TYPE, Call, FunctionSpec

ADMIN_FUNCTIONS: Final = frozenset({"C_InitToken", "C_InitPIN"})


class ForbidAdminOperations(Unit):
    name = "forbid_admin_operations"
    stage = STAGE_SESSION

    @classmethod
    def active(cls, policy: EffectivePolicy) -> bool:
        return policy.forbid_admin_operations

    def applies(self, spec: FunctionSpec) -> bool:
        return spec.has(USER_TYPE) or spec.function in ADMIN_FUNCTIONS or (
            spec.function == "C_SetPIN")

    def check(self, call: Call) -> int | None:
        fn = call.function
        if fn in ADMIN_FUNCTIONS:
            return c.CKR_FUNCTION_NOT_SUPPORTED
        if fn == "C_SetPIN":
            session = call.session
            rv, info = self.state.backend.get_session_info(session)
            if rv != c.CKR_OK:
                return int(rv)  # the token would have said the same about the session
            if info is not None and info.state == c.CKS_RW_SO_FUNCTIONS:
                return c.CKR_FUNCTION_NOT_SUPPORTED
            return None
        user_type = int(call.first(USER_TYPE))
        if user_type == c.CKU_SO:
            return c.CKR_USER_TYPE_INVALID
        if user_type == c.CKU_CONTEXT_SPECIFIC and self.state.policy.mode == "compat":
            return c.CKR_USER_TYPE_INVALID
        return None
