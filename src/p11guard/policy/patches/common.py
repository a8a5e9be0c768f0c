"""What the CryptokiX patches share: critical attributes, conflict pairs,
reading an object's attributes, templates as views, key-pair linking.

A *view* is ``{attribute: bool}`` for the boolean attributes plus the raw
bytes of CKA_CLASS / CKA_KEY_TYPE under their own keys; an absent attribute
is simply not in it.  Templates reach the patches with canonical booleans
(engine stage 0), values read from the token are canonical too, so a
boolean is TRUE iff its byte is non-zero.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, Final

from p11guard.pkcs11 import constants as c
from p11guard.policy.rules.base import EngineState, Unit, refill_find_objects
from p11guard.policy.rules.calls import Call, FunctionSpec

CK_UNAVAILABLE_INFORMATION: Final = (1 << 64) - 1

# Caml Crush's critical attributes (reference §7.0); seg = with do_segregate_usage.
CRITICAL_BOOLEANS: Final[tuple[int, ...]] = (
    c.CKA_SENSITIVE, c.CKA_EXTRACTABLE, c.CKA_ALWAYS_SENSITIVE, c.CKA_NEVER_EXTRACTABLE,
    c.CKA_ENCRYPT, c.CKA_DECRYPT, c.CKA_WRAP, c.CKA_UNWRAP, c.CKA_PRIVATE, c.CKA_DERIVE,
)
SEG_BOOLEANS: Final[tuple[int, ...]] = (
    c.CKA_SIGN, c.CKA_VERIFY, c.CKA_SIGN_RECOVER, c.CKA_VERIFY_RECOVER,
)
# Everything a patch may need about an existing key, read in one call and
# cached per object (policy/objcache.py: dropped on SetAttributeValue,
# DestroyObject, session and login changes).
READ_TYPES: Final[tuple[int, ...]] = (
    c.CKA_CLASS, c.CKA_KEY_TYPE, c.CKA_LOCAL, c.CKA_VALUE_LEN, c.CKA_WRAP_WITH_TRUSTED,
    *CRITICAL_BOOLEANS, *SEG_BOOLEANS,
)
BOOLEAN_TYPES: Final[frozenset[int]] = frozenset(
    (*CRITICAL_BOOLEANS, *SEG_BOOLEANS, c.CKA_LOCAL, c.CKA_WRAP_WITH_TRUSTED, c.CKA_TOKEN,
     c.CKA_MODIFIABLE, c.CKA_TRUSTED))
KEY_CLASSES: Final = frozenset({c.CKO_SECRET_KEY, c.CKO_PRIVATE_KEY, c.CKO_PUBLIC_KEY})

T, F = True, False
# Conflicting pairs (reference §7.1): both true in one view = conflict.
PAIRS: Final[tuple[tuple[int, bool, int, bool], ...]] = (
    (c.CKA_WRAP, T, c.CKA_DECRYPT, T),
    (c.CKA_UNWRAP, T, c.CKA_ENCRYPT, T),
    (c.CKA_SENSITIVE, F, c.CKA_EXTRACTABLE, F),
    (c.CKA_SENSITIVE, F, c.CKA_ALWAYS_SENSITIVE, T),
    (c.CKA_EXTRACTABLE, T, c.CKA_NEVER_EXTRACTABLE, T),
    (c.CKA_WRAP, T, c.CKA_SENSITIVE, F),
    (c.CKA_WRAP, T, c.CKA_ALWAYS_SENSITIVE, F),
)
SEG_PAIRS: Final[tuple[tuple[int, bool, int, bool], ...]] = tuple(
    [(c.CKA_ENCRYPT, T, other, T) for other in
     (c.CKA_SIGN, c.CKA_SIGN_RECOVER, c.CKA_VERIFY, c.CKA_VERIFY_RECOVER, c.CKA_WRAP)]
    + [(c.CKA_DECRYPT, T, other, T) for other in
       (c.CKA_VERIFY, c.CKA_VERIFY_RECOVER, c.CKA_SIGN, c.CKA_SIGN_RECOVER, c.CKA_UNWRAP)])

# Errors of a critical-attribute read that prevent_sensitive_leak returns as they are.
PASS_THROUGH_ERRORS: Final = frozenset({
    c.CKR_GENERAL_ERROR, c.CKR_SLOT_ID_INVALID, c.CKR_KEY_HANDLE_INVALID,
    c.CKR_SESSION_CLOSED, c.CKR_SESSION_HANDLE_INVALID, c.CKR_TOKEN_NOT_PRESENT,
    c.CKR_CRYPTOKI_NOT_INITIALIZED, c.CKR_OBJECT_HANDLE_INVALID,
})

View = dict[int, Any]


def ulong(value: bytes) -> int:
    """A native CK_ULONG attribute value."""
    return int.from_bytes(value, sys.byteorder)


def ulong_bytes(value: int) -> bytes:
    return value.to_bytes(8, sys.byteorder)


def segregated(state: EngineState) -> bool:
    """do_segregate_usage passed (Caml Crush: a flag set by C_Initialize)."""
    return bool(state.scratch.get("segregate"))


def strict(state: EngineState) -> bool:
    return state.policy.mode == "strict"


def pairs(state: EngineState) -> tuple[tuple[int, bool, int, bool], ...]:
    return PAIRS + SEG_PAIRS if segregated(state) else PAIRS


def decode(attr_type: int, value: bytes | None) -> Any:
    """A template or token value in view form (None stays None)."""
    if value is None:
        return None
    if attr_type in BOOLEAN_TYPES:
        return any(value)
    if attr_type in (c.CKA_CLASS, c.CKA_KEY_TYPE, c.CKA_VALUE_LEN) and len(value) in (4, 8):
        return ulong(value)
    return value


def template_view(*templates: Iterable[tuple[int, Any]]) -> View:
    """Several templates concatenated (GenerateKeyPair) as one view.

    A type given twice with different values is recorded as the sentinel
    ``AMBIGUOUS`` (patches treat it as a conflict: a token takes one of them).
    """
    view: View = {}
    for template in templates:
        for attr_type, value in template:
            if not isinstance(value, bytes):
                continue
            v = decode(attr_type, value)
            if attr_type in view and view[attr_type] != v:
                view[attr_type] = AMBIGUOUS
            else:
                view[attr_type] = v
    return view


class _Ambiguous:
    def __repr__(self) -> str:
        return "AMBIGUOUS"


AMBIGUOUS: Final = _Ambiguous()


def has(view: View, attr_type: int, value: bool) -> bool:
    """Does the view say ``attr_type`` = ``value`` (an ambiguous entry says both)?"""
    v = view.get(attr_type)
    return v is AMBIGUOUS or v is value


def conflict(view: View, pair_list: Iterable[tuple[int, bool, int, bool]]) -> bool:
    return any(has(view, a, va) and has(view, b, vb) for a, va, b, vb in pair_list)


def read(state: EngineState, session: int | None, handle: int) -> tuple[int, View]:
    """(rv, view) of an existing object through the per-worker attribute cache."""
    if session is None:
        return c.CKR_SESSION_HANDLE_INVALID, {}
    # Every Patch asked the cache to fetch READ_TYPES with each object
    # (``want``), so a cached entry has them all: the fast path.
    rv, attrs = state.attributes(session, handle)
    if rv != c.CKR_OK:
        return rv, {}
    # Decoded views follow the cache entry (same dict object while cached):
    # a SignInit through patchset 1 costs two dict look-ups, not two decodes.
    views: dict[int, tuple[Any, View]] = state.scratch.setdefault("patch_views", {})
    found = views.get(handle)
    if found is not None and found[0] is attrs:
        return rv, found[1]
    view = {t: decode(t, attrs.get(t)) for t in READ_TYPES if attrs.get(t) is not None}
    if len(views) >= 4096:
        views.clear()
    views[handle] = (attrs, view)
    return rv, view


def merged(base: View, template: View) -> View:
    """``base`` overridden by ``template`` (SetAttributeValue, CopyObject)."""
    out = dict(base)
    out.update(template)
    return out


class Patch(Unit):
    """A CryptokiX patch: placed by the configuration on one function at a time."""

    functions: frozenset[str] = frozenset()
    # Functions whose result ``after`` filters.
    after_functions: frozenset[str] = frozenset()

    def __init__(self, state: EngineState) -> None:
        super().__init__(state)
        state.cache.want(*READ_TYPES)

    def applies(self, spec: FunctionSpec) -> bool:
        return spec.function in self.functions

    def wants_after(self, spec: FunctionSpec) -> bool:
        return spec.function in self.after_functions

    def block(self, call: Call, rv: int, why: str) -> int:
        # The reason goes to the audit log with the refusal (never a value).
        call.notes["blocked_by"] = f"{self.name}: {why}"
        return rv


# -- C_FindObjects pruning (use-time patches hide the keys they would refuse) --------

MAX_REFILLS: Final = 10_000


def prune_find_objects(unit: Unit, call: Call, result: Any, blocked: Any) -> Any:
    """Use-time patches hide from C_FindObjects the keys they would refuse."""
    return refill_find_objects(unit.state, call, result, blocked, rule=unit.name,
                               note="{n} key(s) hidden", max_refills=MAX_REFILLS)


# -- strict mode: key pairs are linked ---------------------------------------------------

PAIR_KEY_TYPES: Final = frozenset({c.CKK_RSA, c.CKK_EC})
MAX_LINKED: Final = 256


def _slot(state: EngineState, session: int) -> int | None:
    slot = state.slot_of(session)
    if slot is not None:
        return slot
    rv, info = state.backend.get_session_info(session)
    return None if rv != c.CKR_OK or info is None else int(info.slot_id)


def _link_attribute(state: EngineState, session: int, handle: int,
                    key_type: int) -> bytes | None:
    """What a key shares with its other half: the RSA modulus, the EC curve.

    EC private keys carry no public point, so EC halves are linked by curve:
    an over-approximation (any EC public key of that curve) that only costs
    keys asking for EC encrypt/wrap usages, which standard PKCS#11 lacks.
    """
    want = c.CKA_MODULUS if key_type == c.CKK_RSA else c.CKA_EC_PARAMS
    rv, attrs = state.backend.get_attribute_value(session, handle, [(want, None)])
    if rv != c.CKR_OK or not attrs or attrs[0][2] in (CK_UNAVAILABLE_INFORMATION, 0):
        return None
    length = attrs[0][2]
    if length > 64 * 1024:
        return None
    rv, attrs = state.backend.get_attribute_value(session, handle, [(want, length)])
    if rv != c.CKR_OK or attrs[0][1] is None:
        return None
    return bytes(attrs[0][1])


def linked_halves(state: EngineState, session: int, key_class: int, key_type: int,
                  link: bytes) -> tuple[int, list[View]]:
    """(rv, views) of the keys of the other class sharing ``link`` with a key.

    Searched in a session of our own so that the client's search state on
    its sessions is untouched; sees what the client's login lets it see.
    """
    other = c.CKO_PRIVATE_KEY if key_class == c.CKO_PUBLIC_KEY else c.CKO_PUBLIC_KEY
    link_type = c.CKA_MODULUS if key_type == c.CKK_RSA else c.CKA_EC_PARAMS
    slot = _slot(state, session)
    if slot is None:
        return c.CKR_SESSION_HANDLE_INVALID, []
    backend = state.backend
    rv, own = backend.open_session(slot, c.CKF_SERIAL_SESSION)
    if rv != c.CKR_OK:
        return rv, []
    views: list[View] = []
    try:
        template = [(c.CKA_CLASS, ulong_bytes(other)), (c.CKA_KEY_TYPE, ulong_bytes(key_type)),
                    (link_type, link)]
        rv = backend.find_objects_init(own, template)
        if rv != c.CKR_OK:
            return rv, []
        handles: list[int] = []
        while len(handles) < MAX_LINKED:
            rv, found = backend.find_objects(own, 32)
            if rv != c.CKR_OK or not found:
                break
            handles.extend(found)
        backend.find_objects_final(own)
        if rv != c.CKR_OK:
            return rv, []
        for h in handles:
            rv, answers = backend.get_attribute_value(
                own, h, [(t, 8) for t in READ_TYPES])
            if rv not in (c.CKR_OK, c.CKR_ATTRIBUTE_TYPE_INVALID, c.CKR_ATTRIBUTE_SENSITIVE):
                return rv, []
            views.append({t: decode(t, v) for t, v, _n in answers if v is not None})
    finally:
        backend.close_session(own)
    return c.CKR_OK, views


def pair_view(own: View, others: list[View]) -> View:
    """One view for a key and its linked halves: a usage any of them has counts."""
    out = dict(own)
    for view in others:
        for t, v in view.items():
            if t in (c.CKA_CLASS, c.CKA_KEY_TYPE):
                continue
            if v is True or t not in out:
                out[t] = v
    return out


def pair_conflict(state: EngineState, session: int, handle: int | None, view: View,
                  link: bytes | None = None) -> int | None:
    """Strict mode: does a public/private RSA or EC key conflict with its other half?

    Returns None (no conflict, or not a linkable key), an rv for a failed
    look-up, or -1 for a conflict.
    """
    key_class, key_type = view.get(c.CKA_CLASS), view.get(c.CKA_KEY_TYPE)
    if key_class not in (c.CKO_PUBLIC_KEY, c.CKO_PRIVATE_KEY) or key_type not in PAIR_KEY_TYPES:
        return None
    assert isinstance(key_class, int) and isinstance(key_type, int)
    if link is None:
        if handle is None:
            return None
        link = _link_attribute(state, session, handle, key_type)
        if link is None:
            return None  # no public component: nothing can be linked to it
    rv, others = linked_halves(state, session, key_class, key_type, link)
    if rv != c.CKR_OK:
        return rv
    if others and conflict(pair_view(view, others), pairs(state)):
        return -1
    return None
