"""remove_padding_oracles, including C_DecryptInit (Caml Crush's bug B8)."""

from __future__ import annotations

import pytest

from p11guard.pkcs11 import constants as c
from p11guard.policy.rules.padding import CAMLCRUSH_ORACLES, ORACLE_MECHANISMS
from tests.unit.test_policy_support import SESSION, engine

PAD = (c.CKM_AES_CBC_PAD, b"\0" * 16)
RSA = (c.CKM_RSA_PKCS, None)
OAEP = (c.CKM_RSA_PKCS_OAEP, b"p")


def rule(*ops: str) -> str:
    return f'remove_padding_oracles = [("softhsm", [{", ".join(ops)}])]\n'


@pytest.mark.parametrize("ops,refused,allowed", [
    (("encrypt",), ["encrypt_init", "decrypt_init"], ["sign_init", "verify_init"]),
    (("sign",), ["sign_init", "sign_recover_init", "verify_init", "verify_recover_init"],
     ["encrypt_init", "decrypt_init"]),
    (("unwrap",), ["decrypt_init"], ["encrypt_init", "sign_init"]),
    (("all",), ["encrypt_init", "decrypt_init", "sign_init", "verify_init"], []),
])
def test_inits(ops: tuple[str, ...], refused: list[str], allowed: list[str]) -> None:
    wrapped, _backend = engine(rule(*ops))
    for method in refused:
        assert getattr(wrapped, method)(SESSION, RSA, 1) == c.CKR_MECHANISM_INVALID, method
        assert getattr(wrapped, method)(SESSION, OAEP, 1) == c.CKR_OK, method
    for method in allowed:
        assert getattr(wrapped, method)(SESSION, RSA, 1) == c.CKR_OK, method


def test_wrap_and_unwrap() -> None:
    wrapped, _backend = engine(rule("wrap", "unwrap"))
    assert wrapped.wrap_key(SESSION, PAD, 1, 2, None)[0] == c.CKR_MECHANISM_INVALID
    assert wrapped.unwrap_key(SESSION, RSA, 1, b"w", [])[0] == c.CKR_MECHANISM_INVALID
    assert wrapped.unwrap_key(SESSION, (c.CKM_AES_KEY_WRAP, None), 1, b"w", [])[0] == c.CKR_OK


def test_mechanism_lists() -> None:
    assert len(CAMLCRUSH_ORACLES) == 20  # Caml Crush's 21 names, CAST5 = CAST128
    assert CAMLCRUSH_ORACLES < ORACLE_MECHANISMS
    assert c.CKM_SHA224_RSA_PKCS in ORACLE_MECHANISMS
    assert c.CKM_RSA_PKCS_OAEP not in ORACLE_MECHANISMS


def test_unwrap_rule_does_not_skip_other_checks() -> None:
    """Caml Crush's bug B1: with unwrap on, other mechanisms skipped every later check."""
    wrapped, backend = engine(rule("unwrap") + 'allowed_labels = [("softhsm", ["ok"])]\n')
    backend.add(1, b"ok")
    result = wrapped.unwrap_key(SESSION, (c.CKM_AES_KEY_WRAP, None), 1, b"w",
                                [(c.CKA_LABEL, b"evil")])
    assert result[0] == c.CKR_ATTRIBUTE_VALUE_INVALID
