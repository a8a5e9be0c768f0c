"""Reader for Caml Crush's ``filter.conf`` (OCaml config-file syntax), unchanged.

Validation follows Caml Crush's start-up checks and is stricter where that is
sound: unknown options are errors (Caml Crush ignores them silently, so a typo
such as ``log_subchanel`` or the documented-but-unreal ``filter_actions``
disabled a rule without a word); duplicate options warn and the first one is
used, as Caml Crush does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

from p11guard.policy.model import (
    PADDING_OPS,
    Action,
    ConfigError,
    Location,
    Mode,
    ModuleEntry,
    PaddingOp,
    Policy,
    Rule,
)
from p11guard.policy.readers.common import (
    RULE_OPTIONS,
    ReadResult,
    check_policy,
    parse_hex_key,
)
from p11guard.policy.readers.names import (
    FUNCTION_NAMES,
    is_action_name,
    mechanism_value,
)
from p11guard.policy.readers.ocamllex import decode_source
from p11guard.policy.readers.ocamlvalue import Entry, Value, parse

T = TypeVar("T")

OPTIONS = ("debug", "log_subchannel", "modules", *RULE_OPTIONS, "wrapping_format_key")
# Misspellings found in Caml Crush's own documentation.
_HINTS = {
    "filter_actions": "use filter_actions_pre or filter_actions_post",
    "log_subchanel": "did you mean log_subchannel?",
}
_BOOLEANS = {"true": True, "yes": True, "false": False, "no": False}


class _Converter:
    """Turns parsed values into typed ones, with located errors."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, message: str, value: Value, option: str) -> ConfigError:
        return ConfigError(message, file=self.file, line=value.line, option=option)

    def loc(self, value: Value) -> Location:
        return Location(self.file, value.line)

    def string(self, value: Value, option: str, what: str) -> str:
        # config-file takes a bare word wherever a string is expected.
        if value.kind in ("string", "ident"):
            return cast(str, value.scalar)
        raise self.fail(f"expected {_article(what)} (a string), found {value.describe()}",
                        value, option)

    def integer(self, value: Value, option: str) -> int:
        if value.kind == "int":
            return cast(int, value.scalar)
        raise self.fail(f"expected an integer, found {value.describe()}", value, option)

    def boolean(self, value: Value, option: str) -> bool:
        if value.kind in ("ident", "string") and value.scalar in _BOOLEANS:
            return _BOOLEANS[value.scalar]
        raise self.fail(
            f"expected a boolean (true, false, yes or no), found {value.describe()}", value, option
        )

    def seq(self, value: Value, option: str, what: str) -> tuple[Value, ...]:
        if value.kind == "list":
            return value.items
        raise self.fail(f"expected a list [...] of {what}, found {value.describe()}", value, option)

    def pair(self, value: Value, option: str, what: str) -> tuple[Value, Value]:
        if value.kind == "tuple" and len(value.items) == 2:
            return value.items[0], value.items[1]
        raise self.fail(f"expected a couple {what}, found {value.describe()}", value, option)

    def rules(
        self,
        value: Value,
        option: str,
        what: str,
        convert: Callable[[Value], T],
    ) -> tuple[Rule[T], ...]:
        out: list[Rule[T]] = []
        for item in self.seq(value, option, f"couples (alias_regexp, {what})"):
            alias_v, payload = self.pair(item, option, f"(alias_regexp, {what})")
            alias = self.string(alias_v, option, "an alias regexp")
            out.append(Rule(alias, convert(payload), self.loc(item)))
        return tuple(out)

    def names(
        self, value: Value, option: str, what: str, check: Callable[[str], T], kind: str
    ) -> tuple[T, ...]:
        out: list[T] = []
        for item in self.seq(value, option, what):
            name = self.string(item, option, kind)
            try:
                out.append(check(name))
            except (KeyError, ValueError):
                raise self.fail(f"unknown {kind} {name!r}", item, option) from None
        return tuple(out)


def _article(what: str) -> str:
    if what.startswith(("a ", "an ")):
        return what
    return ("an " if what[0] in "aeiouAEIOU" else "a ") + what


def _function(name: str) -> str:
    if name not in FUNCTION_NAMES:
        raise KeyError(name)
    return name


def _action(name: str) -> str:
    if not is_action_name(name):
        raise KeyError(name)
    return name


def _padding(name: str) -> PaddingOp:
    if name not in PADDING_OPS:
        raise KeyError(name)
    return cast(PaddingOp, name)


def _convert(entries: dict[str, Entry], file: str, mode: Mode) -> Policy:
    cv = _Converter(file)

    def get(option: str) -> Value | None:
        entry = entries.get(option)
        return entry.value if entry else None

    modules: list[ModuleEntry] = []
    if (v := get("modules")) is not None:
        for item in cv.seq(v, "modules", "couples (alias, path)"):
            alias_v, path_v = cv.pair(item, "modules", "(alias, path)")
            alias = cv.string(alias_v, "modules", "an alias")
            path = cv.string(path_v, "modules", "a module path")
            if not path:
                raise cv.fail(f"empty module path for alias {alias!r}", item, "modules")
            modules.append(ModuleEntry(alias, path, cv.loc(item)))

    debug = 0
    if (v := get("debug")) is not None:
        debug = cv.integer(v, "debug")
        if not 0 <= debug <= 3:
            raise cv.fail(f"debug level must be between 0 and 3, got {debug}", v, "debug")

    log_subchannel = ""
    if (v := get("log_subchannel")) is not None:
        log_subchannel = cv.string(v, "log_subchannel", "a log subchannel name")

    key: bytes | None = None
    if (v := get("wrapping_format_key")) is not None:
        text = cv.string(v, "wrapping_format_key", "a hexadecimal key")
        try:
            key = parse_hex_key(text)
        except ValueError as exc:
            raise cv.fail(str(exc), v, "wrapping_format_key") from None

    def name_list(option: str, what: str, check: Callable[[str], T], kind: str) -> Callable[
        [Value], tuple[T, ...]
    ]:
        return lambda payload: cv.names(payload, option, what, check, kind)

    def rules_of(option: str, what: str, convert: Callable[[Value], T]) -> tuple[Rule[T], ...]:
        v = get(option)
        return () if v is None else cv.rules(v, option, what, convert)

    def patterns(option: str) -> Callable[[Value], tuple[str, ...]]:
        return lambda payload: tuple(
            cv.string(p, option, "a regexp") for p in cv.seq(payload, option, "regexps")
        )

    def actions(option: str) -> Callable[[Value], tuple[Action, ...]]:
        def convert(payload: Value) -> tuple[Action, ...]:
            out: list[Action] = []
            for item in cv.seq(payload, option, "couples (C_function, action)"):
                fn_v, act_v = cv.pair(item, option, "(C_function, action)")
                fn = cv.string(fn_v, option, "a PKCS#11 function name")
                act = cv.string(act_v, option, "an action name")
                if fn not in FUNCTION_NAMES:
                    raise cv.fail(f"unknown PKCS#11 function {fn!r}", fn_v, option)
                if not is_action_name(act):
                    raise cv.fail(f"unknown action {act!r}", act_v, option)
                out.append(Action(fn, act))
            return tuple(out)

        return convert

    return Policy(
        modules=tuple(modules),
        debug=debug,
        log_subchannel=log_subchannel,
        forbidden_mechanisms=rules_of(
            "forbidden_mechanisms", "[CKM_x, ...]",
            name_list("forbidden_mechanisms", "mechanism names", mechanism_value, "mechanism"),
        ),
        allowed_labels=rules_of("allowed_labels", "[label_regexp, ...]",
                                patterns("allowed_labels")),
        allowed_ids=rules_of("allowed_ids", "[id_regexp, ...]", patterns("allowed_ids")),
        forbidden_functions=rules_of(
            "forbidden_functions", "[C_x, ...]",
            name_list("forbidden_functions", "function names", _function, "PKCS#11 function"),
        ),
        enforce_ro_sessions=rules_of(
            "enforce_ro_sessions", "bool", lambda p: cv.boolean(p, "enforce_ro_sessions")
        ),
        forbid_admin_operations=rules_of(
            "forbid_admin_operations", "bool", lambda p: cv.boolean(p, "forbid_admin_operations")
        ),
        remove_padding_oracles=rules_of(
            "remove_padding_oracles", "[operation, ...]",
            name_list("remove_padding_oracles", "operations", _padding, "padding operation"),
        ),
        filter_actions_pre=rules_of("filter_actions_pre", "[(C_x, action), ...]",
                                    actions("filter_actions_pre")),
        filter_actions_post=rules_of("filter_actions_post", "[(C_x, action), ...]",
                                     actions("filter_actions_post")),
        wrapping_format_key=key,
        mode=mode,
        preset=None,
        source=file,
    )


def parse_filter_conf(
    text: str, file: str = "filter.conf", *, mode: Mode = "strict", validate: bool = True
) -> ReadResult:
    """Parse filter.conf ``text``; ``file`` is only used in messages.

    ``mode`` is how alias/label/id patterns will be matched ("strict" is
    p11guard's default, "compat" reproduces Caml Crush).  ``validate=False``
    skips the start-up cross checks (alias coverage, wrapping key presence) but
    not syntax, types and names: for converting a file that is not finished,
    such as Debian's shipped one, which lacks its wrapping_format_key.
    """
    warnings: list[str] = []
    entries: dict[str, Entry] = {}
    for entry in parse(text, file):
        if entry.key not in OPTIONS:
            hint = _HINTS.get(entry.key)
            raise ConfigError(
                f"unknown option {entry.key!r}" + (f" ({hint})" if hint else ""),
                file=file, line=entry.line, option=entry.key)
        if entry.key in entries:
            first = entries[entry.key]
            warnings.append(str(ConfigError(
                f"option given again (first at line {first.line}); only the first one is used",
                file=file, line=entry.line, option=entry.key)))
            continue
        entries[entry.key] = entry
    policy = _convert(entries, file, mode)
    warnings.extend(check_policy(policy, mode, cross=validate))
    return ReadResult(policy, tuple(warnings))


def read_filter_conf(
    path: str | Path, *, mode: Mode = "strict", validate: bool = True
) -> ReadResult:
    """Read and validate a filter.conf file."""
    file = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", file=file) from None
    return parse_filter_conf(decode_source(data), file, mode=mode, validate=validate)
