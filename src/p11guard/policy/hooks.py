"""``filter_actions_pre`` / ``filter_actions_post``: actions, hooks and patches.

An action name in a policy is resolved, in this order, to:

1. a registered action (``register_action``): Caml Crush's demo actions
   (``identity``, ``c_Initialize_hook``, ``c_Login_hook``) and, once they
   exist, the CryptokiX patches;
2. ``package.module:function`` -- a Python callable imported by path;
3. a name of the entry-point group ``p11guard.filter_actions``.

A resolved object is either a *hook*, a callable ``hook(call: Call) ->
Verdict`` (None or "continue" to go on, an int CK_RV to refuse, ``Done(answer)``
to answer), or a :class:`~p11guard.policy.rules.base.Unit` subclass (a patch:
pre/post checks, ``after`` filtering, backend access, per-worker state).

A name that resolves to nothing -- including a Caml Crush patch this version
does not implement -- is a configuration error at start-up, never silently
ignored.
"""

from __future__ import annotations

import hmac
import importlib
import importlib.metadata
from collections.abc import Callable
from typing import Any, Final

from p11guard.pkcs11 import constants as c
from p11guard.policy.model import ConfigError, Policy, Rule
from p11guard.policy.readers.names import PATCH_ACTIONS
from p11guard.policy.rules.base import STAGE_POST_HOOKS, STAGE_PRE_HOOKS, EngineState, Unit
from p11guard.policy.rules.calls import (
    BY_FUNCTION,
    CONTINUE,
    Call,
    Done,
    FunctionSpec,
    Hook,
    Verdict,
)

ENTRY_POINT_GROUP: Final = "p11guard.filter_actions"

# name -> a hook callable or a Unit subclass.
Action = Hook | type[Unit]
_REGISTRY: dict[str, Action] = {}
# Resolutions done so far: a worker resolves again at C_LoadModule, possibly
# after a chroot or privilege drop made the Python installation unreadable.
_RESOLVED: dict[str, Action] = {}


class ActionNotAvailable(LookupError):
    """An action name that does not resolve (unknown, unimportable, unimplemented)."""


def register_action(name: str, action: Action) -> None:
    """Make ``name`` usable in filter_actions_pre/post (the patches call this)."""
    _REGISTRY[name] = action
    _RESOLVED.pop(name, None)


def registered_actions() -> frozenset[str]:
    return frozenset(_REGISTRY)


# -- Caml Crush's demo actions ------------------------------------------------------

def _identity(call: Call) -> Verdict:
    return CONTINUE


def _c_initialize_hook(call: Call) -> Verdict:
    # Caml Crush's demo prints a message and goes on; we go on.
    return CONTINUE


def _c_login_hook(call: Call) -> Verdict:
    """Caml Crush's demo: only the PIN "1234" may log in, others get CKR_PIN_LOCKED."""
    pin = call.get("pin") or b""
    return CONTINUE if hmac.compare_digest(bytes(pin), b"1234") else c.CKR_PIN_LOCKED


register_action("identity", _identity)
register_action("c_Initialize_hook", _c_initialize_hook)
register_action("c_Login_hook", _c_login_hook)


# -- resolution -------------------------------------------------------------------

def _import_path(name: str) -> Any:
    module_name, _, attr_path = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ActionNotAvailable(f"cannot import module {module_name!r}: {exc}") from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ActionNotAvailable(f"{module_name!r} has no attribute {attr_path!r}") from None
    return obj


def _entry_point(name: str) -> Any | None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                return ep.load()
            except Exception as exc:  # a broken plug-in is a config error
                raise ActionNotAvailable(f"entry point {name!r} failed to load: {exc}") from None
    return None


def resolve_action(name: str) -> Action:
    """The hook or unit class for action ``name``; ActionNotAvailable otherwise."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _RESOLVED:
        return _RESOLVED[name]
    action = _resolve(name)
    _RESOLVED[name] = action
    return action


def _resolve(name: str) -> Action:
    found: Any = None
    if found is None and ":" in name:
        found = _import_path(name)
    if found is None:
        found = _entry_point(name)
    if found is None:
        if name in PATCH_ACTIONS:
            raise ActionNotAvailable(
                f"the CryptokiX patch {name!r} is not implemented in this version of p11guard")
        raise ActionNotAvailable(f"unknown action {name!r}")
    if isinstance(found, type) and issubclass(found, Unit):
        return found
    if callable(found):
        return found  # type: ignore[no-any-return]
    raise ActionNotAvailable(f"action {name!r} is neither callable nor a Unit class")


def check_actions(policy: Policy) -> list[ConfigError]:
    """Every action of ``policy`` that does not resolve, as a located error."""
    errors: list[ConfigError] = []
    for option in ("filter_actions_pre", "filter_actions_post"):
        rules: tuple[Rule[Any], ...] = getattr(policy, option)
        for rule in rules:
            for act in rule.value:
                try:
                    resolve_action(act.action)
                except ActionNotAvailable as exc:
                    loc = rule.location
                    errors.append(ConfigError(
                        f"{act.function}: {exc}", file=loc.file if loc else None,
                        line=loc.line if loc else None, option=option))
    return errors


# -- placing an action in the pipeline ----------------------------------------------

def normalise(verdict: Any) -> Verdict:
    """A hook's answer as the engine's verdict; TypeError for anything else."""
    if verdict is None or verdict == CONTINUE:
        return None
    if isinstance(verdict, Done):
        return verdict
    if isinstance(verdict, int) and not isinstance(verdict, bool) and 0 <= verdict < 1 << 64:
        return verdict
    raise TypeError(f"a hook must return 'continue', a CK_RV or Done, not {verdict!r}")


class ActionUnit(Unit):
    """An action configured on one function, at the pre or post stage."""

    def __init__(self, state: EngineState, action_name: str, function: str, action: Action,
                 *, post: bool) -> None:
        super().__init__(state)
        self.name = action_name
        self.function = function
        self.stage = STAGE_POST_HOOKS if post else STAGE_PRE_HOOKS
        self.inner: Unit | None = None
        self.hook: Callable[[Call], Any] | None = None
        if isinstance(action, type):
            self.inner = action(state)
            self.has_after = self.inner.has_after
        else:
            self.hook = action

    def applies(self, spec: FunctionSpec) -> bool:
        if spec.function != self.function:
            return False
        return self.inner.applies(spec) if self.inner is not None else True

    def wants_after(self, spec: FunctionSpec) -> bool:
        # A patch may filter the answer of only some of its functions.
        return self.inner.wants_after(spec) if self.inner is not None else False

    def check(self, call: Call) -> Verdict:
        if self.inner is not None:
            return normalise(self.inner.check(call))
        assert self.hook is not None
        return normalise(self.hook(call))

    def after(self, call: Call, result: Any) -> Any:
        return result if self.inner is None else self.inner.after(call, result)


def action_units(state: EngineState) -> list[ActionUnit]:
    """The configured pre and post actions of the module, in file order."""
    units: list[ActionUnit] = []
    policy = state.policy
    for post, actions in ((False, policy.actions_pre), (True, policy.actions_post)):
        for act in actions:
            if act.function not in BY_FUNCTION:
                continue  # C_LoadModule: handled before a module exists
            units.append(ActionUnit(state, act.action, act.function,
                                    resolve_action(act.action), post=post))
    return units
