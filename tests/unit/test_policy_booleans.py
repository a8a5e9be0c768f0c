"""Boolean canonicalisation: any non-zero CK_BBOOL byte is TRUE before every check."""

from __future__ import annotations

from typing import Any

from p11guard.pkcs11 import constants as c
from p11guard.policy.rules.booleans import canonical_template
from p11guard.policy.rules.calls import Call
from tests.unit.test_policy_support import SESSION, engine

SEEN: list[Any] = []


def record(call: Call) -> None:
    SEEN.append(call.get("template"))


def test_canonical_template() -> None:
    assert canonical_template([(c.CKA_SENSITIVE, b"\x01")]) is None
    assert canonical_template([(c.CKA_SENSITIVE, b"\x02"), (c.CKA_LABEL, b"\x02")]) == [
        (c.CKA_SENSITIVE, b"\x01"), (c.CKA_LABEL, b"\x02")]
    # Not one byte: left for the token to refuse.
    assert canonical_template([(c.CKA_SENSITIVE, b"\x00\x01")]) is None


def test_hooks_and_token_see_canonical_values() -> None:
    SEEN.clear()
    wrapped, backend = engine(
        'filter_actions_pre = [("softhsm", '
        '[(C_CreateObject, "tests.unit.test_policy_booleans:record")])]\n')
    wrapped.create_object(SESSION, [(c.CKA_EXTRACTABLE, b"\x80"), (c.CKA_TOKEN, b"\x00")])
    canonical = [(c.CKA_EXTRACTABLE, b"\x01"), (c.CKA_TOKEN, b"\x00")]
    assert [canonical] == SEEN
    assert backend.calls == [("create_object", (SESSION, canonical))]


def test_search_templates_too() -> None:
    wrapped, backend = engine()
    wrapped.find_objects_init(SESSION, [(c.CKA_PRIVATE, b"\xff")])
    assert backend.calls == [("find_objects_init", (SESSION, [(c.CKA_PRIVATE, b"\x01")]))]
