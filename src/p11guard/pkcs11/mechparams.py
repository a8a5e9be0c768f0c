"""Mechanism parameters that arrive as raw client memory (Caml Crush protocol v3).

Protocol version 3 carries ``pParameter`` as the client's bytes.  That is fine
for byte strings (IVs) and flat ``CK_ULONG`` structures between peers of the
same architecture, and fatal for structures holding pointers: the pointers are
addresses in the *client's* process (Caml Crush's worker crashes on them).

This module never forwards raw client memory blindly.  For each parameterised
mechanism we know the C layout; a raw parameter is parsed with the client's
CK_ULONG size and byte order and rebuilt in the server's native layout.  A
pointer field is acceptable only when it is NULL (and so means nothing in any
address space); otherwise the call is refused with CKR_MECHANISM_PARAM_INVALID.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from typing import Final

from .attributes import Endian

CKR_MECHANISM_PARAM_INVALID = 0x71

NATIVE_ULONG_SIZE = struct.calcsize("L")
NATIVE_BYTEORDER: Final[Endian] = "little" if sys.byteorder == "little" else "big"


@dataclass(frozen=True, slots=True)
class Arch:
    """A peer's CK_ULONG size (4 or 8) and byte order ("little" or "big")."""

    ulong_size: int
    byteorder: Endian

    @property
    def is_native(self) -> bool:
        return self.ulong_size == NATIVE_ULONG_SIZE and self.byteorder == NATIVE_BYTEORDER


NATIVE_ARCH = Arch(NATIVE_ULONG_SIZE, NATIVE_BYTEORDER)


class ParamRefused(Exception):
    """The raw parameter cannot be forwarded safely; answer CKR_MECHANISM_PARAM_INVALID."""

    rv = CKR_MECHANISM_PARAM_INVALID


# Field codes: "u" CK_ULONG, "p" pointer, "c" CK_BBOOL/CK_BYTE, "bN" CK_BYTE[N].
_LAYOUTS: dict[str, tuple[str, ...]] = {
    "PSS": ("u", "u", "u"),  # hashAlg, mgf, sLen
    "OAEP": ("u", "u", "u", "p", "u"),  # hashAlg, mgf, source, pSourceData, ulSourceDataLen
    "ULONG": ("u",),  # CK_MAC_GENERAL_PARAMS, CK_EXTRACT_PARAMS, CK_OBJECT_HANDLE
    "AES_CTR": ("u", "b16"),  # ulCounterBits, cb[16]
    "EDDSA": ("c", "u", "p"),  # phFlag, ulContextDataLen, pContextData
}

_MECHANISM_LAYOUT: dict[int, str] = {}
for _m in (0x0D, 0x0E, 0x43, 0x44, 0x45, 0x47, 0x63, 0x64, 0x65, 0x67):
    _MECHANISM_LAYOUT[_m] = "PSS"
_MECHANISM_LAYOUT[0x09] = "OAEP"  # CKM_RSA_PKCS_OAEP
_MECHANISM_LAYOUT[0x1086] = "AES_CTR"
_MECHANISM_LAYOUT[0x1057] = "EDDSA"
for _m in (
    0x0202, 0x0212, 0x0222, 0x0232, 0x0242, 0x0252, 0x0257, 0x0262, 0x0272,  # *_HMAC_GENERAL
    0x004A, 0x004E, 0x0052,  # SHA512_224/256/T_HMAC_GENERAL
    0x1084, 0x108B,  # AES_MAC_GENERAL, AES_CMAC_GENERAL
    0x0360, 0x0365,  # CONCATENATE_BASE_AND_KEY, EXTRACT_KEY_FROM_KEY
):
    _MECHANISM_LAYOUT[_m] = "ULONG"

# Structures whose pointers are never NULL in a meaningful call: refused outright
# unless the parameter is empty.
POINTER_PARAM_MECHANISMS: frozenset[int] = frozenset({
    0x1087,  # AES_GCM
    0x1088,  # AES_CCM
    0x1050, 0x1051, 0x1052,  # ECDH1_DERIVE, ECDH1_COFACTOR_DERIVE, ECMQV_DERIVE
    0x1053, 0x1054,  # ECDH_AES_KEY_WRAP, RSA_AES_KEY_WRAP
    0x0031, 0x0032, 0x0033,  # X9_42_DH_DERIVE, X9_42_DH_HYBRID_DERIVE, X9_42_MQV_DERIVE
    0x1100, 0x1101, 0x1102, 0x1103, 0x1104, 0x1105,  # *_ENCRYPT_DATA derivation
    0x0556, 0x0557, 0x0566, 0x0567, 0x0656, 0x0657,  # CAMELLIA/ARIA/SEED_*_ENCRYPT_DATA
    0x0362, 0x0363, 0x0364,  # CONCATENATE_*_DATA, XOR_BASE_AND_DATA
    0x03B0,  # PKCS5_PBKD2
    0x0371, 0x0372, 0x0373, 0x0375, 0x0376, 0x0377, 0x0378,  # SSL3/TLS derivation, TLS_PRF
    0x03D6, 0x03D7, 0x03D8, 0x03D9,  # TLS10_MAC_*, TLS12_MAC, TLS12_KDF
    0x03E0, 0x03E1, 0x03E2, 0x03E3, 0x03E4, 0x03E5,  # TLS12_*, TLS_MAC, TLS_KDF
    0x0401,  # KEY_WRAP_SET_OAEP
    0x402A, 0x402B,  # HKDF_DERIVE, HKDF_DATA
    0x1226, 0x4021, 0x4020, 0x4022,  # CHACHA20, CHACHA20_POLY1305, SALSA20, SALSA20_POLY1305
    0x03AC, 0x03AD, 0x03AE,  # SP800_108_*_KDF
    0x1202, 0x1203,  # GOSTR3410_KEY_WRAP, GOSTR3410_DERIVE
})


def _field_size(code: str, arch: Arch) -> tuple[int, int]:
    """(size, alignment) of a field code."""
    if code in ("u", "p"):
        return arch.ulong_size, arch.ulong_size
    if code == "c":
        return 1, 1
    return int(code[1:]), 1


def _layout(fields: tuple[str, ...], arch: Arch) -> tuple[list[int], int]:
    offsets = []
    pos = 0
    max_align = 1
    for code in fields:
        size, align = _field_size(code, arch)
        max_align = max(max_align, align)
        pos = (pos + align - 1) // align * align
        offsets.append(pos)
        pos += size
    total = (pos + max_align - 1) // max_align * max_align
    return offsets, total


def _parse(fields: tuple[str, ...], raw: bytes, arch: Arch) -> list[int | bytes]:
    offsets, total = _layout(fields, arch)
    if len(raw) != total:
        raise ParamRefused(f"parameter of {len(raw)} bytes, expected {total}")
    values: list[int | bytes] = []
    for code, off in zip(fields, offsets, strict=True):
        size, _ = _field_size(code, arch)
        chunk = raw[off : off + size]
        if code in ("u", "p"):
            values.append(int.from_bytes(chunk, arch.byteorder))
        elif code == "c":
            values.append(chunk[0])
        else:
            values.append(bytes(chunk))
    return values


def _build(fields: tuple[str, ...], values: list[int | bytes], arch: Arch) -> bytes:
    offsets, total = _layout(fields, arch)
    out = bytearray(total)
    for code, off, value in zip(fields, offsets, values, strict=True):
        size, _ = _field_size(code, arch)
        if code in ("u", "p"):
            assert isinstance(value, int)
            if value >= 1 << (8 * size):
                raise ParamRefused("a CK_ULONG field does not fit the server's CK_ULONG")
            out[off : off + size] = value.to_bytes(size, arch.byteorder)
        elif code == "c":
            assert isinstance(value, int)
            out[off] = value
        else:
            assert isinstance(value, bytes)
            out[off : off + size] = value
    return bytes(out)


def native_parameter(mechanism: int, raw: bytes, client: Arch) -> bytes | None:
    """The parameter to hand the module for a raw v3 parameter, or raise ParamRefused.

    Returns None for an empty parameter: the module gets pParameter = NULL
    (Caml Crush passes a non-NULL zero-length pointer, which SoftHSM refuses).
    """
    if not raw:
        return None
    if mechanism in POINTER_PARAM_MECHANISMS:
        raise ParamRefused("this mechanism's parameter holds pointers; protocol v3 cannot carry it")
    layout_name = _MECHANISM_LAYOUT.get(mechanism)
    if layout_name is None:
        # Byte-string parameters (IVs, DH public values) and vendor mechanisms
        # with flat parameters: forwarded as they are.
        return raw
    fields = _LAYOUTS[layout_name]
    values = _parse(fields, raw, client)
    for code, value in zip(fields, values, strict=True):
        if code == "p" and value != 0:
            raise ParamRefused("a pointer inside the parameter is not NULL")
    if client.is_native:
        return raw
    return _build(fields, values, NATIVE_ARCH)
