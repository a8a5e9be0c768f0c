"""The policy engine (placeholder until the filter issue lands): pass-through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .model import Policy


@dataclass(frozen=True, slots=True)
class EngineContext:
    """Who is calling: for the audit log and identity-based rules."""

    peer: str
    pid: int


def wrap_module(module: Any, policy: Policy, alias: str, context: EngineContext) -> Any:
    """Return an object with the module's methods that applies ``policy`` for ``alias``."""
    return module
