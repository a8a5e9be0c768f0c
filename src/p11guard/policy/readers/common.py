"""Checks shared by the policy readers (filter.conf and TOML)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from p11guard.policy.model import ConfigError, Location, Mode, Policy, Rule
from p11guard.policy.readers.names import PATCH_ACTIONS
from p11guard.policy.strregex import StrRegexError, camlcrush_match, strict_match, validate

# Characters that make an alias a pattern rather than a plain name.
_PATTERN_CHARS = frozenset(".*+?[]^$\\")


@dataclass(frozen=True, slots=True)
class ReadResult:
    """A policy and the warnings met while reading it (``file:line: option: text``)."""

    policy: Policy
    warnings: tuple[str, ...] = ()


def located_error(message: str, loc: Location | None, option: str) -> ConfigError:
    if loc is None:
        return ConfigError(message, option=option)
    return ConfigError(message, file=loc.file, line=loc.line, option=option)


def warning_text(message: str, loc: Location | None, option: str) -> str:
    return str(located_error(message, loc, option))


def check_pattern(pattern: str, loc: Location | None, option: str, what: str) -> None:
    try:
        validate(pattern)
    except StrRegexError as exc:
        raise located_error(
            f"invalid {what} regexp {pattern!r} at position {exc.position}: {exc.reason}",
            loc,
            option,
        ) from None


def nth_matching_line(lines: list[str], pattern: str, nth: int = 0) -> int | None:
    """The 1-based number of the ``nth`` line matching ``pattern`` (for error locations)."""
    rx = re.compile(pattern)
    count = 0
    for number, line in enumerate(lines, 1):
        if rx.match(line):
            if count == nth:
                return number
            count += 1
    return None


# The options that are lists of per-alias rules, in Caml Crush's order.
RULE_OPTIONS = (
    "forbidden_mechanisms",
    "allowed_labels",
    "allowed_ids",
    "forbidden_functions",
    "enforce_ro_sessions",
    "forbid_admin_operations",
    "remove_padding_oracles",
    "filter_actions_pre",
    "filter_actions_post",
)


def check_policy(policy: Policy, mode: Mode, *, cross: bool = True) -> list[str]:
    """Start-up validation shared by the readers; returns warnings, raises ConfigError.

    Pattern syntax is always checked; ``cross=False`` skips the checks below
    that relate options to each other.

    As in Caml Crush: ``modules`` must not be empty and every rule's alias
    pattern must match at least one configured alias (Caml Crush forgets to
    check ``filter_actions_post``; we do not).  A ``wrapping_format_key`` is
    required when ``wrapping_format_patch`` is used.
    """
    warnings: list[str] = []
    if cross and not policy.modules:
        raise ConfigError("no module configured (at least one alias is required)",
                          file=policy.source or None, option="modules")
    match = strict_match if mode == "strict" else camlcrush_match
    seen: dict[str, Location | None] = {}
    for entry in policy.modules:
        check_pattern(entry.alias, entry.location, "modules", "alias")
        if entry.alias in seen:
            warnings.append(warning_text(
                f"alias {entry.alias!r} is configured twice; only the first entry is used",
                entry.location, "modules"))
        seen.setdefault(entry.alias, entry.location)
        if mode == "strict" and any(c in _PATTERN_CHARS for c in entry.alias):
            warnings.append(warning_text(
                f"alias {entry.alias!r} is a pattern: in strict mode a client must ask for a "
                "configured alias exactly, so only the literal name matches it (compat mode "
                "matches it as a pattern, letting a client pick a name no rule covers)",
                entry.location, "modules"))
    aliases = [m.alias for m in policy.modules]
    uses_wrap_format = False
    wrap_format_at: Location | None = None  # the first rule using wrapping_format_patch
    for option in RULE_OPTIONS:
        rules: tuple[Rule[Any], ...] = getattr(policy, option)
        for rule in rules:
            check_pattern(rule.alias_pattern, rule.location, option, "alias")
            if cross and not any(match(rule.alias_pattern, alias) for alias in aliases):
                raise located_error(
                    f"alias pattern {rule.alias_pattern!r} matches no configured module alias "
                    f"({', '.join(repr(a) for a in aliases)})",
                    rule.location, option)
            if option in ("filter_actions_pre", "filter_actions_post"):
                if any(a.action == "wrapping_format_patch" for a in rule.value):
                    uses_wrap_format = True
                    wrap_format_at = wrap_format_at or rule.location
                if option == "filter_actions_pre" and any(
                    a.action in PATCH_ACTIONS for a in rule.value
                ):
                    warnings.append(warning_text(
                        "patches are meant to be post actions; as pre actions they run before "
                        "the built-in checks", rule.location, option))
            if option in ("allowed_labels", "allowed_ids"):
                for pattern in rule.value:
                    check_pattern(pattern, rule.location, option, option[:-1].replace("_", " "))
            if option == "allowed_ids":
                for pattern in rule.value:
                    if any(c in "ABCDEF" for c in pattern.replace("\\", "")):
                        warnings.append(warning_text(
                            f"id pattern {pattern!r} has upper-case hex letters but ids are "
                            "matched as lower-case hex", rule.location, option))
    if cross and uses_wrap_format and policy.wrapping_format_key is None and policy.preset is None:
        raise located_error(
            "wrapping_format_patch is used but no wrapping_format_key is set "
            "(32 hexadecimal characters)",
            wrap_format_at or (Location(policy.source) if policy.source else None),
            "wrapping_format_key")
    if policy.wrapping_format_key is not None and not uses_wrap_format and policy.preset is None:
        warnings.append(warning_text(
            "wrapping_format_key is set but wrapping_format_patch is not used",
            Location(policy.source) if policy.source else None, "wrapping_format_key"))
    return warnings


def parse_hex_key(text: str) -> bytes:
    """``wrapping_format_key``: exactly 32 hex digits -> 16 bytes; ValueError otherwise."""
    if len(text) != 32:
        raise ValueError(f"must be 32 hexadecimal characters, got {len(text)}")
    if not all(c in "0123456789abcdefABCDEF" for c in text):
        raise ValueError("must contain only hexadecimal characters")
    return bytes.fromhex(text)
