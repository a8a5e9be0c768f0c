"""``p11guard check-config PATH``: validate a configuration, print the effective policy.

PATH may be a server configuration (p11guard TOML or Caml Crush
``pkcs11proxyd.conf``) or a policy on its own (Caml Crush ``filter.conf`` or a
p11guard policy TOML).  Errors raise :class:`ConfigError` (file, line, option);
the filter engine's start-up checks are included, so what passes here starts.
Never prints the wrapping_format_key.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from p11guard.policy.engine import check_startup, resolve_effective
from p11guard.policy.model import ConfigError, EffectivePolicy, Policy, UnknownAliasError
from p11guard.policy.readers.names import mechanism_name
from p11guard.policy.rules.functions import forbidden_set
from p11guard.policy.rules.padding import covered_functions

_SERVER_TOML_KEYS = frozenset({"server", "listen", "tls", "policy"})


def _load(path: Path) -> tuple[Policy, list[str], str]:
    """(policy, warnings, what the file is)."""
    from p11guard.config.server import detect_format, load_server_config
    from p11guard.policy.readers.filterconf import read_filter_conf
    from p11guard.policy.readers.toml import read_policy_toml

    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", file=str(path)) from None
    if path.suffix == ".toml":
        try:
            keys = set(tomllib.loads(text))
        except tomllib.TOMLDecodeError:
            keys = set()  # let the real reader report the error with its location
        if keys & _SERVER_TOML_KEYS or not keys:
            config = load_server_config(path)
            return config.policy, list(config.warnings), "p11guard server configuration"
        result = read_policy_toml(path)
        return result.policy, list(result.warnings), "p11guard policy"
    if detect_format(text, str(path)) == "camlcrush":
        config = load_server_config(path)
        return config.policy, list(config.warnings), "Caml Crush pkcs11proxyd.conf"
    result = read_filter_conf(path)
    return result.policy, list(result.warnings), "Caml Crush filter.conf"


def _mechanisms(values: frozenset[int]) -> str:
    return ", ".join(sorted(mechanism_name(v) or f"{v:#x}" for v in values))


def _describe_alias(policy: Policy, alias: str, path: str) -> list[str]:
    lines = [f"module {alias!r} -> {path}"]
    try:
        eff: EffectivePolicy = resolve_effective(policy, alias)
    except UnknownAliasError:  # pragma: no cover - a configured alias always resolves
        return [*lines, "  (no rules: alias does not resolve)"]

    def show(option: str, text: str) -> None:
        lines.append(f"  {option:<24} {text}")

    show("forbidden_mechanisms", _mechanisms(eff.forbidden_mechanisms) or "-")
    show("allowed_labels", "no filtering" if eff.allowed_labels is None
         else " | ".join(repr(p) for p in eff.allowed_labels))
    show("allowed_ids", "no filtering" if eff.allowed_ids is None
         else " | ".join(repr(p) for p in eff.allowed_ids))
    show("forbidden_functions", ", ".join(sorted(forbidden_set(eff))) or "-")
    show("enforce_ro_sessions", "yes" if eff.enforce_ro_sessions else "no")
    show("forbid_admin_operations",
         "yes (SO login, C_InitToken, C_InitPIN, SO C_SetPIN)"
         if eff.forbid_admin_operations else "no")
    ops = eff.padding_oracle_ops
    show("remove_padding_oracles",
         f"{', '.join(sorted(ops))} (checks {', '.join(sorted(covered_functions(ops)))})"
         if ops else "-")
    for name, acts in (("filter_actions_pre", eff.actions_pre),
                       ("filter_actions_post", eff.actions_post)):
        show(name, "; ".join(f"{a.function} -> {a.action}" for a in acts) or "-")
    return lines


def describe_config(path: str | Path) -> str:
    """The effective policy of the configuration at ``path``, per module alias."""
    path = Path(path)
    policy, warnings, what = _load(path)
    errors, engine_warnings = check_startup(policy, create_key=False)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        first = errors[0]
        raise ConfigError(first.message + more, file=first.file, line=first.line,
                          option=first.option)
    lines = [
        f"{path}: {what}, OK",
        f"mode: {policy.mode}    preset: {policy.preset or 'none'}    debug: {policy.debug}"
        f"    log_subchannel: {policy.log_subchannel or '-'}",
        "wrapping_format_key: " + ("set" if policy.wrapping_format_key else "not set"),
    ]
    for warning in [*warnings, *engine_warnings]:
        lines.append(f"warning: {warning}")
    seen: set[str] = set()
    for entry in policy.modules:
        if entry.alias in seen:
            continue
        seen.add(entry.alias)
        lines.extend(_describe_alias(policy, entry.alias, entry.path))
    return "\n".join(lines)
