"""Typed mechanism parameters of protocol version 4: a discriminated union.

Version 3 carries ``pParameter`` as the client's raw memory, which cannot work
for structures holding pointers and is garbled between architectures.  Version
4 sends each parameter as a *tag* (which C structure it is) followed by the
structure's fields in a fixed order, every CK_ULONG as an XDR hyper and every
pointer+length pair as an ``opaque<>``.  Nothing in the encoding depends on the
peer's word size or byte order.

Python representation: ``(tag, values)`` where ``values`` is a tuple in the
order of :data:`PARAMS`\\ ``[tag].fields``; a typed mechanism is
``(mechanism_type, (tag, values))``.

This module is bytes only.  Which mechanism may carry which tag, and how a tag
becomes a native C structure, is PKCS#11 knowledge: see
:mod:`p11guard.pkcs11.paramtable` and :mod:`p11guard.pkcs11.cparams`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .xdr import Packer, Unpacker, XdrError

# Field codes: "h" hyper (CK_ULONG / CK_BBOOL / enum), "o" opaque<> (a pointer and
# its length, or a byte string), "fN" an opaque<> of exactly N bytes (a C array).
ParamValue = tuple[int, tuple[Any, ...]]
TypedMechanism = tuple[int, ParamValue]


@dataclass(frozen=True, slots=True)
class ParamShape:
    tag: int
    name: str
    c_struct: str  # the C type the server builds ("" for byte strings and NONE)
    fields: tuple[tuple[str, str], ...]

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.fields)


def _shape(tag: int, name: str, c_struct: str, spec: str) -> ParamShape:
    fields = tuple(tuple(item.split(":")) for item in spec.split())
    return ParamShape(tag, name, c_struct, fields)  # type: ignore[arg-type]


# THE table of parameter encodings.  Tags are part of the protocol: never
# renumber, only append.
_SHAPES: tuple[ParamShape, ...] = (
    _shape(0, "NONE", "", ""),
    _shape(1, "BYTES", "", "data:o"),
    _shape(2, "ULONG", "CK_ULONG", "value:h"),
    _shape(3, "RSA_PKCS_PSS", "CK_RSA_PKCS_PSS_PARAMS", "hash_alg:h mgf:h salt_len:h"),
    _shape(4, "RSA_PKCS_OAEP", "CK_RSA_PKCS_OAEP_PARAMS",
           "hash_alg:h mgf:h source:h source_data:o"),
    _shape(5, "GCM", "CK_GCM_PARAMS", "iv:o iv_bits:h aad:o tag_bits:h"),
    _shape(6, "CCM", "CK_CCM_PARAMS", "data_len:h nonce:o aad:o mac_len:h"),
    _shape(7, "AES_CTR", "CK_AES_CTR_PARAMS", "counter_bits:h cb:f16"),
    _shape(8, "ECDH1_DERIVE", "CK_ECDH1_DERIVE_PARAMS", "kdf:h shared_data:o public_data:o"),
    _shape(9, "KEY_DERIVATION_STRING", "CK_KEY_DERIVATION_STRING_DATA", "data:o"),
    _shape(10, "AES_CBC_ENCRYPT_DATA", "CK_AES_CBC_ENCRYPT_DATA_PARAMS", "iv:f16 data:o"),
    _shape(11, "DES_CBC_ENCRYPT_DATA", "CK_DES_CBC_ENCRYPT_DATA_PARAMS", "iv:f8 data:o"),
    _shape(12, "PKCS5_PBKD2", "CK_PKCS5_PBKD2_PARAMS",
           "salt_source:h salt_source_data:o iterations:h prf:h prf_data:o password:o"),
    _shape(13, "PKCS5_PBKD2_2", "CK_PKCS5_PBKD2_PARAMS2",
           "salt_source:h salt_source_data:o iterations:h prf:h prf_data:o password:o"),
    _shape(14, "HKDF", "CK_HKDF_PARAMS",
           "extract:h expand:h prf_hash:h salt_type:h salt:o salt_key:h info:o"),
    _shape(15, "EDDSA", "CK_EDDSA_PARAMS", "ph_flag:h context_data:o"),
    _shape(16, "ECDH_AES_KEY_WRAP", "CK_ECDH_AES_KEY_WRAP_PARAMS",
           "aes_key_bits:h kdf:h shared_data:o"),
    _shape(17, "RSA_AES_KEY_WRAP", "CK_RSA_AES_KEY_WRAP_PARAMS",
           "aes_key_bits:h hash_alg:h mgf:h source:h source_data:o"),
    _shape(18, "X9_42_DH1_DERIVE", "CK_X9_42_DH1_DERIVE_PARAMS",
           "kdf:h other_info:o public_data:o"),
    _shape(19, "CHACHA20_POLY1305", "CK_SALSA20_CHACHA20_POLY1305_PARAMS", "nonce:o aad:o"),
    _shape(20, "CHACHA20", "CK_CHACHA20_PARAMS",
           "block_counter:o block_counter_bits:h nonce:o nonce_bits:h"),
    _shape(21, "GCM_MESSAGE", "CK_GCM_MESSAGE_PARAMS",
           "iv:o iv_fixed_bits:h iv_generator:h tag:o tag_bits:h"),
    _shape(22, "CCM_MESSAGE", "CK_CCM_MESSAGE_PARAMS",
           "data_len:h nonce:o nonce_fixed_bits:h nonce_generator:h mac:o"),
    _shape(23, "CHACHA20_POLY1305_MESSAGE", "CK_SALSA20_CHACHA20_POLY1305_MSG_PARAMS",
           "nonce:o tag:f16"),
    # The client's own memory in the layout it declared with SetupArch: only for
    # mechanisms the peers do not both know, and only when the server allows it.
    _shape(24, "RAW", "", "data:o"),
)

PARAMS: dict[int, ParamShape] = {s.tag: s for s in _SHAPES}
TAGS: dict[str, int] = {s.name: s.tag for s in _SHAPES}
TAG_NONE = TAGS["NONE"]
TAG_BYTES = TAGS["BYTES"]
TAG_RAW = TAGS["RAW"]
# Message-based (PKCS#11 3.0) per-message parameters: in/out structures whose
# buffers the module may write (IV, tag, MAC); the reply carries them back.
MESSAGE_TAGS: frozenset[int] = frozenset(
    {TAGS["GCM_MESSAGE"], TAGS["CCM_MESSAGE"], TAGS["CHACHA20_POLY1305_MESSAGE"]}
)

assert len(PARAMS) == len(_SHAPES) and sorted(PARAMS) == list(range(len(_SHAPES)))


def param(name: str, **fields: Any) -> ParamValue:
    """Build a parameter by names: ``param("GCM", iv=..., iv_bits=96, aad=b"", tag_bits=128)``."""
    shape = PARAMS[TAGS[name]]
    missing = set(shape.field_names) - set(fields)
    extra = set(fields) - set(shape.field_names)
    if missing or extra:
        raise ValueError(f"{name}: missing {sorted(missing)}, unknown {sorted(extra)}")
    return shape.tag, tuple(fields[n] for n in shape.field_names)


def as_dict(value: ParamValue) -> dict[str, Any]:
    tag, values = value
    return dict(zip(PARAMS[tag].field_names, values, strict=True))


def encode_param(p: Packer, value: ParamValue) -> None:
    tag, values = value
    shape = PARAMS.get(tag)
    if shape is None:
        raise ValueError(f"unknown parameter tag {tag}")
    if len(values) != len(shape.fields):
        raise ValueError(f"{shape.name}: expected {len(shape.fields)} fields")
    p.uint(tag)
    for (name, code), v in zip(shape.fields, values, strict=True):
        if code == "h":
            p.hyper(int(v))
        else:
            data = bytes(v)
            if code != "o" and len(data) != int(code[1:]):
                raise ValueError(f"{shape.name}.{name}: exactly {code[1:]} bytes")
            p.opaque(data)


def decode_param(u: Unpacker, max_opaque: int) -> ParamValue:
    tag = u.uint()
    shape = PARAMS.get(tag)
    if shape is None:
        raise XdrError(f"unknown mechanism parameter tag {tag}")
    values: list[Any] = []
    for name, code in shape.fields:
        if code == "h":
            values.append(u.hyper())
        elif code == "o":
            values.append(u.opaque(max_opaque))
        else:
            size = int(code[1:])
            data = u.opaque(size)
            if len(data) != size:
                raise XdrError(f"{shape.name}.{name}: {len(data)} bytes, expected {size}")
            values.append(data)
    return tag, tuple(values)


def encode_mechanism(p: Packer, mech: TypedMechanism) -> None:
    p.hyper(mech[0])
    encode_param(p, mech[1])


def decode_mechanism(u: Unpacker, max_opaque: int) -> TypedMechanism:
    mech_type = u.hyper()
    return mech_type, decode_param(u, max_opaque)


NO_PARAM: ParamValue = (TAG_NONE, ())
