"""Constant tables and lookups (src/p11guard/pkcs11/constants.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p11guard.pkcs11 import constants as c
from p11guard.pkcs11._cdef import SIGNATURES_30, SIGNATURES_240

REPO = Path(__file__).resolve().parents[2]

# Values from the PKCS#11 2.40 / 3.0 specifications, written out independently.
KNOWN = {
    "CKR_OK": 0x0, "CKR_CANCEL": 0x1, "CKR_ARGUMENTS_BAD": 0x7,
    "CKR_ATTRIBUTE_SENSITIVE": 0x11, "CKR_BUFFER_TOO_SMALL": 0x150,
    "CKR_CRYPTOKI_NOT_INITIALIZED": 0x190, "CKR_CRYPTOKI_ALREADY_INITIALIZED": 0x191,
    "CKR_EXCEEDED_MAX_ITERATIONS": 0x1B5, "CKR_PIN_TOO_WEAK": 0x1B8,
    "CKR_PUBLIC_KEY_INVALID": 0x1B9, "CKR_FUNCTION_REJECTED": 0x200,
    "CKR_TOKEN_RESOURCE_EXCEEDED": 0x201, "CKR_OPERATION_CANCEL_FAILED": 0x202,
    "CKR_VENDOR_DEFINED": 0x80000000,
    "CKM_RSA_PKCS_KEY_PAIR_GEN": 0x0, "CKM_RSA_PKCS": 0x1, "CKM_SHA256_RSA_PKCS": 0x40,
    "CKM_AES_KEY_GEN": 0x1080, "CKM_AES_CBC": 0x1082, "CKM_AES_GCM": 0x1087,
    "CKM_AES_KEY_WRAP": 0x2109, "CKM_AES_KEY_WRAP_PAD": 0x210A, "CKM_EC_KEY_PAIR_GEN": 0x1040,
    "CKM_ECDSA": 0x1041, "CKM_EDDSA": 0x1057, "CKM_EC_EDWARDS_KEY_PAIR_GEN": 0x1055,
    "CKM_SHA3_256": 0x2B0, "CKM_CHACHA20": 0x1226, "CKM_POLY1305": 0x1228,
    "CKM_CHACHA20_POLY1305": 0x4021, "CKM_SALSA20": 0x4020, "CKM_X3DH_INITIALIZE": 0x4023,
    "CKM_XEDDSA": 0x4029, "CKM_HKDF_DERIVE": 0x402A, "CKM_HKDF_DATA": 0x402B,
    "CKM_HKDF_KEY_GEN": 0x402C, "CKM_IKE2_PRF_PLUS_DERIVE": 0x402E,
    "CKA_CLASS": 0x0, "CKA_UNIQUE_ID": 0x4, "CKA_VALUE": 0x11, "CKA_SENSITIVE": 0x103,
    "CKA_WRAP_TEMPLATE": 0x40000211, "CKA_UNWRAP_TEMPLATE": 0x40000212,
    "CKA_DERIVE_TEMPLATE": 0x40000213, "CKA_ALLOWED_MECHANISMS": 0x40000600,
    "CKA_PROFILE_ID": 0x601,
    "CKO_SECRET_KEY": 0x4, "CKO_PROFILE": 0x9, "CKK_AES": 0x1F, "CKK_EC_EDWARDS": 0x40,
    "CKK_EC_MONTGOMERY": 0x41, "CKK_HKDF": 0x42, "CKK_CHACHA20": 0x33,
    "CKU_SO": 0, "CKU_USER": 1, "CKU_CONTEXT_SPECIFIC": 2,
    "CKS_RW_SO_FUNCTIONS": 4, "CKC_X_509": 0, "CKH_CLOCK": 2, "CKD_NULL": 1,
    "CKD_SHA3_256_KDF": 0xB, "CKG_MGF1_SHA256": 2, "CKG_MGF1_SHA3_256": 7,
    "CKG_GENERATE_RANDOM": 3, "CKP_BASELINE_PROVIDER": 1, "CKZ_DATA_SPECIFIED": 1,
    "CKF_TOKEN_PRESENT": 1, "CKF_RNG": 1, "CKF_RW_SESSION": 2, "CKF_SERIAL_SESSION": 4,
    "CKF_HW": 1, "CKF_OS_LOCKING_OK": 2, "CKF_ARRAY_ATTRIBUTE": 0x40000000,
    "CKF_DONT_BLOCK": 1, "CKF_INTERFACE_FORK_SAFE": 1, "CKF_EC_OID": 0x800000,
}


@pytest.mark.parametrize(("name", "value"), sorted(KNOWN.items()))
def test_known_values(name: str, value: int) -> None:
    assert getattr(c, name) == value
    assert c.value_of(name) == value


def test_special_values() -> None:
    assert c.CK_UNAVAILABLE_INFORMATION == 2**64 - 1
    assert c.CK_INVALID_HANDLE == 0
    assert c.CK_EFFECTIVELY_INFINITE == 0


@pytest.mark.parametrize(
    ("table", "value", "name"),
    [
        ("CKR", 0, "CKR_OK"), ("CKR_", 0x150, "CKR_BUFFER_TOO_SMALL"),
        ("CKM", 0x2109, "CKM_AES_KEY_WRAP"), ("CKA", 0x40000211, "CKA_WRAP_TEMPLATE"),
        ("CKK", 3, "CKK_EC"), ("CKA", 0x180, "CKA_EC_PARAMS"),
        ("CKM", 0x397, "CKM_SHA3_256_KEY_DERIVATION"),
        ("CKF_TOKEN", 1, "CKF_RNG"), ("CKF_SLOT", 1, "CKF_TOKEN_PRESENT"),
        ("CKF_MECHANISM", 1, "CKF_HW"), ("CKF_SESSION", 4, "CKF_SERIAL_SESSION"),
        ("CKF_INIT", 1, "CKF_LIBRARY_CANT_CREATE_OS_THREADS"),
        ("CKG", 1, "CKG_MGF1_SHA1"), ("CKG_GENERATE", 1, "CKG_GENERATE"),
        ("CKP", 1, "CKP_BASELINE_PROVIDER"), ("CKP_PBKD2", 1, "CKP_PKCS5_PBKD2_HMAC_SHA1"),
        ("CKZ", 1, "CKZ_DATA_SPECIFIED"), ("CKZ_SALT", 1, "CKZ_SALT_SPECIFIED"),
        ("CKU", 2, "CKU_CONTEXT_SPECIFIC"), ("CKS", 0, "CKS_RO_PUBLIC_SESSION"),
    ],
)
def test_name_of_canonical(table: str, value: int, name: str) -> None:
    """Colliding values resolve by context, aliases never win."""
    assert c.name_of(table, value) == name


def test_name_of_vendor_and_unknown() -> None:
    assert c.name_of("CKM", 0x80000005) == "CKM_VENDOR_DEFINED+0x5"
    assert c.name_of("CKA", 0x80000000) == "CKA_VENDOR_DEFINED"
    assert c.name_of("CKR", 0x80001234) == "CKR_VENDOR_DEFINED+0x1234"
    assert c.name_of("CKM", 0x7FFF1234) == "0x7fff1234"
    assert c.name_of("CKU", 0x80001234) == "0x80001234"  # CKU_ has no vendor range
    assert c.name_of("CKR", 2**64 - 1) == "CKR_VENDOR_DEFINED+0xffffffff7fffffff"
    with pytest.raises(KeyError):
        c.name_of("CKQ", 1)


def test_value_of_forms() -> None:
    assert c.value_of("CKM_VENDOR_DEFINED+0x5") == 0x80000005
    assert c.value_of("0x80001234") == 0x80001234
    assert c.value_of("42") == 42
    assert c.value_of(" CKM_AES_CBC ") == 0x1082
    assert c.value_of("CKK_ECDSA") == c.CKK_EC  # alias accepted on input
    assert c.value_of("CKA_SUB_PRIME_BITS") == c.CKA_SUBPRIME_BITS
    for bad in ("CKM_NOPE", "", "0xZZ", "CKM_AES_CBC+1", "CKM_VENDOR_DEFINED+zz",
                str(2**64), "ckm_aes_cbc"):
        with pytest.raises(KeyError):
            c.value_of(bad)


def test_every_name_round_trips() -> None:
    for table, names in c.TABLES.items():
        for name, value in names.items():
            assert c.value_of(name) == value
            canonical = c.name_of(table, value)
            assert c.value_of(canonical) == value
            assert canonical not in c.ALIASES
            assert getattr(c, name) == value


@given(st.sampled_from(sorted(c.TABLES)), st.integers(0, 2**64 - 1))
def test_name_of_total_and_reversible(table: str, value: int) -> None:
    """Any CK_ULONG has a printable name that value_of maps back."""
    assert c.value_of(c.name_of(table, value)) == value


def test_flag_names() -> None:
    flags = c.CKF_RNG | c.CKF_LOGIN_REQUIRED | c.CKF_TOKEN_INITIALIZED | 0x4000000
    assert c.flag_names("CKF_TOKEN", flags) == [
        "CKF_RNG", "CKF_LOGIN_REQUIRED", "CKF_TOKEN_INITIALIZED", "0x4000000",
    ]
    assert c.flag_names("CKF_MECHANISM", c.CKF_SIGN | c.CKF_VERIFY) == ["CKF_SIGN", "CKF_VERIFY"]
    assert c.flag_names("CKF_SESSION", 0) == []


def test_flag_contexts_do_not_mix() -> None:
    assert "CKF_RNG" not in c.TABLES["CKF_SLOT"]
    assert "CKF_HW" in c.TABLES["CKF_MECHANISM"] and "CKF_HW" not in c.TABLES["CKF_TOKEN"]
    # Names are unique across all tables, so value_of needs no context.
    seen: set[str] = set()
    for names in c.TABLES.values():
        assert not seen & names.keys()
        seen |= names.keys()


def test_function_names() -> None:
    assert len(c.FUNCTIONS_240) == 67 and len(set(c.FUNCTIONS_240)) == 67
    assert "C_GetFunctionList" not in c.FUNCTIONS_240
    assert len(c.FUNCTIONS_30) == 24
    assert {"C_LoginUser", "C_SessionCancel", "C_GetInterface"} <= set(c.FUNCTIONS_30)
    # The binding's C function list has the same functions in the same order.
    assert tuple(n for n, _ in SIGNATURES_240 if n != "C_GetFunctionList") == c.FUNCTIONS_240
    assert tuple(n for n, _ in SIGNATURES_30) == c.FUNCTIONS_30
    assert c.ALL_FUNCTIONS == c.FUNCTIONS_240 + c.FUNCTIONS_30


@pytest.mark.skipif(
    not Path("/usr/include/nss/pkcs11t.h").exists()
    or not Path("/usr/include/p11-kit-1/p11-kit/pkcs11.h").exists(),
    reason="system PKCS#11 headers not installed",
)
def test_generated_block_is_up_to_date() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "tools/gen_constants.py"), "--check"])
    assert proc.returncode == 0, "run tools/gen_constants.py"
