"""allowed_labels / allowed_ids: hidden objects are invisible in every function."""

from __future__ import annotations

from typing import Any

import pytest

from p11guard.pkcs11 import constants as c
from p11guard.policy.rules.calls import BY_METHOD, FUNCTIONS, HANDLE_ROLES, STATE_KEY
from tests.unit.test_policy_support import SESSION, FakeBackend, engine

LABELS = 'allowed_labels = [("softhsm", ["ok.*", "shared"])]\n'
IDS = 'allowed_ids = [("softhsm", ["01.*"])]\n'
VISIBLE, HIDDEN = 10, 20

HANDLE_METHODS = [f for f in FUNCTIONS if any(f.has(r) for r in HANDLE_ROLES)]


def _args(spec: Any, hidden_role: str | None) -> list[Any]:
    """Arguments for ``spec`` with the hidden object in ``hidden_role``, visible elsewhere."""
    out: list[Any] = []
    for p in spec.params:
        if p.role == "session":
            out.append(SESSION)
        elif p.role in HANDLE_ROLES:
            out.append(HIDDEN if p.role == hidden_role else VISIBLE)
        elif p.role == "mechanism":
            out.append((c.CKM_AES_KEY_WRAP, None))
        elif p.role == "creation_template":
            out.append([])
        elif p.name == "request":
            out.append([(c.CKA_CLASS, None)])
        elif p.name in ("state", "data", "wrapped"):
            out.append(b"x")
        else:
            out.append(None)
    return out


def _backend() -> FakeBackend:
    b = FakeBackend()
    b.add(VISIBLE, b"ok-key", b"\x01\x02")
    b.add(HIDDEN, b"secret", b"\x01\x02", CKA_VALUE=b"k")
    return b


def _client_calls(backend: FakeBackend) -> list[str]:
    """Backend calls other than the engine's own CKA_LABEL/CKA_ID reads."""
    engine_reads = {c.CKA_LABEL, c.CKA_ID}
    return [name for name, args in backend.calls
            if not (name == "get_attribute_value" and {t for t, _ in args[2]} <= engine_reads)]


@pytest.mark.parametrize("spec", HANDLE_METHODS, ids=lambda s: s.method)
def test_hidden_object_never_reaches_the_token(spec: Any) -> None:
    for role in {p.role for p in spec.params if p.role in HANDLE_ROLES}:
        wrapped, backend = engine(LABELS, _backend())
        result = getattr(wrapped, spec.method)(*_args(spec, role))
        rv = spec.rv_of(result)
        assert rv == HANDLE_ROLES[role], (spec.method, role, hex(rv))
        assert spec.method not in _client_calls(backend)
        # With the visible object in that position the call goes through.
        result = getattr(wrapped, spec.method)(*_args(spec, None))
        assert spec.rv_of(result) == c.CKR_OK
        assert spec.method in _client_calls(backend)


def test_specific_codes_for_wrapping_and_unwrapping_keys() -> None:
    wrapped, _ = engine(LABELS, _backend())
    mech = (c.CKM_AES_KEY_WRAP, None)
    assert wrapped.wrap_key(SESSION, mech, HIDDEN, VISIBLE, None)[0] == (
        c.CKR_WRAPPING_KEY_HANDLE_INVALID)
    assert wrapped.wrap_key(SESSION, mech, VISIBLE, HIDDEN, None)[0] == (
        c.CKR_OBJECT_HANDLE_INVALID)
    assert wrapped.unwrap_key(SESSION, mech, HIDDEN, b"w", [])[0] == (
        c.CKR_UNWRAPPING_KEY_HANDLE_INVALID)


def test_get_attribute_value_on_hidden_object_is_no_oracle() -> None:
    """Caml Crush calls the token and leaks e.g. CKR_ATTRIBUTE_SENSITIVE (bug B4)."""
    wrapped, backend = engine(LABELS, _backend())
    rv, answers = wrapped.get_attribute_value(SESSION, HIDDEN, [(c.CKA_VALUE, None)])
    assert rv == c.CKR_OBJECT_HANDLE_INVALID
    assert answers == [(c.CKA_VALUE, None, (1 << 64) - 1)]
    assert [r for n, r in backend.calls if n == "get_attribute_value"
            and r[2] == [(c.CKA_VALUE, None)]] == []


def test_set_operation_state_keys_are_checked_and_zero_means_none() -> None:
    wrapped, backend = engine(LABELS, _backend())
    assert wrapped.set_operation_state(SESSION, b"st", HIDDEN, 0) == c.CKR_OBJECT_HANDLE_INVALID
    assert wrapped.set_operation_state(SESSION, b"st", 0, HIDDEN) == c.CKR_OBJECT_HANDLE_INVALID
    assert wrapped.set_operation_state(SESSION, b"st", 0, 0) == c.CKR_OK
    assert backend.count("set_operation_state") == 1
    assert STATE_KEY in BY_METHOD["set_operation_state"].positions


def test_unreadable_label_hides_and_nonexistent_is_the_same() -> None:
    b = _backend()
    b.add(30, label=None)
    wrapped, _ = engine(LABELS, b)
    assert wrapped.digest_key(SESSION, 30) == c.CKR_OBJECT_HANDLE_INVALID
    assert wrapped.digest_key(SESSION, 31) == c.CKR_OBJECT_HANDLE_INVALID


def test_session_errors_are_not_disguised() -> None:
    b = _backend()

    def bad_session(session: int, obj: int, request: Any) -> Any:
        return c.CKR_SESSION_HANDLE_INVALID, []

    b.get_attribute_value = bad_session  # type: ignore[method-assign]
    wrapped, _ = engine(LABELS, b)
    assert wrapped.digest_key(99, VISIBLE) == c.CKR_SESSION_HANDLE_INVALID


def test_find_objects_drops_hidden_and_refills() -> None:
    b = FakeBackend()
    for h in range(1, 11):
        b.add(h, b"ok" if h % 3 == 0 else b"no")  # visible: 3, 6, 9
    wrapped, _ = engine(LABELS, b)
    assert wrapped.find_objects_init(SESSION, []) == c.CKR_OK
    assert wrapped.find_objects(SESSION, 2) == (c.CKR_OK, [3, 6])
    assert wrapped.find_objects(SESSION, 2) == (c.CKR_OK, [9])
    assert wrapped.find_objects(SESSION, 2) == (c.CKR_OK, [])
    assert wrapped.find_objects_final(SESSION) == c.CKR_OK
    # State is the token's, per session: after Final, no stale handles.
    assert wrapped.find_objects(SESSION, 2) == (c.CKR_OPERATION_NOT_INITIALIZED, [])


def test_find_objects_is_per_session() -> None:
    b = FakeBackend()
    for h in (1, 2, 3):
        b.add(h, b"ok")
    wrapped, _ = engine(LABELS, b)
    wrapped.find_objects_init(1, [(c.CKA_LABEL, b"ok")])
    wrapped.find_objects_init(2, [])
    assert wrapped.find_objects(1, 1) == (c.CKR_OK, [1])
    assert wrapped.find_objects(2, 5) == (c.CKR_OK, [1, 2, 3])
    assert wrapped.find_objects(1, 5) == (c.CKR_OK, [2, 3])


@pytest.mark.parametrize("method,args", [
    ("create_object", lambda t: (SESSION, t)),
    ("copy_object", lambda t: (SESSION, VISIBLE, t)),
    ("set_attribute_value", lambda t: (SESSION, VISIBLE, t)),
    ("generate_key", lambda t: (SESSION, (c.CKM_AES_KEY_GEN, None), t)),
    ("generate_key_pair", lambda t: (SESSION, (c.CKM_EC_KEY_PAIR_GEN, None), [], t)),
    ("unwrap_key", lambda t: (SESSION, (c.CKM_AES_KEY_WRAP, None), VISIBLE, b"w", t)),
    ("derive_key", lambda t: (SESSION, (c.CKM_ECDH1_DERIVE, None), VISIBLE, t)),
])
def test_creation_templates(method: str, args: Any) -> None:
    wrapped, backend = engine(LABELS + IDS, _backend())
    spec = BY_METHOD[method]
    for template in ([(c.CKA_LABEL, b"evil")], [(c.CKA_ID, b"\x02")],
                     [(c.CKA_LABEL, b"ok\nevil")]):
        result = getattr(wrapped, method)(*args(template))
        assert spec.rv_of(result) == c.CKR_ATTRIBUTE_VALUE_INVALID, template
    assert method not in backend.names()
    result = getattr(wrapped, method)(*args([(c.CKA_LABEL, b"ok-new"), (c.CKA_ID, b"\x01")]))
    assert spec.rv_of(result) == c.CKR_OK


def test_newline_bypass_strict_vs_compat() -> None:
    """Caml Crush matches pattern + "$" in multi-line mode: "ok\\nx" passes "ok" (bug B5)."""
    b = FakeBackend()
    b.add(40, b"shared\nsecret")
    strict, _ = engine(LABELS, b)
    assert strict.digest_key(SESSION, 40) == c.CKR_OBJECT_HANDLE_INVALID
    compat, _ = engine(LABELS, b, mode="compat")
    assert compat.digest_key(SESSION, 40) == c.CKR_OK


def test_ids_are_matched_as_lower_hex_and_both_filters_apply() -> None:
    b = FakeBackend()
    b.add(1, b"ok", b"\x01\xab")
    b.add(2, b"ok", b"\x02")
    b.add(3, b"no", b"\x01")
    b.add(4, b"ok", None)  # no CKA_ID: hidden when ids are filtered
    wrapped, _ = engine(LABELS + IDS, b)
    assert [wrapped.digest_key(SESSION, h) for h in (1, 2, 3, 4)] == [
        c.CKR_OK, c.CKR_OBJECT_HANDLE_INVALID, c.CKR_OBJECT_HANDLE_INVALID,
        c.CKR_OBJECT_HANDLE_INVALID]


def test_no_rule_for_alias_means_no_filtering() -> None:
    b = _backend()
    wrapped, backend = engine('allowed_labels = [("softhsm", ["x"])]\n', b, alias="other",
                              modules='[("softhsm", "/l.so"), ("other", "/l.so")]')
    assert wrapped.digest_key(SESSION, HIDDEN) == c.CKR_OK
    assert wrapped.digest_key == backend.digest_key or backend.count("get_attribute_value") == 0
