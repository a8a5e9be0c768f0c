"""Typed attribute templates of protocol version 4.

Each attribute is ``hyper type`` followed by a discriminated value::

    kind 0 BYTES        opaque<>       byte arrays, CK_BBOOL, CK_DATE, strings, big integers
    kind 1 ULONG        hyper          CK_ULONG and its aliases (class, key type, lengths...)
    kind 2 TEMPLATE     attribute<>    CKA_WRAP_TEMPLATE & co. (one level of nesting)
    kind 3 ULONG_ARRAY  hyper<>        CKA_ALLOWED_MECHANISMS
    kind 4 UNAVAILABLE  (nothing)      replies only: CK_UNAVAILABLE_INFORMATION

so that nothing depends on the peers' CK_ULONG size or byte order.  Python
representation: a list of ``(type, kind, value)`` with ``value`` bytes, int,
a nested list, a list of ints or None.
"""

from __future__ import annotations

import enum
from typing import Any

from .xdr import Packer, Unpacker, XdrError


class ValueKind(enum.IntEnum):
    BYTES = 0
    ULONG = 1
    TEMPLATE = 2
    ULONG_ARRAY = 3
    UNAVAILABLE = 4


TypedAttribute = tuple[int, ValueKind, Any]
TypedTemplate = list[TypedAttribute]

# A nested template may not itself hold a template: PKCS#11 defines no such
# attribute, and a bound on depth bounds the decoder's recursion.
MAX_DEPTH = 2
_MIN_ATTRIBUTE = 8 + 4  # type + kind


def encode_template(p: Packer, template: TypedTemplate, depth: int = 1) -> None:
    p.uint(len(template))
    for attr_type, kind, value in template:
        p.hyper(attr_type)
        p.uint(int(kind))
        if kind is ValueKind.BYTES:
            p.opaque(value)
        elif kind is ValueKind.ULONG:
            p.hyper(value)
        elif kind is ValueKind.TEMPLATE:
            if depth >= MAX_DEPTH:
                raise ValueError("templates nest at most one level deep")
            encode_template(p, value, depth + 1)
        elif kind is ValueKind.ULONG_ARRAY:
            p.uint(len(value))
            for item in value:
                p.hyper(item)
        elif kind is not ValueKind.UNAVAILABLE:
            raise ValueError(f"bad value kind {kind!r}")


class TemplateBudget:
    """Counts attributes over all nesting levels against one bound."""

    __slots__ = ("left",)

    def __init__(self, max_attributes: int) -> None:
        self.left = max_attributes

    def take(self, n: int) -> None:
        if n > self.left:
            raise XdrError("too many attributes in the template")
        self.left -= n


def decode_template(u: Unpacker, max_attributes: int, max_opaque: int, max_list: int,
                    depth: int = 1, budget: TemplateBudget | None = None) -> TypedTemplate:
    budget = budget or TemplateBudget(max_attributes)
    n = u.count(max_attributes, _MIN_ATTRIBUTE)
    budget.take(n)
    out: TypedTemplate = []
    for _ in range(n):
        attr_type = u.hyper()
        raw_kind = u.uint()
        try:
            kind = ValueKind(raw_kind)
        except ValueError:
            raise XdrError(f"unknown attribute value kind {raw_kind}") from None
        value: Any
        if kind is ValueKind.BYTES:
            value = u.opaque(max_opaque)
        elif kind is ValueKind.ULONG:
            value = u.hyper()
        elif kind is ValueKind.TEMPLATE:
            if depth >= MAX_DEPTH:
                raise XdrError("templates nest at most one level deep")
            value = decode_template(u, max_attributes, max_opaque, max_list, depth + 1, budget)
        elif kind is ValueKind.ULONG_ARRAY:
            count = u.count(max_list, 8)
            value = [u.hyper() for _ in range(count)]
        else:
            value = None
        out.append((attr_type, kind, value))
    return out
