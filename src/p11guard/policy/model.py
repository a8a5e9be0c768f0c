"""The typed policy: what a filter.conf or a TOML policy says, independent of syntax.

Readers (``policy/readers``) build a :class:`Policy`; the writer
(``policy/writer.py``) turns it into TOML; the filter engine asks
:meth:`Policy.for_alias` for the :class:`EffectivePolicy` of the module a client
loads.  Source locations are kept for error messages but are not part of
equality, so ``read(to_toml(p)) == p`` holds across formats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Literal, NamedTuple, TypeVar, get_args

from p11guard.policy.strregex import camlcrush_match, strict_match

Mode = Literal["strict", "compat"]
PaddingOp = Literal["wrap", "unwrap", "encrypt", "sign", "all"]
Preset = Literal["patchset1", "patchset2"]

MODES: tuple[str, ...] = get_args(Mode)
PADDING_OPS: tuple[str, ...] = get_args(PaddingOp)
PRESETS: tuple[str, ...] = get_args(Preset)
# The operations "all" stands for.
PADDING_OPS_ALL: frozenset[str] = frozenset({"wrap", "unwrap", "encrypt", "sign"})

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration problem, located: ``str(e)`` reads ``file:line: option: message``."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        option: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.option = option
        super().__init__(self.__str__())

    def __str__(self) -> str:
        parts = []
        if self.file is not None:
            parts.append(self.file if self.line is None else f"{self.file}:{self.line}")
        if self.option:
            parts.append(self.option)
        parts.append(self.message)
        return ": ".join(parts)


@dataclass(frozen=True, slots=True)
class Location:
    """Where a rule or entry was written (for messages only)."""

    file: str
    line: int | None = None

    def __str__(self) -> str:
        return self.file if self.line is None else f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class ModuleEntry:
    """``alias`` (a pattern, like every alias in Caml Crush) -> PKCS#11 module ``path``."""

    alias: str
    path: str
    location: Location | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Rule(Generic[T]):
    """One rule of an option: applies to modules whose requested name matches ``alias_pattern``."""

    alias_pattern: str
    value: T
    location: Location | None = field(default=None, compare=False)


class Action(NamedTuple):
    """A hook: run ``action`` when the PKCS#11 function ``function`` (``C_x``) is called."""

    function: str
    action: str


@dataclass(frozen=True, slots=True)
class Policy:
    """A complete policy.  Rule tuples keep file order (it matters for first-match options)."""

    modules: tuple[ModuleEntry, ...]
    debug: int = 0
    log_subchannel: str = ""
    forbidden_mechanisms: tuple[Rule[tuple[int, ...]], ...] = ()
    allowed_labels: tuple[Rule[tuple[str, ...]], ...] = ()
    allowed_ids: tuple[Rule[tuple[str, ...]], ...] = ()
    forbidden_functions: tuple[Rule[tuple[str, ...]], ...] = ()
    enforce_ro_sessions: tuple[Rule[bool], ...] = ()
    forbid_admin_operations: tuple[Rule[bool], ...] = ()
    remove_padding_oracles: tuple[Rule[tuple[PaddingOp, ...]], ...] = ()
    filter_actions_pre: tuple[Rule[tuple[Action, ...]], ...] = ()
    filter_actions_post: tuple[Rule[tuple[Action, ...]], ...] = ()
    # repr=False: key material must never end up in a log line.
    wrapping_format_key: bytes | None = field(default=None, repr=False)
    mode: Mode = "strict"
    # A built-in rule set the engine adds (e.g. "patchset1"); None = only the rules above.
    preset: Preset | None = None
    source: str = field(default="", compare=False)

    def matcher(self) -> Callable[[str, str | bytes], bool]:
        """The pattern matcher this policy's ``mode`` calls for."""
        return strict_match if self.mode == "strict" else camlcrush_match

    def module_for(self, name: str) -> ModuleEntry | None:
        """The first module entry whose alias pattern matches the requested ``name``."""
        match = self.matcher()
        for entry in self.modules:
            if match(entry.alias, name):
                return entry
        return None

    def for_alias(self, name: str) -> EffectivePolicy:
        """Resolve every option for a client that asked for module ``name``.

        Raises :class:`UnknownAliasError` when no module entry matches (Caml
        Crush then refuses C_LoadModule).
        """
        module = self.module_for(name)
        if module is None:
            raise UnknownAliasError(name)
        match = self.matcher()

        def matching(rules: Iterable[Rule[T]]) -> list[T]:
            return [r.value for r in rules if match(r.alias_pattern, name)]

        def first(rules: Iterable[Rule[bool]]) -> bool:
            found = matching(rules)
            return found[0] if found else False

        labels = matching(self.allowed_labels)
        ids = matching(self.allowed_ids)
        ops: set[str] = set()
        for op_list in matching(self.remove_padding_oracles):
            for op in op_list:
                ops |= PADDING_OPS_ALL if op == "all" else {op}
        return EffectivePolicy(
            requested_name=name,
            module=module,
            mode=self.mode,
            debug=self.debug,
            log_subchannel=self.log_subchannel,
            forbidden_mechanisms=frozenset(
                m for ms in matching(self.forbidden_mechanisms) for m in ms
            ),
            allowed_labels=tuple(p for ps in labels for p in ps) if labels else None,
            allowed_ids=tuple(p for ps in ids for p in ps) if ids else None,
            forbidden_functions=frozenset(
                f for fs in matching(self.forbidden_functions) for f in fs
            ),
            enforce_ro_sessions=first(self.enforce_ro_sessions),
            forbid_admin_operations=first(self.forbid_admin_operations),
            padding_oracle_ops=frozenset(ops),
            actions_pre=tuple(a for acts in matching(self.filter_actions_pre) for a in acts),
            actions_post=tuple(a for acts in matching(self.filter_actions_post) for a in acts),
            wrapping_format_key=self.wrapping_format_key,
            preset=self.preset,
        )


class UnknownAliasError(LookupError):
    """No ``modules`` entry matches the name a client asked for."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no module configured for alias {name!r}")
        self.name = name


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    """Every option resolved for one requested module name (what the engine consumes).

    ``allowed_labels``/``allowed_ids`` are None when no rule matches (no
    filtering); otherwise an object is visible iff its label (raw bytes) / id
    (lower-case hex) matches at least one pattern, with the policy's matcher.
    """

    requested_name: str
    module: ModuleEntry
    mode: Mode
    debug: int
    log_subchannel: str
    forbidden_mechanisms: frozenset[int]
    allowed_labels: tuple[str, ...] | None
    allowed_ids: tuple[str, ...] | None
    forbidden_functions: frozenset[str]
    enforce_ro_sessions: bool
    forbid_admin_operations: bool
    padding_oracle_ops: frozenset[str]  # subset of wrap/unwrap/encrypt/sign ("all" expanded)
    actions_pre: tuple[Action, ...]
    actions_post: tuple[Action, ...]
    wrapping_format_key: bytes | None = field(repr=False)
    preset: Preset | None

    def _match(self, pattern: str, subject: str | bytes) -> bool:
        return (strict_match if self.mode == "strict" else camlcrush_match)(pattern, subject)

    def label_allowed(self, label: bytes) -> bool:
        """Is an object with CKA_LABEL ``label`` (raw bytes) visible?"""
        if self.allowed_labels is None:
            return True
        return any(self._match(p, label) for p in self.allowed_labels)

    def id_allowed(self, object_id: bytes) -> bool:
        """Is an object with CKA_ID ``object_id`` (raw bytes) visible?  Matched as lower hex."""
        if self.allowed_ids is None:
            return True
        hex_id = object_id.hex()
        return any(self._match(p, hex_id) for p in self.allowed_ids)

    def actions_for(self, function: str, *, post: bool) -> tuple[str, ...]:
        """The action names hooked on ``function`` (``C_x``), in file order."""
        acts = self.actions_post if post else self.actions_pre
        return tuple(a.action for a in acts if a.function == function)
