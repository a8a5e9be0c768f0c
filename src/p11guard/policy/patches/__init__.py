"""The CryptokiX patches of Caml Crush as policy units, by their Caml Crush names.

Importing this package registers every patch with ``policy/hooks.py``, so the
names work in ``filter_actions_pre/post`` of a filter.conf or a TOML policy,
and in the presets (``policy/presets.py``).  See docs/patches.md.
"""

from __future__ import annotations

from typing import Final

from p11guard.policy.hooks import register_action
from p11guard.policy.patches.common import Patch
from p11guard.policy.patches.creation import (
    ConflictingAttributes,
    NonLocalObjects,
    StickyAttributes,
)
from p11guard.policy.patches.templates import (
    PreventSensitiveLeak,
    SanitizeTemplates,
    SecureTemplates,
    SegregateUsage,
)
from p11guard.policy.patches.use_time import (
    ConflictingOnExisting,
    DangerousEscrowAll,
    DangerousEscrowEncrypt,
    DangerousParanoid,
)
from p11guard.policy.patches.wrapping import WrappingFormat

PATCHES: Final[dict[str, type[Patch]]] = {
    cls.name: cls for cls in (
        SegregateUsage, NonLocalObjects, PreventSensitiveLeak, ConflictingAttributes,
        ConflictingOnExisting, DangerousParanoid, DangerousEscrowEncrypt, DangerousEscrowAll,
        StickyAttributes, WrappingFormat, SecureTemplates, SanitizeTemplates,
    )
}

for _name, _cls in PATCHES.items():
    register_action(_name, _cls)

__all__ = ["PATCHES"]
