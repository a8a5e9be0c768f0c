"""``forbidden_functions``: listed functions answer CKR_FUNCTION_NOT_SUPPORTED.

Runs after the pre hooks (as in Caml Crush, so a pre hook can still answer).
A PKCS#11 3.0 function with the same role as a listed 2.40 one is forbidden
with it (C_Login also forbids C_LoginUser): a client must not get around the
rule by speaking the newer interface.
"""

from __future__ import annotations

from typing import Final

from p11guard.pkcs11 import constants as c
from p11guard.policy.model import EffectivePolicy
from p11guard.policy.rules.base import STAGE_FORBIDDEN_FUNCTIONS, Unit
from p11guard.policy.rules.calls import Call, FunctionSpec

# 2.40 name -> 3.0 functions that do the same thing.
EQUIVALENTS: Final[dict[str, frozenset[str]]] = {
    "C_Login": frozenset({"C_LoginUser"}),
    "C_CancelFunction": frozenset({"C_SessionCancel"}),
}


def forbidden_set(policy: EffectivePolicy) -> frozenset[str]:
    names = set(policy.forbidden_functions)
    for name in policy.forbidden_functions:
        names |= EQUIVALENTS.get(name, frozenset())
    return frozenset(names)


class ForbiddenFunctions(Unit):
    name = "forbidden_functions"
    stage = STAGE_FORBIDDEN_FUNCTIONS

    @classmethod
    def active(cls, policy: EffectivePolicy) -> bool:
        return bool(policy.forbidden_functions)

    def applies(self, spec: FunctionSpec) -> bool:
        return spec.function in forbidden_set(self.state.policy)

    def check(self, call: Call) -> int:
        return c.CKR_FUNCTION_NOT_SUPPORTED
