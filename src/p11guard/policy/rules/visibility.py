"""``allowed_labels`` / ``allowed_ids`` and the object-visibility stage.

An object is visible iff every hiding unit lets it through: its CKA_LABEL (raw
bytes) matches an allowed label pattern and its CKA_ID (lower-case hex)
matches an allowed id pattern (when those options apply to the module).  An
object whose label/id cannot be read is hidden, as in Caml Crush.

Strict everywhere (Caml Crush's bug B4): a hidden object is invisible in
*every* function, including C_GetAttributeValue and C_SetOperationState, and
never reaches the token: the call answers CKR_OBJECT_HANDLE_INVALID (or
CKR_WRAPPING_KEY_HANDLE_INVALID / CKR_UNWRAPPING_KEY_HANDLE_INVALID for the
wrapping / unwrapping key), so error codes reveal nothing about it.
C_FindObjects drops hidden handles and asks the token for more, so a caller
asking for N gets N visible handles while there are some.

Creation templates (CreateObject, CopyObject, SetAttributeValue, GenerateKey,
both GenerateKeyPair templates, UnwrapKey, DeriveKey) may only set an allowed
label/id: CKR_ATTRIBUTE_VALUE_INVALID otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from p11guard.pkcs11 import constants as c
from p11guard.policy.model import EffectivePolicy
from p11guard.policy.rules.base import (
    SESSION_ERRORS,
    STAGE_CREATION,
    STAGE_VISIBILITY,
    EngineState,
    Unit,
    refill_find_objects,
)
from p11guard.policy.rules.calls import (
    CREATION_TEMPLATE,
    HANDLE_ROLES,
    STATE_KEY,
    Call,
    FunctionSpec,
)

# C_FindObjects refill: stop after this many backend calls in one client call
# (a module that keeps answering "full" forever must not hang the worker).
MAX_REFILLS: Final = 100_000
# Memoised pattern verdicts per rule (bounded memory; Caml Crush's grows forever).
MAX_VERDICTS: Final = 4096


class _AttributeRule(Unit):
    """One allowed_* option: an attribute and a predicate on its value."""

    attribute: int = c.CKA_LABEL
    stage = STAGE_CREATION
    hides_objects = True

    def __init__(self, state: EngineState) -> None:
        super().__init__(state)
        state.cache.want(self.attribute)
        # Pattern verdicts by value: the policy is fixed, so they never go stale.
        self._verdicts: dict[bytes, bool] = {}

    def allowed(self, value: bytes) -> bool:
        raise NotImplementedError

    def allowed_cached(self, value: bytes) -> bool:
        verdict = self._verdicts.get(value)
        if verdict is None:
            verdict = self.allowed(value)
            if len(self._verdicts) >= MAX_VERDICTS:
                self._verdicts.clear()
            self._verdicts[value] = verdict
        return verdict

    def applies(self, spec: FunctionSpec) -> bool:
        return spec.has(CREATION_TEMPLATE)

    def check(self, call: Call) -> int | None:
        for _, template in call.role(CREATION_TEMPLATE):
            for attr_type, value in template:
                if attr_type == self.attribute and not (
                        isinstance(value, bytes) and self.allowed_cached(value)):
                    return c.CKR_ATTRIBUTE_VALUE_INVALID
        return None

    def hidden(self, call: Call, handle: int) -> int | None:
        session = call.session
        if session is None:
            return c.CKR_OBJECT_HANDLE_INVALID
        rv, attrs = self.state.attributes(session, handle)
        if rv != c.CKR_OK:
            return rv if rv in SESSION_ERRORS else c.CKR_OBJECT_HANDLE_INVALID
        value = attrs.get(self.attribute)
        if value is None or not self.allowed_cached(value):
            return c.CKR_OBJECT_HANDLE_INVALID
        return None


class AllowedLabels(_AttributeRule):
    name = "allowed_labels"
    attribute = c.CKA_LABEL

    @classmethod
    def active(cls, policy: EffectivePolicy) -> bool:
        return policy.allowed_labels is not None

    def allowed(self, value: bytes) -> bool:
        return self.state.policy.label_allowed(value)


class AllowedIds(_AttributeRule):
    name = "allowed_ids"
    attribute = c.CKA_ID

    @classmethod
    def active(cls, policy: EffectivePolicy) -> bool:
        return policy.allowed_ids is not None

    def allowed(self, value: bytes) -> bool:
        return self.state.policy.id_allowed(value)


class ObjectVisibility(Unit):
    """Stage 30: asks every hiding unit about every input handle; filters FindObjects."""

    name = "object_visibility"
    stage = STAGE_VISIBILITY
    has_after = True

    def __init__(self, state: EngineState, hiders: Sequence[Unit]) -> None:
        super().__init__(state)
        self.hiders = tuple(hiders)
        # Per function: (position, rv for a hidden object there, 0 means "none").
        self._plans: dict[str, tuple[tuple[int, int, bool], ...]] = {}

    def applies(self, spec: FunctionSpec) -> bool:
        if not self.hiders:
            return False
        self._plans[spec.function] = tuple(
            (pos, role_rv, role == STATE_KEY)
            for role, role_rv in HANDLE_ROLES.items() for pos in spec.positions.get(role, ()))
        return bool(self._plans[spec.function]) or spec.method == "find_objects"

    def wants_after(self, spec: FunctionSpec) -> bool:
        return spec.method == "find_objects"

    def _hidden(self, call: Call, handle: int) -> tuple[int, str] | None:
        for unit in self.hiders:
            rv = unit.hidden(call, handle)
            if rv is not None:
                return rv, unit.label
        return None

    def check(self, call: Call) -> int | None:
        args = call.args
        for pos, role_rv, optional in self._plans.get(call.function, ()):
            handle = int(args[pos])
            if optional and handle == 0:
                continue  # CK_INVALID_HANDLE: "no key" for SetOperationState
            found = self._hidden(call, handle)
            if found is not None:
                rv, rule = found
                if rv == c.CKR_OBJECT_HANDLE_INVALID:
                    rv = role_rv
                call.notes["blocked_by"] = rule
                return rv
        return None

    def after(self, call: Call, result: Any) -> Any:
        if call.spec.method != "find_objects":
            return result
        return refill_find_objects(
            self.state, call, result, lambda _session, h: self._hidden(call, h) is not None,
            rule="object_visibility", note="{n} hidden handle(s) dropped",
            max_refills=MAX_REFILLS)
