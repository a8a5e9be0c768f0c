"""``forbidden_mechanisms``: a listed mechanism does not exist for the client.

* every function taking a mechanism (crypto Inits, DigestInit, GenerateKey(Pair),
  WrapKey, UnwrapKey, DeriveKey) -> CKR_MECHANISM_INVALID;
* C_GetMechanismInfo -> CKR_MECHANISM_INVALID;
* C_GetMechanismList: the mechanisms are removed and the count follows the
  filtered list, keeping the size-query contract (NULL list -> CKR_OK and the
  filtered count; too small -> CKR_BUFFER_TOO_SMALL and the filtered count).
"""

from __future__ import annotations

from typing import Any, Final

from p11guard.pkcs11 import constants as c
from p11guard.policy.model import EffectivePolicy
from p11guard.policy.rules.base import STAGE_MECHANISMS, EngineState, Unit
from p11guard.policy.rules.calls import MECHANISM, MECHANISM_TYPE, Call, FunctionSpec

# Upper bound on a mechanism list we accept from a module.
MAX_MECHANISMS: Final = 65536


class ForbiddenMechanisms(Unit):
    name = "forbidden_mechanisms"
    stage = STAGE_MECHANISMS
    has_after = True

    def __init__(self, state: EngineState) -> None:
        super().__init__(state)
        self._forbidden = state.policy.forbidden_mechanisms
        # Per function: positions of (mechanism, bare mechanism type) arguments.
        self._plans: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    @classmethod
    def active(cls, policy: EffectivePolicy) -> bool:
        return bool(policy.forbidden_mechanisms)

    def applies(self, spec: FunctionSpec) -> bool:
        self._plans[spec.function] = (spec.positions.get(MECHANISM, ()),
                                      spec.positions.get(MECHANISM_TYPE, ()))
        return (spec.has(MECHANISM) or spec.has(MECHANISM_TYPE)
                or spec.method == "get_mechanism_list")

    def wants_after(self, spec: FunctionSpec) -> bool:
        return spec.method == "get_mechanism_list"

    def check(self, call: Call) -> int | None:
        mechs, types = self._plans[call.function]
        args = call.args
        for pos in mechs:
            mech = args[pos]
            if mech is not None and int(mech[0]) in self._forbidden:
                return c.CKR_MECHANISM_INVALID
        for pos in types:
            if int(args[pos]) in self._forbidden:
                return c.CKR_MECHANISM_INVALID
        return None

    def after(self, call: Call, result: Any) -> Any:
        if call.spec.method != "get_mechanism_list":
            return result
        rv, _items, _count = result
        if rv not in (c.CKR_OK, c.CKR_BUFFER_TOO_SMALL):
            return result
        slot, wanted = call.args[0], call.args[1]
        full = self._full_list(slot)
        if isinstance(full, int):
            return (full, [], 0)
        forbidden = self.state.policy.forbidden_mechanisms
        kept = [m for m in full if m not in forbidden]
        if len(kept) != len(full):
            self.state.audit.rewrite(call.function, self.name,
                                     f"{len(full) - len(kept)} mechanism(s) removed")
        if wanted is None:
            return (c.CKR_OK, [], len(kept))
        if wanted < len(kept):
            return (c.CKR_BUFFER_TOO_SMALL, [], len(kept))
        return (c.CKR_OK, kept, len(kept))

    def _full_list(self, slot: int) -> list[int] | int:
        """The module's whole list, or an rv.  Retries if it grows meanwhile."""
        backend = self.state.backend
        rv, _, needed = backend.get_mechanism_list(slot, None)
        for _attempt in range(3):
            if rv != c.CKR_OK:
                return int(rv)
            if needed > MAX_MECHANISMS:
                return c.CKR_GENERAL_ERROR
            rv, items, got = backend.get_mechanism_list(slot, needed)
            if rv == c.CKR_OK:
                return [int(m) for m in items]
            if rv == c.CKR_BUFFER_TOO_SMALL:
                rv, needed = c.CKR_OK, got
        return c.CKR_GENERAL_ERROR
