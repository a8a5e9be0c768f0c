"""A small fake PKCS#11 backend for the policy unit tests, and helpers.

The fake has the method names and answer shapes of ``binding.Module``; it
records every call so tests can assert that a refused call never reached it.
(The tests at the end check the fake itself.)
"""

from __future__ import annotations

from typing import Any

from p11guard.pkcs11 import constants as c
from p11guard.pkcs11.types import MechanismInfo, SessionInfo
from p11guard.policy.engine import EngineContext, wrap_module
from p11guard.policy.model import Policy
from p11guard.policy.readers.filterconf import parse_filter_conf
from p11guard.policy.rules.calls import BY_METHOD, CK_UNAVAILABLE_INFORMATION

SESSION = 7
SLOT = 1


class FakeBackend:
    path = "/fake/libfake.so"
    version = (2, 40)
    interface_30 = False

    def __init__(self) -> None:
        self.objects: dict[int, dict[int, bytes]] = {}
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.mechanisms = [c.CKM_RSA_PKCS, c.CKM_RSA_X_509, c.CKM_ECDSA, c.CKM_AES_CBC_PAD,
                           c.CKM_AES_GCM]
        self.searches: dict[int, list[int]] = {}
        self.session_state = c.CKS_RW_USER_FUNCTIONS
        self.next_handle = 1000

    # -- test helpers -------------------------------------------------------------
    def add(self, handle: int, label: bytes | None = b"", oid: bytes | None = b"",
            **extra: bytes) -> int:
        attrs: dict[int, bytes] = {c.CKA_CLASS: (4).to_bytes(8, "little")}
        if label is not None:
            attrs[c.CKA_LABEL] = label
        if oid is not None:
            attrs[c.CKA_ID] = oid
        for name, value in extra.items():
            attrs[c.value_of(name)] = value
        self.objects[handle] = attrs
        return handle

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def count(self, name: str) -> int:
        return self.names().count(name)

    # -- PKCS#11 ----------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return True

    def close(self) -> None:
        self.calls.append(("close", ()))

    def get_attribute_value(self, session: int, obj: int,
                            request: list[tuple[int, int | None]]) -> Any:
        self.calls.append(("get_attribute_value", (session, obj, request)))
        if obj not in self.objects:
            return c.CKR_OBJECT_HANDLE_INVALID, [(t, None, CK_UNAVAILABLE_INFORMATION)
                                                 for t, _ in request]
        rv = c.CKR_OK
        out: list[tuple[int, bytes | None, int]] = []
        for t, length in request:
            value = self.objects[obj].get(t)
            if value is None:
                rv = c.CKR_ATTRIBUTE_TYPE_INVALID
                out.append((t, None, CK_UNAVAILABLE_INFORMATION))
            elif length is None:
                out.append((t, None, len(value)))
            elif length < len(value):
                rv = c.CKR_BUFFER_TOO_SMALL if rv == c.CKR_OK else rv
                out.append((t, None, CK_UNAVAILABLE_INFORMATION))
            else:
                out.append((t, value, len(value)))
        return rv, out

    def set_attribute_value(self, session: int, obj: int, template: list[Any]) -> int:
        self.calls.append(("set_attribute_value", (session, obj, template)))
        if obj not in self.objects:
            return c.CKR_OBJECT_HANDLE_INVALID
        self.objects[obj].update(dict(template))
        return c.CKR_OK

    def destroy_object(self, session: int, obj: int) -> int:
        self.calls.append(("destroy_object", (session, obj)))
        return c.CKR_OK if self.objects.pop(obj, None) is not None else (
            c.CKR_OBJECT_HANDLE_INVALID)

    def create_object(self, session: int, template: list[Any]) -> tuple[int, int]:
        self.calls.append(("create_object", (session, template)))
        self.next_handle += 1
        self.objects[self.next_handle] = dict(template)
        return c.CKR_OK, self.next_handle

    def find_objects_init(self, session: int, template: list[Any]) -> int:
        self.calls.append(("find_objects_init", (session, template)))
        self.searches[session] = [h for h, attrs in sorted(self.objects.items())
                                  if all(attrs.get(t) == v for t, v in template)]
        return c.CKR_OK

    def find_objects(self, session: int, max_count: int) -> tuple[int, list[int]]:
        self.calls.append(("find_objects", (session, max_count)))
        if session not in self.searches:
            return c.CKR_OPERATION_NOT_INITIALIZED, []
        found = self.searches[session][:max_count]
        del self.searches[session][:max_count]
        return c.CKR_OK, found

    def find_objects_final(self, session: int) -> int:
        self.calls.append(("find_objects_final", (session,)))
        return c.CKR_OK if self.searches.pop(session, None) is not None else (
            c.CKR_OPERATION_NOT_INITIALIZED)

    def get_mechanism_list(self, slot: int, count: int | None) -> tuple[int, list[int], int]:
        self.calls.append(("get_mechanism_list", (slot, count)))
        n = len(self.mechanisms)
        if count is None:
            return c.CKR_OK, [], n
        if count < n:
            return c.CKR_BUFFER_TOO_SMALL, [], n
        return c.CKR_OK, list(self.mechanisms), n

    def get_mechanism_info(self, slot: int, mech: int) -> tuple[int, MechanismInfo | None]:
        self.calls.append(("get_mechanism_info", (slot, mech)))
        return c.CKR_OK, MechanismInfo(1, 2, 3)

    def get_session_info(self, session: int) -> tuple[int, SessionInfo | None]:
        self.calls.append(("get_session_info", (session,)))
        return c.CKR_OK, SessionInfo(SLOT, self.session_state, 6, 0)

    def open_session(self, slot: int, flags: int) -> tuple[int, int]:
        self.calls.append(("open_session", (slot, flags)))
        return c.CKR_OK, SESSION

    def __getattr__(self, name: str) -> Any:
        spec = BY_METHOD.get(name)
        if spec is None:
            raise AttributeError(name)

        def generic(*args: Any) -> Any:
            self.calls.append((name, args))
            return spec.refusal(c.CKR_OK, args)

        return generic


def policy_of(extra: str = "", *, mode: str = "strict",
              modules: str = '[("softhsm", "/fake/libfake.so")]') -> Policy:
    text = f"modules = {modules}\n{extra}"
    return parse_filter_conf(text, "test.conf", mode=mode).policy  # type: ignore[arg-type]


def engine(extra: str = "", backend: FakeBackend | None = None, *, alias: str = "softhsm",
           mode: str = "strict", modules: str = '[("softhsm", "/fake/libfake.so")]',
           ) -> tuple[Any, FakeBackend]:
    backend = backend or FakeBackend()
    wrapped = wrap_module(backend, policy_of(extra, mode=mode, modules=modules), alias,
                          EngineContext(peer="test-peer", pid=4242))
    return wrapped, backend


def ulong(value: int) -> bytes:
    return value.to_bytes(8, "little")


# -- the fake itself ---------------------------------------------------------------------

def test_fake_attribute_semantics() -> None:
    b = FakeBackend()
    b.add(5, b"label", b"\x01")
    assert b.get_attribute_value(SESSION, 5, [(c.CKA_LABEL, None)]) == (
        c.CKR_OK, [(c.CKA_LABEL, None, 5)])
    assert b.get_attribute_value(SESSION, 5, [(c.CKA_LABEL, 2)])[0] == c.CKR_BUFFER_TOO_SMALL
    assert b.get_attribute_value(SESSION, 6, [(c.CKA_LABEL, 2)])[0] == (
        c.CKR_OBJECT_HANDLE_INVALID)


def test_fake_generic_methods_answer_in_shape() -> None:
    b = FakeBackend()
    assert b.sign(SESSION, b"x", 10) == (c.CKR_OK, None, 0)
    assert b.sign_init(SESSION, (c.CKM_ECDSA, None), 5) == c.CKR_OK
    assert b.names() == ["sign", "sign_init"]
