"""Engine bookkeeping after a call: the session -> slot map and cache invalidation.

Not an option: always on whenever some unit reads object attributes.  Runs
only for calls that reached the token.
"""

from __future__ import annotations

from typing import Any, Final

from p11guard.pkcs11 import constants as c
from p11guard.policy.rules.base import STAGE_BOOKKEEPING, Unit
from p11guard.policy.rules.calls import Call, FunctionSpec

# Calls after which no cached attribute can be trusted.
CLEAR_ALL: Final = frozenset({
    "C_Initialize", "C_Finalize", "C_CloseSession", "C_CloseAllSessions",
    "C_Login", "C_LoginUser", "C_Logout", "C_InitToken",
})
# Calls that change (or remove) the object they name.
CHANGES_OBJECT: Final = frozenset({"C_SetAttributeValue", "C_DestroyObject"})
_WATCHED: Final = CLEAR_ALL | CHANGES_OBJECT | {"C_OpenSession"}


class Bookkeeping(Unit):
    name = "bookkeeping"
    stage = STAGE_BOOKKEEPING
    has_after = True

    def applies(self, spec: FunctionSpec) -> bool:
        return spec.function in _WATCHED

    def after(self, call: Call, result: Any) -> Any:
        fn = call.function
        state = self.state
        if fn == "C_OpenSession":
            rv, handle = result
            if rv == c.CKR_OK:
                state.sessions[int(handle)] = int(call.args[0])
            return result
        if fn in CHANGES_OBJECT:
            # Whatever the rv: a module may have applied part of a template.
            state.cache.invalidate(int(call.args[1]))
            return result
        state.cache.clear()
        if fn == "C_CloseSession":
            state.sessions.pop(int(call.args[0]), None)
        elif fn == "C_CloseAllSessions":
            slot = int(call.args[0])
            for session in [s for s, sl in list(state.sessions.items()) if sl == slot]:
                state.sessions.pop(session, None)
        elif fn in ("C_Finalize", "C_Initialize"):
            state.sessions.clear()
        return result
