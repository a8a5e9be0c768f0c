"""Boolean canonicalisation (strict, always on): any non-zero CK_BBOOL byte is TRUE.

Caml Crush compares template booleans as raw bytes (TRUE is exactly 0x01), so
a value such as 0x02 is neither TRUE nor FALSE to its checks while the token
(SoftHSM among others) takes it as TRUE: a creation-time check bypass (bug B3).
We rewrite every one-byte boolean of every template to 0x00/0x01 before any
other unit or hook sees the call, so checks and token agree.
"""

from __future__ import annotations

from p11guard.pkcs11.attributes import AttrKind, kind_of
from p11guard.policy.rules.base import STAGE_CANONICAL, Unit
from p11guard.policy.rules.calls import CREATION_TEMPLATE, SEARCH_TEMPLATE, Call, FunctionSpec

_TEMPLATE_ROLES = (CREATION_TEMPLATE, SEARCH_TEMPLATE)
TRUE, FALSE = b"\x01", b"\x00"

Template = list[tuple[int, bytes]]


def canonical_template(template: Template) -> Template | None:
    """The template with canonical booleans, or None if it already was."""
    changed = False
    out: Template = []
    for attr_type, value in template:
        # Only plain byte values: a nested template (protocol v4) is not a boolean.
        if (isinstance(value, bytes) and len(value) == 1 and value not in (TRUE, FALSE)
                and kind_of(attr_type) is AttrKind.BOOL):
            value = TRUE
            changed = True
        out.append((attr_type, value))
    return out if changed else None


class CanonicalBooleans(Unit):
    name = "canonical_booleans"
    stage = STAGE_CANONICAL
    needs_bookkeeping = False  # rewrites its call's templates, nothing else
    # fastpath.c declines any template holding a one-byte value other than 0/1.
    fast_path_checked = True

    def applies(self, spec: FunctionSpec) -> bool:
        return any(spec.has(role) for role in _TEMPLATE_ROLES)

    def check(self, call: Call) -> None:
        for role in _TEMPLATE_ROLES:
            for pos, template in call.role(role):
                fixed = canonical_template(template)
                if fixed is not None:
                    call.args[pos] = fixed
                    self.state.audit.rewrite(call.function, self.name,
                                             "non-canonical CK_BBOOL set to TRUE")
        return None
