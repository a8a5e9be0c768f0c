"""filter_actions_pre/post: resolution, typed hooks, unimplemented patches are errors."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from p11guard.pkcs11 import constants as c
from p11guard.policy import engine as engine_mod
from p11guard.policy.engine import DeniedModule, EngineContext, check_startup, wrap_module
from p11guard.policy.hooks import ActionNotAvailable, normalise, resolve_action
from p11guard.policy.rules.base import Unit
from p11guard.policy.rules.calls import Call, Done
from tests.unit.test_policy_support import SESSION, FakeBackend, engine, policy_of

CALLS: list[tuple[str, dict[str, Any]]] = []


def spy(call: Call) -> str:
    CALLS.append((call.function, call.params))
    return "continue"


def deny(call: Call) -> int:
    return c.CKR_PIN_INCORRECT


def answer(call: Call) -> Done:
    return Done((c.CKR_OK, b"from-hook", 9))


def bad(call: Call) -> Any:
    return "maybe"


class CountingPatch(Unit):
    """A patch as a unit: a check, an after step, backend access."""

    has_after = True

    def applies(self, spec: Any) -> bool:
        return True

    def check(self, call: Call) -> None:
        self.state.scratch["n"] = self.state.scratch.get("n", 0) + 1
        return None

    def after(self, call: Call, result: Any) -> Any:
        rv, _data, _n = result
        return rv, b"patched", 7


def hook(name: str, function: str = "C_Sign", post: bool = True) -> str:
    option = "filter_actions_post" if post else "filter_actions_pre"
    return f'{option} = [("softhsm", [({function}, "tests.unit.test_policy_hooks:{name}")])]\n'


def test_hook_gets_the_decoded_arguments() -> None:
    CALLS.clear()
    wrapped, _backend = engine(hook("spy", "C_SignInit", post=False))
    assert wrapped.sign_init(SESSION, (c.CKM_ECDSA, None), 5) == c.CKR_OK
    assert CALLS == [("C_SignInit", {"session": SESSION, "mechanism": (c.CKM_ECDSA, None),
                                     "key": 5})]


def test_hook_refuses_and_answers() -> None:
    wrapped, backend = engine(hook("deny", "C_Login"))
    assert wrapped.login(SESSION, c.CKU_USER, b"1234") == c.CKR_PIN_INCORRECT
    wrapped, backend = engine(hook("answer"))
    assert wrapped.sign(SESSION, b"x", 100) == (c.CKR_OK, b"from-hook", 9)
    assert backend.calls == []


def test_bad_hook_answer_is_general_error() -> None:
    wrapped, _ = engine(hook("bad"))
    assert wrapped.sign(SESSION, b"x", 100) == (c.CKR_GENERAL_ERROR, None, 0)


def test_a_unit_class_as_action() -> None:
    wrapped, _backend = engine(hook("CountingPatch"))
    assert wrapped.sign(SESSION, b"x", 100) == (c.CKR_OK, b"patched", 7)
    assert wrapped.state.scratch["n"] == 1


def test_demo_actions() -> None:
    wrapped, _backend = engine('filter_actions_pre = [("softhsm", [(C_Login, c_Login_hook), '
                              '(C_Initialize, c_Initialize_hook), (C_Sign, identity)])]\n')
    assert wrapped.login(SESSION, c.CKU_USER, b"0000") == c.CKR_PIN_LOCKED
    assert wrapped.login(SESSION, c.CKU_USER, b"1234") == c.CKR_OK
    assert wrapped.initialize(0, None) == c.CKR_OK


def test_resolution_errors() -> None:
    assert resolve_action("wrapping_format_patch").__name__ == "WrappingFormat"
    with pytest.raises(ActionNotAvailable, match="cannot import"):
        resolve_action("no_such_module_xyz:f")
    with pytest.raises(ActionNotAvailable, match="no attribute"):
        resolve_action("tests.unit.test_policy_hooks:nothing")
    with pytest.raises(ActionNotAvailable, match="unknown action"):
        resolve_action("no_such_action")


def test_unresolvable_action_is_a_located_startup_error() -> None:
    policy = policy_of('wrapping_format_key = "00112233445566778899aabbccddeeff"\n'
                       'filter_actions_post = [("softhsm", '
                       '[(C_WrapKey, "no_such_module_xyz:hook")])]\n')
    errors, _ = check_startup(policy)
    assert len(errors) == 1
    assert str(errors[0]).startswith("test.conf:3: filter_actions_post: C_WrapKey:")
    # And a worker given such a policy anyway fails closed.
    wrapped, _backend = engine('wrapping_format_key = "00112233445566778899aabbccddeeff"\n'
                              'filter_actions_post = [("softhsm", [(C_WrapKey, '
                              '"no_such_module_xyz:hook")])]\n')
    assert isinstance(wrapped, DeniedModule)


def test_normalise() -> None:
    assert normalise(None) is None and normalise("continue") is None
    assert normalise(0x6) == 0x6
    with pytest.raises(TypeError):
        normalise(True)
    with pytest.raises(TypeError):
        normalise(-1)



def test_preset_actions_are_added_after_configured_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(engine_mod.PRESET_ACTIONS, "patchset1",
                        (("C_Sign", "tests.unit.test_policy_hooks:answer"),))
    policy = replace(policy_of(), preset="patchset1")
    wrapped = wrap_module(FakeBackend(), policy, "softhsm", EngineContext("p", 1))
    assert wrapped.sign(SESSION, b"x", 10) == (c.CKR_OK, b"from-hook", 9)
    assert check_startup(policy)[1] == []  # implemented: no warning
