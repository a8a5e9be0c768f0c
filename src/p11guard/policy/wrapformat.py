"""The two wrapping formats: Caml Crush's (interoperable) and p11guard's own (v1).

A wrapped key leaves the token as ``W`` (the token's C_WrapKey output).  The
wrapping-format patch appends the key's security attributes and a MAC, so the
attributes cannot be changed between C_WrapKey and C_UnwrapKey (an attacker
who unwraps the same blob twice, once with DECRYPT and once with WRAP, gets a
wrap/decrypt pair on one key value).

**Caml Crush format** (reference notes §7.9, kept byte for byte so blobs move
between Caml Crush 1.0.12 and p11guard)::

    W | CKA_CLASS (u32 big-endian) | 10 (or 14 with segregation) attribute bytes
      | AES-128-CMAC (16 bytes) over everything before it

Attribute byte: 0x01 TRUE, 0x00 FALSE, 0xFF absent.  No version, no key type,
no value length, no mechanism binding (bug B7).

**p11guard format v1** (everything bound, fixed-length trailer at the end)::

    W | "P11G" | version (1) | reserved (1) | len(W) (u32) | CKA_CLASS (u64)
      | CKA_KEY_TYPE (u64) | CKA_VALUE_LEN (u64, all-ones if none)
      | wrapping mechanism (u64) | 15 attribute bytes | HMAC-SHA256 (32)

integers big-endian; the MAC covers W and the trailer before it, under a key
derived from the configured 16-byte key (so a blob of one format never
verifies as the other).  The MAC is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.cmac import CMAC

from p11guard.pkcs11 import constants as c

ABSENT: Final = 0xFF
CLASS_UNAVAILABLE: Final = 0xFFFFFFFF
ALL_ONES_64: Final = (1 << 64) - 1

# Caml Crush's "critical attributes" after CKA_CLASS, in blob order.
CAMLCRUSH_ATTRIBUTES: Final[tuple[int, ...]] = (
    c.CKA_SENSITIVE, c.CKA_EXTRACTABLE, c.CKA_ALWAYS_SENSITIVE, c.CKA_NEVER_EXTRACTABLE,
    c.CKA_ENCRYPT, c.CKA_DECRYPT, c.CKA_WRAP, c.CKA_UNWRAP, c.CKA_PRIVATE, c.CKA_DERIVE,
)
# Appended with do_segregate_usage.
SEGREGATION_ATTRIBUTES: Final[tuple[int, ...]] = (
    c.CKA_SIGN, c.CKA_VERIFY, c.CKA_SIGN_RECOVER, c.CKA_VERIFY_RECOVER,
)
# p11guard v1: always every usage, whatever the segregation setting.
P11GUARD_ATTRIBUTES: Final[tuple[int, ...]] = (
    *CAMLCRUSH_ATTRIBUTES, *SEGREGATION_ATTRIBUTES, c.CKA_WRAP_WITH_TRUSTED,
)

CMAC_LEN: Final = 16
P11G_MAGIC: Final = b"P11G"
P11G_VERSION: Final = 1
_P11G_HEAD = struct.Struct(">4sBBIQQQQ")
P11G_MAC_LEN: Final = 32
P11G_TRAILER_LEN: Final = _P11G_HEAD.size + len(P11GUARD_ATTRIBUTES) + P11G_MAC_LEN
_P11G_KDF_LABEL: Final = b"p11guard wrapping format v1 MAC key"


class FormatError(ValueError):
    """A blob that is not (a valid instance of) the expected format."""


def cmac(key: bytes, data: bytes) -> bytes:
    """AES-128-CMAC (RFC 4493)."""
    mac = CMAC(algorithms.AES(key))
    mac.update(data)
    return mac.finalize()


def bool_byte(value: bytes | None) -> int:
    """An attribute as Caml Crush's byte: absent 0xFF, else any non-zero byte is TRUE."""
    if value is None:
        return ABSENT
    return 0x01 if any(value) else 0x00


@dataclass(frozen=True, slots=True)
class Unwrapped:
    """What a blob says about the key inside: attribute constraints and W."""

    wrapped: bytes  # W, for the token's C_UnwrapKey
    booleans: dict[int, bool]  # attribute -> value (absent attributes not listed)
    key_class: int | None
    key_type: int | None = None
    value_len: int | None = None
    mechanism: int | None = None
    format: str = "camlcrush"


# -- Caml Crush format --------------------------------------------------------------

def camlcrush_trailer_len(segregate: bool) -> int:
    return 4 + len(CAMLCRUSH_ATTRIBUTES) + (len(SEGREGATION_ATTRIBUTES) if segregate else 0) \
        + CMAC_LEN


def camlcrush_wrap(key: bytes, wrapped: bytes, key_class: int | None,
                   attributes: Mapping[int, bytes | None], *, segregate: bool = False) -> bytes:
    """``wrapped`` with Caml Crush's attribute trailer and CMAC."""
    types = CAMLCRUSH_ATTRIBUTES + (SEGREGATION_ATTRIBUTES if segregate else ())
    klass = CLASS_UNAVAILABLE if key_class is None else key_class & 0xFFFFFFFF
    body = wrapped + struct.pack(">I", klass) + bytes(bool_byte(attributes.get(t)) for t in types)
    return body + cmac(key, body)


def camlcrush_unwrap(key: bytes, blob: bytes, *, segregate: bool = False) -> Unwrapped:
    """Check the CMAC and decode; FormatError if short or forged."""
    types = CAMLCRUSH_ATTRIBUTES + (SEGREGATION_ATTRIBUTES if segregate else ())
    trailer = camlcrush_trailer_len(segregate)
    if len(blob) < trailer:
        raise FormatError("blob shorter than the Caml Crush trailer")
    body, mac = blob[:-CMAC_LEN], blob[-CMAC_LEN:]
    # Constant time (Caml Crush compares with (=), bug B7).
    if not hmac.compare_digest(cmac(key, body), mac):
        raise FormatError("Caml Crush CMAC mismatch")
    n = len(blob) - trailer
    (klass,) = struct.unpack(">I", body[n:n + 4])
    booleans: dict[int, bool] = {}
    for t, byte in zip(types, body[n + 4:], strict=True):
        if byte in (0, 1):  # other bytes: no constraint, as in Caml Crush
            booleans[t] = byte == 1
    return Unwrapped(wrapped=blob[:n], booleans=booleans,
                     key_class=None if klass == CLASS_UNAVAILABLE else klass)


# -- p11guard format v1 ---------------------------------------------------------------

def _p11g_key(key: bytes) -> bytes:
    # Domain separation: the configured key also serves Caml Crush's CMAC.
    return hmac.new(key, _P11G_KDF_LABEL, hashlib.sha256).digest()


def _u64(value: int | None) -> int:
    return ALL_ONES_64 if value is None else value & ALL_ONES_64


def p11guard_wrap(key: bytes, wrapped: bytes, *, key_class: int | None, key_type: int | None,
                  value_len: int | None, mechanism: int,
                  attributes: Mapping[int, bytes | None]) -> bytes:
    """``wrapped`` with the p11guard v1 trailer and its HMAC."""
    if len(wrapped) > 0xFFFFFFFF:
        raise FormatError("wrapped key too long")
    head = _P11G_HEAD.pack(P11G_MAGIC, P11G_VERSION, 0, len(wrapped), _u64(key_class),
                           _u64(key_type), _u64(value_len), _u64(mechanism))
    body = wrapped + head + bytes(bool_byte(attributes.get(t)) for t in P11GUARD_ATTRIBUTES)
    return body + hmac.new(_p11g_key(key), body, hashlib.sha256).digest()


def is_p11guard_blob(blob: bytes) -> bool:
    """Does ``blob`` carry a p11guard trailer (not yet authenticated)?"""
    if len(blob) < P11G_TRAILER_LEN:
        return False
    start = len(blob) - P11G_TRAILER_LEN
    return blob[start:start + 4] == P11G_MAGIC


def p11guard_unwrap(key: bytes, blob: bytes) -> Unwrapped:
    """Check the HMAC and decode; FormatError if short, forged or of another version."""
    if not is_p11guard_blob(blob):
        raise FormatError("not a p11guard wrapped key")
    body, mac = blob[:-P11G_MAC_LEN], blob[-P11G_MAC_LEN:]
    if not hmac.compare_digest(hmac.new(_p11g_key(key), body, hashlib.sha256).digest(), mac):
        raise FormatError("p11guard MAC mismatch")
    start = len(blob) - P11G_TRAILER_LEN
    _magic, version, _reserved, w_len, klass, ktype, vlen, mech = _P11G_HEAD.unpack_from(
        blob, start)
    if version != P11G_VERSION:
        raise FormatError(f"unsupported p11guard wrapping format version {version}")
    if w_len != start:
        raise FormatError("length field does not match the blob")
    flags = blob[start + _P11G_HEAD.size:start + _P11G_HEAD.size + len(P11GUARD_ATTRIBUTES)]
    booleans = {t: b == 1 for t, b in zip(P11GUARD_ATTRIBUTES, flags, strict=True)
                if b in (0, 1)}

    def opt(v: int) -> int | None:
        return None if v == ALL_ONES_64 else v

    return Unwrapped(wrapped=blob[:start], booleans=booleans, key_class=opt(klass),
                     key_type=opt(ktype), value_len=opt(vlen), mechanism=opt(mech),
                     format="p11guard")


def trailer_len(fmt: str, *, segregate: bool = False) -> int:
    return P11G_TRAILER_LEN if fmt == "p11guard" else camlcrush_trailer_len(segregate)
