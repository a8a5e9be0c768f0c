"""Reader for p11guard's own TOML policy format (documented in docs/configuration.md).

A standalone policy file and the ``[policy]`` table of a server configuration
share one schema::

    mode = "strict"            # or "compat" (Caml Crush's regexp semantics)
    preset = "patchset1"       # "patchset1" (default), "patchset2" or "none"
    debug = 0
    log_subchannel = ""
    wrapping_format_key = "<32 hex digits>"

    [modules]                  # alias pattern -> module path, first match wins
    softhsm = "/usr/lib/softhsm/libsofthsm2.so"

    [[forbidden_mechanisms]]   # one table per rule, in order
    alias = ".*"
    mechanisms = ["CKM_RSA_X_509", 0x80001234]
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

from p11guard.policy.model import (
    MODES,
    PADDING_OPS,
    PRESETS,
    Action,
    ConfigError,
    Location,
    Mode,
    ModuleEntry,
    PaddingOp,
    Policy,
    Preset,
    Rule,
)
from p11guard.policy.readers.common import (
    ReadResult,
    check_policy,
    nth_matching_line,
    parse_hex_key,
)
from p11guard.policy.readers.names import FUNCTION_NAMES, is_action_name, mechanism_value

T = TypeVar("T")

DEFAULT_PRESET: Preset = "patchset1"
SCALAR_KEYS = ("mode", "preset", "debug", "log_subchannel", "wrapping_format_key")
# option -> the key holding the rule's value
RULE_KEYS: dict[str, str] = {
    "forbidden_mechanisms": "mechanisms",
    "allowed_labels": "labels",
    "allowed_ids": "ids",
    "forbidden_functions": "functions",
    "enforce_ro_sessions": "enabled",
    "forbid_admin_operations": "enabled",
    "remove_padding_oracles": "operations",
    "filter_actions_pre": "actions",
    "filter_actions_post": "actions",
}
POLICY_KEYS = frozenset(SCALAR_KEYS) | frozenset(RULE_KEYS) | {"modules"}
MAX_ULONG = 2**64 - 1


class _Locator:
    """Finds the line of a key or of the n-th ``[[table]]`` in TOML source text.

    tomllib gives no positions; a textual search is good enough for messages.
    """

    def __init__(self, text: str, file: str, prefix: str) -> None:
        self.lines = text.splitlines()
        self.file = file
        self.prefix = prefix  # "" or "policy." for a server configuration

    def _find(self, pattern: str, nth: int = 0) -> int | None:
        return nth_matching_line(self.lines, pattern, nth)

    def key(self, key: str) -> Location:
        line = self._find(rf"\s*[\"']?{re.escape(key)}[\"']?\s*=")
        return Location(self.file, line)

    def rule(self, option: str, index: int) -> Location:
        dotted = r"\s*\.\s*".join(re.escape(p) for p in (self.prefix + option).split("."))
        line = self._find(rf"\s*\[\[\s*{dotted}\s*\]\]", index)
        if line is None:
            line = self._find(rf"\s*{re.escape(option)}\s*=")
        return Location(self.file, line)


def _error(message: str, loc: Location | None, option: str) -> ConfigError:
    if loc is None:
        return ConfigError(message, option=option)
    return ConfigError(message, file=loc.file, line=loc.line, option=option)


def _type_name(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def _str(value: object, loc: Location, option: str, what: str) -> str:
    if not isinstance(value, str):
        raise _error(f"{what} must be a string, not {_type_name(value)}", loc, option)
    return value


def _str_list(value: object, loc: Location, option: str, what: str) -> list[str]:
    if not isinstance(value, list):
        raise _error(f"{what} must be an array of strings, not {_type_name(value)}", loc, option)
    return [_str(v, loc, option, f"each of {what}") for v in value]


def _mechanism(value: object, loc: Location, option: str) -> int:
    if isinstance(value, bool):
        raise _error("a mechanism must be a CKM_ name or an integer", loc, option)
    if isinstance(value, int):
        if not 0 <= value <= MAX_ULONG:
            raise _error(f"mechanism value {value} out of range", loc, option)
        return value
    if isinstance(value, str):
        try:
            return mechanism_value(value)
        except KeyError:
            raise _error(f"unknown mechanism {value!r}", loc, option) from None
    raise _error(f"a mechanism must be a CKM_ name or an integer, not {_type_name(value)}",
                 loc, option)


def _actions(value: object, loc: Location, option: str) -> tuple[Action, ...]:
    if not isinstance(value, list):
        raise _error("actions must be an array of [function, action] pairs", loc, option)
    out: list[Action] = []
    for item in value:
        if isinstance(item, list) and len(item) == 2:
            fn, act = item
        elif isinstance(item, dict) and set(item) == {"function", "action"}:
            fn, act = item["function"], item["action"]
        else:
            raise _error("each action must be [\"C_x\", \"action\"] or "
                         "{function = \"C_x\", action = \"action\"}", loc, option)
        fn = _str(fn, loc, option, "a function name")
        act = _str(act, loc, option, "an action name")
        if fn not in FUNCTION_NAMES:
            raise _error(f"unknown PKCS#11 function {fn!r}", loc, option)
        if not is_action_name(act):
            raise _error(f"unknown action {act!r}", loc, option)
        out.append(Action(fn, act))
    return tuple(out)


def _rule_value(option: str, value: object, loc: Location) -> object:
    if option == "forbidden_mechanisms":
        if not isinstance(value, list):
            raise _error("mechanisms must be an array", loc, option)
        return tuple(_mechanism(v, loc, option) for v in value)
    if option in ("allowed_labels", "allowed_ids"):
        return tuple(_str_list(value, loc, option, RULE_KEYS[option]))
    if option == "forbidden_functions":
        names = _str_list(value, loc, option, "functions")
        for name in names:
            if name not in FUNCTION_NAMES:
                raise _error(f"unknown PKCS#11 function {name!r}", loc, option)
        return tuple(names)
    if option in ("enforce_ro_sessions", "forbid_admin_operations"):
        if not isinstance(value, bool):
            raise _error(f"enabled must be true or false, not {_type_name(value)}", loc, option)
        return value
    if option == "remove_padding_oracles":
        ops = _str_list(value, loc, option, "operations")
        for op in ops:
            if op not in PADDING_OPS:
                raise _error(f"unknown padding operation {op!r} (expected one of "
                             f"{', '.join(PADDING_OPS)})", loc, option)
        return tuple(cast(PaddingOp, op) for op in ops)
    return _actions(value, loc, option)


def _rules(option: str, raw: object, locate: _Locator) -> tuple[Rule[Any], ...]:
    if not isinstance(raw, list):
        raise _error(f"must be an array of tables ([[{option}]]), not {_type_name(raw)}",
                     locate.key(option), option)
    value_key = RULE_KEYS[option]
    out: list[Rule[Any]] = []
    for index, table in enumerate(raw):
        loc = locate.rule(option, index)
        if not isinstance(table, dict):
            raise _error(f"each rule must be a table, not {_type_name(table)}", loc, option)
        unknown = set(table) - {"alias", value_key}
        if unknown:
            raise _error(f"unknown key(s) {', '.join(sorted(unknown))} (expected alias and "
                         f"{value_key})", loc, option)
        if "alias" not in table or value_key not in table:
            raise _error(f"a rule needs both alias and {value_key}", loc, option)
        alias = _str(table["alias"], loc, option, "alias")
        out.append(Rule(alias, _rule_value(option, table[value_key], loc), loc))
    return tuple(out)


def _modules(raw: object, locate: _Locator) -> tuple[ModuleEntry, ...]:
    out: list[ModuleEntry] = []
    if isinstance(raw, dict):
        for alias, path in raw.items():
            loc = locate.key(alias)
            path = _str(path, loc, "modules", f"the path of alias {alias!r}")
            if not path:
                raise _error(f"empty module path for alias {alias!r}", loc, "modules")
            out.append(ModuleEntry(alias, path, loc))
        return tuple(out)
    if isinstance(raw, list):
        # [[modules]] alias = ..., path = ...: allows an alias listed twice.
        for index, table in enumerate(raw):
            loc = locate.rule("modules", index)
            if not isinstance(table, dict) or set(table) != {"alias", "path"}:
                raise _error("each [[modules]] entry needs exactly alias and path", loc,
                             "modules")
            alias = _str(table["alias"], loc, "modules", "alias")
            path = _str(table["path"], loc, "modules", "path")
            if not path:
                raise _error(f"empty module path for alias {alias!r}", loc, "modules")
            out.append(ModuleEntry(alias, path, loc))
        return tuple(out)
    raise _error(f"must be a table alias = \"path\", not {_type_name(raw)}",
                 locate.key("modules"), "modules")


def policy_from_mapping(
    doc: Mapping[str, Any],
    *,
    file: str,
    text: str = "",
    prefix: str = "",
    validate: bool = True,
) -> ReadResult:
    """Build a policy from parsed TOML (a policy file, or a server's ``[policy]`` table).

    ``text`` (the TOML source) and ``prefix`` ("policy.") only serve to locate
    errors.
    """
    locate = _Locator(text, file, prefix)
    unknown = [k for k in doc if k not in POLICY_KEYS]
    if unknown:
        name = unknown[0]
        raise _error(f"unknown option {name!r}", locate.key(name), prefix + name)

    def scalar(key: str, kind: type[T], default: T, what: str) -> T:
        if key not in doc:
            return default
        value = doc[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _error(f"must be {what}, not {_type_name(value)}", locate.key(key), key)
        return value

    mode = scalar("mode", str, "strict", "a string")
    if mode not in MODES:
        raise _error(f"unknown mode {mode!r} (expected strict or compat)", locate.key("mode"),
                     "mode")
    preset_name = scalar("preset", str, DEFAULT_PRESET, "a string")
    if preset_name != "none" and preset_name not in PRESETS:
        raise _error(f"unknown preset {preset_name!r} (expected {', '.join(PRESETS)} or none)",
                     locate.key("preset"), "preset")
    preset = None if preset_name == "none" else cast(Preset, preset_name)
    debug = scalar("debug", int, 0, "an integer")
    if not 0 <= debug <= 3:
        raise _error(f"debug level must be between 0 and 3, got {debug}", locate.key("debug"),
                     "debug")
    log_subchannel = scalar("log_subchannel", str, "", "a string")
    key: bytes | None = None
    if "wrapping_format_key" in doc:
        text_key = scalar("wrapping_format_key", str, "", "a string")
        try:
            key = parse_hex_key(text_key)
        except ValueError as exc:
            raise _error(str(exc), locate.key("wrapping_format_key"),
                         "wrapping_format_key") from None

    def rules(option: str) -> tuple[Rule[Any], ...]:
        return _rules(option, doc[option], locate) if option in doc else ()

    policy = Policy(
        modules=_modules(doc["modules"], locate) if "modules" in doc else (),
        debug=debug,
        log_subchannel=log_subchannel,
        forbidden_mechanisms=rules("forbidden_mechanisms"),
        allowed_labels=rules("allowed_labels"),
        allowed_ids=rules("allowed_ids"),
        forbidden_functions=rules("forbidden_functions"),
        enforce_ro_sessions=rules("enforce_ro_sessions"),
        forbid_admin_operations=rules("forbid_admin_operations"),
        remove_padding_oracles=rules("remove_padding_oracles"),
        filter_actions_pre=rules("filter_actions_pre"),
        filter_actions_post=rules("filter_actions_post"),
        wrapping_format_key=key,
        mode=cast(Mode, mode),
        preset=preset,
        source=file,
    )
    warnings = check_policy(policy, policy.mode, cross=validate)
    return ReadResult(policy, tuple(warnings))


def toml_error(exc: tomllib.TOMLDecodeError, file: str) -> ConfigError:
    """A TOMLDecodeError as a located ConfigError."""
    message = str(exc)
    found = re.search(r"\(at line (\d+), column \d+\)$", message)
    line = int(found.group(1)) if found else None
    if found:
        message = message[: found.start()].rstrip()
    return ConfigError(f"invalid TOML: {message}", file=file, line=line)


def parse_policy_toml(text: str, file: str = "policy.toml", *, validate: bool = True) -> ReadResult:
    """Parse a standalone TOML policy."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise toml_error(exc, file) from None
    return policy_from_mapping(doc, file=file, text=text, validate=validate)


def read_policy_toml(path: str | Path, *, validate: bool = True) -> ReadResult:
    """Read a standalone TOML policy file."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the file: {exc}", file=file) from None
    return parse_policy_toml(text, file, validate=validate)
