"""Attribute value kinds and layout conversions (src/p11guard/pkcs11/attributes.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p11guard.pkcs11 import constants as c
from p11guard.pkcs11.attributes import (
    NATIVE_ULONG_SIZE,
    AttrKind,
    Endian,
    bytes_ulong,
    canonical_bool,
    convert_ulong,
    convert_ulong_array,
    kind_of,
    ulong_bytes,
)

ENDIANS: tuple[Endian, ...] = ("little", "big")


@pytest.mark.parametrize(
    ("attr", "kind"),
    [
        (c.CKA_CLASS, AttrKind.ULONG), (c.CKA_KEY_TYPE, AttrKind.ULONG),
        (c.CKA_CERTIFICATE_TYPE, AttrKind.ULONG), (c.CKA_CERTIFICATE_CATEGORY, AttrKind.ULONG),
        (c.CKA_HW_FEATURE_TYPE, AttrKind.ULONG), (c.CKA_MODULUS_BITS, AttrKind.ULONG),
        (c.CKA_VALUE_BITS, AttrKind.ULONG), (c.CKA_VALUE_LEN, AttrKind.ULONG),
        (c.CKA_PRIME_BITS, AttrKind.ULONG), (c.CKA_SUB_PRIME_BITS, AttrKind.ULONG),
        (c.CKA_KEY_GEN_MECHANISM, AttrKind.ULONG), (c.CKA_MECHANISM_TYPE, AttrKind.ULONG),
        (c.CKA_NAME_HASH_ALGORITHM, AttrKind.ULONG),
        (c.CKA_JAVA_MIDP_SECURITY_DOMAIN, AttrKind.ULONG), (c.CKA_AUTH_PIN_FLAGS, AttrKind.ULONG),
        (c.CKA_PIXEL_X, AttrKind.ULONG), (c.CKA_CHAR_ROWS, AttrKind.ULONG),
        (c.CKA_BITS_PER_PIXEL, AttrKind.ULONG), (c.CKA_OTP_FORMAT, AttrKind.ULONG),
        (c.CKA_OTP_LENGTH, AttrKind.ULONG), (c.CKA_PROFILE_ID, AttrKind.ULONG),
        (c.CKA_TOKEN, AttrKind.BOOL), (c.CKA_SENSITIVE, AttrKind.BOOL),
        (c.CKA_EXTRACTABLE, AttrKind.BOOL), (c.CKA_WRAP_WITH_TRUSTED, AttrKind.BOOL),
        (c.CKA_ALWAYS_AUTHENTICATE, AttrKind.BOOL), (c.CKA_OTP_USER_FRIENDLY_MODE, AttrKind.BOOL),
        (c.CKA_COPYABLE, AttrKind.BOOL), (c.CKA_DESTROYABLE, AttrKind.BOOL),
        (c.CKA_START_DATE, AttrKind.DATE), (c.CKA_END_DATE, AttrKind.DATE),
        (c.CKA_WRAP_TEMPLATE, AttrKind.TEMPLATE), (c.CKA_UNWRAP_TEMPLATE, AttrKind.TEMPLATE),
        (c.CKA_DERIVE_TEMPLATE, AttrKind.TEMPLATE),
        (c.CKA_ALLOWED_MECHANISMS, AttrKind.ULONG_ARRAY),
        (c.CKA_VALUE, AttrKind.BYTES), (c.CKA_LABEL, AttrKind.BYTES),
        (c.CKA_UNIQUE_ID, AttrKind.BYTES), (c.CKA_OTP_TIME, AttrKind.BYTES),
        (c.CKA_VENDOR_DEFINED + 7, AttrKind.BYTES), (0x7FFF0000, AttrKind.BYTES),
    ],
)
def test_kind_of(attr: int, kind: AttrKind) -> None:
    assert kind_of(attr) is kind


def test_array_attributes_are_exactly_the_array_flagged_ones() -> None:
    for value in c.TABLES["CKA"].values():
        is_array = bool(value & c.CKF_ARRAY_ATTRIBUTE) and value < c.CKA_VENDOR_DEFINED
        assert is_array == (kind_of(value) in (AttrKind.TEMPLATE, AttrKind.ULONG_ARRAY))


def test_every_bool_and_ulong_is_a_known_attribute() -> None:
    known = set(c.TABLES["CKA"].values())
    from p11guard.pkcs11.attributes import KINDS

    assert set(KINDS) <= known


def test_convert_ulong_examples() -> None:
    one_le8 = (1).to_bytes(8, "little")
    assert convert_ulong(one_le8, 8, "little", 4, "big") == b"\x00\x00\x00\x01"
    assert convert_ulong(b"\x00\x00\x00\x01", 4, "big", 8, "little") == one_le8
    too_big = (2**32).to_bytes(8, "little")
    assert convert_ulong(too_big, 8, "little", 4, "little") is None
    assert convert_ulong((2**32 - 1).to_bytes(8, "big"), 8, "big", 4, "big") == b"\xff" * 4
    assert convert_ulong(b"\x01\x02\x03", 4, "little", 8, "little") is None  # wrong size
    assert convert_ulong(b"\x01" * 8, 8, "little", 3, "little") is None
    assert convert_ulong(b"", 4, "little", 4, "little") is None


@given(st.integers(0, 2**32 - 1), st.sampled_from(ENDIANS), st.sampled_from(ENDIANS),
       st.sampled_from((4, 8)), st.sampled_from((4, 8)))
def test_convert_ulong_round_trip(n: int, e1: Endian, e2: Endian, s1: int, s2: int) -> None:
    there = convert_ulong(n.to_bytes(s1, e1), s1, e1, s2, e2)
    assert there is not None and int.from_bytes(there, e2) == n
    assert convert_ulong(there, s2, e2, s1, e1) == n.to_bytes(s1, e1)


@given(st.lists(st.integers(0, 2**32 - 1), max_size=8))
def test_convert_ulong_array(values: list[int]) -> None:
    raw = b"".join(v.to_bytes(8, "little") for v in values)
    out = convert_ulong_array(raw, 8, "little", 4, "big")
    assert out == b"".join(v.to_bytes(4, "big") for v in values)
    assert convert_ulong_array(raw + b"\x00", 8, "little", 4, "big") is None


def test_convert_ulong_array_refuses_overflow() -> None:
    raw = (1).to_bytes(8, "little") + (2**40).to_bytes(8, "little")
    assert convert_ulong_array(raw, 8, "little", 4, "little") is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [(b"\x01", True), (b"\xff", True), (b"\x00", False), (b"", False),
     (b"\x00\x00\x00\x01", True), (b"\x00" * 8, False), (b"\x02", True)],
)
def test_canonical_bool(value: bytes, expected: bool) -> None:
    assert canonical_bool(value) is expected


def test_ulong_helpers() -> None:
    assert len(ulong_bytes(5)) == NATIVE_ULONG_SIZE
    assert bytes_ulong(ulong_bytes(5)) == 5
    assert bytes_ulong(b"\x01\x02") is None
