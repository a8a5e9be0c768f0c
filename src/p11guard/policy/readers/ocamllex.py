"""A lexer for the OCaml-flavoured configuration files of Caml Crush.

Both ``filter.conf`` (OCaml ``config-file``) and ``pkcs11proxyd.conf``
(OCamlnet Netplex) are token streams of identifiers, double-quoted strings with
OCaml escapes, integers, floats, punctuation and nested ``(* *)`` comments.
Every token carries its line so that errors point at the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from p11guard.policy.model import ConfigError

TokenKind = Literal["ident", "string", "int", "float", "punct", "eof"]

PUNCTUATION = frozenset("=[](),;{}")
_IDENT_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_IDENT_CHARS = _IDENT_START | frozenset("0123456789'")
_DIGITS = frozenset("0123456789")
_SIMPLE_ESCAPES = {
    "\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "b": "\b", "r": "\r", " ": " ",
}
# Guards against pathological inputs (the files are small and written by admins).
MAX_INPUT = 4 * 1024 * 1024
MAX_COMMENT_DEPTH = 64


@dataclass(frozen=True, slots=True)
class Token:
    kind: TokenKind
    value: str | int | float
    line: int


def _byte_char(value: int) -> str:
    """A character standing for byte ``value`` (see strregex: surrogateescape)."""
    return chr(value) if value < 0x80 else chr(0xDC00 + value)


def decode_source(data: bytes) -> str:
    """File bytes -> text where non-UTF-8 bytes survive (OCaml strings are bytes)."""
    return data.decode("utf-8", "surrogateescape")


class Lexer:
    """Tokenises ``text``; errors are :class:`ConfigError` located in ``file``."""

    def __init__(self, text: str, file: str) -> None:
        if len(text) > MAX_INPUT:
            raise ConfigError(f"file too large (over {MAX_INPUT} bytes)", file=file)
        self.text = text
        self.file = file
        self.pos = 0
        self.line = 1

    def error(self, message: str, line: int | None = None) -> ConfigError:
        return ConfigError(message, file=self.file, line=line if line is not None else self.line)

    def tokens(self) -> list[Token]:
        out: list[Token] = []
        while True:
            tok = self._next()
            out.append(tok)
            if tok.kind == "eof":
                return out

    def _skip_blanks_and_comments(self) -> None:
        text = self.text
        while self.pos < len(text):
            c = text[self.pos]
            if c == "\n":
                self.line += 1
                self.pos += 1
            elif c in " \t\r\f":
                self.pos += 1
            elif text.startswith("(*", self.pos):
                self._skip_comment()
            else:
                return

    def _skip_comment(self) -> None:
        start_line = self.line
        depth = 0
        text = self.text
        while self.pos < len(text):
            if text.startswith("(*", self.pos):
                depth += 1
                if depth > MAX_COMMENT_DEPTH:
                    raise self.error("comments nested too deeply", start_line)
                self.pos += 2
            elif text.startswith("*)", self.pos):
                depth -= 1
                self.pos += 2
                if depth == 0:
                    return
            else:
                if text[self.pos] == "\n":
                    self.line += 1
                self.pos += 1
        raise self.error("unterminated comment '(*'", start_line)

    def _next(self) -> Token:
        self._skip_blanks_and_comments()
        text = self.text
        if self.pos >= len(text):
            return Token("eof", "", self.line)
        c = text[self.pos]
        line = self.line
        if text.startswith("*)", self.pos):
            raise self.error("'*)' outside a comment")
        if c in PUNCTUATION:
            self.pos += 1
            return Token("punct", c, line)
        if c == '"':
            return Token("string", self._string(), line)
        if c in _IDENT_START:
            start = self.pos
            while self.pos < len(text) and text[self.pos] in _IDENT_CHARS:
                self.pos += 1
            return Token("ident", text[start : self.pos], line)
        if c in _DIGITS or (
            c == "-" and self.pos + 1 < len(text) and text[self.pos + 1] in _DIGITS
        ):
            return self._number()
        shown = c if c.isprintable() and not 0xDC80 <= ord(c) <= 0xDCFF else repr(c)
        raise self.error(f"unexpected character {shown!r}")

    def _number(self) -> Token:
        text = self.text
        start = self.pos
        line = self.line
        if text[self.pos] == "-":
            self.pos += 1
        while self.pos < len(text) and (text[self.pos] in _IDENT_CHARS or text[self.pos] in ".+-"):
            # Take the whole word so that '12abc' or '1.2.3' is one bad token.
            if text[self.pos] in "+-" and text[self.pos - 1] not in "eE":
                break
            self.pos += 1
        word = text[start : self.pos].replace("_", "")
        try:
            if word.lstrip("-").startswith(("0x", "0X", "0o", "0O", "0b", "0B")):
                return Token("int", int(word, 0), line)
            if any(ch in word for ch in ".eE"):
                return Token("float", float(word), line)
            return Token("int", int(word, 10), line)
        except ValueError:
            raise self.error(f"invalid number {text[start:self.pos]!r}") from None

    def _string(self) -> str:
        text = self.text
        start_line = self.line
        self.pos += 1  # opening quote
        out: list[str] = []
        while True:
            if self.pos >= len(text):
                raise self.error("unterminated string", start_line)
            c = text[self.pos]
            if c == '"':
                self.pos += 1
                return "".join(out)
            if c == "\n":
                self.line += 1
            if c != "\\":
                out.append(c)
                self.pos += 1
                continue
            out.append(self._escape())

    def _escape(self) -> str:
        text = self.text
        self.pos += 1  # the backslash
        if self.pos >= len(text):
            raise self.error("unterminated string")
        c = text[self.pos]
        if c in _SIMPLE_ESCAPES:
            self.pos += 1
            return _SIMPLE_ESCAPES[c]
        if c == "\n":
            # Backslash-newline: the newline and the next line's indentation vanish.
            self.line += 1
            self.pos += 1
            while self.pos < len(text) and text[self.pos] in " \t":
                self.pos += 1
            return ""
        if c in _DIGITS:
            digits = text[self.pos : self.pos + 3]
            if len(digits) == 3 and all(d in _DIGITS for d in digits) and int(digits) <= 255:
                self.pos += 3
                return _byte_char(int(digits))
            raise self.error(f"invalid escape '\\{digits}' in string (\\ddd must be 000..255)")
        if c == "x":
            digits = text[self.pos + 1 : self.pos + 3]
            if len(digits) == 2 and all(d in "0123456789abcdefABCDEF" for d in digits):
                self.pos += 3
                return _byte_char(int(digits, 16))
            raise self.error("invalid escape '\\x' in string (needs two hex digits)")
        if c == "o":
            digits = text[self.pos + 1 : self.pos + 4]
            if len(digits) == 3 and all(d in "01234567" for d in digits) and int(digits, 8) <= 255:
                self.pos += 4
                return _byte_char(int(digits, 8))
            raise self.error("invalid escape '\\o' in string (needs three octal digits <= 377)")
        # OCaml tools disagree on unknown escapes (kept or dropped): refuse them.
        shown = c if c.isprintable() else repr(c)
        raise self.error(
            f"unknown escape '\\{shown}' in string (write '\\\\{shown}' for a backslash, "
            f"e.g. \"\\\\(\" for a regexp group)"
        )
