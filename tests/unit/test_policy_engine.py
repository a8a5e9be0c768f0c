"""The engine: pass-through cost, unit order, fail-closed behaviour, alias matching."""

from __future__ import annotations

from typing import Any

from p11guard.pkcs11 import constants as c
from p11guard.policy.engine import DeniedModule, PolicyModule
from p11guard.policy.rules.base import Unit
from p11guard.policy.rules.calls import Call, Done
from tests.unit.test_policy_support import SESSION, engine

ECDSA = (c.CKM_ECDSA, None)


def test_no_rules_means_the_backends_own_methods() -> None:
    wrapped, backend = engine()
    assert isinstance(wrapped, PolicyModule)
    # Nothing applies to C_Sign: the bound method of the backend, no wrapper at all.
    assert wrapped.get_session_info == backend.get_session_info
    assert wrapped.raw_function("C_Sign") is None  # would bypass the policy
    assert wrapped.path == backend.path and wrapped.has("C_Sign")


def test_pipeline_order_is_the_documented_one() -> None:
    wrapped, _ = engine(
        'forbidden_mechanisms = [("softhsm", [CKM_RSA_PKCS])]\n'
        'allowed_labels = [("softhsm", ["ok"])]\n'
        'remove_padding_oracles = [("softhsm", [all])]\n'
        'forbid_admin_operations = [("softhsm", true)]\n'
        'filter_actions_pre = [("softhsm", [(C_SignInit, identity)])]\n'
        'filter_actions_post = [("softhsm", [(C_SignInit, c_Login_hook)])]\n')
    names = [u.label for u in wrapped.pipelines["C_SignInit"]]
    assert names == ["identity", "object_visibility", "forbidden_mechanisms",
                     "remove_padding_oracles", "c_Login_hook"]
    assert [u.label for u in wrapped.pipelines["C_CreateObject"]] == [
        "canonical_booleans", "allowed_labels"]


def test_first_refusal_decides_the_rv() -> None:
    wrapped, backend = engine(
        'forbidden_mechanisms = [("softhsm", [CKM_RSA_PKCS])]\n'
        'allowed_labels = [("softhsm", ["ok"])]\n'
        'forbidden_functions = [("softhsm", [C_SignInit])]\n')
    backend.add(5, b"hidden")
    # forbidden_functions (20) before visibility (30) before mechanisms (40).
    assert wrapped.sign_init(SESSION, (c.CKM_RSA_PKCS, None), 5) == c.CKR_FUNCTION_NOT_SUPPORTED
    assert wrapped.verify_init(SESSION, (c.CKM_RSA_PKCS, None), 5) == c.CKR_OBJECT_HANDLE_INVALID
    backend.add(6, b"ok")
    assert wrapped.verify_init(SESSION, (c.CKM_RSA_PKCS, None), 6) == c.CKR_MECHANISM_INVALID
    assert wrapped.verify_init(SESSION, ECDSA, 6) == c.CKR_OK
    assert backend.count("verify_init") == 1


class Exploding(Unit):
    name = "exploding"

    def applies(self, spec: Any) -> bool:
        return True

    def check(self, call: Call) -> Any:
        raise RuntimeError("pin was 1234")  # must not reach the audit log


class WrongShape(Unit):
    name = "wrong_shape"

    def applies(self, spec: Any) -> bool:
        return True

    def check(self, call: Call) -> Any:
        return Done("not a tuple")


def test_a_raising_unit_becomes_general_error(caplog: Any) -> None:
    wrapped, backend = engine(
        'filter_actions_post = [("softhsm", [(C_Sign, "tests.unit.test_policy_engine:Exploding"), '
        '(C_GetAttributeValue, "tests.unit.test_policy_engine:Exploding")])]\n')
    assert wrapped.sign(SESSION, b"data", 100) == (c.CKR_GENERAL_ERROR, None, 0)
    rv, answers = wrapped.get_attribute_value(SESSION, 1, [(c.CKA_LABEL, None)])
    assert rv == c.CKR_GENERAL_ERROR and len(answers) == 1
    assert "sign" not in backend.names()
    assert "1234" not in caplog.text and "RuntimeError" in caplog.text


def test_a_terminal_answer_of_the_wrong_shape_is_refused() -> None:
    wrapped, _ = engine('filter_actions_post = [("softhsm", '
                        '[(C_Sign, "tests.unit.test_policy_engine:WrongShape")])]\n')
    assert wrapped.sign(SESSION, b"x", 10) == (c.CKR_GENERAL_ERROR, None, 0)


def test_a_raising_backend_becomes_general_error() -> None:
    _wrapped, backend = engine('forbidden_mechanisms = [("softhsm", [CKM_RSA_PKCS])]\n')

    def broken(*args: Any) -> Any:
        raise OverflowError("can't convert negative int to unsigned")

    backend.sign_init = broken  # type: ignore[attr-defined]
    wrapped2, _ = engine('forbidden_mechanisms = [("softhsm", [CKM_RSA_PKCS])]\n', backend)
    assert wrapped2.sign_init(SESSION, ECDSA, 1) == c.CKR_GENERAL_ERROR


def test_strict_aliases_match_exactly() -> None:
    modules = '[("softhsm", "/fake/libfake.so"), ("s.*", "/fake/libfake.so")]'
    rules = 'forbidden_mechanisms = [("softhsm", [CKM_ECDSA])]\n'
    # Caml Crush: the client picks "sX": matches the second alias, escapes the rule.
    compat, backend = engine(rules, alias="sX", mode="compat", modules=modules)
    assert compat.sign_init(SESSION, ECDSA, 1) == c.CKR_OK
    # strict: a name that is not a configured alias gets a module that refuses everything.
    strict, backend = engine(rules, alias="sX", modules=modules)
    assert isinstance(strict, DeniedModule)
    assert strict.sign_init(SESSION, ECDSA, 1) == c.CKR_GENERAL_ERROR
    assert strict.get_mechanism_list(1, None) == (c.CKR_GENERAL_ERROR, [], 0)
    assert backend.calls == []


def test_rules_follow_the_alias() -> None:
    modules = '[("softhsm", "/fake/libfake.so"), ("other", "/fake/libfake.so")]'
    rules = 'forbidden_mechanisms = [("softhsm", [CKM_ECDSA])]\n'
    mine, _ = engine(rules, alias="softhsm", modules=modules)
    other, _ = engine(rules, alias="other", modules=modules)
    assert mine.sign_init(SESSION, ECDSA, 1) == c.CKR_MECHANISM_INVALID
    assert other.sign_init(SESSION, ECDSA, 1) == c.CKR_OK
