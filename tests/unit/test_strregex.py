"""OCaml Str regexps: translation and the two matching semantics."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p11guard.policy.strregex import (
    StrRegexError,
    camlcrush_match,
    compile_camlcrush,
    strict_match,
    translate,
    validate,
)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (r"\(a\|b\)", b"(a|b)"),  # escaped parens/pipe are operators
        ("(a|b)", rb"\(a\|b\)"),  # bare ones are literals
        ("x{2,3}", rb"x\{2,3\}"),  # no counted repetition in Str
        ("sof.*", b"sof.*"),
        ("a**", b"(?:a*)*"),  # stacked repeat, not an error
        ("a*?", b"(?:a*)?"),  # Str's '?' after '*' is not Python's lazy star
        ("*a", rb"\*a"),  # a leading star is a literal
        (r"\(*a\)", rb"(\*a)"),
        (r"a\|*", rb"a|\*"),
        (r"\.\$\^\[\]\\", rb"\.\$\^\[\]\\"),
        ("[]a]", rb"[\x5da]"),  # ']' first in a set is literal
        (r"[^\]", rb"[^\x5c]"),  # backslash is ordinary inside a set
        ("[a-z0-9_-]", rb"[a-z0-9\x5f\x2d]"),
        (r"\bword\b", rb"\bword\b"),
        (r"\(a\)\1", rb"(a)(?:\1)"),
    ],
)
def test_translate(pattern: str, expected: bytes) -> None:
    assert translate(pattern) == expected


def test_strict_translation_uses_string_anchors() -> None:
    assert translate("^a$", strict=True) == rb"\Aa\Z"


@pytest.mark.parametrize(
    ("pattern", "subject", "compat", "strict"),
    [
        ("softhsm", "softhsm", True, True),
        ("softhsm", "softhsm2", False, False),  # full match for simple patterns
        ("softhsm", "xsofthsm", False, False),
        ("sof.*", "softhsm", True, True),
        (".*", "", True, True),
        # The newline bypass: Caml Crush's '$' matches before any '\n'.
        ("GOOD", "GOOD\nanything", True, False),
        ("GOOD", "GOOD\n", True, False),
        ("GOOD.*", "GOOD\nx", True, False),
        # Alternation binds weaker than the appended '$': prefix-A or exactly-B.
        (r"A\|B", "Axyz", True, False),
        (r"A\|B", "Bxyz", False, False),
        (r"A\|B", "B", True, True),
        (r"A\|B", "A", True, True),
        (r"\(A\|B\)", "Axyz", False, False),
        (r"\(sofths.*\|opencryptoki\)", "softhsm111", True, True),
        (r"\(sofths.*\|opencryptoki\)", "opencryptoki", True, True),
        ("a^b", "a\nb", False, False),
        ("a\n^b", "a\nb", True, False),  # '^' after a newline: line anchor only in compat
        ("0123.*", "0123ab", True, True),
        ("[0-9a-f]*", "00ff", True, True),
        ("[^a]", "\n", True, True),
        (".", "\n", False, False),
        ("(x)", "(x)", True, True),
        ("a+", "aaa", True, True),
        ("ab?c", "ac", True, True),
    ],
)
def test_match_semantics(pattern: str, subject: str, compat: bool, strict: bool) -> None:
    assert camlcrush_match(pattern, subject) is compat
    assert strict_match(pattern, subject) is strict


def test_bytes_subjects_match_byte_by_byte() -> None:
    # OCaml strings are bytes: '.' is one byte, so a 2-byte UTF-8 char needs '..'.
    assert strict_match("..", "é".encode())
    assert not strict_match(".", "é".encode())
    assert strict_match("é", "é".encode())
    assert strict_match("\udce9", b"\xe9")  # a non-UTF-8 byte from filter.conf


@pytest.mark.parametrize(
    ("pattern", "position", "reason"),
    [
        (r"\(", 0, "unmatched"),
        (r"ab\)", 2, "unmatched"),
        ("x[a", 1, "unterminated"),
        ("a\\", 1, "trailing backslash"),
        ("[z-a]", 1, "out of order"),
        (r"\1", 0, "undefined group"),
        (r"\(a\1\)", 3, "undefined group"),
    ],
)
def test_invalid_patterns(pattern: str, position: int, reason: str) -> None:
    with pytest.raises(StrRegexError) as info:
        validate(pattern)
    assert info.value.position == position
    assert reason in str(info.value)
    assert f"position {position}" in str(info.value)


def test_compiled_patterns_are_cached_and_bounded() -> None:
    assert compile_camlcrush("cache.*me") is compile_camlcrush("cache.*me")
    info = compile_camlcrush.cache_info()
    assert info.maxsize is not None and info.maxsize > 0


_STR_ATOMS = st.sampled_from(
    ["a", "b", ".", "*", "+", "?", "\\(", "\\)", "\\|", "(", ")", "|", "{", "}", "[ab]",
     "[^a]", "^", "$", "\\b", "\\.", "\\1", "\n", "\\"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_STR_ATOMS, max_size=12).map("".join), st.text("ab\n(|)", max_size=8))
def test_translation_never_crashes(pattern: str, subject: str) -> None:
    # Either a clean StrRegexError or a pattern Python compiles and can run.
    try:
        validate(pattern)
    except StrRegexError:
        return
    camlcrush_match(pattern, subject)
    strict_match(pattern, subject)


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(codec="ascii", exclude_characters="\\.*+?[]^$"), max_size=10))
def test_plain_text_is_literal(text: str) -> None:
    # Without Str operators, a pattern matches exactly itself.
    assert strict_match(text, text)
    assert not strict_match(text, text + "x")
