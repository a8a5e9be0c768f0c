"""Names a policy may use: PKCS#11 functions, mechanisms and filter actions.

Mechanism names are resolved through ``p11guard.pkcs11.constants`` when that
module is available (imported lazily, it is written separately); a small table
of common mechanisms keeps the readers usable without it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from p11guard.wire.procedures import CONTROL_PROCEDURES, PROCEDURES

# The function names Caml Crush accepts in filter.conf: the 67 PKCS#11 calls the
# protocol carries plus C_LoadModule (C_GetFunctionList is not one of them).
FUNCTION_NAMES: frozenset[str] = frozenset(
    {p.c_name for p in PROCEDURES if p.name not in CONTROL_PROCEDURES} | {"C_LoadModule"}
)

# Actions known to the filter: Caml Crush's demo hooks and its patches.
PATCH_ACTIONS: frozenset[str] = frozenset(
    {
        "do_segregate_usage",
        "non_local_objects_patch",
        "prevent_sensitive_leak_patch",
        "conflicting_attributes_patch",
        "conflicting_attributes_patch_on_existing_objects",
        "dangerous_sensitive_keys_paranoid",
        "dangerous_sensitive_keys_escrow_encrypt",
        "dangerous_sensitive_keys_escrow_all",
        "sticky_attributes_patch",
        "wrapping_format_patch",
        "secure_templates_patch",
        "sanitize_creation_templates_patch",
    }
)
DEMO_ACTIONS: frozenset[str] = frozenset({"identity", "c_Initialize_hook", "c_Login_hook"})
ACTION_NAMES: frozenset[str] = PATCH_ACTIONS | DEMO_ACTIONS

# A Python hook named by import path: ``package.module:function`` (p11guard extension).
_CALLABLE_ACTION = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
# Entry-point group whose names may be used as actions (p11guard extension).
ACTION_ENTRY_POINT_GROUP = "p11guard.filter_actions"


def is_action_name(name: str) -> bool:
    """A Caml Crush action, a ``module:function`` path or a registered entry point.

    Whether it is *implemented* is the filter engine's start-up check
    (``p11guard.policy.hooks.check_actions``); this only checks the spelling.
    """
    if name in ACTION_NAMES or _CALLABLE_ACTION.fullmatch(name):
        return True
    from importlib.metadata import entry_points

    return any(ep.name == name for ep in entry_points(group=ACTION_ENTRY_POINT_GROUP))

# Fallback for when p11guard.pkcs11.constants is not there: the mechanisms of
# Caml Crush's padding-oracle list and the ones commonly found in configurations.
_FALLBACK_MECHANISMS: dict[str, int] = {
    "CKM_RSA_PKCS_KEY_PAIR_GEN": 0x0,
    "CKM_RSA_PKCS": 0x1,
    "CKM_RSA_X_509": 0x3,
    "CKM_MD2_RSA_PKCS": 0x4,
    "CKM_MD5_RSA_PKCS": 0x5,
    "CKM_SHA1_RSA_PKCS": 0x6,
    "CKM_RIPEMD128_RSA_PKCS": 0x7,
    "CKM_RIPEMD160_RSA_PKCS": 0x8,
    "CKM_RSA_PKCS_OAEP": 0x9,
    "CKM_RSA_PKCS_PSS": 0xD,
    "CKM_DSA_KEY_PAIR_GEN": 0x10,
    "CKM_DH_PKCS_KEY_PAIR_GEN": 0x20,
    "CKM_DH_PKCS_DERIVE": 0x21,
    "CKM_SHA256_RSA_PKCS": 0x40,
    "CKM_SHA384_RSA_PKCS": 0x41,
    "CKM_SHA512_RSA_PKCS": 0x42,
    "CKM_SHA256_RSA_PKCS_PSS": 0x43,
    "CKM_SHA224_RSA_PKCS": 0x46,
    "CKM_RC2_CBC_PAD": 0x105,
    "CKM_DES_KEY_GEN": 0x120,
    "CKM_DES_ECB": 0x121,
    "CKM_DES_CBC": 0x122,
    "CKM_DES_CBC_PAD": 0x125,
    "CKM_DES3_KEY_GEN": 0x131,
    "CKM_DES3_ECB": 0x132,
    "CKM_DES3_CBC": 0x133,
    "CKM_DES3_CBC_PAD": 0x136,
    "CKM_CDMF_CBC_PAD": 0x145,
    "CKM_MD5": 0x210,
    "CKM_SHA_1": 0x220,
    "CKM_SHA_1_HMAC": 0x221,
    "CKM_SHA256": 0x250,
    "CKM_SHA256_HMAC": 0x251,
    "CKM_SHA224": 0x255,
    "CKM_SHA384": 0x260,
    "CKM_SHA512": 0x270,
    "CKM_CAST_CBC_PAD": 0x305,
    "CKM_CAST3_CBC_PAD": 0x315,
    "CKM_CAST5_CBC_PAD": 0x325,
    "CKM_CAST128_CBC_PAD": 0x325,
    "CKM_RC5_CBC_PAD": 0x335,
    "CKM_IDEA_CBC_PAD": 0x345,
    "CKM_GENERIC_SECRET_KEY_GEN": 0x350,
    "CKM_EC_KEY_PAIR_GEN": 0x1040,
    "CKM_ECDSA_KEY_PAIR_GEN": 0x1040,
    "CKM_ECDSA": 0x1041,
    "CKM_ECDSA_SHA1": 0x1042,
    "CKM_ECDSA_SHA256": 0x1044,
    "CKM_ECDH1_DERIVE": 0x1050,
    "CKM_AES_KEY_GEN": 0x1080,
    "CKM_AES_ECB": 0x1081,
    "CKM_AES_CBC": 0x1082,
    "CKM_AES_CBC_PAD": 0x1085,
    "CKM_AES_CTR": 0x1086,
    "CKM_AES_GCM": 0x1087,
    "CKM_AES_CMAC": 0x108A,
    "CKM_AES_KEY_WRAP": 0x2109,
    "CKM_AES_KEY_WRAP_PAD": 0x210A,
    "CKM_VENDOR_DEFINED": 0x80000000,
}
_FALLBACK_BY_VALUE: dict[int, str] = {}
for _name, _value in _FALLBACK_MECHANISMS.items():
    _FALLBACK_BY_VALUE.setdefault(_value, _name)


def _constants_lookup(attr: str) -> Callable[..., object] | None:
    try:
        module = importlib.import_module("p11guard.pkcs11.constants")
    except ImportError:
        return None
    func = getattr(module, attr, None)
    return func if callable(func) else None


def mechanism_value(name: str) -> int:
    """The value of mechanism ``name`` (``CKM_...``); KeyError if unknown.

    Only names are accepted here: numbers are the TOML reader's business.
    """
    if not name.startswith("CKM_"):
        raise KeyError(name)
    lookup = _constants_lookup("value_of")
    if lookup is not None:
        try:
            value = lookup(name)
        except (KeyError, ValueError):
            value = None
        if isinstance(value, int):
            return value
    return _FALLBACK_MECHANISMS[name]


def mechanism_name(value: int) -> str | None:
    """The canonical name of mechanism ``value``, or None if we do not know one."""
    lookup = _constants_lookup("name_of")
    if lookup is not None:
        for prefix in ("CKM", "CKM_"):  # tolerate either spelling of the prefix
            try:
                name = lookup(prefix, value)
            except (KeyError, ValueError, TypeError):
                continue
            # name_of renders unknown values as hex strings: only take real names.
            if isinstance(name, str) and name.startswith("CKM_") and "+" not in name:
                return name
    return _FALLBACK_BY_VALUE.get(value)
