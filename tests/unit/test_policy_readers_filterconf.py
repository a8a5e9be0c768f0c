"""Caml Crush filter.conf reader: real files, every option, every error."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p11guard.policy.model import Action, ConfigError, Mode, ModuleEntry
from p11guard.policy.readers.common import ReadResult
from p11guard.policy.readers.filterconf import parse_filter_conf, read_filter_conf
from p11guard.policy.readers.names import FUNCTION_NAMES
from p11guard.policy.readers.ocamlvalue import parse

DATA = Path(__file__).parent.parent / "data" / "config"
DEBIAN_FILTER = Path("/etc/pkcs11proxyd/filter.conf")
KEY_LINE = 'wrapping_format_key = "00112233445566778899aabbccddeeff"'

MINIMAL = 'modules = [("softhsm", "/usr/lib/softhsm/libsofthsm2.so")]\n'


def parse_ok(text: str, mode: Mode = "strict") -> ReadResult:
    return parse_filter_conf(text, "filter.conf", mode=mode)


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_filter_conf(text, "filter.conf")
    return info.value


# --- the real files -----------------------------------------------------------------


@pytest.mark.skipif(not DEBIAN_FILTER.exists(), reason="caml-crush-server not installed")
def test_debian_filter_conf_parses_but_lacks_its_wrapping_key() -> None:
    # Caml Crush itself refuses to start with the shipped file: patchset 1 uses
    # wrapping_format_patch and the key is commented out.  We say so, with a line.
    with pytest.raises(ConfigError) as info:
        read_filter_conf(DEBIAN_FILTER)
    assert info.value.option == "wrapping_format_key"
    assert info.value.line is not None
    assert str(info.value).startswith(f"{DEBIAN_FILTER}:{info.value.line}: wrapping_format_key:")
    # Syntax, types and names are fine: it converts without the cross checks...
    result = read_filter_conf(DEBIAN_FILTER, validate=False)
    policy = result.policy
    assert [m.alias for m in policy.modules] == ["softhsm", "opencryptoki"]
    assert policy.log_subchannel == "filter"
    assert len(policy.filter_actions_post) == 1
    assert len(policy.filter_actions_post[0].value) == 44
    # ...and loads once the key is uncommented.
    text = DEBIAN_FILTER.read_text().replace(f"(*\n{KEY_LINE}\n*)", KEY_LINE)
    assert KEY_LINE in text
    loaded = parse_filter_conf(text, str(DEBIAN_FILTER)).policy
    assert loaded.wrapping_format_key == bytes.fromhex("00112233445566778899aabbccddeeff")
    eff = loaded.for_alias("softhsm")
    assert eff.forbidden_mechanisms == {0x3}
    assert eff.actions_for("C_WrapKey", post=True) == (
        "conflicting_attributes_patch_on_existing_objects",
        "dangerous_sensitive_keys_escrow_encrypt",
        "wrapping_format_patch",
    )
    assert loaded.for_alias("opencryptoki").forbidden_mechanisms == frozenset()


def test_minimal_sample() -> None:
    result = read_filter_conf(DATA / "filter-minimal.conf")
    assert result.warnings == ()
    policy = result.policy
    assert policy.modules == (ModuleEntry("softhsm", "/usr/lib/softhsm/libsofthsm2.so"),)
    assert policy.debug == 0 and policy.log_subchannel == "filter"
    assert policy.mode == "strict" and policy.preset is None
    assert policy.modules[0].location is not None
    assert str(policy.modules[0].location).endswith("filter-minimal.conf:2")


def test_full_sample_every_option() -> None:
    result = read_filter_conf(DATA / "filter-full.conf", mode="compat")
    p = result.policy
    assert p.debug == 2
    assert p.wrapping_format_key == bytes.fromhex("00112233445566778899aabbccddeeff")
    assert [m.alias for m in p.modules] == ["softhsm", "opencryptoki", ""]
    assert [r.value for r in p.forbidden_mechanisms] == [(0x3, 0x5), (0x121,)]
    assert p.allowed_labels[0].alias_pattern == r"\(sofths.*\|opencryptoki\)"
    assert p.allowed_ids[0].value == ("0123.*",)
    assert p.forbidden_functions[0].value == ("C_Login", "C_Logout")
    assert [r.value for r in p.enforce_ro_sessions] == [False, True]
    assert [r.value for r in p.forbid_admin_operations] == [True]
    assert p.remove_padding_oracles[0].value == ("wrap", "unwrap", "encrypt")
    assert p.filter_actions_pre[0].value == (
        Action("C_Login", "c_Login_hook"),
        Action("C_Initialize", "c_Initialize_hook"),
    )
    assert p.forbidden_mechanisms[1].location is not None
    assert p.forbidden_mechanisms[1].location.line == 10

    soft = p.for_alias("softhsm")
    assert soft.forbidden_mechanisms == {0x3, 0x5, 0x121}  # union
    assert soft.allowed_labels == ("MYLABEL.*", "LABEL_EXACT", ".*THE_LABEL", "mytes.*")
    assert soft.forbidden_functions == {"C_Login", "C_Logout", "C_Sign"}
    assert soft.enforce_ro_sessions is False  # first match: ("soft.*", no)
    assert soft.forbid_admin_operations is True
    assert soft.padding_oracle_ops == {"wrap", "unwrap", "encrypt", "sign"}
    assert soft.actions_for("C_CloseSession", post=False) == ("identity",)
    assert soft.label_allowed(b"MYLABEL1") and not soft.label_allowed(b"1MYLABEL")
    assert soft.id_allowed(bytes.fromhex("0123ff")) and not soft.id_allowed(b"\x01")

    ock = p.for_alias("opencryptoki")
    assert ock.enforce_ro_sessions is True
    assert ock.forbidden_mechanisms == frozenset()
    assert ock.allowed_ids is None  # no rule: no filtering
    assert ock.padding_oracle_ops == {"wrap", "unwrap", "encrypt"}


def test_separators_and_bare_words() -> None:
    # Caml Crush's files use ','; config-file also takes ';' and a trailing separator.
    text = 'modules = [(softhsm, "/x.so"); ("b", "/y.so"),]\nlog_subchannel = sub\n'
    policy = parse_ok(text).policy
    assert [m.alias for m in policy.modules] == ["softhsm", "b"]
    assert policy.log_subchannel == "sub"


def test_ocaml_string_escapes() -> None:
    text = MINIMAL + (
        'allowed_labels = [("softhsm", ["a\\\\(b\\\\)", "tab\\there", "\\065\\x42\\o103", '
        '"quote\\"", "line\\\n      continued"])]\n'
    )
    labels = parse_ok(text).policy.allowed_labels[0].value
    assert labels == ("a\\(b\\)", "tab\there", "ABC", 'quote"', "linecontinued")


def test_high_bytes_survive() -> None:
    text = MINIMAL + 'allowed_labels = [("softhsm", ["caf\\233"])]\n'
    policy = parse_ok(text).policy
    eff = policy.for_alias("softhsm")
    assert eff.label_allowed(b"caf\xe9")
    assert not eff.label_allowed("café".encode())


def test_duplicate_option_warns_and_first_wins() -> None:
    text = MINIMAL + "debug = 1\ndebug = 3\n"
    result = parse_ok(text)
    assert result.policy.debug == 1
    assert result.warnings == (
        "filter.conf:3: debug: option given again (first at line 2); only the first one is used",
    )


def test_duplicate_alias_warns() -> None:
    text = 'modules = [("a", "/x.so"), ("a", "/y.so")]\n'
    warnings = parse_ok(text).warnings
    assert any("configured twice" in w for w in warnings)


def test_strict_mode_warns_about_pattern_aliases() -> None:
    text = 'modules = [("soft.*", "/x.so")]\n'
    assert any("is a pattern" in w for w in parse_ok(text).warnings)
    assert parse_ok(text, mode="compat").warnings == ()


def test_upper_case_id_pattern_warns() -> None:
    text = MINIMAL + 'allowed_ids = [("softhsm", ["AB.*"])]\n'
    assert any("lower-case" in w for w in parse_ok(text).warnings)


def test_unused_wrapping_key_warns() -> None:
    text = MINIMAL + 'wrapping_format_key = "00112233445566778899aabbccddeeff"\n'
    assert any("not used" in w for w in parse_ok(text).warnings)


def test_function_names_are_caml_crushs_68() -> None:
    assert len(FUNCTION_NAMES) == 68
    assert "C_LoadModule" in FUNCTION_NAMES and "C_GetFunctionList" not in FUNCTION_NAMES


# --- errors: each names file:line and the option ------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "forbidden_mechanisms = [(\"softhsm\", [CKM_FOO])]\n",
         "filter.conf:2: forbidden_mechanisms: unknown mechanism 'CKM_FOO'"),
        (MINIMAL + "forbidden_mechanisms = [(\"softhsm\", [0x1])]\n",
         "filter.conf:2: forbidden_mechanisms: expected a mechanism (a string), found int 1"),
        (MINIMAL + "forbidden_functions = [(\"softhsm\", [C_Nope])]\n",
         "filter.conf:2: forbidden_functions: unknown PKCS#11 function 'C_Nope'"),
        (MINIMAL + "forbidden_functions = [(\"softhsm\", [C_GetFunctionList])]\n",
         "filter.conf:2: forbidden_functions: unknown PKCS#11 function 'C_GetFunctionList'"),
        (MINIMAL + "remove_padding_oracles = [(\".*\", [decrypt])]\n",
         "filter.conf:2: remove_padding_oracles: unknown padding operation 'decrypt'"),
        (MINIMAL + "enforce_ro_sessions = [(\".*\", maybe)]\n",
         "filter.conf:2: enforce_ro_sessions: expected a boolean (true, false, yes or no), "
         "found ident 'maybe'"),
        (MINIMAL + "forbid_admin_operations = [(\".*\", [yes])]\n",
         "filter.conf:2: forbid_admin_operations: expected a boolean (true, false, yes or no), "
         "found a list of 1 element(s)"),
        (MINIMAL + "filter_actions_post = [(\".*\", [(C_Login, evil_hook)])]\n",
         "filter.conf:2: filter_actions_post: unknown action 'evil_hook'"),
        (MINIMAL + "filter_actions_pre = [(\".*\", [(C_Nope, identity)])]\n",
         "filter.conf:2: filter_actions_pre: unknown PKCS#11 function 'C_Nope'"),
        (MINIMAL + 'wrapping_format_key = "0011"\n',
         "filter.conf:2: wrapping_format_key: must be 32 hexadecimal characters, got 4"),
        (MINIMAL + 'wrapping_format_key = "zz112233445566778899aabbccddeeff"\n',
         "filter.conf:2: wrapping_format_key: must contain only hexadecimal characters"),
        (MINIMAL + "debug = 7\n", "filter.conf:2: debug: debug level must be between 0 and 3"),
        (MINIMAL + 'debug = "1"\n', "filter.conf:2: debug: expected an integer"),
        (MINIMAL + "filter_actions = [(\".*\", [(C_Login, identity)])]\n",
         "filter.conf:2: filter_actions: unknown option 'filter_actions' "
         "(use filter_actions_pre or filter_actions_post)"),
        (MINIMAL + "log_subchanel = x\n",
         "filter.conf:2: log_subchanel: unknown option 'log_subchanel' "
         "(did you mean log_subchannel?)"),
        ("modules = []\n", "filter.conf: modules: no module configured"),
        ("debug = 0\n", "filter.conf: modules: no module configured"),
        ('modules = [("a", "")]\n', "filter.conf:1: modules: empty module path for alias 'a'"),
        ('modules = [("a")]\n', "filter.conf:1: modules: expected a couple (alias, path)"),
        ('modules = ("a", "/x")\n', "filter.conf:1: modules: expected a list [...]"),
        (MINIMAL + "allowed_labels = [(\"other\", [\"x\"])]\n",
         "filter.conf:2: allowed_labels: alias pattern 'other' matches no configured module "
         "alias ('softhsm')"),
        # Caml Crush never checks post-action aliases; we do.
        (MINIMAL + "filter_actions_post = [(\"nope\", [(C_Login, identity)])]\n",
         "filter.conf:2: filter_actions_post: alias pattern 'nope' matches no configured"),
        (MINIMAL + "allowed_labels = [(\"softhsm\", [\"\\\\(\"])]\n",
         "filter.conf:2: allowed_labels: invalid allowed label regexp '\\\\(' at position 0"),
        ('modules = [("\\\\)", "/x.so")]\n',
         "filter.conf:1: modules: invalid alias regexp"),
        (MINIMAL + "filter_actions_post = [(\".*\", [(C_WrapKey, wrapping_format_patch)])]\n",
         "filter.conf:2: wrapping_format_key: wrapping_format_patch is used but no "
         "wrapping_format_key is set"),
    ],
)
def test_semantic_errors(text: str, expected: str) -> None:
    assert str(error_of(text)).startswith(expected)


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ('modules = [("a", "/x.so")', 1, "missing ']'"),
        ('modules = [("a" "/x.so")]', 1, "expected ',' or ')'"),
        ("modules [", 1, "expected '='"),
        ("\n\n= 3", 3, "expected an option name"),
        ('(* open\n (* nested *)\n debug = 1\n', 1, "unterminated comment"),
        ("debug = 1 *)", 1, "'*)' outside a comment"),
        ('modules = [("a\n\n', 1, "unterminated string"),
        ('\nlog_subchannel = "a\\(b"', 2, "unknown escape '\\('"),
        ('log_subchannel = "\\999"', 1, "invalid escape"),
        ("debug = 12abc", 1, "invalid number"),
        ("debug = @", 1, "unexpected character '@'"),
        ("debug =", 1, "expected a value, found the end of the file"),
    ],
)
def test_syntax_errors(text: str, line: int, fragment: str) -> None:
    err = error_of(text)
    assert err.file == "filter.conf" and err.line == line
    assert fragment in str(err)


def test_missing_file() -> None:
    with pytest.raises(ConfigError) as info:
        read_filter_conf("/nonexistent/filter.conf")
    assert str(info.value).startswith("/nonexistent/filter.conf: cannot read the file")


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    err = error_of("debug = " + "[" * 5000)
    assert "nested too deeply" in str(err)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(
    [*'=[](),;{}"\\*\n xy_0123CKM', "(*", "*)", "modules", "debug", "C_Login", "\\("]
), max_size=40).map("".join))
def test_lexer_and_parser_only_raise_config_error(text: str) -> None:
    try:
        parse(text, "fuzz.conf")
        parse_filter_conf(text, "fuzz.conf")
    except ConfigError as exc:
        assert exc.file == "fuzz.conf"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_only_raise_config_error(data: bytes) -> None:
    with contextlib.suppress(ConfigError):
        parse_filter_conf(data.decode("utf-8", "surrogateescape"), "fuzz.conf")
