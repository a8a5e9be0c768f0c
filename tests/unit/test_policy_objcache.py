"""The per-worker attribute cache: one read per object, correct invalidation."""

from __future__ import annotations

import pytest

from p11guard.pkcs11 import constants as c
from p11guard.policy.objcache import ObjectCache
from tests.unit.test_policy_support import SESSION, SLOT, FakeBackend, engine

LABELS = 'allowed_labels = [("softhsm", ["ok.*"])]\n'
ECDSA = (c.CKM_ECDSA, None)


def reads(backend: FakeBackend) -> int:
    return backend.count("get_attribute_value")


def test_repeated_calls_do_not_reread() -> None:
    b = FakeBackend()
    b.add(5, b"ok")
    wrapped, _ = engine(LABELS, b)
    for _ in range(10):
        assert wrapped.sign_init(SESSION, ECDSA, 5) == c.CKR_OK
    assert reads(b) == 1  # label and id in one call, once


def test_long_labels_take_the_two_step_read() -> None:
    b = FakeBackend()
    b.add(5, b"ok" + b"x" * 1000)
    wrapped, _ = engine(LABELS, b)
    assert wrapped.sign_init(SESSION, ECDSA, 5) == c.CKR_OK
    assert reads(b) == 3  # guess too small, lengths, values


def test_set_attribute_value_invalidates() -> None:
    b = FakeBackend()
    b.add(5, b"ok")
    wrapped, _ = engine(LABELS, b)
    assert wrapped.sign_init(SESSION, ECDSA, 5) == c.CKR_OK
    # Relabel through the proxy to an allowed label, then behind its back to a hidden one.
    assert wrapped.set_attribute_value(SESSION, 5, [(c.CKA_LABEL, b"ok2")]) == c.CKR_OK
    b.objects[5][c.CKA_LABEL] = b"hidden"
    assert wrapped.sign_init(SESSION, ECDSA, 5) == c.CKR_OBJECT_HANDLE_INVALID


def test_destroy_object_invalidates() -> None:
    b = FakeBackend()
    b.add(5, b"ok")
    wrapped, _ = engine(LABELS, b)
    assert wrapped.sign_init(SESSION, ECDSA, 5) == c.CKR_OK
    assert wrapped.destroy_object(SESSION, 5) == c.CKR_OK
    b.add(5, b"reused-handle")
    assert wrapped.sign_init(SESSION, ECDSA, 5) == c.CKR_OBJECT_HANDLE_INVALID


@pytest.mark.parametrize("method,args", [
    ("close_session", (SESSION,)), ("close_all_sessions", (SLOT,)),
    ("login", (SESSION, c.CKU_USER, b"1234")), ("logout", (SESSION,)),
    ("login_user", (SESSION, c.CKU_USER, b"1234", b"me")), ("finalize", ()),
])
def test_session_and_login_events_clear_everything(method: str, args: tuple[object, ...]
                                                   ) -> None:
    b = FakeBackend()
    b.add(5, b"ok")
    wrapped, _ = engine(LABELS, b)
    assert wrapped.sign_init(SESSION, ECDSA, 5) == c.CKR_OK
    b.objects[5][c.CKA_LABEL] = b"now-hidden"  # e.g. another object behind the handle
    getattr(wrapped, method)(*args)
    assert wrapped.sign_init(SESSION, ECDSA, 5) == c.CKR_OBJECT_HANDLE_INVALID


def test_failed_reads_are_not_cached() -> None:
    b = FakeBackend()
    wrapped, _ = engine(LABELS, b)
    assert wrapped.sign_init(SESSION, ECDSA, 5) == c.CKR_OBJECT_HANDLE_INVALID
    b.add(5, b"ok")  # e.g. a private object after login
    assert wrapped.sign_init(SESSION, ECDSA, 5) == c.CKR_OK


def test_cache_is_keyed_by_slot() -> None:
    b = FakeBackend()
    b.add(5, b"ok")
    cache = ObjectCache(b, [c.CKA_LABEL])
    assert cache.get(SESSION, 1, 5)[1][c.CKA_LABEL] == b"ok"
    b.objects[5][c.CKA_LABEL] = b"other-token"
    assert cache.get(SESSION, 2, 5)[1][c.CKA_LABEL] == b"other-token"
    assert cache.get(SESSION, 1, 5)[1][c.CKA_LABEL] == b"ok"
    cache.invalidate(5)
    assert len(cache) == 0


def test_a_read_racing_an_invalidation_is_not_stored() -> None:
    b = FakeBackend()
    b.add(5, b"ok")
    cache = ObjectCache(b, [c.CKA_LABEL])
    real = b.get_attribute_value

    def racing(*args: object) -> object:
        answer = real(*args)  # type: ignore[arg-type]
        cache.invalidate(5)  # SetAttributeValue in another thread, meanwhile
        return answer

    b.get_attribute_value = racing  # type: ignore[method-assign,assignment]
    rv, attrs = cache.get(SESSION, 1, 5)
    assert rv == c.CKR_OK and attrs[c.CKA_LABEL] == b"ok"
    assert len(cache) == 0


def test_oversized_attributes_are_unreadable() -> None:
    b = FakeBackend()
    b.add(5, b"x" * (64 * 1024 + 1))
    cache = ObjectCache(b, [c.CKA_LABEL])
    rv, attrs = cache.get(SESSION, 1, 5)
    assert rv == c.CKR_OK and attrs[c.CKA_LABEL] is None
