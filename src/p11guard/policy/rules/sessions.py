"""``enforce_ro_sessions``: C_OpenSession silently loses CKF_RW_SESSION.

The token then refuses token-object writes (CKR_SESSION_READ_ONLY) and SO
login (CKR_SESSION_READ_ONLY_EXISTS); session objects remain possible.  Same
as Caml Crush.
"""

from __future__ import annotations

from p11guard.pkcs11 import constants as c
from p11guard.policy.model import EffectivePolicy
from p11guard.policy.rules.base import STAGE_SESSION, Unit
from p11guard.policy.rules.calls import SESSION_FLAGS, Call, FunctionSpec


class EnforceReadOnlySessions(Unit):
    name = "enforce_ro_sessions"
    stage = STAGE_SESSION

    @classmethod
    def active(cls, policy: EffectivePolicy) -> bool:
        return policy.enforce_ro_sessions

    def applies(self, spec: FunctionSpec) -> bool:
        return spec.has(SESSION_FLAGS)

    def check(self, call: Call) -> None:
        for pos, flags in call.role(SESSION_FLAGS):
            if int(flags) & c.CKF_RW_SESSION:
                call.args[pos] = int(flags) & ~c.CKF_RW_SESSION
                self.state.audit.rewrite(call.function, self.name, "CKF_RW_SESSION cleared")
        return None
