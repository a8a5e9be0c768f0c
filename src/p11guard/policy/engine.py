"""The policy engine: wraps a loaded module so every call goes through the policy.

``wrap_module`` (called by the dispatcher right after C_LoadModule) returns an
object with exactly the methods of :class:`p11guard.pkcs11.binding.Module`.
For each function it precomputes, once, the units that apply to it
(``rules/calls.py`` says which arguments have which role; each unit says which
roles it acts on).  A function no unit cares about is the backend's own
method: pass-through costs nothing.

Order of units (docs/ARCHITECTURE.md, "Policy engine: order of units"):

  0 canonical booleans -> 10 pre actions -> 20 forbidden_functions ->
  30 object visibility (allowed_labels/allowed_ids on input handles) ->
  40 forbidden_mechanisms -> 50 remove_padding_oracles ->
  60 label/id of creation templates -> 70 enforce_ro_sessions,
  forbid_admin_operations -> 80 post actions (patches) -> backend ->
  ``after`` steps (FindObjects / mechanism-list filtering, cache bookkeeping).

The first unit that refuses decides the CK_RV.  A unit or backend that raises
turns into CKR_GENERAL_ERROR for that call (audited), never a dead worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from p11guard.pkcs11 import constants as c
from p11guard.policy import presets
from p11guard.policy.audit import Auditor
from p11guard.policy.hooks import (
    ActionNotAvailable,
    ActionUnit,
    action_units,
    check_actions,
    resolve_action,
)
from p11guard.policy.model import ConfigError, EffectivePolicy, Policy, UnknownAliasError
from p11guard.policy.objcache import ObjectCache
from p11guard.policy.rules.admin import ForbidAdminOperations
from p11guard.policy.rules.base import EngineState, Unit
from p11guard.policy.rules.bookkeeping import Bookkeeping
from p11guard.policy.rules.booleans import CanonicalBooleans
from p11guard.policy.rules.calls import (
    ATTRS,
    BY_FUNCTION,
    FUNCTIONS,
    HANDLE,
    HANDLES,
    LIST,
    OUT,
    PAIR,
    RANDOM,
    RV,
    STRUCT,
    Call,
    Done,
    FunctionSpec,
)
from p11guard.policy.rules.functions import ForbiddenFunctions
from p11guard.policy.rules.mechanisms import ForbiddenMechanisms
from p11guard.policy.rules.padding import RemovePaddingOracles
from p11guard.policy.rules.sessions import EnforceReadOnlySessions
from p11guard.policy.rules.visibility import AllowedIds, AllowedLabels, ObjectVisibility

log = logging.getLogger("p11guard.policy")

# The built-in option units, in stage order (ties keep this order).
BUILTIN_UNITS: Final[tuple[type[Unit], ...]] = (
    CanonicalBooleans,
    ForbiddenFunctions,
    AllowedLabels,
    AllowedIds,
    ForbiddenMechanisms,
    RemovePaddingOracles,
    EnforceReadOnlySessions,
    ForbidAdminOperations,
)

# Built-in rule sets a policy's ``preset`` adds: preset -> [(C function, action)]
# as post actions (the CryptokiX patchsets, ``policy/presets.py``).  An empty
# or missing entry means the preset is not implemented (a start-up warning).
PRESET_ACTIONS: dict[str, tuple[tuple[str, str], ...]] = dict(presets.PRESETS)

_TUPLE_LEN: Final[dict[str, int]] = {
    STRUCT: 2, LIST: 3, HANDLE: 2, PAIR: 3, OUT: 3, ATTRS: 2, HANDLES: 2, RANDOM: 2,
}


@dataclass(frozen=True, slots=True)
class EngineContext:
    """Who is calling: for the audit log and identity-based rules."""

    peer: str
    pid: int


def _shape_ok(spec: FunctionSpec, result: Any) -> bool:
    """Does a terminal unit's answer have the backend's shape for ``spec``?"""
    if spec.shape == RV:
        return isinstance(result, int) and not isinstance(result, bool)
    return (isinstance(result, tuple) and len(result) == _TUPLE_LEN[spec.shape]
            and isinstance(result[0], int))


class PolicyModule:
    """The loaded module seen through the policy (same methods as ``binding.Module``)."""

    def __init__(self, backend: Any, state: EngineState | None, units: Sequence[Unit]) -> None:
        self._backend = backend
        self._state = state
        ordered = sorted(units, key=lambda u: u.stage)  # stable: ties keep given order
        self.units: tuple[Unit, ...] = tuple(ordered)
        self.pipelines: dict[str, tuple[Unit, ...]] = {}
        for spec in FUNCTIONS:
            pipeline = tuple(u for u in ordered if u.applies(spec))
            self.pipelines[spec.function] = pipeline
            if not pipeline:
                setattr(self, spec.method, getattr(backend, spec.method))
            else:
                setattr(self, spec.method, self._wrap(spec, pipeline))

    if TYPE_CHECKING:  # the PKCS#11 methods are set per instance, from the table
        def __getattr__(self, name: str) -> Any: ...

    # -- housekeeping the dispatcher and tools may use --------------------------

    @property
    def path(self) -> str:
        return str(self._backend.path)

    @property
    def version(self) -> Any:
        return self._backend.version

    @property
    def interface_30(self) -> bool:
        return bool(self._backend.interface_30)

    @property
    def state(self) -> EngineState | None:
        return self._state

    def has(self, name: str) -> bool:
        return bool(self._backend.has(name))

    def raw_function(self, name: str) -> Any:
        """Always None: a raw C pointer would bypass the policy."""
        return None

    def fast_path_functions(self) -> tuple[int, frozenset[str]] | None:
        """The backend's function-list address and those of its functions that no
        unit of the policy acts on: the worker's C fast path may call exactly
        these directly (their method here *is* the backend's)."""
        backend = getattr(self._backend, "fast_path_functions", None)
        found = backend() if backend is not None else None
        if found is None:
            return None
        address, available = found
        return address, frozenset(
            name for name in available if name in self.pipelines
            and all(unit.fast_path_checked for unit in self.pipelines[name]))

    def close(self) -> None:
        self._backend.close()

    # -- the per-function pipeline ------------------------------------------------

    def _wrap(self, spec: FunctionSpec, pipeline: tuple[Unit, ...]) -> Callable[..., Any]:
        assert self._state is not None
        state = self._state
        audit = state.audit
        function = spec.function
        backend_method = getattr(self._backend, spec.method)
        checks = tuple(u for u in pipeline if type(u).check is not Unit.check)
        afters = tuple(u for u in pipeline if u.wants_after(spec))
        check_names = ",".join(u.label for u in checks)
        verbose = audit.verbose  # fixed for the worker's life

        def refuse(unit: Unit, call: Call, exc: BaseException) -> Any:
            # Only the exception's type: its text might quote an argument (a PIN).
            audit.error(function, unit.label, c.CKR_GENERAL_ERROR, type(exc).__name__)
            log.debug("%s: unit %s raised %s", function, unit.label, type(exc).__name__)
            return spec.refusal(c.CKR_GENERAL_ERROR, call.args)

        def method(*args: Any) -> Any:
            call = Call(spec, list(args), state)
            for unit in checks:
                try:
                    verdict = unit.check(call)
                except Exception as exc:
                    return refuse(unit, call, exc)
                if verdict is None:
                    continue
                if isinstance(verdict, Done):
                    if not _shape_ok(spec, verdict.result):
                        return refuse(unit, call, TypeError("answer of the wrong shape"))
                    rv = spec.rv_of(verdict.result)
                    if rv != c.CKR_OK:
                        audit.block(function, unit.label, rv)
                    else:
                        audit.allow(function, unit.label, "answered by the unit")
                    return verdict.result
                if not isinstance(verdict, int) or isinstance(verdict, bool):
                    return refuse(unit, call, TypeError("bad verdict"))
                audit.block(function, call.notes.pop("blocked_by", unit.label), verdict)
                return spec.refusal(verdict, call.args)
            if verbose and checks:
                audit.allow(function, check_names)
            try:
                result = backend_method(*call.args)
            except Exception as exc:
                # cffi OverflowError on an argument a hook rewrote, a module
                # answering garbage...: a CK_RV, not a dead worker.
                audit.error(function, "backend", c.CKR_GENERAL_ERROR, type(exc).__name__)
                return spec.refusal(c.CKR_GENERAL_ERROR, call.args)
            for unit in afters:
                try:
                    result = unit.after(call, result)
                except Exception as exc:
                    return refuse(unit, call, exc)
            return result

        method.__name__ = method.__qualname__ = spec.method
        return method


class DeniedModule:
    """Every call refused with CKR_GENERAL_ERROR: the policy could not be applied.

    Fail closed: a configuration the engine cannot honour must not turn into
    pass-through.
    """

    def __init__(self, backend: Any, reason: str) -> None:
        self._backend = backend
        self.reason = reason
        for spec in FUNCTIONS:
            setattr(self, spec.method, self._refuse(spec))

    if TYPE_CHECKING:  # the PKCS#11 methods are set per instance, from the table
        def __getattr__(self, name: str) -> Any: ...

    @staticmethod
    def _refuse(spec: FunctionSpec) -> Callable[..., Any]:
        def method(*args: Any) -> Any:
            return spec.refusal(c.CKR_GENERAL_ERROR, args)

        return method

    def has(self, name: str) -> bool:
        return False

    def raw_function(self, name: str) -> Any:
        return None

    def close(self) -> None:
        self._backend.close()


def resolve_effective(policy: Policy, alias: str) -> EffectivePolicy:
    """The effective policy for the name a client loaded.

    Strict mode: the name must *be* a configured alias (no pattern can lead a
    client to another alias's module without that alias's rules, bug B5).
    Compat mode: Caml Crush's matching, rules matched against the client's name.
    """
    if policy.mode == "strict" and not any(m.alias == alias for m in policy.modules):
        raise UnknownAliasError(alias)
    return policy.for_alias(alias)


def build_units(state: EngineState) -> list[Unit]:
    """The units of a module: built-in options that are on, the configured
    actions, then the engine's own visibility and bookkeeping units."""
    # Wrapping formats and key of the CryptokiX wrapping_format_patch.
    presets.configure(state)
    units: list[Unit] = [cls(state) for cls in BUILTIN_UNITS if cls.active(state.policy)]
    units.extend(action_units(state))
    # The preset's patches come after the configured post actions.
    for function, action in presets.preset_actions(state.policy, PRESET_ACTIONS):
        if function in BY_FUNCTION:
            units.append(ActionUnit(state, action, function, resolve_action(action), post=True))
    hiders = [u for u in units if u.hides_objects]
    units.append(ObjectVisibility(state, hiders))
    # Session and object-cache bookkeeping serves the other units; with none (a
    # pass-through policy) every function stays the backend's own method, which
    # also lets the worker's C fast path serve OpenSession/CloseSession/Logout.
    if any(u.needs_bookkeeping and u.applies(spec) for u in units for spec in FUNCTIONS):
        units.append(Bookkeeping(state))
    return units


def wrap_module(module: Any, policy: Policy, alias: str, context: EngineContext) -> Any:
    """Return an object with the module's methods that applies ``policy`` for ``alias``."""
    try:
        effective = resolve_effective(policy, alias)
    except UnknownAliasError:
        Auditor(peer=context.peer, pid=context.pid, alias=alias).block(
            "C_LoadModule", "modules", c.CKR_GENERAL_ERROR, "alias is not configured exactly")
        return DeniedModule(module, f"alias {alias!r} is not configured")
    auditor = Auditor(peer=context.peer, pid=context.pid, alias=alias, debug=effective.debug,
                      subchannel=effective.log_subchannel)
    state = EngineState(backend=module, policy=effective, audit=auditor,
                        cache=ObjectCache(module))
    try:
        units = build_units(state)
    except ActionNotAvailable as exc:
        # check_startup() refuses such a policy; this is defence in depth.
        auditor.error("C_LoadModule", "filter_actions", c.CKR_GENERAL_ERROR, str(exc))
        return DeniedModule(module, str(exc))
    if effective.debug >= 3:
        auditor.info("C_LoadModule", "debug", repr(effective))
    return PolicyModule(module, state, units)


def check_startup(policy: Policy, *, create_key: bool = True
                  ) -> tuple[list[ConfigError], list[str]]:
    """(errors, warnings) the server must act on before it accepts a client.

    Errors: actions that resolve to nothing (an unimplemented patch included),
    a wrapping-format key that cannot be read or created.
    Warnings: a preset not implemented yet, compat mode's known weaknesses.

    Side effect: loads the per-installation wrapping key (creating it, 0600, on
    first start) when the policy needs one (``presets.prepare``); the
    listener calls this before dropping privileges and workers inherit it.
    ``create_key=False`` (check-config) only checks an existing key file.
    """
    errors = check_actions(policy)
    warnings: list[str] = []
    source = policy.source or "policy"
    key_errors, notices = presets.prepare(policy, create=create_key)
    errors.extend(ConfigError(e, file=policy.source or None, option="wrapping_format_key")
                  for e in key_errors)
    for notice in notices:
        log.info("%s: %s", source, notice)
    if policy.preset is not None and not PRESET_ACTIONS.get(policy.preset):
        warnings.append(f"{source}: preset: {policy.preset!r} is not implemented in this "
                        "version: no CryptokiX patch is applied")
    if policy.mode == "compat":
        warnings.append(f"{source}: mode: 'compat' matches aliases, labels and ids like Caml "
                        "Crush, including its weaknesses (newline and alias-pattern bypasses)")
    return errors, warnings
