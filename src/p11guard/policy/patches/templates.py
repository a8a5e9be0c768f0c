"""Template patches (patchset 1 and 2) and the usage-segregation switch.

* ``sanitize_creation_templates_patch``: attributes a template leaves out get
  safe values instead of the token's defaults (SoftHSM2 defaults to
  WRAP=DECRYPT=TRUE, SENSITIVE=FALSE...).  Caml Crush makes the token call
  itself (terminal); p11guard rewrites the template and lets later checks run.
  Strict mode: a key derived from a sensitive / non-extractable base key
  cannot be less protected than its base (CKR_TEMPLATE_INCONSISTENT).
* ``secure_templates_patch`` (patchset 2): templates must conform to one of
  a few reference templates (reference §7.8); the usage attributes of an
  existing key are frozen.
* ``prevent_sensitive_leak_patch``: secret values of sensitive or
  extractable keys are never returned by C_GetAttributeValue, and cannot be
  overwritten.
* ``do_segregate_usage``: turns on the sign/verify vs encrypt/decrypt pairs.
"""

from __future__ import annotations

from typing import Final

from p11guard.pkcs11 import constants as c
from p11guard.policy.patches.common import (
    CK_UNAVAILABLE_INFORMATION,
    KEY_CLASSES,
    PASS_THROUGH_ERRORS,
    Patch,
    View,
    merged,
    read,
    segregated,
    strict,
    template_view,
)
from p11guard.policy.rules.calls import Call, Done

TRUE, FALSE = b"\x01", b"\x00"
_T, _F = True, False

SANITIZE_DEFAULTS: Final[dict[int, tuple[tuple[int, bool], ...]]] = {
    c.CKO_SECRET_KEY: (
        (c.CKA_WRAP, _F), (c.CKA_UNWRAP, _F), (c.CKA_ENCRYPT, _F), (c.CKA_DECRYPT, _F),
        (c.CKA_SIGN, _F), (c.CKA_VERIFY, _F), (c.CKA_SENSITIVE, _T), (c.CKA_EXTRACTABLE, _F),
        (c.CKA_DERIVE, _F), (c.CKA_PRIVATE, _T)),
    c.CKO_PRIVATE_KEY: (
        (c.CKA_UNWRAP, _F), (c.CKA_DECRYPT, _F), (c.CKA_SIGN, _F), (c.CKA_SIGN_RECOVER, _F),
        (c.CKA_SENSITIVE, _T), (c.CKA_EXTRACTABLE, _F), (c.CKA_DERIVE, _F), (c.CKA_PRIVATE, _T)),
    c.CKO_PUBLIC_KEY: (
        (c.CKA_WRAP, _F), (c.CKA_ENCRYPT, _F), (c.CKA_VERIFY, _F), (c.CKA_VERIFY_RECOVER, _F),
        (c.CKA_DERIVE, _F)),
}

Template = list[tuple[int, bytes]]


def sanitized(template: Template, key_class: int | None) -> Template:
    """``template`` plus the safe defaults of ``key_class`` it lacks."""
    present = {t for t, _ in template}
    extra = [(t, TRUE if v else FALSE) for t, v in SANITIZE_DEFAULTS.get(key_class or -1, ())
             if t not in present]
    return [*template, *extra] if extra else template


class SanitizeTemplates(Patch):
    name = "sanitize_creation_templates_patch"
    functions = frozenset({"C_CreateObject", "C_GenerateKey", "C_GenerateKeyPair",
                           "C_DeriveKey", "C_UnwrapKey"})

    def check(self, call: Call) -> int | None:
        fn = call.function
        if fn == "C_GenerateKeyPair":
            call.set("public_template", sanitized(call.get("public_template"), c.CKO_PUBLIC_KEY))
            call.set("private_template",
                     sanitized(call.get("private_template"), c.CKO_PRIVATE_KEY))
            return None
        template: Template = list(call.get("template") or [])
        if fn == "C_GenerateKey":
            key_class: int | None = c.CKO_SECRET_KEY
        else:
            found = template_view(template).get(c.CKA_CLASS)
            if not isinstance(found, int):
                return self.block(call, c.CKR_TEMPLATE_INCOMPLETE, "no CKA_CLASS")
            key_class = found
        if fn == "C_DeriveKey" and strict(self.state):
            refused = self._inherit(call, template)
            if refused is not None:
                return refused
        call.set("template", sanitized(template, key_class))
        return None

    def _inherit(self, call: Call, template: Template) -> int | None:
        """Strict: a derived key is at least as protected as its base key."""
        rv, base = read(self.state, call.session, int(call.get("base_key")))
        if rv != c.CKR_OK:
            return self.block(call, c.CKR_TEMPLATE_INCONSISTENT, "base key unreadable")
        view = template_view(template)
        bad = c.CKR_TEMPLATE_INCONSISTENT
        if base.get(c.CKA_SENSITIVE) is True:
            if view.get(c.CKA_SENSITIVE) is not None and view.get(c.CKA_SENSITIVE) is not True:
                return self.block(call, bad, "derived key less sensitive than its base")
            if c.CKA_SENSITIVE not in view:
                template.append((c.CKA_SENSITIVE, TRUE))
        if base.get(c.CKA_EXTRACTABLE) is False:
            if view.get(c.CKA_EXTRACTABLE) is not None and view.get(c.CKA_EXTRACTABLE) is not False:
                return self.block(call, bad, "derived key more extractable than its base")
            if c.CKA_EXTRACTABLE not in view:
                template.append((c.CKA_EXTRACTABLE, FALSE))
        return None


# -- secure_templates_patch (patchset 2) ---------------------------------------------------

def _ref(*items: tuple[int, bool]) -> tuple[tuple[int, bool], ...]:
    return items


_SEG_OFF = ((c.CKA_SIGN, _F), (c.CKA_SIGN_RECOVER, _F), (c.CKA_VERIFY, _F),
            (c.CKA_VERIFY_RECOVER, _F))
G1 = _ref((c.CKA_ENCRYPT, _F), (c.CKA_DECRYPT, _F), (c.CKA_SENSITIVE, _T))
G2 = _ref((c.CKA_WRAP, _F), (c.CKA_UNWRAP, _F), (c.CKA_SENSITIVE, _T))
G3 = _ref((c.CKA_WRAP, _F), (c.CKA_UNWRAP, _F), (c.CKA_ENCRYPT, _F), (c.CKA_DECRYPT, _F),
          (c.CKA_SENSITIVE, _T))
C1 = _ref((c.CKA_WRAP, _F), (c.CKA_DECRYPT, _F), (c.CKA_SENSITIVE, _T))
C2 = _ref((c.CKA_WRAP, _F), (c.CKA_DECRYPT, _F), (c.CKA_ENCRYPT, _F), (c.CKA_SENSITIVE, _T))
FROZEN: Final = (c.CKA_WRAP, c.CKA_UNWRAP, c.CKA_DECRYPT, c.CKA_ENCRYPT, c.CKA_SENSITIVE)
SEG_FROZEN: Final = (c.CKA_SIGN, c.CKA_VERIFY, c.CKA_SIGN_RECOVER, c.CKA_VERIFY_RECOVER)


def conforms(view: View, ref: tuple[tuple[int, bool], ...]) -> bool:
    return all(t not in view or view[t] is v for t, v in ref)


class SecureTemplates(Patch):
    name = "secure_templates_patch"
    functions = frozenset({"C_GenerateKey", "C_GenerateKeyPair", "C_CreateObject",
                           "C_CopyObject", "C_UnwrapKey", "C_DeriveKey", "C_SetAttributeValue"})

    def generation_refs(self) -> tuple[tuple[tuple[int, bool], ...], ...]:
        if segregated(self.state):
            return (G1 + _SEG_OFF, G2 + _SEG_OFF, G3)
        return (G1, G2)

    def import_refs(self) -> tuple[tuple[tuple[int, bool], ...], ...]:
        if segregated(self.state):
            return (C1 + _SEG_OFF, C2)
        return (C1,)

    def check(self, call: Call) -> int | None:
        fn = call.function
        bad = c.CKR_TEMPLATE_INCONSISTENT
        from p11guard.policy.patches.creation import call_template

        view = call_template(call)
        if fn in ("C_GenerateKey", "C_GenerateKeyPair"):
            if not any(conforms(view, r) for r in self.generation_refs()):
                return self.block(call, bad, "template matches no secure generation template")
            return None
        if fn == "C_CreateObject" and view.get(c.CKA_CLASS) not in KEY_CLASSES:
            return None
        if fn in ("C_CopyObject", "C_SetAttributeValue"):
            rv, current = read(self.state, call.session, int(call.get("object")))
            if rv != c.CKR_OK:
                return self.block(call, rv, "attributes unreadable")
            if current.get(c.CKA_CLASS) not in KEY_CLASSES:
                return None
            if fn == "C_SetAttributeValue":
                return self._frozen(call, current, view)
            if strict(self.state):
                # The copy as it will be: source attributes overridden by the template.
                whole = merged(current, view)
                refs = self.generation_refs() + self.import_refs()
                if not any(conforms(whole, r) for r in refs):
                    return self.block(call, bad, "copy would match no secure template")
        if not any(conforms(view, r) for r in self.import_refs()):
            return self.block(call, bad, "template matches no secure import template")
        return None

    def _frozen(self, call: Call, current: View, view: View) -> int | None:
        frozen = FROZEN + (SEG_FROZEN if segregated(self.state) else ())
        for attr in frozen:
            if attr in view and view[attr] is not current.get(attr):
                # Strict: making a key sensitive is always allowed (bug B13).
                if attr == c.CKA_SENSITIVE and view[attr] is True and strict(self.state):
                    continue
                return self.block(call, c.CKR_ATTRIBUTE_READ_ONLY, "frozen attribute")
        if (strict(self.state) and view.get(c.CKA_EXTRACTABLE) is True
                and current.get(c.CKA_EXTRACTABLE) is False):
            return self.block(call, c.CKR_ATTRIBUTE_READ_ONLY, "EXTRACTABLE cannot come back")
        return None


# -- prevent_sensitive_leak_patch ------------------------------------------------------------

SECRET_VALUES: Final = frozenset({
    c.CKA_VALUE, c.CKA_PRIVATE_EXPONENT, c.CKA_PRIME_1, c.CKA_PRIME_2, c.CKA_EXPONENT_1,
    c.CKA_EXPONENT_2, c.CKA_COEFFICIENT,
})


class PreventSensitiveLeak(Patch):
    name = "prevent_sensitive_leak_patch"
    functions = frozenset({"C_GetAttributeValue", "C_SetAttributeValue"})

    def _protected(self, call: Call) -> tuple[int, bool]:
        rv, view = read(self.state, call.session, int(call.get("object")))
        if rv != c.CKR_OK:
            return rv, True
        return rv, view.get(c.CKA_SENSITIVE) is True or view.get(c.CKA_EXTRACTABLE) is True

    def check(self, call: Call) -> int | Done | None:
        if call.function == "C_SetAttributeValue":
            template = call.get("template") or []
            types = {t for t, _ in template}
            if c.CKA_ALWAYS_SENSITIVE in types or c.CKA_NEVER_EXTRACTABLE in types:
                return self.block(call, c.CKR_ATTRIBUTE_READ_ONLY, "read-only attribute")
            if types & SECRET_VALUES:
                rv, protected = self._protected(call)
                if protected:
                    return self.block(call, c.CKR_ATTRIBUTE_READ_ONLY, "secret value of a key")
            return None
        request = call.get("request") or []
        if not any(t in SECRET_VALUES for t, _ in request):
            return None  # the common case costs one set lookup per attribute
        rv, protected = self._protected(call)
        if rv != c.CKR_OK:
            bad = rv if rv in PASS_THROUGH_ERRORS else c.CKR_ATTRIBUTE_VALUE_INVALID
            return self.block(call, bad, "attributes unreadable")
        if not protected:
            return None
        rest = [(t, n) for t, n in request if t not in SECRET_VALUES]
        answers: dict[int, tuple[int, object, int]] = {}
        token_rv = c.CKR_OK
        if rest:
            token_rv, got = self.state.backend.get_attribute_value(
                call.session, int(call.get("object")), rest)
            for i, entry in enumerate(got):
                answers[i] = entry
        out: list[tuple[int, object, int]] = []
        i = 0
        for t, _n in request:
            if t in SECRET_VALUES:
                out.append((t, None, CK_UNAVAILABLE_INFORMATION))
            else:
                out.append(answers.get(i, (t, None, CK_UNAVAILABLE_INFORMATION)))
                i += 1
        # Caml Crush's RSA branch answers CKR_OK with empty values (bug B9);
        # the spec's answer is CKR_ATTRIBUTE_SENSITIVE with -1 lengths.
        rv = c.CKR_ATTRIBUTE_SENSITIVE if token_rv == c.CKR_OK else token_rv
        return Done((rv, out))


class SegregateUsage(Patch):
    """``do_segregate_usage`` (on C_Initialize): sign/verify keys cannot encrypt/decrypt."""

    name = "do_segregate_usage"
    functions = frozenset({"C_Initialize"})

    def check(self, call: Call) -> None:
        self.state.scratch["segregate"] = True
        return None
