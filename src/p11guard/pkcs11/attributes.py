"""What kind of value each CKA_ attribute holds, and conversions between layouts.

The proxy moves attribute values as raw bytes.  Most of the time that is all it
needs; but CK_ULONG-valued attributes change size and byte order between a
32-bit client and a 64-bit module (Caml Crush's SetupArch), CK_BBOOL values
must be compared as booleans by the policy, and template-valued attributes hold
pointers that cannot cross a socket.  ``kind_of`` tells those cases apart.
"""

from __future__ import annotations

import enum
import sys
from typing import Final, Literal

from p11guard.pkcs11 import constants as c

Endian = Literal["little", "big"]

NATIVE_ENDIAN: Final[Endian] = "little" if sys.byteorder == "little" else "big"
# sizeof(CK_ULONG) of this process: PKCS#11 on Unix uses unsigned long.
NATIVE_ULONG_SIZE: Final[int] = 8 if sys.maxsize > 2**32 else 4


class AttrKind(enum.Enum):
    """The C type behind an attribute's pValue."""

    ULONG = "ulong"  # CK_ULONG or an alias (CK_OBJECT_CLASS, CK_KEY_TYPE, ...)
    BOOL = "bool"  # CK_BBOOL, one byte
    BYTES = "bytes"  # byte array, RFC 2279 string, DER, big integer
    DATE = "date"  # CK_DATE: 8 ASCII digits YYYYMMDD (or empty)
    TEMPLATE = "template"  # CK_ATTRIBUTE array (CKF_ARRAY_ATTRIBUTE)
    ULONG_ARRAY = "ulong_array"  # CK_MECHANISM_TYPE array


_ULONG: Final[tuple[int, ...]] = (
    c.CKA_CLASS, c.CKA_CERTIFICATE_TYPE, c.CKA_CERTIFICATE_CATEGORY,
    c.CKA_JAVA_MIDP_SECURITY_DOMAIN, c.CKA_NAME_HASH_ALGORITHM, c.CKA_KEY_TYPE,
    c.CKA_MODULUS_BITS, c.CKA_PRIME_BITS, c.CKA_SUBPRIME_BITS, c.CKA_VALUE_BITS,
    c.CKA_VALUE_LEN, c.CKA_KEY_GEN_MECHANISM, c.CKA_AUTH_PIN_FLAGS,
    c.CKA_OTP_FORMAT, c.CKA_OTP_LENGTH, c.CKA_OTP_TIME_INTERVAL,
    c.CKA_OTP_CHALLENGE_REQUIREMENT, c.CKA_OTP_TIME_REQUIREMENT,
    c.CKA_OTP_COUNTER_REQUIREMENT, c.CKA_OTP_PIN_REQUIREMENT,
    c.CKA_HW_FEATURE_TYPE, c.CKA_PIXEL_X, c.CKA_PIXEL_Y, c.CKA_RESOLUTION,
    c.CKA_CHAR_ROWS, c.CKA_CHAR_COLUMNS, c.CKA_BITS_PER_PIXEL, c.CKA_MECHANISM_TYPE,
    c.CKA_PROFILE_ID, c.CKA_X2RATCHET_BAGSIZE, c.CKA_X2RATCHET_NR, c.CKA_X2RATCHET_NS,
    c.CKA_X2RATCHET_PNS,
)

_BOOL: Final[tuple[int, ...]] = (
    c.CKA_TOKEN, c.CKA_PRIVATE, c.CKA_TRUSTED, c.CKA_SENSITIVE, c.CKA_ENCRYPT,
    c.CKA_DECRYPT, c.CKA_WRAP, c.CKA_UNWRAP, c.CKA_SIGN, c.CKA_SIGN_RECOVER, c.CKA_VERIFY,
    c.CKA_VERIFY_RECOVER, c.CKA_DERIVE, c.CKA_EXTRACTABLE, c.CKA_LOCAL,
    c.CKA_NEVER_EXTRACTABLE, c.CKA_ALWAYS_SENSITIVE, c.CKA_MODIFIABLE, c.CKA_COPYABLE,
    c.CKA_DESTROYABLE, c.CKA_SECONDARY_AUTH, c.CKA_ALWAYS_AUTHENTICATE,
    c.CKA_WRAP_WITH_TRUSTED, c.CKA_OTP_USER_FRIENDLY_MODE, c.CKA_RESET_ON_INIT,
    c.CKA_HAS_RESET, c.CKA_COLOR, c.CKA_X2RATCHET_BOBS1STMSG, c.CKA_X2RATCHET_ISALICE,
)

KINDS: Final[dict[int, AttrKind]] = {
    **{t: AttrKind.ULONG for t in _ULONG},
    **{t: AttrKind.BOOL for t in _BOOL},
    c.CKA_START_DATE: AttrKind.DATE,
    c.CKA_END_DATE: AttrKind.DATE,
    c.CKA_WRAP_TEMPLATE: AttrKind.TEMPLATE,
    c.CKA_UNWRAP_TEMPLATE: AttrKind.TEMPLATE,
    c.CKA_DERIVE_TEMPLATE: AttrKind.TEMPLATE,
    c.CKA_ALLOWED_MECHANISMS: AttrKind.ULONG_ARRAY,
}


def kind_of(attr_type: int) -> AttrKind:
    """The value kind of ``attr_type``; unknown and vendor attributes are BYTES.

    Treating what we do not know as opaque bytes is the only safe default: it
    is passed through unchanged and never reinterpreted.
    """
    return KINDS.get(attr_type, AttrKind.BYTES)


def convert_ulong(
    value: bytes, from_size: int, from_endian: Endian, to_size: int, to_endian: Endian
) -> bytes | None:
    """Re-encode one CK_ULONG from one (size, byte order) layout to another.

    Returns None when ``value`` is not exactly ``from_size`` bytes or when the
    number does not fit in ``to_size`` bytes (a 64-bit value above 2**32-1
    going to a 32-bit peer): the caller must then answer with an error rather
    than silently truncate.
    """
    if len(value) != from_size or from_size not in (4, 8) or to_size not in (4, 8):
        return None
    number = int.from_bytes(value, from_endian)
    if number >= 1 << (8 * to_size):
        return None
    return number.to_bytes(to_size, to_endian)


def convert_ulong_array(
    value: bytes, from_size: int, from_endian: Endian, to_size: int, to_endian: Endian
) -> bytes | None:
    """``convert_ulong`` over a packed array of CK_ULONGs (CKA_ALLOWED_MECHANISMS)."""
    if from_size not in (4, 8) or len(value) % from_size:
        return None
    parts = []
    for start in range(0, len(value), from_size):
        part = convert_ulong(
            value[start:start + from_size], from_size, from_endian, to_size, to_endian
        )
        if part is None:
            return None
        parts.append(part)
    return b"".join(parts)


def canonical_bool(value: bytes) -> bool:
    """A CK_BBOOL as the policy must read it: any non-zero byte is TRUE.

    Modules disagree on what TRUE looks like (0x01, 0xFF, or even a wider
    field); the policy must not be fooled by a "true" that is not 0x01.
    """
    return any(value)


def ulong_bytes(number: int, size: int = NATIVE_ULONG_SIZE,
                endian: Endian = NATIVE_ENDIAN) -> bytes:
    """Encode a CK_ULONG attribute value (native layout by default)."""
    return number.to_bytes(size, endian)


def bytes_ulong(value: bytes, endian: Endian = NATIVE_ENDIAN) -> int | None:
    """Decode a CK_ULONG attribute value; None unless it is 4 or 8 bytes long."""
    if len(value) not in (4, 8):
        return None
    return int.from_bytes(value, endian)


TRUE: Final[bytes] = b"\x01"
FALSE: Final[bytes] = b"\x00"
