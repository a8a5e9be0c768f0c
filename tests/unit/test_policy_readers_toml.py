"""p11guard TOML policy reader, the TOML writer and their round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p11guard.policy.model import Action, ConfigError, ModuleEntry, Policy, Rule
from p11guard.policy.readers.filterconf import parse_filter_conf, read_filter_conf
from p11guard.policy.readers.toml import parse_policy_toml, read_policy_toml
from p11guard.policy.writer import UnrepresentableError, to_toml, toml_string

DATA = Path(__file__).parent.parent / "data" / "config"
DEBIAN_FILTER = Path("/etc/pkcs11proxyd/filter.conf")
MODULES = '[modules]\nsofthsm = "/usr/lib/softhsm/libsofthsm2.so"\n'


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_policy_toml(text, "policy.toml")
    return info.value


def test_sample_policy() -> None:
    result = read_policy_toml(DATA / "policy.toml")
    p = result.policy
    assert p.preset is None and p.mode == "strict" and p.debug == 1
    assert p.modules[1] == ModuleEntry("soft.*", "/usr/lib/other.so")
    assert p.forbidden_mechanisms[0].value == (0x3, 0x80001234)
    assert p.allowed_labels[0].value == ("app_.*", "")
    assert p.filter_actions_post[0].value == (
        Action("C_GetAttributeValue", "prevent_sensitive_leak_patch"),
        Action("C_SetAttributeValue", "prevent_sensitive_leak_patch"),
    )
    loc = p.forbidden_mechanisms[0].location
    assert loc is not None and loc.line == 10  # its [[...]] header
    eff = p.for_alias("softhsm")
    assert eff.enforce_ro_sessions
    assert eff.padding_oracle_ops == {"wrap", "unwrap", "encrypt", "sign"}
    assert eff.label_allowed(b"") and eff.label_allowed(b"app_x") and not eff.label_allowed(b"x")
    # "soft.*" is a pattern alias: the strict-mode warning says so.
    assert any("is a pattern" in w for w in result.warnings)


def test_defaults_are_the_secure_preset() -> None:
    p = parse_policy_toml(MODULES).policy
    assert p.preset == "patchset1" and p.mode == "strict"
    assert parse_policy_toml('preset = "none"\n' + MODULES).policy.preset is None


def test_modules_as_array_of_tables() -> None:
    text = '[[modules]]\nalias = "a"\npath = "/x.so"\n[[modules]]\nalias = "a"\npath = "/y.so"\n'
    p = parse_policy_toml(text).policy
    assert [m.path for m in p.modules] == ["/x.so", "/y.so"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('mode = "loose"\n' + MODULES, "policy.toml:1: mode: unknown mode 'loose'"),
        ('preset = "p3"\n' + MODULES, "policy.toml:1: preset: unknown preset 'p3'"),
        ("debug = 9\n" + MODULES, "policy.toml:1: debug: debug level must be between 0 and 3"),
        ("debug = true\n" + MODULES, "policy.toml:1: debug: must be an integer, not a boolean"),
        ('colour = "red"\n' + MODULES, "policy.toml:1: colour: unknown option 'colour'"),
        ('wrapping_format_key = "abc"\n' + MODULES,
         "policy.toml:1: wrapping_format_key: must be 32 hexadecimal characters"),
        (MODULES + '\n[[forbidden_mechanisms]]\nalias = ".*"\nmechanisms = ["CKM_FOO"]\n',
         "policy.toml:4: forbidden_mechanisms: unknown mechanism 'CKM_FOO'"),
        (MODULES + '\n[[forbidden_mechanisms]]\nalias = ".*"\nmechanisms = [-1]\n',
         "policy.toml:4: forbidden_mechanisms: mechanism value -1 out of range"),
        (MODULES + '\n[[forbidden_functions]]\nalias = ".*"\nfunctions = ["C_Foo"]\n',
         "policy.toml:4: forbidden_functions: unknown PKCS#11 function 'C_Foo'"),
        (MODULES + '\n[[enforce_ro_sessions]]\nalias = ".*"\nenabled = "yes"\n',
         "policy.toml:4: enforce_ro_sessions: enabled must be true or false, not a string"),
        (MODULES + '\n[[remove_padding_oracles]]\nalias = ".*"\noperations = ["decrypt"]\n',
         "policy.toml:4: remove_padding_oracles: unknown padding operation 'decrypt'"),
        (MODULES + '\n[[filter_actions_pre]]\nalias = ".*"\nactions = [["C_Login"]]\n',
         "policy.toml:4: filter_actions_pre: each action must be"),
        (MODULES + '\n[[filter_actions_pre]]\nalias = ".*"\nactions = [["C_Login", "x"]]\n',
         "policy.toml:4: filter_actions_pre: unknown action 'x'"),
        (MODULES + '\n[[allowed_labels]]\nalias = ".*"\nlabel = ["x"]\n',
         "policy.toml:4: allowed_labels: unknown key(s) label"),
        (MODULES + '\n[[allowed_labels]]\nalias = ".*"\n',
         "policy.toml:4: allowed_labels: a rule needs both alias and labels"),
        (MODULES + '\n[[allowed_ids]]\nalias = "other"\nids = ["01"]\n',
         "policy.toml:4: allowed_ids: alias pattern 'other' matches no configured module alias"),
        (MODULES + '\n[[allowed_ids]]\nalias = ".*"\nids = ["[01"]\n',
         "policy.toml:4: allowed_ids: invalid allowed id regexp '[01' at position 0"),
        ('[modules]\nsofthsm = ""\n', "policy.toml:2: modules: empty module path"),
        ('[modules]\nsofthsm = 3\n', "policy.toml:2: modules: the path of alias 'softhsm' must"),
        ('preset = "none"\n', "policy.toml: modules: no module configured"),
        ("mode = \n", "policy.toml:1: invalid TOML: Invalid value"),
    ],
)
def test_errors(text: str, expected: str) -> None:
    assert str(error_of(text)).startswith(expected)


# --- writer and round trips ---------------------------------------------------------


def roundtrip(policy: Policy) -> Policy:
    return parse_policy_toml(to_toml(policy), validate=False).policy


def test_round_trip_of_the_full_filter_conf() -> None:
    for mode in ("strict", "compat"):
        policy = read_filter_conf(DATA / "filter-full.conf", mode=mode).policy
        text = to_toml(policy, header="converted from filter-full.conf")
        assert text.startswith("# converted from filter-full.conf\n")
        back = parse_policy_toml(text).policy
        assert back == policy
        assert back.for_alias("softhsm") == policy.for_alias("softhsm")


@pytest.mark.skipif(not DEBIAN_FILTER.exists(), reason="caml-crush-server not installed")
def test_round_trip_of_debians_filter_conf() -> None:
    policy = read_filter_conf(DEBIAN_FILTER, validate=False).policy
    assert roundtrip(policy) == policy


def test_round_trip_of_toml_samples() -> None:
    policy = read_policy_toml(DATA / "policy.toml").policy
    assert roundtrip(policy) == policy


def test_round_trip_of_awkward_strings_and_unknown_mechanisms() -> None:
    policy = Policy(
        modules=(ModuleEntry('we"ird\\alias', "/p a t h/\u00e9.so"), ModuleEntry("", "/d.so"),
                 ModuleEntry('we"ird\\alias', "/dup.so")),
        log_subchannel="tab\there\x7f\x01",
        forbidden_mechanisms=(Rule(".*", (0x80000001, 0x1, 0xFFFFFFFFFFFFFFFF)),),
        allowed_labels=(Rule(".*", ("line\nbreak", "\\(a\\|b\\)")),),
        filter_actions_pre=(Rule(".*", ()),),
        enforce_ro_sessions=(Rule(".*", False),),
        wrapping_format_key=bytes(range(16)),
        mode="compat",
        preset="patchset2",
    )
    assert roundtrip(policy) == policy


def test_writer_refuses_non_utf8_bytes() -> None:
    policy = parse_filter_conf(
        'modules = [("a", "/x.so")]\nallowed_labels = [("a", ["\\255"])]\n'
    ).policy
    with pytest.raises(UnrepresentableError):
        to_toml(policy)


def test_key_is_never_in_repr() -> None:
    policy = Policy(modules=(ModuleEntry("a", "/x"),), wrapping_format_key=b"\xaa" * 16)
    assert "aaaa" not in repr(policy) and "\\xaa" not in repr(policy)
    assert "\\xaa" not in repr(policy.for_alias("a"))


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(exclude_categories=["Cs"]), max_size=30))
def test_toml_string_round_trips(text: str) -> None:
    import tomllib

    assert tomllib.loads(f"x = {toml_string(text)}")["x"] == text
