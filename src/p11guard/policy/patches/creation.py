"""Creation- and modification-time patches (patchset 1 unless noted).

* ``conflicting_attributes_patch``: no template (or, for C_SetAttributeValue,
  resulting object) may hold a conflicting pair -> CKR_ATTRIBUTE_VALUE_INVALID.
  Strict mode adds: C_CopyObject checked on the merged source + template
  view (Caml Crush: template only, bug B6) and public/private RSA/EC keys
  checked together with their other half (bug B2).
* ``sticky_attributes_patch``: protections cannot be removed (WRAP, UNWRAP,
  ENCRYPT, DECRYPT, SENSITIVE, ALWAYS_SENSITIVE, NEVER_EXTRACTABLE stay TRUE,
  EXTRACTABLE stays FALSE) -> CKR_ATTRIBUTE_VALUE_INVALID.
* ``non_local_objects_patch``: imported keys cannot wrap/unwrap or claim to be
  local -> CKR_TEMPLATE_INCONSISTENT.
"""

from __future__ import annotations

from typing import Final

from p11guard.pkcs11 import constants as c
from p11guard.policy.patches.common import (
    KEY_CLASSES,
    Patch,
    View,
    conflict,
    has,
    merged,
    pair_conflict,
    pairs,
    read,
    segregated,
    strict,
    template_view,
)
from p11guard.policy.rules.calls import CREATION_TEMPLATE, Call

CREATION: Final = frozenset({"C_CreateObject", "C_CopyObject", "C_UnwrapKey", "C_GenerateKey",
                             "C_GenerateKeyPair", "C_DeriveKey", "C_SetAttributeValue"})


def call_template(call: Call) -> View:
    """Every creation template of the call as one view (GenerateKeyPair: both)."""
    return template_view(*(t for _, t in call.role(CREATION_TEMPLATE)))


class ConflictingAttributes(Patch):
    name = "conflicting_attributes_patch"
    functions = CREATION

    def check(self, call: Call) -> int | None:
        state = self.state
        rv_bad = c.CKR_ATTRIBUTE_VALUE_INVALID
        view = call_template(call)
        fn = call.function
        session = call.session
        handle: int | None = None
        if fn == "C_SetAttributeValue" or (fn == "C_CopyObject" and strict(state)):
            handle = int(call.get("object"))
            rv, current = read(state, session, handle)
            if rv != c.CKR_OK:
                return self.block(call, rv_bad, "attributes unreadable")
            view = merged(current, view)
        if conflict(view, pairs(state)):
            return self.block(call, rv_bad, "conflicting attributes")
        if strict(state) and session is not None and fn in (
                "C_SetAttributeValue", "C_CopyObject", "C_CreateObject"):
            link = None
            if fn == "C_CreateObject":
                link = self._template_link(call, view)
            found = pair_conflict(state, session, handle, view, link)
            if found is not None:
                return self.block(call, rv_bad, "conflicts with the other half of its key pair")
        return None

    @staticmethod
    def _template_link(call: Call, view: View) -> bytes | None:
        want = c.CKA_MODULUS if view.get(c.CKA_KEY_TYPE) == c.CKK_RSA else c.CKA_EC_PARAMS
        for t, v in call.get("template") or ():
            if t == want and isinstance(v, bytes) and v:
                return v
        return None


# attribute -> the value that sticks once the object has it.
STICKY: Final[tuple[tuple[int, bool], ...]] = (
    (c.CKA_WRAP, True), (c.CKA_UNWRAP, True), (c.CKA_ENCRYPT, True), (c.CKA_DECRYPT, True),
    (c.CKA_SENSITIVE, True), (c.CKA_EXTRACTABLE, False), (c.CKA_ALWAYS_SENSITIVE, True),
    (c.CKA_NEVER_EXTRACTABLE, True),
)
SEG_STICKY: Final[tuple[tuple[int, bool], ...]] = (
    (c.CKA_SIGN, True), (c.CKA_VERIFY, True), (c.CKA_SIGN_RECOVER, True),
    (c.CKA_VERIFY_RECOVER, True),
)


class StickyAttributes(Patch):
    name = "sticky_attributes_patch"
    functions = frozenset({"C_CopyObject", "C_SetAttributeValue"})

    def check(self, call: Call) -> int | None:
        template = call_template(call)
        rv, current = read(self.state, call.session, int(call.get("object")))
        if rv != c.CKR_OK:
            return self.block(call, c.CKR_ATTRIBUTE_VALUE_INVALID, "attributes unreadable")
        sticky = STICKY + (SEG_STICKY if segregated(self.state) else ())
        for attr, value in sticky:
            if current.get(attr) is value and attr in template and template[attr] is not value:
                return self.block(call, c.CKR_ATTRIBUTE_VALUE_INVALID, "sticky attribute")
        return None


_NON_LOCAL_FORBIDDEN: Final = ((c.CKA_UNWRAP, True), (c.CKA_WRAP, True), (c.CKA_LOCAL, True))


class NonLocalObjects(Patch):
    name = "non_local_objects_patch"
    functions = frozenset({"C_CreateObject", "C_CopyObject", "C_SetAttributeValue"})

    def check(self, call: Call) -> int | None:
        template = call_template(call)
        if not any(has(template, a, v) for a, v in _NON_LOCAL_FORBIDDEN):
            return None
        bad = c.CKR_TEMPLATE_INCONSISTENT
        if call.function == "C_CreateObject":
            if template.get(c.CKA_CLASS) in KEY_CLASSES:
                return self.block(call, bad, "imported key with WRAP/UNWRAP/LOCAL")
            return None
        rv, current = read(self.state, call.session, int(call.get("object")))
        if rv != c.CKR_OK:
            # Caml Crush lets an unreadable object through; fail closed.
            return self.block(call, bad, "attributes unreadable")
        if current.get(c.CKA_CLASS) in KEY_CLASSES and current.get(c.CKA_LOCAL) is not True:
            return self.block(call, bad, "non-local key given WRAP/UNWRAP/LOCAL")
        return None
