"""Presets (Caml Crush's patchsets 1 and 2) and the per-installation wrapping key.

``preset = "patchset1"`` (the default of every TOML configuration) adds, after
the configured post actions, the patches Caml Crush's shipped filter.conf
places (reference §8), in its order.  ``patchset2`` is the alternative set
(secure templates, no wrapping format).  In strict mode the patches also
apply p11guard's cross-object checks (docs/patches.md).

The wrapping format of the presets is p11guard's v1 format.  Its MAC key is
``wrapping_format_key`` when the policy sets one, else a random key made for
this installation on first start and kept in a 0600 file (``key_file``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Final

import p11guard.policy.patches  # noqa: F401  (registers the patch actions)
from p11guard.policy.model import EffectivePolicy, Policy
from p11guard.policy.patches.wrapping import SCRATCH_KEY, WrapSettings
from p11guard.policy.rules.base import EngineState

log = logging.getLogger("p11guard.policy")

CRYPTO_INITS: Final = (
    "C_EncryptInit", "C_DecryptInit", "C_SignInit", "C_SignRecoverInit", "C_VerifyInit",
    "C_VerifyRecoverInit", "C_MessageEncryptInit", "C_MessageDecryptInit",
    "C_MessageSignInit", "C_MessageVerifyInit", "C_DigestKey",
)
NON_LOCAL = "non_local_objects_patch"
LEAK = "prevent_sensitive_leak_patch"
CONFLICT = "conflicting_attributes_patch"
EXISTING = "conflicting_attributes_patch_on_existing_objects"
DANGEROUS = "dangerous_sensitive_keys_escrow_encrypt"
STICKY = "sticky_attributes_patch"
WRAP_FORMAT = "wrapping_format_patch"
SECURE = "secure_templates_patch"
SANITIZE = "sanitize_creation_templates_patch"


def _on(functions: tuple[str, ...], *actions: str) -> list[tuple[str, str]]:
    return [(f, a) for f in functions for a in actions]


# Caml Crush's shipped filter.conf (patchset 1), function by function, in its order.
PATCHSET1: Final[tuple[tuple[str, str], ...]] = tuple(
    _on(("C_CreateObject",), NON_LOCAL, CONFLICT, SANITIZE)
    + _on(("C_CopyObject",), NON_LOCAL, CONFLICT, STICKY)
    + _on(("C_SetAttributeValue",), NON_LOCAL, LEAK, CONFLICT, STICKY)
    + _on(("C_GetAttributeValue",), LEAK)
    + _on(("C_GenerateKey", "C_GenerateKeyPair"), CONFLICT, SANITIZE)
    + _on(("C_DeriveKey",), EXISTING, DANGEROUS, CONFLICT, SANITIZE)
    + _on(("C_WrapKey",), EXISTING, DANGEROUS, WRAP_FORMAT)
    + _on(("C_UnwrapKey",), EXISTING, DANGEROUS, CONFLICT, WRAP_FORMAT)
    + _on(CRYPTO_INITS, EXISTING, DANGEROUS)
    + _on(("C_FindObjects",), EXISTING, DANGEROUS)
)
# Patchset 2 (commented out in Caml Crush's filter.conf; exclusive with 1).
PATCHSET2: Final[tuple[tuple[str, str], ...]] = tuple(
    _on((*CRYPTO_INITS, "C_FindObjects", "C_DeriveKey", "C_WrapKey", "C_UnwrapKey"),
        EXISTING, DANGEROUS)
    + _on(("C_GenerateKey", "C_GenerateKeyPair", "C_CreateObject", "C_CopyObject",
           "C_UnwrapKey", "C_DeriveKey", "C_SetAttributeValue"), SECURE)
    + _on(("C_GetAttributeValue", "C_SetAttributeValue"), LEAK)
    + _on(("C_CreateObject", "C_GenerateKey", "C_GenerateKeyPair", "C_DeriveKey",
           "C_UnwrapKey"), SANITIZE)
)
PRESETS: Final[dict[str, tuple[tuple[str, str], ...]]] = {
    "patchset1": PATCHSET1,
    "patchset2": PATCHSET2,
}


def _explicit_wrap_format(policy: EffectivePolicy | Policy) -> bool:
    if isinstance(policy, EffectivePolicy):
        actions = (*policy.actions_pre, *policy.actions_post)
    else:
        actions = tuple(a for rule in (*policy.filter_actions_pre, *policy.filter_actions_post)
                        for a in rule.value)
    return any(a.action == WRAP_FORMAT for a in actions)


def preset_actions(policy: EffectivePolicy,
                   table: dict[str, tuple[tuple[str, str], ...]] | None = None,
                   ) -> tuple[tuple[str, str], ...]:
    """The (function, action) post actions the policy's preset adds.

    A policy that configures ``wrapping_format_patch`` itself keeps its own
    (Caml Crush format, accepting both): the preset does not add a second one.
    """
    actions = (PRESETS if table is None else table).get(policy.preset or "", ())
    if _explicit_wrap_format(policy):
        actions = tuple(a for a in actions if a[1] != WRAP_FORMAT)
    return actions


def needs_installation_key(policy: Policy) -> bool:
    """Does ``policy`` use a wrapping format without setting its key?"""
    if policy.wrapping_format_key is not None:
        return False
    return WRAP_FORMAT in {a for _, a in PRESETS.get(policy.preset or "", ())} \
        or (policy.preset is not None and _explicit_wrap_format(policy))


def configure(state: EngineState) -> None:
    """Choose the wrapping formats of a module's engine (``WrappingFormat`` reads it)."""
    policy = state.policy
    explicit = _explicit_wrap_format(policy)
    preset_wraps = WRAP_FORMAT in {a for _, a in PRESETS.get(policy.preset or "", ())}
    key = policy.wrapping_format_key
    if key is None and policy.preset is not None:
        key = installation_key()
    if explicit and preset_wraps:
        settings = WrapSettings("camlcrush", frozenset({"camlcrush", "p11guard"}), key)
    elif explicit:
        settings = WrapSettings("camlcrush", frozenset({"camlcrush"}), key)
    else:
        settings = WrapSettings("p11guard", frozenset({"p11guard"}), key)
    state.scratch[SCRATCH_KEY] = settings


# -- the per-installation key -------------------------------------------------------------

KEY_FILE_ENV: Final = "P11GUARD_WRAPPING_KEY_FILE"
KEY_FILE_NAME: Final = "wrapping_format.key"
_installation_key: bytes | None = None
_installation_key_file: Path | None = None


def key_file(policy: Policy | None = None) -> Path | None:
    """Where this installation's wrapping key lives (None: nowhere known).

    1. ``$P11GUARD_WRAPPING_KEY_FILE``;
    2. ``$STATE_DIRECTORY/wrapping_format.key`` (systemd's StateDirectory=,
       i.e. /var/lib/p11guard: /etc is read-only under ProtectSystem=strict);
    3. next to the configuration file the policy came from (``policy.source``).
    """
    explicit = os.environ.get(KEY_FILE_ENV)
    if explicit:
        return Path(explicit)
    state_dir = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state_dir:
        return Path(state_dir) / KEY_FILE_NAME
    if policy is not None and policy.source and Path(policy.source).is_file():
        return Path(policy.source).resolve().parent / KEY_FILE_NAME
    return None


def _read_key(path: Path) -> bytes:
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file")
    if st.st_mode & 0o077:
        raise ValueError(f"{path}: permissions {stat.S_IMODE(st.st_mode):04o} are too open "
                         "(the wrapping key must be 0600)")
    text = path.read_text(encoding="ascii").strip()
    if len(text) != 32 or any(ch not in "0123456789abcdefABCDEF" for ch in text):
        raise ValueError(f"{path}: expected 32 hexadecimal characters")
    return bytes.fromhex(text)


def load_or_create_key(path: Path) -> tuple[bytes, bool]:
    """(key, created): read the key file, or make one (0600, never overwritten)."""
    try:
        return _read_key(path), False
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_bytes(16)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return _read_key(path), False
    try:
        os.write(fd, key.hex().encode("ascii") + b"\n")
        os.fsync(fd)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)
    return key, True


def prepare(policy: Policy, *, create: bool = True) -> tuple[list[str], list[str]]:
    """Start-up: load (or create) the installation key if the policy needs one.

    With ``create=False`` (a configuration check) a missing key file is only
    reported: the check must not write anything.

    Returns (errors, notices).  Called by ``engine.check_startup`` in the
    listener, before privileges are dropped; workers inherit the key.
    """
    global _installation_key, _installation_key_file
    if not needs_installation_key(policy):
        return [], []
    path = key_file(policy)
    if path is None:
        return [f"wrapping format key: the policy sets no wrapping_format_key and has no "
                f"configuration file to keep one next to (set {KEY_FILE_ENV})"], []
    if not create and not path.exists():
        return [], [f"a new wrapping format key will be generated in {path} at first start"]
    try:
        key, created = load_or_create_key(path)
    except (OSError, ValueError) as exc:
        return [f"wrapping format key: {exc} (set wrapping_format_key, or "
                f"{KEY_FILE_ENV} to a writable path)"], []
    _installation_key, _installation_key_file = key, path
    notice = (f"generated a new wrapping format key in {path}" if created
              else f"wrapping format key read from {path}")
    return [], [notice]


def installation_key() -> bytes | None:
    """The key ``prepare`` loaded; else an attempt to read (never create) it now."""
    global _installation_key
    if _installation_key is None:
        path = _installation_key_file or key_file(None)
        if path is None:
            return None
        try:
            _installation_key = _read_key(path)
        except (OSError, ValueError):
            return None
    return _installation_key


def set_installation_key(key: bytes | None) -> None:
    """For tools and tests: use ``key`` as the installation key."""
    global _installation_key
    _installation_key = key
