"""forbidden_functions: CKR_FUNCTION_NOT_SUPPORTED, after the pre actions."""

from __future__ import annotations

from p11guard.pkcs11 import constants as c
from p11guard.policy.rules.calls import Call
from tests.unit.test_policy_support import SESSION, engine

RULE = 'forbidden_functions = [("softhsm", [C_Login, C_GenerateRandom, C_DestroyObject])]\n'


def test_forbidden_functions_refused_before_the_token() -> None:
    wrapped, backend = engine(RULE)
    assert wrapped.login(SESSION, c.CKU_USER, b"1234") == c.CKR_FUNCTION_NOT_SUPPORTED
    assert wrapped.generate_random(SESSION, 16) == (c.CKR_FUNCTION_NOT_SUPPORTED, b"")
    assert wrapped.destroy_object(SESSION, 1) == c.CKR_FUNCTION_NOT_SUPPORTED
    assert backend.calls == []
    assert wrapped.logout(SESSION) == c.CKR_OK


def test_the_30_equivalent_is_forbidden_too() -> None:
    wrapped, backend = engine(RULE)
    assert wrapped.login_user(SESSION, c.CKU_USER, b"1234", b"u") == c.CKR_FUNCTION_NOT_SUPPORTED
    assert backend.calls == []


def answer_ok(call: Call) -> int:
    return c.CKR_OK


def test_pre_actions_run_before_forbidden_functions() -> None:
    wrapped, backend = engine(
        RULE + 'filter_actions_pre = [("softhsm", '
        '[(C_Login, "tests.unit.test_policy_functions:answer_ok")])]\n')
    assert wrapped.login(SESSION, c.CKU_USER, b"1234") == c.CKR_OK
    assert backend.calls == []
