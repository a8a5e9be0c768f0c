"""Which typed parameter (protocol v4 tag) each mechanism takes.

The server accepts a typed parameter only with a mechanism listed here for
that tag: a structure is then rebuilt in native memory exactly as the module
expects it, so a client cannot make the module read one structure as another
(a CK_ULONG taken for a pointer is how Caml Crush's worker crashes).

``NONE`` (a NULL parameter) is always accepted: the module itself refuses a
missing parameter it needs.  ``RAW`` (client memory) is accepted only where
the server configuration allows it (see :func:`raw_allowed`).

docs/mechanisms.md is this table in prose; keep them together.
"""

from __future__ import annotations

from typing import Final

from p11guard.pkcs11 import constants as c
from p11guard.wire.mechanisms import TAGS


def _values(names: str) -> list[int]:
    out = []
    for name in names.split():
        value = getattr(c, name, None)
        if value is None:
            raise AssertionError(f"unknown mechanism {name}")
        out.append(int(value))
    return out


# tag name -> mechanisms, by name.  A mechanism may accept several tags
# (CKM_PKCS5_PBKD2: the 2.40 and the 3.0 structure).
_BY_TAG: Final[dict[str, str]] = {
    # Byte strings: IVs, DH public values, AES key wrap's optional IV.
    "BYTES": """
        CKM_DES_CBC CKM_DES_CBC_PAD CKM_DES3_CBC CKM_DES3_CBC_PAD CKM_DES_OFB64 CKM_DES_OFB8
        CKM_DES_CFB64 CKM_DES_CFB8 CKM_CDMF_CBC CKM_CDMF_CBC_PAD
        CKM_AES_CBC CKM_AES_CBC_PAD CKM_AES_CTS CKM_AES_OFB CKM_AES_CFB64 CKM_AES_CFB8
        CKM_AES_CFB128 CKM_AES_CFB1 CKM_AES_KEY_WRAP CKM_AES_KEY_WRAP_PAD CKM_AES_KEY_WRAP_KWP
        CKM_CAMELLIA_CBC CKM_CAMELLIA_CBC_PAD CKM_ARIA_CBC CKM_ARIA_CBC_PAD CKM_SEED_CBC
        CKM_SEED_CBC_PAD CKM_BLOWFISH_CBC CKM_BLOWFISH_CBC_PAD CKM_TWOFISH_CBC
        CKM_TWOFISH_CBC_PAD CKM_IDEA_CBC CKM_IDEA_CBC_PAD CKM_CAST_CBC CKM_CAST_CBC_PAD
        CKM_CAST3_CBC CKM_CAST3_CBC_PAD CKM_CAST128_CBC CKM_CAST128_CBC_PAD
        CKM_DH_PKCS_DERIVE CKM_GOST28147 CKM_GOST28147_KEY_WRAP
    """,
    # One CK_ULONG: output lengths of the *_GENERAL MACs, a bit index, a key handle.
    "ULONG": """
        CKM_MD5_HMAC_GENERAL CKM_SHA_1_HMAC_GENERAL CKM_SHA224_HMAC_GENERAL
        CKM_SHA256_HMAC_GENERAL CKM_SHA384_HMAC_GENERAL CKM_SHA512_HMAC_GENERAL
        CKM_SHA512_224_HMAC_GENERAL CKM_SHA512_256_HMAC_GENERAL CKM_SHA512_T_HMAC_GENERAL
        CKM_SHA3_224_HMAC_GENERAL CKM_SHA3_256_HMAC_GENERAL CKM_SHA3_384_HMAC_GENERAL
        CKM_SHA3_512_HMAC_GENERAL CKM_RIPEMD128_HMAC_GENERAL CKM_RIPEMD160_HMAC_GENERAL
        CKM_DES_MAC_GENERAL CKM_DES3_MAC_GENERAL CKM_DES3_CMAC_GENERAL CKM_AES_MAC_GENERAL
        CKM_AES_CMAC_GENERAL CKM_CAMELLIA_MAC_GENERAL CKM_ARIA_MAC_GENERAL
        CKM_EXTRACT_KEY_FROM_KEY CKM_CONCATENATE_BASE_AND_KEY
    """,
    "RSA_PKCS_PSS": """
        CKM_RSA_PKCS_PSS CKM_SHA1_RSA_PKCS_PSS CKM_SHA224_RSA_PKCS_PSS CKM_SHA256_RSA_PKCS_PSS
        CKM_SHA384_RSA_PKCS_PSS CKM_SHA512_RSA_PKCS_PSS CKM_SHA3_224_RSA_PKCS_PSS
        CKM_SHA3_256_RSA_PKCS_PSS CKM_SHA3_384_RSA_PKCS_PSS CKM_SHA3_512_RSA_PKCS_PSS
    """,
    "RSA_PKCS_OAEP": "CKM_RSA_PKCS_OAEP",
    "GCM": "CKM_AES_GCM",
    "CCM": "CKM_AES_CCM",
    "AES_CTR": "CKM_AES_CTR",
    "ECDH1_DERIVE": "CKM_ECDH1_DERIVE CKM_ECDH1_COFACTOR_DERIVE",
    "KEY_DERIVATION_STRING": """
        CKM_CONCATENATE_BASE_AND_DATA CKM_CONCATENATE_DATA_AND_BASE CKM_XOR_BASE_AND_DATA
        CKM_DES_ECB_ENCRYPT_DATA CKM_DES3_ECB_ENCRYPT_DATA CKM_AES_ECB_ENCRYPT_DATA
        CKM_CAMELLIA_ECB_ENCRYPT_DATA CKM_ARIA_ECB_ENCRYPT_DATA CKM_SEED_ECB_ENCRYPT_DATA
    """,
    "AES_CBC_ENCRYPT_DATA": """
        CKM_AES_CBC_ENCRYPT_DATA CKM_CAMELLIA_CBC_ENCRYPT_DATA CKM_ARIA_CBC_ENCRYPT_DATA
        CKM_SEED_CBC_ENCRYPT_DATA
    """,
    "DES_CBC_ENCRYPT_DATA": "CKM_DES_CBC_ENCRYPT_DATA CKM_DES3_CBC_ENCRYPT_DATA",
    "PKCS5_PBKD2": "CKM_PKCS5_PBKD2",
    "PKCS5_PBKD2_2": "CKM_PKCS5_PBKD2",
    "HKDF": "CKM_HKDF_DERIVE CKM_HKDF_DATA",
    "EDDSA": "CKM_EDDSA",
    "ECDH_AES_KEY_WRAP": "CKM_ECDH_AES_KEY_WRAP",
    "RSA_AES_KEY_WRAP": "CKM_RSA_AES_KEY_WRAP",
    "X9_42_DH1_DERIVE": "CKM_X9_42_DH_DERIVE",
    "CHACHA20_POLY1305": "CKM_CHACHA20_POLY1305 CKM_SALSA20_POLY1305",
    "CHACHA20": "CKM_CHACHA20",
    # Per-message parameters (C_EncryptMessage & co.): checked against the
    # mechanism of the session's Message*Init.
    "GCM_MESSAGE": "CKM_AES_GCM",
    "CCM_MESSAGE": "CKM_AES_CCM",
    "CHACHA20_POLY1305_MESSAGE": "CKM_CHACHA20_POLY1305 CKM_SALSA20_POLY1305",
}

ACCEPTED: Final[dict[int, frozenset[int]]] = {}
for _tag_name, _names in _BY_TAG.items():
    for _mech in _values(_names):
        ACCEPTED[_mech] = ACCEPTED.get(_mech, frozenset()) | {TAGS[_tag_name]}

# Mechanisms whose v4 parameter is known (any tag): a RAW parameter for them is
# refused, the client has no reason not to send the typed form.
KNOWN: Final[frozenset[int]] = frozenset(ACCEPTED)


def tag_accepted(mechanism: int, tag: int) -> bool:
    """May ``mechanism`` carry a parameter of ``tag`` (RAW excluded: see raw_allowed)?"""
    if tag == TAGS["NONE"]:
        return True
    return tag in ACCEPTED.get(mechanism, frozenset())


def raw_allowed(mechanism: int, enabled: bool, client_is_native: bool) -> bool:
    """RAW passthrough: configured on, same architecture, a mechanism we do not know."""
    return enabled and client_is_native and mechanism not in KNOWN
