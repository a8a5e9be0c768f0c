"""forbid_admin_operations: SO login, InitToken, InitPIN, SO-side SetPIN."""

from __future__ import annotations

from p11guard.pkcs11 import constants as c
from tests.unit.test_policy_support import SESSION, SLOT, engine

RULE = 'forbid_admin_operations = [("softhsm", true)]\n'


def test_so_login_refused() -> None:
    wrapped, backend = engine(RULE)
    assert wrapped.login(SESSION, c.CKU_SO, b"5678") == c.CKR_USER_TYPE_INVALID
    assert wrapped.login_user(SESSION, c.CKU_SO, b"5678", b"so") == c.CKR_USER_TYPE_INVALID
    assert backend.calls == []
    assert wrapped.login(SESSION, c.CKU_USER, b"1234") == c.CKR_OK


def test_init_token_and_init_pin_refused() -> None:
    """Caml Crush lets C_InitToken through: SO-PIN oracle and token wipe (bug B11)."""
    wrapped, backend = engine(RULE)
    assert wrapped.init_token(SLOT, b"5678", b"x" * 32) == c.CKR_FUNCTION_NOT_SUPPORTED
    assert wrapped.init_pin(SESSION, b"1234") == c.CKR_FUNCTION_NOT_SUPPORTED
    assert backend.calls == []


def test_set_pin_refused_only_in_so_sessions() -> None:
    wrapped, backend = engine(RULE)
    assert wrapped.set_pin(SESSION, b"1234", b"4321") == c.CKR_OK
    backend.session_state = c.CKS_RW_SO_FUNCTIONS
    assert wrapped.set_pin(SESSION, b"5678", b"8765") == c.CKR_FUNCTION_NOT_SUPPORTED
    assert backend.count("set_pin") == 1


def test_context_specific_allowed_in_strict_refused_in_compat() -> None:
    strict, _ = engine(RULE)
    assert strict.login(SESSION, c.CKU_CONTEXT_SPECIFIC, b"1234") == c.CKR_OK
    compat, _ = engine(RULE, mode="compat")
    assert compat.login(SESSION, c.CKU_CONTEXT_SPECIFIC, b"1234") == c.CKR_USER_TYPE_INVALID


def test_off_means_untouched() -> None:
    wrapped, backend = engine('forbid_admin_operations = [("softhsm", false)]\n')
    assert wrapped.init_token == backend.init_token or wrapped.init_token(SLOT, None, b"") == 0
