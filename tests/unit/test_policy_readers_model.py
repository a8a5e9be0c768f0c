"""Policy.for_alias: rule resolution in strict and compat modes."""

from __future__ import annotations

import pytest

from p11guard.policy.model import (
    Action,
    ConfigError,
    Location,
    ModuleEntry,
    Policy,
    Rule,
    UnknownAliasError,
)


def make(mode: str = "strict") -> Policy:
    return Policy(
        modules=(ModuleEntry("softhsm", "/a.so"), ModuleEntry("soft.*", "/b.so"),
                 ModuleEntry("GOOD", "/g.so")),
        forbidden_mechanisms=(Rule("soft.*", (1,)), Rule("softhsm", (2,)), Rule("x", (3,))),
        allowed_labels=(Rule("softhsm", ("GOOD",)),),
        enforce_ro_sessions=(Rule("softhsm", False), Rule(".*", True)),
        forbid_admin_operations=(Rule(r"A\|soft", True),),
        remove_padding_oracles=(Rule(".*", ("sign",)), Rule("softhsm", ("all",))),
        filter_actions_pre=(Rule(".*", (Action("C_Login", "c_Login_hook"),)),),
        filter_actions_post=(
            Rule(".*", (Action("C_Login", "identity"), Action("C_Sign", "identity"))),
            Rule("softhsm", (Action("C_Login", "c_Login_hook"),)),
        ),
        mode=mode,  # type: ignore[arg-type]
    )


def test_first_matching_module_wins() -> None:
    p = make()
    assert p.for_alias("softhsm").module.path == "/a.so"
    assert p.for_alias("softhsm2").module.path == "/b.so"


def test_unknown_alias() -> None:
    with pytest.raises(UnknownAliasError):
        make().for_alias("opensc")
    assert make().module_for("opensc") is None


def test_union_and_first_match() -> None:
    eff = make().for_alias("softhsm")
    assert eff.forbidden_mechanisms == {1, 2}  # union
    assert eff.enforce_ro_sessions is False  # first match
    assert eff.padding_oracle_ops == {"wrap", "unwrap", "encrypt", "sign"}
    assert eff.actions_for("C_Login", post=True) == ("identity", "c_Login_hook")  # file order
    assert eff.actions_for("C_Login", post=False) == ("c_Login_hook",)
    other = make().for_alias("soft2")
    assert other.forbidden_mechanisms == {1}
    assert other.enforce_ro_sessions is True
    assert other.allowed_labels is None and other.label_allowed(b"anything")


def test_newline_bypass_only_in_compat() -> None:
    strict = make("strict").for_alias("softhsm")
    compat = make("compat").for_alias("softhsm")
    assert strict.label_allowed(b"GOOD") and compat.label_allowed(b"GOOD")
    assert compat.label_allowed(b"GOOD\nsecret")
    assert not strict.label_allowed(b"GOOD\nsecret")


def test_alternation_precedence_only_in_compat() -> None:
    # r"A\|soft" in Caml Crush means "starts with A, or is exactly soft".
    assert make("compat").for_alias("softhsm").forbid_admin_operations is False
    assert make("strict").for_alias("softhsm").forbid_admin_operations is False
    compat = make("compat")
    assert compat.module_for("GOOD\nx") is not None  # the module alias bypass too
    assert make("strict").module_for("GOOD\nx") is None


def test_ids_are_matched_as_lower_hex() -> None:
    p = Policy(modules=(ModuleEntry("a", "/x"),), allowed_ids=(Rule("a", ("01ab.*",)),))
    eff = p.for_alias("a")
    assert eff.id_allowed(b"\x01\xab\xff") and not eff.id_allowed(b"\x01\xac")


def test_locations_are_not_part_of_equality() -> None:
    a = Policy(modules=(ModuleEntry("a", "/x", Location("f", 1)),), source="f")
    b = Policy(modules=(ModuleEntry("a", "/x", Location("g", 9)),), source="g")
    assert a == b


def test_config_error_format() -> None:
    assert str(ConfigError("bad", file="f.conf", line=3, option="debug")) == "f.conf:3: debug: bad"
    assert str(ConfigError("bad", file="f.conf")) == "f.conf: bad"
    assert str(ConfigError("bad")) == "bad"
