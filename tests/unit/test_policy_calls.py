"""The engine's function table: complete, consistent with the binding, roles right."""

from __future__ import annotations

import inspect

import pytest

from p11guard.pkcs11 import constants as c
from p11guard.pkcs11.binding import Module
from p11guard.policy.rules.calls import (
    BY_FUNCTION,
    BY_METHOD,
    CREATION_TEMPLATE,
    FUNCTIONS,
    HANDLE_ROLES,
    KEY,
    MECHANISM,
    USER_TYPE,
    Call,
)
from p11guard.wire.procedures import CONTROL_PROCEDURES, PROCEDURES

HOUSEKEEPING = {"has", "raw_function", "close", "path", "version", "interface_30",
                "fast_path_functions"}


def test_every_binding_method_is_in_the_table() -> None:
    methods = {n for n in dir(Module) if not n.startswith("_")} - HOUSEKEEPING
    assert methods == set(BY_METHOD)


@pytest.mark.parametrize("spec", FUNCTIONS, ids=lambda s: s.method)
def test_parameters_match_the_binding_signature(spec: object) -> None:
    from p11guard.policy.rules.calls import FunctionSpec

    assert isinstance(spec, FunctionSpec)
    sig = inspect.signature(getattr(Module, spec.method))
    params = [p for p in sig.parameters if p != "self"]
    assert len(params) == len(spec.params), spec.method


def test_every_wire_procedure_has_a_function() -> None:
    for proc in PROCEDURES:
        if proc.name in CONTROL_PROCEDURES:
            continue
        assert proc.c_name in BY_FUNCTION, proc.c_name


def test_roles() -> None:
    assert BY_METHOD["wrap_key"].positions["wrapping_key"] == (2,)
    assert BY_METHOD["wrap_key"].positions[KEY] == (3,)
    assert BY_METHOD["generate_key_pair"].positions[CREATION_TEMPLATE] == (2, 3)
    assert BY_METHOD["login_user"].has(USER_TYPE)  # 3.0 covered by the same role
    for name in ("encrypt_init", "decrypt_init", "sign_init", "verify_init",
                 "sign_recover_init", "verify_recover_init", "digest_init", "generate_key",
                 "generate_key_pair", "wrap_key", "unwrap_key", "derive_key"):
        assert BY_METHOD[name].has(MECHANISM), name
    # Every function taking an existing object has a handle role.
    for name in ("copy_object", "destroy_object", "get_object_size", "get_attribute_value",
                 "set_attribute_value", "digest_key", "set_operation_state", "derive_key"):
        assert any(BY_METHOD[name].has(r) for r in HANDLE_ROLES), name


def test_refusal_shapes() -> None:
    assert BY_METHOD["sign_init"].refusal(5, []) == 5
    assert BY_METHOD["get_token_info"].refusal(5, []) == (5, None)
    assert BY_METHOD["get_mechanism_list"].refusal(5, []) == (5, [], 0)
    assert BY_METHOD["create_object"].refusal(5, []) == (5, 0)
    assert BY_METHOD["generate_key_pair"].refusal(5, []) == (5, 0, 0)
    assert BY_METHOD["sign"].refusal(5, []) == (5, None, 0)
    assert BY_METHOD["find_objects"].refusal(5, []) == (5, [])
    assert BY_METHOD["generate_random"].refusal(5, []) == (5, b"")
    rv, answers = BY_METHOD["get_attribute_value"].refusal(
        c.CKR_OBJECT_HANDLE_INVALID, [1, 2, [(c.CKA_LABEL, None), (c.CKA_ID, 4)]])
    assert rv == c.CKR_OBJECT_HANDLE_INVALID
    assert [a[0] for a in answers] == [c.CKA_LABEL, c.CKA_ID]  # one per request


def test_call_accessors_and_repr_hides_values() -> None:
    call = Call(BY_METHOD["login"], [3, 1, b"secret-pin"], None)
    assert call.session == 3 and call.get("user_type") == 1
    call.set("user_type", 0)
    assert call.params == {"session": 3, "user_type": 0, "pin": b"secret-pin"}
    assert "secret" not in repr(call)
    with pytest.raises(KeyError):
        call.set("nope", 1)
