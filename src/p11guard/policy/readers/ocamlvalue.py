"""Parse OCaml ``config-file`` syntax (Caml Crush's filter.conf) into located values.

Grammar (what Caml Crush's files use, slightly stricter where it costs nothing)::

    file   := (key "=" value)*
    key    := ident | string
    value  := string | ident | int | float
            | "[" items "]"            list
            | "(" items ")"            tuple
            | "{" file "}"             group
    items  := empty | value (sep value)* sep?      sep := "," | ";"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from p11guard.policy.model import ConfigError
from p11guard.policy.readers.ocamllex import Lexer, Token

ValueKind = Literal["string", "ident", "int", "float", "list", "tuple", "group"]
MAX_DEPTH = 32


@dataclass(frozen=True, slots=True)
class Value:
    kind: ValueKind
    line: int
    scalar: str | int | float | None = None
    items: tuple[Value, ...] = ()
    entries: tuple[Entry, ...] = ()

    def describe(self) -> str:
        """A short description for error messages."""
        if self.kind in ("string", "ident", "int", "float"):
            return f"{self.kind} {self.scalar!r}"
        if self.kind == "group":
            return "a { ... } group"
        return f"a {self.kind} of {len(self.items)} element(s)"


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    value: Value
    line: int


class _Parser:
    def __init__(self, tokens: list[Token], file: str) -> None:
        self.tokens = tokens
        self.i = 0
        self.file = file

    def error(self, message: str, tok: Token) -> ConfigError:
        return ConfigError(message, file=self.file, line=tok.line)

    def peek(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        tok = self.tokens[self.i]
        if tok.kind != "eof":
            self.i += 1
        return tok

    def is_punct(self, tok: Token, char: str) -> bool:
        return tok.kind == "punct" and tok.value == char

    def entries(self, depth: int, closing: str | None) -> tuple[Entry, ...]:
        out: list[Entry] = []
        while True:
            tok = self.peek()
            if closing is None and tok.kind == "eof":
                return tuple(out)
            if closing is not None and self.is_punct(tok, closing):
                self.take()
                return tuple(out)
            if tok.kind == "eof":
                raise self.error(f"missing '{closing}' before the end of the file", tok)
            if tok.kind not in ("ident", "string"):
                raise self.error(f"expected an option name, found {_show(tok)}", tok)
            self.take()
            eq = self.take()
            if not self.is_punct(eq, "="):
                raise self.error(f"expected '=' after {tok.value!s}, found {_show(eq)}", eq)
            out.append(Entry(str(tok.value), self.value(depth), tok.line))

    def value(self, depth: int) -> Value:
        tok = self.take()
        if depth > MAX_DEPTH:
            raise self.error("values nested too deeply", tok)
        if tok.kind in ("string", "ident", "int", "float"):
            return Value(tok.kind, tok.line, scalar=tok.value)
        if self.is_punct(tok, "["):
            return Value("list", tok.line, items=self.items(depth + 1, "]"))
        if self.is_punct(tok, "("):
            return Value("tuple", tok.line, items=self.items(depth + 1, ")"))
        if self.is_punct(tok, "{"):
            return Value("group", tok.line, entries=self.entries(depth + 1, "}"))
        raise self.error(f"expected a value, found {_show(tok)}", tok)

    def items(self, depth: int, closing: str) -> tuple[Value, ...]:
        out: list[Value] = []
        while True:
            tok = self.peek()
            if self.is_punct(tok, closing):
                self.take()
                return tuple(out)
            if tok.kind == "eof":
                raise self.error(f"missing '{closing}' before the end of the file", tok)
            out.append(self.value(depth))
            sep = self.peek()
            if self.is_punct(sep, ",") or self.is_punct(sep, ";"):
                self.take()
            elif sep.kind == "eof":
                raise self.error(f"missing '{closing}' before the end of the file", sep)
            elif not self.is_punct(sep, closing):
                raise self.error(f"expected ',' or '{closing}', found {_show(sep)}", sep)


def _show(tok: Token) -> str:
    if tok.kind == "eof":
        return "the end of the file"
    if tok.kind == "punct":
        return f"'{tok.value}'"
    return f"{tok.kind} {tok.value!r}"


def parse(text: str, file: str) -> tuple[Entry, ...]:
    """Parse a whole config-file document; raise :class:`ConfigError` on bad syntax."""
    return _Parser(Lexer(text, file).tokens(), file).entries(0, None)
