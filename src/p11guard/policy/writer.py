"""Write a :class:`Policy` as p11guard TOML (``p11guard convert-config``).

The output reads back to an equal policy: ``parse_policy_toml(to_toml(p)).policy == p``.
"""

from __future__ import annotations

from collections.abc import Iterable

from p11guard.policy.model import Action, Policy, Rule
from p11guard.policy.readers.names import mechanism_name
from p11guard.policy.readers.toml import RULE_KEYS

_BARE_KEY = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class UnrepresentableError(ValueError):
    """The policy holds a value TOML cannot carry (e.g. bytes that are not UTF-8)."""


def toml_string(text: str) -> str:
    """A TOML basic string for ``text``."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if 0xD800 <= code <= 0xDFFF:
            # A byte that was not UTF-8 in filter.conf (see ocamllex): TOML strings
            # are Unicode, so it cannot be written without changing its meaning.
            raise UnrepresentableError(
                f"{text!r} contains a byte that is not valid UTF-8 (0x{code - 0xDC00:02x})"
            )
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _key(name: str) -> str:
    return name if name and all(c in _BARE_KEY for c in name) else toml_string(name)


def _strings(values: Iterable[str]) -> str:
    return "[" + ", ".join(toml_string(v) for v in values) + "]"


def _mechanisms(values: Iterable[int]) -> str:
    items = []
    for value in values:
        name = mechanism_name(value)
        items.append(toml_string(name) if name else f"0x{value:x}")
    return "[" + ", ".join(items) + "]"


def _actions(values: Iterable[Action]) -> str:
    pairs = [f"[{toml_string(a.function)}, {toml_string(a.action)}]" for a in values]
    if len(pairs) <= 1:
        return "[" + ", ".join(pairs) + "]"
    return "[\n" + "".join(f"    {p},\n" for p in pairs) + "]"


def _rule_value(option: str, value: object) -> str:
    if option == "forbidden_mechanisms":
        return _mechanisms(value)  # type: ignore[arg-type]
    if option in ("enforce_ro_sessions", "forbid_admin_operations"):
        return "true" if value else "false"
    if option in ("filter_actions_pre", "filter_actions_post"):
        return _actions(value)  # type: ignore[arg-type]
    return _strings(value)  # type: ignore[arg-type]


def to_toml(policy: Policy, *, header: str | None = None) -> str:
    """Render ``policy`` as a standalone TOML policy document."""
    lines: list[str] = []
    if header:
        lines.extend(f"# {line}".rstrip() for line in header.splitlines())
        lines.append("")
    lines.append(f"mode = {toml_string(policy.mode)}")
    lines.append(f"preset = {toml_string(policy.preset or 'none')}")
    lines.append(f"debug = {policy.debug}")
    lines.append(f"log_subchannel = {toml_string(policy.log_subchannel)}")
    if policy.wrapping_format_key is not None:
        lines.append(f"wrapping_format_key = {toml_string(policy.wrapping_format_key.hex())}")
    aliases = [m.alias for m in policy.modules]
    if len(set(aliases)) == len(aliases):
        lines += ["", "[modules]"]
        lines += [f"{_key(m.alias)} = {toml_string(m.path)}" for m in policy.modules]
    else:
        # An alias given twice cannot be a key twice in one table.
        for m in policy.modules:
            lines += ["", "[[modules]]", f"alias = {toml_string(m.alias)}",
                      f"path = {toml_string(m.path)}"]
    for option, value_key in RULE_KEYS.items():
        rules: tuple[Rule[object], ...] = getattr(policy, option)
        for rule in rules:
            lines += [
                "",
                f"[[{option}]]",
                f"alias = {toml_string(rule.alias_pattern)}",
                f"{value_key} = {_rule_value(option, rule.value)}",
            ]
    return "\n".join(lines) + "\n"
