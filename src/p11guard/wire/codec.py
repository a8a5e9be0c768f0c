"""Encoders and decoders for procedure arguments and results, driven by the table.

Nothing here is written per procedure: each :class:`~p11guard.wire.procedures.Kind`
has one encoder and one decoder, and a procedure's codec is the sequence of its
fields' codecs, compiled once at import.

Python representation of each kind:

=========== ===============================================================
HYPER       ``int`` (unsigned 64-bit pattern)
OPAQUE      ``bytes``
MECHANISM   ``(mechanism_type, parameter_bytes)``
TEMPLATE    ``list[(attribute_type, value_bytes, value_len)]``
HYPER_LIST  ``list[int]``
structs     a ``dict`` of field name to value when decoded; when encoding,
            a mapping or any object with attributes of those names.
            Versions are ``(major, minor)`` tuples.
=========== ===============================================================
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import mechanisms as mech4
from . import templates as tmpl4
from .procedures import BY_NUMBER, PROCEDURES, STRUCTS, TABLES, Field, Kind, Procedure
from .xdr import Packer, Unpacker, XdrError

Template = list[tuple[int, bytes, int]]
Mechanism = tuple[int, bytes]


@dataclass(frozen=True, slots=True)
class Limits:
    """Hard bounds on what a peer may make us allocate."""

    max_record_size: int = 16 * 1024 * 1024
    max_attributes: int = 4096  # entries in one template
    max_list_count: int = 1 << 20  # entries in a slot/mechanism/object list
    max_opaque: int = 16 * 1024 * 1024


DEFAULT_LIMITS = Limits()

_Enc = Callable[[Packer, Any], None]
_Dec = Callable[[Unpacker, Limits], Any]


# --- per-kind codecs ---------------------------------------------------------

def _enc_hyper(p: Packer, v: int) -> None:
    p.hyper(v)


def _dec_hyper(u: Unpacker, _lim: Limits) -> int:
    return u.hyper()


def _enc_opaque(p: Packer, v: bytes) -> None:
    p.opaque(v)


def _dec_opaque(u: Unpacker, lim: Limits) -> bytes:
    return u.opaque(lim.max_opaque)


def _enc_mechanism(p: Packer, v: Mechanism) -> None:
    p.hyper(v[0])
    p.opaque(v[1] or b"")


def _dec_mechanism(u: Unpacker, lim: Limits) -> Mechanism:
    return (u.hyper(), u.opaque(lim.max_opaque))


def _enc_template(p: Packer, v: Template) -> None:
    p.uint(len(v))
    for attr_type, value, value_len in v:
        p.hyper(attr_type)
        p.opaque(value)
        p.hyper(value_len)


_MIN_ATTRIBUTE_SIZE = 8 + 4 + 8


def _dec_template(u: Unpacker, lim: Limits) -> Template:
    n = u.count(lim.max_attributes, _MIN_ATTRIBUTE_SIZE)
    out: Template = []
    for _ in range(n):
        attr_type = u.hyper()
        value = u.opaque(lim.max_opaque)
        out.append((attr_type, value, u.hyper()))
    return out


def _enc_hyper_list(p: Packer, v: list[int]) -> None:
    p.uint(len(v))
    for item in v:
        p.hyper(item)


def _dec_hyper_list(u: Unpacker, lim: Limits) -> list[int]:
    n = u.count(lim.max_list_count, 8)
    return [u.hyper() for _ in range(n)]


def _enc_version(p: Packer, v: tuple[int, int]) -> None:
    p.opaque(bytes((v[0] & 0xFF,)))
    p.opaque(bytes((v[1] & 0xFF,)))


def _dec_version(u: Unpacker, _lim: Limits) -> tuple[int, int]:
    major = u.opaque(1)
    minor = u.opaque(1)
    return (major[0] if major else 0, minor[0] if minor else 0)


def _text_codec(bound: int) -> tuple[_Enc, _Dec]:
    def enc(p: Packer, v: bytes) -> None:
        p.opaque(v)

    def dec(u: Unpacker, lim: Limits) -> bytes:
        # Unbounded in Caml Crush's .x file (slot info): bound by a sane size.
        return u.opaque(bound or 1024)

    return enc, dec


def _struct_codec(kind: Kind) -> tuple[_Enc, _Dec]:
    fields: list[tuple[str, _Enc, _Dec]] = []
    for name, shape in STRUCTS[kind]:
        if shape == "hyper":
            fields.append((name, _enc_hyper, _dec_hyper))
        elif shape == "version":
            fields.append((name, _enc_version, _dec_version))
        else:
            assert isinstance(shape, tuple) and shape[0] == "text"
            enc_t, dec_t = _text_codec(shape[1])
            fields.append((name, enc_t, dec_t))

    names = tuple(name for name, _, _ in fields)
    if all(shape == "hyper" for _, shape in STRUCTS[kind]):
        packer_struct = struct.Struct(">" + "Q" * len(names))
        by_attr = operator.attrgetter(*names)
        by_key = operator.itemgetter(*names)

        # Getter per value type: isinstance(v, Mapping) (an ABC check) would cost
        # more than the packing itself on every call.
        getters: dict[type, Callable[[Any], Any]] = {}

        def enc_flat(p: Packer, v: Any) -> None:
            getter = getters.get(type(v))
            if getter is None:
                getter = getters[type(v)] = by_key if isinstance(v, Mapping) else by_attr
            p.buffer().extend(packer_struct.pack(*getter(v)))

        def dec_flat(u: Unpacker, lim: Limits) -> dict[str, Any]:
            return dict(zip(names, u.fixed(packer_struct), strict=True))

        return enc_flat, dec_flat

    def enc(p: Packer, v: Any) -> None:
        if isinstance(v, Mapping):
            for name, e, _ in fields:
                e(p, v[name])
        else:
            for name, e, _ in fields:
                e(p, getattr(v, name))

    def dec(u: Unpacker, lim: Limits) -> dict[str, Any]:
        return {name: d(u, lim) for name, _, d in fields}

    return enc, dec


# Protocol version 4's typed kinds (wire/mechanisms.py, wire/templates.py).

def _dec_typed_mechanism(u: Unpacker, lim: Limits) -> mech4.TypedMechanism:
    return mech4.decode_mechanism(u, lim.max_opaque)


def _dec_typed_param(u: Unpacker, lim: Limits) -> mech4.ParamValue:
    return mech4.decode_param(u, lim.max_opaque)


def _enc_typed_template(p: Packer, v: tmpl4.TypedTemplate) -> None:
    tmpl4.encode_template(p, v)


def _dec_typed_template(u: Unpacker, lim: Limits) -> tmpl4.TypedTemplate:
    return tmpl4.decode_template(u, lim.max_attributes, lim.max_opaque, lim.max_list_count)


CODECS: dict[Kind, tuple[_Enc, _Dec]] = {
    Kind.HYPER: (_enc_hyper, _dec_hyper),
    Kind.OPAQUE: (_enc_opaque, _dec_opaque),
    Kind.MECHANISM: (_enc_mechanism, _dec_mechanism),
    Kind.TEMPLATE: (_enc_template, _dec_template),
    Kind.HYPER_LIST: (_enc_hyper_list, _dec_hyper_list),
    Kind.TYPED_MECHANISM: (mech4.encode_mechanism, _dec_typed_mechanism),
    Kind.TYPED_PARAM: (mech4.encode_param, _dec_typed_param),
    Kind.TYPED_TEMPLATE: (_enc_typed_template, _dec_typed_template),
}
for _kind in STRUCTS:
    CODECS[_kind] = _struct_codec(_kind)


# --- per-procedure codecs ----------------------------------------------------

class FieldCodec:
    """Encode/decode one ordered list of fields (a procedure's arguments or result).

    Runs of consecutive HYPER fields are compiled into one precompiled
    ``struct.Struct`` each, so that the common shapes ("session handle",
    "rv + handle", "rv + session info") cost one pack/unpack call.
    """

    __slots__ = ("_all_hyper", "_decs", "_encs", "_plan", "_struct", "names")

    def __init__(self, fields: tuple[Field, ...]) -> None:
        self.names = tuple(f.name for f in fields)
        self._encs = tuple(CODECS[f.kind][0] for f in fields)
        self._decs = tuple(CODECS[f.kind][1] for f in fields)
        kinds = [f.kind for f in fields]
        self._all_hyper = all(k is Kind.HYPER for k in kinds)
        self._struct = struct.Struct(">" + "Q" * len(kinds))
        # (Struct, start, end) for a run of hypers, (None, index, decoder) otherwise.
        plan: list[tuple[struct.Struct | None, int, Any]] = []
        i = 0
        while i < len(kinds):
            if kinds[i] is Kind.HYPER:
                j = i
                while j < len(kinds) and kinds[j] is Kind.HYPER:
                    j += 1
                plan.append((struct.Struct(">" + "Q" * (j - i)), i, j))
                i = j
            else:
                plan.append((None, i, self._decs[i]))
                i += 1
        self._plan = tuple(plan)

    def encode(self, values: tuple[Any, ...] | list[Any], packer: Packer | None = None) -> bytes:
        if len(values) != len(self._encs):
            raise ValueError(f"expected {len(self._encs)} values, got {len(values)}")
        p = packer or Packer()
        self.encode_into(p, values)
        return p.getvalue()

    def encode_into(self, p: Packer, values: tuple[Any, ...] | list[Any]) -> None:
        buf = p.buffer()
        mark = len(buf)
        try:
            if self._all_hyper:
                buf += self._struct.pack(*values)
                return
            for st, start, end in self._plan:
                if st is not None:
                    buf += st.pack(*values[start:end])
                else:
                    self._encs[start](p, values[start])
        except struct.error:
            # Negative numbers (Caml Crush's "-1" codes): the generic encoders
            # mask them to their 64-bit two's-complement pattern.
            del buf[mark:]
            for enc, value in zip(self._encs, values, strict=True):
                enc(p, value)

    def decode(self, data: bytes | memoryview, limits: Limits = DEFAULT_LIMITS) -> tuple[Any, ...]:
        """Decode exactly ``data``: trailing bytes are an error (GARBAGE_ARGS)."""
        if self._all_hyper:
            if len(data) != self._struct.size:
                raise XdrError(f"expected {self._struct.size} bytes, got {len(data)}")
            return self._struct.unpack(data)
        u = Unpacker(data)
        values: list[Any] = []
        for st, _, dec in self._plan:
            if st is not None:
                values.extend(u.fixed(st))
            else:
                values.append(dec(u, limits))
        u.done()
        return tuple(values)


@dataclass(frozen=True, slots=True)
class ProcedureCodec:
    procedure: Procedure
    args: FieldCodec
    result: FieldCodec


PROCEDURE_CODECS: dict[int, ProcedureCodec] = {
    p.number: ProcedureCodec(p, FieldCodec(p.args), FieldCodec(p.result)) for p in PROCEDURES
}


# Per protocol version (3: Caml Crush's, 4: p11guard's): number -> codec.
CODECS_BY_VERSION: dict[int, dict[int, ProcedureCodec]] = {
    version: {
        number: ProcedureCodec(p, FieldCodec(p.args), FieldCodec(p.result))
        for number, p in table.items()
    }
    for version, table in TABLES.items()
}
CODECS_BY_VERSION[3] = PROCEDURE_CODECS  # the very same objects as before


def codec_for(number: int) -> ProcedureCodec:
    try:
        return PROCEDURE_CODECS[number]
    except KeyError:
        raise XdrError(f"no procedure {number}") from None


def rv_only_result(procedure: Procedure, rv: int) -> tuple[Any, ...]:
    """A well-formed result for ``procedure`` carrying only an error code.

    Used when a call is refused before reaching the module: every other field
    gets its empty value (0, b"", empty list, zeroed struct).
    """
    values: list[Any] = [rv]
    for f in procedure.result[1:]:
        values.append(empty_value(f.kind))
    return tuple(values)


def empty_value(kind: Kind) -> Any:
    if kind is Kind.HYPER:
        return 0
    if kind is Kind.OPAQUE:
        return b""
    if kind is Kind.MECHANISM:
        return (0, b"")
    if kind is Kind.TYPED_MECHANISM:
        return (0, mech4.NO_PARAM)
    if kind is Kind.TYPED_PARAM:
        return mech4.NO_PARAM
    if kind in (Kind.TEMPLATE, Kind.HYPER_LIST, Kind.TYPED_TEMPLATE):
        return []
    out: dict[str, Any] = {}
    for name, shape in STRUCTS[kind]:
        if shape == "hyper":
            out[name] = 0
        elif shape == "version":
            out[name] = (0, 0)
        else:
            assert isinstance(shape, tuple)
            out[name] = b" " * (shape[1] or 0)
    return out


__all__ = [
    "BY_NUMBER",
    "CODECS_BY_VERSION",
    "DEFAULT_LIMITS",
    "PROCEDURE_CODECS",
    "FieldCodec",
    "Limits",
    "ProcedureCodec",
    "XdrError",
    "codec_for",
    "empty_value",
    "rv_only_result",
]
