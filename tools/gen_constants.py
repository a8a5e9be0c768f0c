#!/usr/bin/env python3
"""Regenerate the tables inside ``src/p11guard/pkcs11/constants.py``.

The *values* of PKCS#11 constants are facts of the standard; this script reads
them from the C headers that Debian ships (p11-kit's header for 2.40, NSS's
``pkcs11t.h`` which carries the OASIS 3.0 values) plus a few 3.0 values given
by hand below, and rewrites only the region between the ``BEGIN GENERATED`` and
``END GENERATED`` markers of constants.py.  The lookup functions around that
region are hand-written and left untouched.

Usage: python3 tools/gen_constants.py [--check]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# NSS first: where the two disagree NSS has the OASIS value (see KNOWN_WRONG).
HEADERS = (
    Path("/usr/include/nss/pkcs11t.h"),
    Path("/usr/include/p11-kit-1/p11-kit/pkcs11.h"),
)
TARGET = Path(__file__).resolve().parent.parent / "src/p11guard/pkcs11/constants.py"
BEGIN = "# ---- BEGIN GENERATED (tools/gen_constants.py) ----\n"
END = "# ---- END GENERATED ----\n"

# PKCS#11 3.0 values missing from the headers above (from the OASIS 3.0 spec).
EXTRA: dict[str, int] = {
    "CKA_UNIQUE_ID": 0x00000004,
    "CKM_IKE2_PRF_PLUS_DERIVE": 0x0000402E,
    "CKM_IKE_PRF_DERIVE": 0x0000402F,
    "CKM_IKE1_PRF_DERIVE": 0x00004030,
    "CKM_IKE1_EXTENDED_DERIVE": 0x00004031,
}

# 3.0 spellings missing from the headers: alias -> the name it stands for.
EXTRA_ALIASES: dict[str, str] = {
    "CKM_SHA3_256_KEY_DERIVE": "CKM_SHA3_256_KEY_DERIVATION",
    "CKM_SHA3_224_KEY_DERIVE": "CKM_SHA3_224_KEY_DERIVATION",
    "CKM_SHA3_384_KEY_DERIVE": "CKM_SHA3_384_KEY_DERIVATION",
    "CKM_SHA3_512_KEY_DERIVE": "CKM_SHA3_512_KEY_DERIVATION",
    "CKM_SHAKE_128_KEY_DERIVE": "CKM_SHAKE_128_KEY_DERIVATION",
    "CKM_SHAKE_256_KEY_DERIVE": "CKM_SHAKE_256_KEY_DERIVATION",
}

# p11-kit 0.24's header numbers these 0x1c0..0x1c4; the OASIS 2.40 and 3.0
# headers (and SoftHSM2) use 0x1b5..0x1b9.  The first header's value is kept.
KNOWN_WRONG = {
    "CKR_EXCEEDED_MAX_ITERATIONS", "CKR_FIPS_SELF_TEST_FAILED", "CKR_LIBRARY_LOAD_FAILED",
    "CKR_PIN_TOO_WEAK", "CKR_PUBLIC_KEY_INVALID",
}

# Names that exist in the headers but are not PKCS#11 (NSS/p11-kit private).
SKIP = {"CKK_INVALID_KEY_TYPE"}

# When several names share a value, the first of these wins as the canonical
# name (the one ``name_of`` returns); everything else is an accepted alias.
PREFERRED = {
    "CKK_EC", "CKK_CAST128", "CKM_CAST128_KEY_GEN", "CKM_CAST128_ECB", "CKM_CAST128_CBC",
    "CKM_CAST128_MAC", "CKM_CAST128_MAC_GENERAL", "CKM_CAST128_CBC_PAD",
    "CKM_PBE_MD5_CAST128_CBC", "CKM_PBE_SHA1_CAST128_CBC", "CKM_EC_KEY_PAIR_GEN",
    "CKA_EC_PARAMS", "CKA_SUBPRIME_BITS", "CKF_EC_OID", "CKR_PIN_EXPIRED",
    "CKM_DSA_PROBABILISTIC_PARAMETER_GEN",
}

# Context of each CKF_ name: CKF_ values collide across structures, so each
# context gets its own table.  Names not listed are reported and must be added.
CKF_CONTEXTS: dict[str, tuple[str, ...]] = {
    "CKF_SLOT": ("TOKEN_PRESENT", "REMOVABLE_DEVICE", "HW_SLOT"),
    "CKF_TOKEN": (
        "RNG", "WRITE_PROTECTED", "LOGIN_REQUIRED", "USER_PIN_INITIALIZED",
        "RESTORE_KEY_NOT_NEEDED", "CLOCK_ON_TOKEN", "PROTECTED_AUTHENTICATION_PATH",
        "DUAL_CRYPTO_OPERATIONS", "TOKEN_INITIALIZED", "SECONDARY_AUTHENTICATION",
        "USER_PIN_COUNT_LOW", "USER_PIN_FINAL_TRY", "USER_PIN_LOCKED",
        "USER_PIN_TO_BE_CHANGED", "SO_PIN_COUNT_LOW", "SO_PIN_FINAL_TRY", "SO_PIN_LOCKED",
        "SO_PIN_TO_BE_CHANGED", "ERROR_STATE",
    ),
    "CKF_SESSION": ("RW_SESSION", "SERIAL_SESSION"),
    "CKF_MECHANISM": (
        "HW", "MESSAGE_ENCRYPT", "MESSAGE_DECRYPT", "MESSAGE_SIGN", "MESSAGE_VERIFY",
        "MULTI_MESSAGE", "FIND_OBJECTS", "ENCRYPT", "DECRYPT", "DIGEST", "SIGN",
        "SIGN_RECOVER", "VERIFY", "VERIFY_RECOVER", "GENERATE", "GENERATE_KEY_PAIR", "WRAP",
        "UNWRAP", "DERIVE", "EC_F_P", "EC_F_2M", "EC_ECPARAMETERS", "EC_OID", "EC_NAMEDCURVE",
        "EC_UNCOMPRESS", "EC_COMPRESS", "EC_CURVENAME", "EXTENSION",
    ),
    "CKF_INIT": ("LIBRARY_CANT_CREATE_OS_THREADS", "OS_LOCKING_OK"),
    "CKF_WAIT": ("DONT_BLOCK",),
    "CKF_ATTRIBUTE": ("ARRAY_ATTRIBUTE",),
    "CKF_INTERFACE": ("INTERFACE_FORK_SAFE",),
    "CKF_MESSAGE": ("END_OF_MESSAGE",),
    "CKF_HKDF": ("HKDF_SALT_NULL", "HKDF_SALT_DATA", "HKDF_SALT_KEY"),
    "CKF_OTP": (
        "NEXT_OTP", "EXCLUDE_TIME", "EXCLUDE_COUNTER", "EXCLUDE_CHALLENGE", "EXCLUDE_PIN",
        "USER_FRIENDLY_OTP",
    ),
}

# Other prefixes whose names fall into two unrelated value spaces.
SPLIT: dict[str, tuple[str, str]] = {
    # name prefix -> (table for names starting with it, table otherwise)
    "CKG_GENERATE": ("CKG_GENERATE", "CKG"),
    "CKG_NO_GENERATE": ("CKG_GENERATE", "CKG"),
    "CKP_PKCS5_PBKD2_": ("CKP_PBKD2", "CKP"),
    "CKZ_SALT_": ("CKZ_SALT", "CKZ"),
}

PREFIXES = ("CKR", "CKM", "CKA", "CKO", "CKK", "CKU", "CKS", "CKC", "CKH", "CKD", "CKG",
            "CKP", "CKZ", "CKN")

DEFINE = re.compile(r"^\s*#\s*define\s+(CK[A-Z]?_[A-Za-z0-9_]+)\s+(.+?)\s*(?:/\*.*)?$")


def _evaluate(expr: str, known: dict[str, int]) -> int | None:
    """Evaluate the small C constant expressions the headers use."""
    text = expr.strip()
    text = re.sub(r"\(\s*unsigned\s+long\s*\)", "", text)
    text = re.sub(r"\b(0x[0-9A-Fa-f]+|\d+)[uU]?[lL]{0,2}\b", r"\1", text)
    text = re.sub(r"~\s*0\b", str(2**64 - 1), text)
    if not re.fullmatch(r"[\sA-Za-z0-9_()|<x]+", text):
        return None

    def ref(match: re.Match[str]) -> str:
        name = match.group(0)
        if name.startswith("0x") or name.isdigit():
            return name
        if name not in known:
            raise KeyError(name)
        return str(known[name])

    try:
        text = re.sub(r"\b[A-Za-z_][A-Za-z0-9_]*\b|0x[0-9A-Fa-f]+", ref, text)
        value = eval(text, {"__builtins__": {}})  # only digits, | and << remain here
    except (KeyError, SyntaxError):
        return None
    return int(value) if isinstance(value, int) else None


def parse() -> tuple[dict[str, int], set[str]]:
    """All CK*_ names with their values, and the names defined as aliases."""
    values: dict[str, int] = {}
    aliases: set[str] = set()
    for header in HEADERS:
        for line in header.read_text().splitlines():
            if "NSS Specific" in line:
                break
            m = DEFINE.match(line)
            if not m or m.group(1) in SKIP:
                continue
            name, expr = m.group(1), m.group(2)
            value = _evaluate(expr, values)
            if value is None:
                continue
            if re.fullmatch(r"\(?\s*CK[A-Z]?_\w+\s*\)?", expr.strip()):
                aliases.add(name)
            old = values.setdefault(name, value)
            if old != value and name not in KNOWN_WRONG:
                raise SystemExit(f"{name}: {old:#x} in one header, {value:#x} in another")
    for name, value in EXTRA.items():
        values.setdefault(name, value)
    for name, target in EXTRA_ALIASES.items():
        values.setdefault(name, values[target])
        aliases.add(name)
    return values, aliases


def table_of(name: str) -> str | None:
    if name.startswith("CKF_"):
        short = name[4:]
        for table, names in CKF_CONTEXTS.items():
            if short in names:
                return table
        return None
    for start, (yes, _no) in SPLIT.items():
        if name.startswith(start):
            return yes
    prefix = name.split("_", 1)[0]
    return prefix if prefix in PREFIXES else None


def render(values: dict[str, int], aliases: set[str]) -> str:
    tables: dict[str, dict[str, int]] = {}
    unknown_flags = []
    for name, value in values.items():
        if name.startswith("CK_") or name.startswith("CKF_VENDOR"):
            continue
        table = table_of(name)
        if table is None:
            if name.startswith("CKF_"):
                unknown_flags.append(name)
            continue
        tables.setdefault(table, {})[name] = value
    if unknown_flags:
        raise SystemExit(f"CKF_ names without a context: {unknown_flags}")

    out = [BEGIN]
    specials = ("CK_UNAVAILABLE_INFORMATION", "CK_EFFECTIVELY_INFINITE", "CK_INVALID_HANDLE",
                "CK_TRUE", "CK_FALSE")
    for name in specials:
        out.append(f"{name} = {values[name]:#x}\n")
    out.append("\n")
    for table in sorted(tables):
        out.append(f"# {table}\n")
        for name, value in sorted(tables[table].items(), key=lambda kv: (kv[1], kv[0])):
            out.append(f"{name} = {value:#010x}\n")
        out.append("\n")
    out.append("# Every table: name -> value (aliases included).\n")
    out.append("TABLES: Final[dict[str, dict[str, int]]] = {\n")
    for table in sorted(tables):
        out.append(f"    {table!r}: {{\n")
        for name, _value in sorted(tables[table].items(), key=lambda kv: (kv[1], kv[0])):
            out.append(f"        {name!r}: {name},\n")
        out.append("    },\n")
    out.append("}\n\n")
    alias_names = sorted(n for n in aliases if table_of(n) is not None)
    dup_losers: list[str] = []
    for entries in tables.values():
        by_value: dict[int, list[str]] = {}
        for name, value in entries.items():
            if name not in aliases:
                by_value.setdefault(value, []).append(name)
        for names in by_value.values():
            if len(names) > 1:
                winners = [n for n in names if n in PREFERRED]
                if len(winners) != 1:
                    raise SystemExit(f"no single canonical name among {names}")
                dup_losers.extend(n for n in names if n not in PREFERRED)
    out.append("# Deprecated or alternative spellings; name_of never returns these.\n")
    out.append("ALIASES: Final[frozenset[str]] = frozenset({\n")
    for name in sorted({*alias_names, *dup_losers}):
        out.append(f"    {name!r},\n")
    out.append("})\n")
    out.append(END)
    return "".join(out)


def main() -> int:
    values, aliases = parse()
    generated = render(values, aliases)
    source = TARGET.read_text()
    head, rest = source.split(BEGIN, 1)
    _old, tail = rest.split(END, 1)
    new = head + generated + tail
    if "--check" in sys.argv:
        return 0 if new == source else 1
    TARGET.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
