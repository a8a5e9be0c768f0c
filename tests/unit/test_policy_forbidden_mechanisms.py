"""forbidden_mechanisms: Inits, key functions, GetMechanismInfo, GetMechanismList."""

from __future__ import annotations

import pytest

from p11guard.pkcs11 import constants as c
from tests.unit.test_policy_support import SESSION, SLOT, engine

RULE = 'forbidden_mechanisms = [("softhsm", [CKM_RSA_PKCS, CKM_AES_GCM])]\n'
RSA = (c.CKM_RSA_PKCS, None)


@pytest.mark.parametrize("method", ["encrypt_init", "decrypt_init", "sign_init", "verify_init",
                                    "sign_recover_init", "verify_recover_init"])
def test_crypto_inits(method: str) -> None:
    wrapped, backend = engine(RULE)
    assert getattr(wrapped, method)(SESSION, RSA, 1) == c.CKR_MECHANISM_INVALID
    assert getattr(wrapped, method)(SESSION, (c.CKM_ECDSA, None), 1) == c.CKR_OK
    assert backend.count(method) == 1


def test_key_functions() -> None:
    wrapped, backend = engine(RULE)
    gcm = (c.CKM_AES_GCM, b"params")
    assert wrapped.digest_init(SESSION, gcm) == c.CKR_MECHANISM_INVALID
    assert wrapped.generate_key(SESSION, gcm, []) == (c.CKR_MECHANISM_INVALID, 0)
    assert wrapped.generate_key_pair(SESSION, RSA, [], []) == (c.CKR_MECHANISM_INVALID, 0, 0)
    assert wrapped.wrap_key(SESSION, RSA, 1, 2, None) == (c.CKR_MECHANISM_INVALID, None, 0)
    assert wrapped.unwrap_key(SESSION, RSA, 1, b"w", []) == (c.CKR_MECHANISM_INVALID, 0)
    assert wrapped.derive_key(SESSION, gcm, 1, []) == (c.CKR_MECHANISM_INVALID, 0)
    assert backend.calls == []


def test_mechanism_info() -> None:
    wrapped, _backend = engine(RULE)
    assert wrapped.get_mechanism_info(SLOT, c.CKM_RSA_PKCS) == (c.CKR_MECHANISM_INVALID, None)
    assert wrapped.get_mechanism_info(SLOT, c.CKM_ECDSA)[0] == c.CKR_OK


def test_mechanism_list_keeps_the_size_query_contract() -> None:
    wrapped, _backend = engine(RULE)
    kept = [c.CKM_RSA_X_509, c.CKM_ECDSA, c.CKM_AES_CBC_PAD]
    assert wrapped.get_mechanism_list(SLOT, None) == (c.CKR_OK, [], 3)
    assert wrapped.get_mechanism_list(SLOT, 2) == (c.CKR_BUFFER_TOO_SMALL, [], 3)
    # 4 is too small for the token's 5 but enough for the filtered 3.
    assert wrapped.get_mechanism_list(SLOT, 4) == (c.CKR_OK, kept, 3)
    assert wrapped.get_mechanism_list(SLOT, 10) == (c.CKR_OK, kept, 3)


def test_mechanism_list_errors_pass_through() -> None:
    wrapped, backend = engine(RULE)

    def failing(slot: int, count: int | None) -> tuple[int, list[int], int]:
        return c.CKR_SLOT_ID_INVALID, [], 0

    backend.get_mechanism_list = failing  # type: ignore[method-assign]
    wrapped, _ = engine(RULE, backend)
    assert wrapped.get_mechanism_list(99, None) == (c.CKR_SLOT_ID_INVALID, [], 0)


def test_inactive_without_rule_for_alias() -> None:
    wrapped, backend = engine('forbidden_mechanisms = [("softhsm", [])]\n')
    assert wrapped.get_mechanism_list == backend.get_mechanism_list
