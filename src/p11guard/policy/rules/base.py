"""The unit interface and the per-worker state every unit shares.

A *unit* is one policy option (forbidden_mechanisms, allowed_labels, ...), a
hook, or a CryptokiX patch.  The engine (``policy/engine.py``) asks each unit,
once per function when the module is loaded, whether it ``applies``; on a call
it runs the applying units' ``check`` in stage order, then the backend, then
their ``after`` steps.  See docs/filter.md for the contract.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from p11guard.pkcs11 import constants as c
from p11guard.policy.audit import Auditor
from p11guard.policy.model import EffectivePolicy
from p11guard.policy.objcache import Attributes, ObjectCache
from p11guard.policy.rules.calls import Call, FunctionSpec, Verdict

# Stages: the documented order of docs/filter.md ("Policy engine: order of units").
STAGE_CANONICAL = 0  # boolean canonicalisation of templates
STAGE_PRE_HOOKS = 10  # filter_actions_pre
STAGE_FORBIDDEN_FUNCTIONS = 20
STAGE_VISIBILITY = 30  # allowed_labels / allowed_ids on input handles
STAGE_MECHANISMS = 40  # forbidden_mechanisms
STAGE_PADDING = 50  # remove_padding_oracles
STAGE_CREATION = 60  # label/id of creation templates
STAGE_SESSION = 70  # enforce_ro_sessions, forbid_admin_operations
STAGE_POST_HOOKS = 80  # filter_actions_post (the patches)
STAGE_BOOKKEEPING = 90  # cache invalidation (after the backend call only)

# Errors that say nothing about an object: returned as they are when reading
# an object's attributes fails with them (a hidden object is reported as
# CKR_OBJECT_HANDLE_INVALID in every other case).
SESSION_ERRORS = frozenset({
    c.CKR_SESSION_HANDLE_INVALID, c.CKR_SESSION_CLOSED, c.CKR_CRYPTOKI_NOT_INITIALIZED,
    c.CKR_DEVICE_REMOVED, c.CKR_TOKEN_NOT_PRESENT, c.CKR_DEVICE_ERROR, c.CKR_HOST_MEMORY,
})


@dataclass
class EngineState:
    """Per worker (one connection, one loaded module): shared by every unit.

    ``backend`` is the real module (``p11guard.pkcs11.binding.Module``): units
    that need to read attributes or make the call themselves use it.
    ``scratch`` is per-unit private state (``scratch.setdefault(name, ...)``).
    """

    backend: Any
    policy: EffectivePolicy
    audit: Auditor
    cache: ObjectCache
    sessions: dict[int, int] = field(default_factory=dict)  # session -> slot
    scratch: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def slot_of(self, session: int | None) -> int | None:
        return None if session is None else self.sessions.get(session)

    def attributes(self, session: int, handle: int,
                   types: tuple[int, ...] | None = None) -> tuple[int, Attributes]:
        """Cached attributes of ``handle`` (read through ``session`` when needed)."""
        return self.cache.get(session, self.slot_of(session), handle, types)


class Unit:
    """Base class of a policy unit.  Override what you need.

    * ``applies(spec)``: called once per function at module load; a unit that
      does not apply costs nothing on that function's calls.
    * ``check(call)``: before the backend call, in stage order.  Return None
      (go on), an int CK_RV (refuse: the engine answers in the function's shape
      and audits it), or ``Done(result)`` (answer this; terminal patches).
    * ``after(call, result)``: after the backend call (only if the call
      reached it); returns the possibly filtered result.  Set ``has_after``
      (or override ``wants_after(spec)`` to run it for some functions only).
    * ``hidden(call, handle)``: object visibility.  Units with
      ``hides_objects = True`` are asked for every input handle of every
      function (stage 30) and for every handle C_FindObjects returns.  Return
      None (visible), CKR_OBJECT_HANDLE_INVALID (hidden), or a session error.

    A unit must not raise for an odd backend answer; if it does anyway, the
    engine turns it into CKR_GENERAL_ERROR for that call.
    """

    # Plain class attributes (not ClassVar): a unit placed by the
    # configuration (a hook, a patch) sets its own stage on the instance.
    name: str = "unit"
    stage: int = STAGE_POST_HOOKS
    has_after: bool = False
    hides_objects: bool = False
    # Whether the unit reads the engine's session/object bookkeeping (state.sessions,
    # state.cache): the Bookkeeping unit is added only when some unit may.
    # Conservative default; a unit that only looks at its call's arguments says no.
    needs_bookkeeping: bool = True
    # True when the worker's C fast path (server/fastpath.py) declines every call
    # this unit would change, so the unit does not keep its functions out of C.
    fast_path_checked: bool = False

    def __init__(self, state: EngineState) -> None:
        self.state = state

    @property
    def label(self) -> str:
        """The rule name used in the audit log."""
        return self.name

    def applies(self, spec: FunctionSpec) -> bool:
        return False

    def wants_after(self, spec: FunctionSpec) -> bool:
        """Whether ``after`` must run for ``spec`` (default: ``has_after``)."""
        return self.has_after

    def check(self, call: Call) -> Verdict:
        return None

    def after(self, call: Call, result: Any) -> Any:
        return result

    def hidden(self, call: Call, handle: int) -> int | None:
        return None

    @classmethod
    def active(cls, policy: EffectivePolicy) -> bool:
        """Whether ``policy`` turns this option on at all (built-in options)."""
        return True


def refill_find_objects(state: EngineState, call: Call, result: Any,
                        blocked: Callable[[int, int], bool], *, rule: str, note: str,
                        max_refills: int) -> Any:
    """C_FindObjects without the handles ``blocked(session, handle)`` refuses.

    When the token filled the caller's buffer there may be more, so the gap is
    asked for again: a full answer still means "maybe more" (a client reading
    one handle at a time must not stop at the first hidden object).  ``note``
    is the audit text, with ``{n}`` for the number of dropped handles.
    """
    rv, handles = result
    if rv != c.CKR_OK:
        return result
    session, max_count = int(call.args[0]), int(call.args[1])
    keep = [h for h in handles if not blocked(session, h)]
    dropped = len(handles) - len(keep)
    fetched = len(handles)
    refills = 0
    while fetched == max_count and len(keep) < max_count and refills < max_refills:
        refills += 1
        want = max_count - len(keep)
        rv, more = state.backend.find_objects(session, want)
        if rv != c.CKR_OK:
            # Report the error now only if there is nothing to give.
            return (rv, []) if not keep else (c.CKR_OK, keep)
        fetched = len(more) if len(more) < want else max_count
        for h in more:
            if blocked(session, h):
                dropped += 1
            else:
                keep.append(h)
    if dropped:
        state.audit.rewrite(call.function, rule, note.format(n=dropped))
    return (c.CKR_OK, keep)
