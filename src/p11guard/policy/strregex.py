"""OCaml ``Str`` regular expressions, translated to Python ``re``.

Caml Crush's ``filter.conf`` uses OCaml's ``Str`` dialect for module aliases,
labels and ids.  This module translates that dialect and offers two matchers:

* :func:`camlcrush_match` reproduces Caml Crush exactly (pattern + ``$``, matched
  at offset 0, ``$``/``^`` at line ends): kept for compatibility and for tests
  that document Caml Crush's weaknesses (newline bypass, alternation binding
  weaker than the appended ``$``);
* :func:`strict_match` is p11guard's default: the *whole* subject must match,
  ``$`` never matches before a newline, ``^`` only at the start.

Matching is done on bytes, as OCaml strings are bytes: a label is matched as its
raw bytes and ``.`` matches one byte.  Patterns are ``str``; they are encoded as
UTF-8 (``surrogateescape`` keeps bytes that are not UTF-8, see the filter.conf
reader) before translation.
"""

from __future__ import annotations

import functools
import re

__all__ = [
    "StrRegexError",
    "camlcrush_match",
    "compile_camlcrush",
    "compile_strict",
    "strict_match",
    "to_bytes",
    "translate",
    "validate",
]

# Characters that a backslash makes literal in Str.  Any other escaped
# character is also taken literally by Str, except the operators below.
_SPECIAL_AFTER_BACKSLASH = frozenset(b"()|b123456789")
_QUANTIFIERS = frozenset(b"*+?")


class StrRegexError(ValueError):
    """An invalid Str pattern; ``position`` is a byte offset into the pattern."""

    def __init__(self, pattern: str, position: int, message: str) -> None:
        super().__init__(f"invalid regexp {pattern!r} at position {position}: {message}")
        self.pattern = pattern
        self.position = position
        self.reason = message


def to_bytes(text: str | bytes) -> bytes:
    """The bytes OCaml would see for ``text``."""
    if isinstance(text, bytes):
        return text
    return text.encode("utf-8", "surrogateescape")


def _lit(byte: int) -> bytes:
    return re.escape(bytes([byte]))


def _class_char(byte: int) -> bytes:
    # Inside a Python class, escape everything that is not alphanumeric so that
    # '\', ']', '[', '^' and '-' are never taken as syntax.
    if chr(byte).isalnum() and byte < 0x80:
        return bytes([byte])
    return b"\\x%02x" % byte


def _translate_class(pat: bytes, start: int, pattern: str) -> tuple[bytes, int]:
    """Translate ``[...]`` starting at ``pat[start] == '['``; return (regex, next index).

    Str sets: ``^`` first negates, ``]`` first (after the optional ``^``) is a
    literal, ``a-z`` is a range, ``-`` first or last is literal, and a
    backslash is an ordinary character.
    """
    i = start + 1
    negate = False
    if i < len(pat) and pat[i] == ord("^"):
        negate = True
        i += 1
    items: list[bytes] = []
    first = True
    while True:
        if i >= len(pat):
            raise StrRegexError(pattern, start, "unterminated character set '['")
        c = pat[i]
        if c == ord("]") and not first:
            i += 1
            break
        first = False
        if i + 2 < len(pat) and pat[i + 1] == ord("-") and pat[i + 2] != ord("]"):
            lo, hi = c, pat[i + 2]
            if lo > hi:
                raise StrRegexError(pattern, i, "character range out of order")
            items.append(_class_char(lo) + b"-" + _class_char(hi))
            i += 3
        else:
            items.append(_class_char(c))
            i += 1
    return b"[" + (b"^" if negate else b"") + b"".join(items) + b"]", i


def _translate(pattern: str, strict: bool) -> bytes:
    pat = to_bytes(pattern)
    # ``out`` holds one entry per atom so that a quantifier applies to the
    # right unit; ``quantified[k]`` tells whether atom k already carries one.
    out: list[bytes] = []
    quantified: list[bool] = []
    # Stack of indexes in ``out`` where an open group starts (for nesting).
    groups: list[tuple[int, int, int]] = []
    i = 0
    n = len(pat)
    opened = 0  # groups are numbered by their '(' (in Str and in Python alike)
    closed: set[int] = set()  # only closed groups may be referred to

    def can_repeat() -> bool:
        # Str takes a quantifier with nothing before it literally.
        if not out:
            return False
        return out[-1] not in (b"(", b"|")

    while i < n:
        c = pat[i]
        if c == ord("\\"):
            if i + 1 >= n:
                raise StrRegexError(pattern, i, "trailing backslash")
            d = pat[i + 1]
            i += 2
            if d == ord("("):
                opened += 1
                groups.append((len(out), i - 2, opened))
                out.append(b"(")
                quantified.append(False)
            elif d == ord(")"):
                if not groups:
                    raise StrRegexError(pattern, i - 2, "unmatched '\\)'")
                begin, _, number = groups.pop()
                closed.add(number)
                body = b"".join(out[begin:]) + b")"
                del out[begin:]
                del quantified[begin:]
                out.append(body)
                quantified.append(False)
            elif d == ord("|"):
                out.append(b"|")
                quantified.append(False)
            elif d == ord("b"):
                out.append(b"\\b")
                quantified.append(True)  # an assertion must be wrapped to be repeated
            elif ord("1") <= d <= ord("9"):
                ref = d - ord("0")
                if ref not in closed:
                    raise StrRegexError(pattern, i - 2, f"reference to undefined group \\{ref}")
                out.append(b"(?:\\%d)" % ref)
                quantified.append(False)
            else:
                out.append(_lit(d))
                quantified.append(False)
            continue
        if c in _QUANTIFIERS:
            if not can_repeat():
                out.append(_lit(c))
                quantified.append(False)
            else:
                if quantified[-1]:
                    # 'a**' or 'a*?' in Str repeat the repeated atom; Python would
                    # reject it or read '*?' as a lazy star.  Wrap it instead
                    # (anchors are marked "quantified" to get the same wrapping).
                    out[-1] = b"(?:" + out[-1] + b")"
                out[-1] = out[-1] + bytes([c])
                quantified[-1] = True
            i += 1
            continue
        if c == ord("["):
            cls, i = _translate_class(pat, i, pattern)
            out.append(cls)
            quantified.append(False)
            continue
        if c == ord("."):
            out.append(b".")
        elif c == ord("^"):
            out.append(b"\\A" if strict else b"^")
        elif c == ord("$"):
            out.append(b"\\Z" if strict else b"$")
        else:
            # Includes the bare '( ) | { }' that are literals in Str.
            out.append(_lit(c))
        quantified.append(c in b"^$")
        i += 1
    if groups:
        raise StrRegexError(pattern, groups[-1][1], "unmatched '\\('")
    return b"".join(out)


def translate(pattern: str, *, strict: bool = False) -> bytes:
    """Python ``re`` source (bytes) equivalent to the Str ``pattern``.

    ``strict`` maps ``^``/``$`` to ``\\A``/``\\Z`` (string edges only).
    """
    return _translate(pattern, strict)


def validate(pattern: str) -> None:
    """Raise :class:`StrRegexError` if ``pattern`` is not a valid Str regexp."""
    compile_strict(pattern)
    compile_camlcrush(pattern)


@functools.lru_cache(maxsize=1024)
def compile_camlcrush(pattern: str) -> re.Pattern[bytes]:
    """Caml Crush's compiled form: ``pattern + "$"``, line anchors."""
    source = _translate(pattern, strict=False) + b"$"
    try:
        return re.compile(source, re.MULTILINE)
    except re.error as exc:  # pragma: no cover - the translator should prevent this
        raise StrRegexError(pattern, exc.pos or 0, str(exc)) from None


@functools.lru_cache(maxsize=1024)
def compile_strict(pattern: str) -> re.Pattern[bytes]:
    """p11guard's compiled form: the whole subject, string anchors only."""
    source = b"(?:" + _translate(pattern, strict=True) + b")"
    try:
        return re.compile(source)
    except re.error as exc:  # pragma: no cover - the translator should prevent this
        raise StrRegexError(pattern, exc.pos or 0, str(exc)) from None


def camlcrush_match(pattern: str, subject: str | bytes) -> bool:
    """Caml Crush's semantics: ``Str.string_match (regexp (pattern ^ "$")) subject 0``.

    Known weaknesses reproduced on purpose: ``"GOOD\\nx"`` matches ``GOOD``, and
    ``A\\|B`` means "starts with A, or is exactly B".
    """
    return compile_camlcrush(pattern).match(to_bytes(subject)) is not None


def strict_match(pattern: str, subject: str | bytes) -> bool:
    """True iff the whole ``subject`` matches ``pattern`` (no newline tricks)."""
    return compile_strict(pattern).fullmatch(to_bytes(subject)) is not None
