"""``remove_padding_oracles``: refuse padding-oracle-prone mechanisms.

Caml Crush checks only C_EncryptInit (op ``encrypt``), C_SignInit (``sign``),
C_WrapKey (``wrap``) and C_UnwrapKey (``unwrap``).  It never covers
C_DecryptInit, which is where Bleichenbacher's and Vaudenay's oracles actually
live (bug B8).  p11guard (both modes, the gap is not harmless):

* ``encrypt`` covers C_EncryptInit and C_DecryptInit;
* ``unwrap`` covers C_UnwrapKey and C_DecryptInit (an unwrap oracle is the
  same oracle as a decrypt one: closing one but not the other protects nothing);
* ``sign`` covers C_SignInit, C_SignRecoverInit, C_VerifyInit, C_VerifyRecoverInit;
* ``wrap`` covers C_WrapKey;
* the PKCS#11 3.0 message-based Inits follow their single-part twins.

Refused mechanisms -> CKR_MECHANISM_INVALID: Caml Crush's list, plus the
PKCS#1 v1.5 signatures it forgot (SHA224 and the SHA3 family).
"""

from __future__ import annotations

from typing import Final

from p11guard.pkcs11 import constants as c
from p11guard.policy.model import EffectivePolicy
from p11guard.policy.rules.base import STAGE_PADDING, Unit
from p11guard.policy.rules.calls import MECHANISM, Call, FunctionSpec

CAMLCRUSH_ORACLES: Final[frozenset[int]] = frozenset({
    c.CKM_RSA_PKCS, c.CKM_RSA_X_509, c.CKM_MD2_RSA_PKCS, c.CKM_MD5_RSA_PKCS,
    c.CKM_SHA1_RSA_PKCS, c.CKM_RIPEMD128_RSA_PKCS, c.CKM_RIPEMD160_RSA_PKCS,
    c.CKM_SHA256_RSA_PKCS, c.CKM_SHA384_RSA_PKCS, c.CKM_SHA512_RSA_PKCS,
    c.CKM_RC2_CBC_PAD, c.CKM_DES_CBC_PAD, c.CKM_DES3_CBC_PAD, c.CKM_CDMF_CBC_PAD,
    c.CKM_CAST_CBC_PAD, c.CKM_CAST3_CBC_PAD, c.CKM_CAST128_CBC_PAD, c.CKM_RC5_CBC_PAD,
    c.CKM_IDEA_CBC_PAD, c.CKM_AES_CBC_PAD,
})
ORACLE_MECHANISMS: Final[frozenset[int]] = CAMLCRUSH_ORACLES | {
    c.CKM_SHA224_RSA_PKCS, c.CKM_SHA3_224_RSA_PKCS, c.CKM_SHA3_256_RSA_PKCS,
    c.CKM_SHA3_384_RSA_PKCS, c.CKM_SHA3_512_RSA_PKCS,
}

# function -> the operations (any of them) that cover it.
COVERED_BY: Final[dict[str, frozenset[str]]] = {
    "C_EncryptInit": frozenset({"encrypt"}),
    "C_DecryptInit": frozenset({"encrypt", "unwrap"}),
    "C_SignInit": frozenset({"sign"}),
    "C_SignRecoverInit": frozenset({"sign"}),
    "C_VerifyInit": frozenset({"sign"}),
    "C_VerifyRecoverInit": frozenset({"sign"}),
    "C_MessageEncryptInit": frozenset({"encrypt"}),
    "C_MessageDecryptInit": frozenset({"encrypt", "unwrap"}),
    "C_MessageSignInit": frozenset({"sign"}),
    "C_MessageVerifyInit": frozenset({"sign"}),
    "C_WrapKey": frozenset({"wrap"}),
    "C_UnwrapKey": frozenset({"unwrap"}),
}


def covered_functions(ops: frozenset[str]) -> frozenset[str]:
    """The functions the padding-oracle rule checks for operations ``ops``."""
    return frozenset(fn for fn, by in COVERED_BY.items() if by & ops)


class RemovePaddingOracles(Unit):
    name = "remove_padding_oracles"
    stage = STAGE_PADDING

    @classmethod
    def active(cls, policy: EffectivePolicy) -> bool:
        return bool(policy.padding_oracle_ops)

    def applies(self, spec: FunctionSpec) -> bool:
        return spec.has(MECHANISM) and spec.function in covered_functions(
            self.state.policy.padding_oracle_ops)

    def check(self, call: Call) -> int | None:
        mech = call.first(MECHANISM)
        if mech is not None and int(mech[0]) in ORACLE_MECHANISMS:
            return c.CKR_MECHANISM_INVALID
        return None
