"""Each CryptokiX patch against the attack it exists for, through a real PKCS#11
client library (python-pkcs11 loading libp11guard.so, or Debian's Caml Crush
client libp11clienttcp.so) against SoftHSM2 behind a proxy.

For every patch: the attack recovers the target key's value through p11guard
without the patch (so the test is real), is refused with it (the exact CK_RV
and the call that got it), and a legitimate use still works.  The strict-mode
cross-object checks are shown against Debian's Caml Crush 1.0.12 with its
patchset 1, where the same attack still works.  ``test_patch_attacks.py`` has
the same attacks at the wire level.

Scenarios run in a child process each (tests/support/p11lib.py): a client
library reads its environment once and python-pkcs11 loads one library per
process.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from p11guard.paths import client_library
from tests.integration.test_patch_attacks import KEY_HEX, patchset1, post
from tests.support.filter import running
from tests.support.p11lib import ckr_name, run_steps
from tests.support.servers import CAMLCRUSH_TCP, REPO
from tests.support.softhsm import Token

LEAKED = "leaked"


def native() -> Path:
    lib = client_library()
    if lib is None:
        pytest.skip("libp11guard.so is not built (make -C native/client)")
    return lib


def camlcrush_client() -> str:
    if not Path(CAMLCRUSH_TCP).exists():
        pytest.skip(f"{CAMLCRUSH_TCP} not installed")
    return CAMLCRUSH_TCP


@pytest.fixture
def short(tmp_path: Path) -> Iterator[Path]:
    """A short directory for pkcs11proxyd: its netplex control socket path is
    length-limited (sun_path), which pytest's tmp_path can exceed."""
    path = Path(tempfile.mkdtemp(prefix="pcl-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def refused(call: str, rv: str) -> str:
    """The outcome of an attack the proxy stopped: ``refused("WrapKey", "CKR_...")``."""
    return f"{call}:{ckr_name(rv)}"


def through(kind: str, token: Token, workdir: Path, extra: str, *steps: str,
            lib: Path | str | None = None) -> dict[str, Any]:
    """Start ``kind`` with this filter.conf text, run ``steps`` through ``lib``."""
    with running(kind, token, workdir, extra) as server:
        return run_steps(lib or native(), server.client_env(), *steps)


# -- one patch, one attack -------------------------------------------------------------------

@dataclass
class Case:
    """A patch configuration, the attacks it stops and the uses it keeps."""

    patch: str
    with_patch: str  # filter.conf lines
    blocked: dict[str, str]  # attack step -> outcome with the patch
    legit: dict[str, Any]  # step -> expected result with the patch
    without: str = ""  # filter.conf lines of the "no patch" run
    unpatched: dict[str, str] = field(default_factory=dict)  # when not LEAKED


CONFLICTING = "conflicting_attributes_patch"
EXISTING = "conflicting_attributes_patch_on_existing_objects"
AVI, OHI, TI = "CKR_ATTRIBUTE_VALUE_INVALID", "CKR_OBJECT_HANDLE_INVALID", \
    "CKR_TEMPLATE_INCONSISTENT"

CASES = [
    Case(CONFLICTING,
         post(("C_GenerateKeyPair", CONFLICTING), ("C_GenerateKey", CONFLICTING)),
         {"rsa_wrap_then_decrypt": refused("GenerateKeyPair", AVI),
          "wrap_then_decrypt": refused("GenerateKey", AVI)},
         {"legit_rsa": True, "legit_encrypt": True}),
    Case(EXISTING,
         post(("C_WrapKey", EXISTING), ("C_DecryptInit", EXISTING), ("C_SignInit", EXISTING)),
         {"wrap_then_decrypt": refused("WrapKey", OHI)},
         {"legit_wrap_cbc": True, "legit_sign": True}),
    *(Case(f"dangerous_sensitive_keys_{variant}",
           post(("C_WrapKey", f"dangerous_sensitive_keys_{variant}")),
           {"dangerous_key": refused("WrapKey", OHI)},
           {"legit_wrap_cbc": True, "legit_encrypt": True})
      for variant in ("paranoid", "escrow_encrypt", "escrow_all")),
    # The conflict check alone stops "add DECRYPT", not "drop WRAP first".
    Case("sticky_attributes_patch",
         post(("C_SetAttributeValue", CONFLICTING),
              ("C_SetAttributeValue", "sticky_attributes_patch")),
         {"sticky": refused("SetAttributeValue", AVI)},
         {"legit_set_usage": True},
         without=post(("C_SetAttributeValue", CONFLICTING))),
    Case("non_local_objects_patch",
         post(("C_CreateObject", "non_local_objects_patch")),
         {"known_key": refused("CreateObject", TI)},
         {"legit_import": True}),
    Case("prevent_sensitive_leak_patch",
         post(("C_GetAttributeValue", "prevent_sensitive_leak_patch"),
              ("C_SetAttributeValue", "prevent_sensitive_leak_patch")),
         {"read_value": refused("GetAttributeValue", "CKR_ATTRIBUTE_SENSITIVE")},
         # The label still reads; the value neither reads nor writes.
         {"legit_attributes": ["lbl", "get:AttributeSensitive", "set:AttributeReadOnly"],
          "legit_encrypt": True}),
    # A key made without usage attributes: SoftHSM2's defaults allow WRAP and DECRYPT.
    Case("sanitize_creation_templates_patch",
         post(("C_GenerateKey", "sanitize_creation_templates_patch")),
         {"bare_wrap_then_decrypt": refused("WrapKey", "CKR_KEY_FUNCTION_NOT_PERMITTED")},
         {"legit_encrypt": True}),
    Case("secure_templates_patch",
         post(("C_GenerateKey", "secure_templates_patch"),
              ("C_GenerateKeyPair", "secure_templates_patch")),
         {"wrap_then_decrypt": refused("GenerateKey", TI),
          "rsa_wrap_then_decrypt": refused("GenerateKeyPair", TI)},
         {"legit_encrypt": True, "legit_wrap": True}),
    Case("wrapping_format_patch",
         f'wrapping_format_key = "{KEY_HEX}"\n'
         + post(("C_WrapKey", "wrapping_format_patch"), ("C_UnwrapKey", "wrapping_format_patch")),
         {"unwrap_weaker": refused("UnwrapKey", TI)},
         # W (24 bytes) + Caml Crush's trailer; a blob the proxy did not make is refused.
         {"legit_wrapformat": {"len": 24 + 30, "unwrap": "same", "forged": "FunctionFailed",
                               "truncated": "FunctionFailed"}}),
    Case("do_segregate_usage",
         post(("C_Initialize", "do_segregate_usage"), ("C_GenerateKeyPair", CONFLICTING)),
         {"segregation_attack": refused("GenerateKeyPair", AVI)},
         {"legit_rsa_segregated": True},
         without=post(("C_GenerateKeyPair", CONFLICTING)),
         unpatched={"segregation_attack": "created"}),
]


@pytest.mark.parametrize("case", CASES, ids=[case.patch for case in CASES])
def test_patch_through_client_library(case: Case, token: Token, tmp_path: Path) -> None:
    attacks = list(case.blocked)
    off = through("p11guard", token, tmp_path / "off", case.without, *attacks)
    assert off == {a: case.unpatched.get(a, LEAKED) for a in attacks}  # the test is real
    on = through("p11guard", token, tmp_path / "on", case.with_patch, *attacks, *case.legit)
    assert on == case.blocked | case.legit


# -- beyond Caml Crush: the strict-mode cross-object checks -----------------------------------
# Without any patch each attack leaks through p11guard; Caml Crush's patchset 1 (its
# own client library, its own server) lets it through or catches it only later;
# p11guard's patchset 1 refuses it where it starts.

STRICT = {
    # B2: the public half gains WRAP after generation; its private half decrypts.
    "split_pair": (LEAKED, refused("SetAttributeValue", AVI)),
    # B6: a copy of a decryption key that adds WRAP (Caml Crush: caught at use only).
    "copy_merged": (refused("WrapKey", OHI), refused("CopyObject", AVI)),
    # B3: WRAP=0x02 is TRUE to the token (Caml Crush: created, caught at use only).
    "odd_bool": (refused("WrapKey", OHI), refused("GenerateKey", AVI)),
}


def test_strict_cross_object_checks(token: Token, tmp_path: Path, short: Path) -> None:
    steps = list(STRICT)
    assert through("p11guard", token, tmp_path / "none", "", *steps) == dict.fromkeys(
        steps, LEAKED)
    camlcrush = through("camlcrush", token, short, patchset1(), *steps,
                        lib=camlcrush_client())
    assert camlcrush == {s: cc for s, (cc, _) in STRICT.items()}
    ours = through("p11guard", token, tmp_path / "pg", patchset1(), *steps)
    assert ours == {s: pg for s, (_, pg) in STRICT.items()}


def test_padding_option_does_not_disable_patches(token: Token, tmp_path: Path,
                                                 short: Path) -> None:
    """B1: remove_padding_oracles on unwrap skips Caml Crush's unwrap checks: a bare
    RSA blob (no authenticated attributes) comes back as a decryption key."""
    extra = patchset1() + 'remove_padding_oracles = [("softhsm", [unwrap])]\n'
    assert through("camlcrush", token, short, extra, "padding_option",
                   lib=camlcrush_client()) == {"padding_option": LEAKED}
    assert through("p11guard", token, tmp_path / "pg", extra, "padding_option") == {
        "padding_option": refused("UnwrapKey", "CKR_FUNCTION_FAILED")}


# -- the whole patchset 1, both client libraries -----------------------------------------------

ATTACKS = {
    "wrap_then_decrypt": refused("GenerateKey", AVI),
    "bare_wrap_then_decrypt": refused("WrapKey", "CKR_KEY_FUNCTION_NOT_PERMITTED"),
    "rsa_wrap_then_decrypt": refused("GenerateKeyPair", AVI),
    "dangerous_key": refused("GenerateKey", AVI),  # SENSITIVE=F with WRAP: a conflict
    "sticky": refused("SetAttributeValue", AVI),
    "known_key": refused("CreateObject", TI),
    "read_value": refused("GetAttributeValue", "CKR_ATTRIBUTE_SENSITIVE"),
    "unwrap_weaker": refused("UnwrapKey", TI),
    "split_pair": refused("SetAttributeValue", AVI),
    "copy_merged": refused("CopyObject", AVI),
    "odd_bool": refused("GenerateKey", AVI),
}
LEGIT = {"legit_sign": True, "legit_encrypt": True, "legit_rsa": True, "legit_wrap_cbc": True,
         "legit_import": True}


@pytest.mark.parametrize("client", ["libp11guard", "camlcrush-client"])
def test_patchset1_blocks_every_attack(client: str, token: Token, tmp_path: Path) -> None:
    lib = native() if client == "libp11guard" else camlcrush_client()
    got = through("p11guard", token, tmp_path, patchset1(), *ATTACKS, *LEGIT, lib=lib)
    assert got == ATTACKS | LEGIT


def test_patchset1_wrap_unwrap_between_instances(token: Token, tmp_path: Path) -> None:
    """Generate, sign, encrypt, wrap here and unwrap there: two p11guard instances with
    patchset 1 and the same wrapping_format_key, through libp11guard.so."""
    extra = patchset1()
    with running("p11guard", token, tmp_path / "a", extra) as a, \
            running("p11guard", token, tmp_path / "b", extra) as b:
        made = run_steps(native(), a.client_env(), "legit_sign", "legit_rsa", "legit_wrap",
                         "share_wrap")
        shared = made.pop("share_wrap")
        assert made == {"legit_sign": True, "legit_rsa": True, "legit_wrap": True}
        assert len(bytes.fromhex(shared["blob"])) == 24 + 30  # Caml Crush format
        got = run_steps(native(), b.client_env(), f"share_unwrap={shared['blob']}")
        assert got == {"share_unwrap": shared["proof"]}
    other = patchset1().replace(KEY_HEX, "ff" * 16)
    got = through("p11guard", token, tmp_path / "c", other, f"share_unwrap={shared['blob']}")
    assert got == {"share_unwrap": refused("UnwrapKey", "CKR_FUNCTION_FAILED")}


def test_benchmark_measures_this_patchset() -> None:
    """bench/ runs its "+ps1" targets with bench/benchkit/patchset1.conf: the same
    actions, in the same order, as the patchset 1 these tests show blocking attacks."""
    bench_conf = (REPO / "bench" / "benchkit" / "patchset1.conf").read_text()
    pair = re.compile(r"\((C_\w+), (\w+)\)")
    assert pair.findall(bench_conf) == pair.findall(patchset1())
    assert f'wrapping_format_key = "{KEY_HEX}"' in bench_conf


def test_derived_key_inherits_base_key_protection(token: Token, tmp_path: Path) -> None:
    """Strict mode: a key derived from a sensitive base key cannot be made readable.

    Through libp11guard.so over protocol v4 (the derivation parameter holds a
    pointer, which v3 cannot carry).  Without a patch the derived value, the base
    key's encryption of zeros, leaves the token; with patchset 1 the derivation is
    refused, while a derivation into an equally protected key still works."""
    assert through("p11guard", token, tmp_path / "off", "", "derive_weaker") == {
        "derive_weaker": LEAKED}
    got = through("p11guard", token, tmp_path / "on", patchset1(), "derive_weaker",
                  "legit_derive")
    assert got == {"derive_weaker": refused("DeriveKey", AVI), "legit_derive": True}
