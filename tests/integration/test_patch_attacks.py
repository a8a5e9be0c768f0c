"""Each CryptokiX patch against the attack it exists for, through the wire
protocol, against SoftHSM2: the attack succeeds without the patch (so the test
is real), is blocked with it, and a legitimate use still works.

The "strict" tests run the same sequence against Debian's Caml Crush with
patchset 1 (where the attack works: its known weaknesses) and p11guard.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from p11guard.client import WireClient
from p11guard.pkcs11 import constants as c
from p11guard.policy.presets import PATCHSET1
from tests.support.filter import attr, ec_keypair, running, session, ulong
from tests.support.softhsm import Token

KEY_HEX = "00112233445566778899aabbccddeeff"
T, F = b"\x01", b"\x00"
ZERO16 = b"\0" * 16
CBC = (c.CKM_AES_CBC, ZERO16)
RSA = (c.CKM_RSA_PKCS, b"")
# CK_RSA_PKCS_OAEP_PARAMS (x86-64): SHA-1, MGF1-SHA1, no label.  A real parameter:
# Caml Crush turns an empty one into a non-NULL pointer SoftHSM2 refuses.
OAEP = (c.CKM_RSA_PKCS_OAEP, struct.pack("<5Q", c.CKM_SHA_1, 1, 1, 0, 0))


def post(*actions: tuple[str, str]) -> str:
    inner = ", ".join(f"({fn}, {act})" for fn, act in actions)
    return f'filter_actions_post = [("softhsm", [{inner}])]\n'


def patchset1() -> str:
    # The filter.conf spelling: Caml Crush knows no PKCS#11 3.0 function names.
    actions = [a for a in PATCHSET1 if not a[0].startswith("C_Message")]
    return f'wrapping_format_key = "{KEY_HEX}"\n' + post(*actions)


# -- building blocks -------------------------------------------------------------------

def secret(client: WireClient, s: int, **flags: bytes) -> tuple[int, int]:
    template = [attr(c.CKA_VALUE_LEN, ulong(16)), attr(c.CKA_TOKEN, F)]
    template += [attr(getattr(c, "CKA_" + k.upper()), v) for k, v in flags.items()]
    rv, handle = client.call("GenerateKey", s, (c.CKM_AES_KEY_GEN, b""), template)
    return int(rv), int(handle)


def target(client: WireClient, s: int) -> tuple[int, bytes]:
    """A sensitive, extractable AES key and its ECB encryption of zeros (the proof)."""
    rv, key = secret(client, s, sensitive=T, extractable=T, encrypt=T, decrypt=F, wrap=F,
                     unwrap=F)
    assert rv == c.CKR_OK, hex(rv)
    assert client.rv("EncryptInit", s, (c.CKM_AES_ECB, b""), key) == c.CKR_OK
    rv, ct = client.call("Encrypt", s, ZERO16)
    assert rv == c.CKR_OK
    return key, bytes(ct)


def is_target(value: bytes, proof: bytes) -> bool:
    enc = Cipher(algorithms.AES(value[:16]), modes.ECB()).encryptor()
    return len(value) >= 16 and enc.update(ZERO16) + enc.finalize() == proof


def cbc_decrypt(key: bytes, data: bytes) -> bytes:
    dec = Cipher(algorithms.AES(key), modes.CBC(ZERO16)).decryptor()
    return dec.update(data) + dec.finalize()


def decrypt(client: WireClient, s: int, mech: tuple[int, bytes], key: int,
            data: bytes) -> tuple[int, bytes]:
    rv = client.rv("DecryptInit", s, mech, key)
    if rv != c.CKR_OK:
        return rv, b""
    rv, out = client.call("Decrypt", s, data)
    return int(rv), bytes(out or b"")


def read_value(client: WireClient, s: int, key: int) -> tuple[int, bytes]:
    rv, values = client.call("GetAttributeValue", s, key, [(c.CKA_VALUE, b"\0" * 64, 64)])
    return int(rv), bytes(values[0][1]) if rv == c.CKR_OK else b""


def rsa_pair(client: WireClient, s: int, pub: dict[int, bytes],
             priv: dict[int, bytes]) -> tuple[int, int, int]:
    pub_t = [attr(c.CKA_MODULUS_BITS, ulong(1024)), attr(c.CKA_PUBLIC_EXPONENT, b"\1\0\1"),
             attr(c.CKA_TOKEN, F)] + [attr(t, v) for t, v in pub.items()]
    priv_t = [attr(c.CKA_TOKEN, F), attr(c.CKA_SENSITIVE, T)] + [
        attr(t, v) for t, v in priv.items()]
    rv, h_pub, h_priv = client.call("GenerateKeyPair", s, (c.CKM_RSA_PKCS_KEY_PAIR_GEN, b""),
                                    pub_t, priv_t)
    return int(rv), int(h_pub), int(h_priv)


Attack = Callable[[WireClient, int], int]  # CKR_OK: the target's value was obtained


def run(token: Token, tmp_path: Path, name: str, extra: str, attack: Attack) -> int:
    with running("p11guard", token, tmp_path / name, extra) as server, \
            session(server) as (client, s, _):
        return attack(client, s)


def outcome(rv: int, value: bytes, proof: bytes) -> int:
    if rv != c.CKR_OK:
        return rv
    assert is_target(value, proof), "the attack ran but recovered something else"
    return c.CKR_OK


# -- the attacks -------------------------------------------------------------------------------

def wrap_then_decrypt_same_key(gen: dict[str, bytes]) -> Attack:
    """One key that can both wrap and decrypt: wrap the target, decrypt the blob."""
    def attack(client: WireClient, s: int) -> int:
        key, proof = target(client, s)
        rv, k = secret(client, s, **gen)
        if rv != c.CKR_OK:
            return rv
        rv, blob = client.call("WrapKey", s, CBC, k, key)
        if rv != c.CKR_OK:
            return int(rv)
        rv, value = decrypt(client, s, CBC, k, bytes(blob)[:16])
        return outcome(rv, value, proof)
    return attack


def rsa_wrap_then_decrypt(client: WireClient, s: int) -> int:
    """Public half wraps (RSA PKCS#1), private half decrypts."""
    key, proof = target(client, s)
    rv, pub, priv = rsa_pair(client, s, {c.CKA_WRAP: T}, {c.CKA_DECRYPT: T})
    if rv != c.CKR_OK:
        return rv
    rv, blob = client.call("WrapKey", s, RSA, pub, key)
    if rv != c.CKR_OK:
        return int(rv)
    rv, value = decrypt(client, s, RSA, priv, bytes(blob)[:128])
    return outcome(rv, value, proof)


def test_conflicting_attributes_patch(token: Token, tmp_path: Path) -> None:
    with_patch = post(("C_GenerateKeyPair", "conflicting_attributes_patch"),
                      ("C_GenerateKey", "conflicting_attributes_patch"))
    assert run(token, tmp_path, "off", "", rsa_wrap_then_decrypt) == c.CKR_OK
    assert run(token, tmp_path, "on", with_patch, rsa_wrap_then_decrypt) == (
        c.CKR_ATTRIBUTE_VALUE_INVALID)
    attack = wrap_then_decrypt_same_key({"wrap": T, "decrypt": T, "sensitive": T})
    assert run(token, tmp_path, "on2", with_patch, attack) == c.CKR_ATTRIBUTE_VALUE_INVALID
    with running("p11guard", token, tmp_path / "legit", with_patch) as server, \
            session(server) as (client, s, _):
        assert rsa_pair(client, s, {c.CKA_ENCRYPT: T}, {c.CKA_DECRYPT: T})[0] == c.CKR_OK
        assert secret(client, s, encrypt=T, decrypt=T, sensitive=T)[0] == c.CKR_OK


def test_conflicting_attributes_patch_on_existing_objects(token: Token, tmp_path: Path) -> None:
    name = "conflicting_attributes_patch_on_existing_objects"
    with_patch = post(("C_WrapKey", name), ("C_DecryptInit", name), ("C_SignInit", name))
    attack = wrap_then_decrypt_same_key({"wrap": T, "decrypt": T, "sensitive": T})
    assert run(token, tmp_path, "off", "", attack) == c.CKR_OK
    assert run(token, tmp_path, "on", with_patch, attack) == c.CKR_OBJECT_HANDLE_INVALID
    with running("p11guard", token, tmp_path / "legit", with_patch) as server, \
            session(server) as (client, s, _):
        _, k = secret(client, s, wrap=T, unwrap=T, encrypt=F, decrypt=F, sensitive=T)
        key, _ = target(client, s)
        assert client.call("WrapKey", s, CBC, k, key)[0] == c.CKR_OK
        _, ec = ec_keypair(client, s, b"ec")
        assert client.rv("SignInit", s, (c.CKM_ECDSA, b""), ec) == c.CKR_OK


def dangerous_key_attack(client: WireClient, s: int) -> int:
    """A wrapping key read while it was not sensitive, then made sensitive."""
    key, proof = target(client, s)
    rv, k = secret(client, s, wrap=T, sensitive=F, extractable=T)
    assert rv == c.CKR_OK
    rv, k_value = read_value(client, s, k)
    assert rv == c.CKR_OK and len(k_value) == 16
    assert client.rv("SetAttributeValue", s, k, [attr(c.CKA_SENSITIVE, T)]) == c.CKR_OK
    rv, blob = client.call("WrapKey", s, CBC, k, key)
    if rv != c.CKR_OK:
        return int(rv)
    return outcome(rv, cbc_decrypt(k_value, bytes(blob)[:16]), proof)


@pytest.mark.parametrize("variant", ["paranoid", "escrow_encrypt", "escrow_all"])
def test_dangerous_sensitive_keys(variant: str, token: Token, tmp_path: Path) -> None:
    with_patch = post(("C_WrapKey", f"dangerous_sensitive_keys_{variant}"))
    assert run(token, tmp_path, "off", "", dangerous_key_attack) == c.CKR_OK
    assert run(token, tmp_path, "on", with_patch, dangerous_key_attack) == (
        c.CKR_OBJECT_HANDLE_INVALID)
    with running("p11guard", token, tmp_path / "legit", with_patch) as server, \
            session(server) as (client, s, _):
        _, k = secret(client, s, wrap=T, sensitive=T)
        key, _ = target(client, s)
        assert client.call("WrapKey", s, CBC, k, key)[0] == c.CKR_OK


def sticky_attack(client: WireClient, s: int) -> int:
    """Wrap while the key may wrap, then turn it into a decryption key."""
    key, proof = target(client, s)
    rv, k = secret(client, s, wrap=T, unwrap=F, encrypt=F, decrypt=F, sensitive=T)
    rv, blob = client.call("WrapKey", s, CBC, k, key)
    assert rv == c.CKR_OK
    for flag, value in ((c.CKA_WRAP, F), (c.CKA_DECRYPT, T)):
        rv = client.rv("SetAttributeValue", s, k, [attr(flag, value)])
        if rv != c.CKR_OK:
            return rv
    rv, value = decrypt(client, s, CBC, k, bytes(blob)[:16])
    return outcome(rv, value, proof)


def test_sticky_attributes_patch(token: Token, tmp_path: Path) -> None:
    conflicting = ("C_SetAttributeValue", "conflicting_attributes_patch")
    # The conflict check alone stops "add DECRYPT", not "drop WRAP first".
    assert run(token, tmp_path, "off", post(conflicting), sticky_attack) == c.CKR_OK
    with_patch = post(conflicting, ("C_SetAttributeValue", "sticky_attributes_patch"))
    assert run(token, tmp_path, "on", with_patch, sticky_attack) == (
        c.CKR_ATTRIBUTE_VALUE_INVALID)
    with running("p11guard", token, tmp_path / "legit", with_patch) as server, \
            session(server) as (client, s, _):
        _, k = secret(client, s, encrypt=F, decrypt=F, wrap=F, unwrap=F, sensitive=T)
        assert client.rv("SetAttributeValue", s, k, [attr(c.CKA_ENCRYPT, T)]) == c.CKR_OK
        assert client.rv("SetAttributeValue", s, k, [attr(c.CKA_LABEL, b"x")]) == c.CKR_OK


def known_key_attack(client: WireClient, s: int) -> int:
    """Import a wrapping key whose value we know; wrap the target with it."""
    key, proof = target(client, s)
    known = bytes(range(16))
    rv, k = client.call("CreateObject", s, [
        attr(c.CKA_CLASS, ulong(c.CKO_SECRET_KEY)), attr(c.CKA_KEY_TYPE, ulong(c.CKK_AES)),
        attr(c.CKA_VALUE, known), attr(c.CKA_WRAP, T), attr(c.CKA_TOKEN, F)])
    if rv != c.CKR_OK:
        return int(rv)
    rv, blob = client.call("WrapKey", s, CBC, k, key)
    assert rv == c.CKR_OK
    return outcome(rv, cbc_decrypt(known, bytes(blob)[:16]), proof)


def test_non_local_objects_patch(token: Token, tmp_path: Path) -> None:
    with_patch = post(("C_CreateObject", "non_local_objects_patch"))
    assert run(token, tmp_path, "off", "", known_key_attack) == c.CKR_OK
    assert run(token, tmp_path, "on", with_patch, known_key_attack) == (
        c.CKR_TEMPLATE_INCONSISTENT)
    with running("p11guard", token, tmp_path / "legit", with_patch) as server, \
            session(server) as (client, s, _):
        rv, _ = client.call("CreateObject", s, [
            attr(c.CKA_CLASS, ulong(c.CKO_SECRET_KEY)), attr(c.CKA_KEY_TYPE, ulong(c.CKK_AES)),
            attr(c.CKA_VALUE, bytes(16)), attr(c.CKA_ENCRYPT, T), attr(c.CKA_TOKEN, F)])
        assert rv == c.CKR_OK


def read_value_attack(client: WireClient, s: int) -> int:
    _, proof = target(client, s)
    rv, k = secret(client, s, sensitive=F, extractable=T, encrypt=T)
    assert client.rv("EncryptInit", s, (c.CKM_AES_ECB, b""), k) == c.CKR_OK
    proof = bytes(client.call("Encrypt", s, ZERO16)[1])
    rv, value = read_value(client, s, k)
    return outcome(rv, value, proof)


def test_prevent_sensitive_leak_patch(token: Token, tmp_path: Path) -> None:
    with_patch = post(("C_GetAttributeValue", "prevent_sensitive_leak_patch"),
                      ("C_SetAttributeValue", "prevent_sensitive_leak_patch"))
    assert run(token, tmp_path, "off", "", read_value_attack) == c.CKR_OK
    assert run(token, tmp_path, "on", with_patch, read_value_attack) == c.CKR_ATTRIBUTE_SENSITIVE
    with running("p11guard", token, tmp_path / "legit", with_patch) as server, \
            session(server) as (client, s, _):
        _, k = secret(client, s, sensitive=F, extractable=T, label=b"lbl")
        rv, values = client.call("GetAttributeValue", s, k, [
            (c.CKA_LABEL, b"\0" * 3, 3), (c.CKA_VALUE, b"\0" * 16, 16)])
        assert rv == c.CKR_ATTRIBUTE_SENSITIVE
        assert bytes(values[0][1]) == b"lbl" and values[1][2] == (1 << 64) - 1
        assert client.rv("SetAttributeValue", s, k, [attr(c.CKA_VALUE, bytes(16))]) == (
            c.CKR_ATTRIBUTE_READ_ONLY)


def test_sanitize_creation_templates_patch(token: Token, tmp_path: Path) -> None:
    # SoftHSM2's defaults for a bare AES key: WRAP and DECRYPT both TRUE.
    attack = wrap_then_decrypt_same_key({})
    with_patch = post(("C_GenerateKey", "sanitize_creation_templates_patch"))
    assert run(token, tmp_path, "off", "", attack) == c.CKR_OK
    assert run(token, tmp_path, "on", with_patch, attack) == c.CKR_KEY_FUNCTION_NOT_PERMITTED
    with running("p11guard", token, tmp_path / "legit", with_patch) as server, \
            session(server) as (client, s, _):
        _, k = secret(client, s, encrypt=T)
        assert client.rv("EncryptInit", s, (c.CKM_AES_ECB, b""), k) == c.CKR_OK


def test_secure_templates_patch(token: Token, tmp_path: Path) -> None:
    attack = wrap_then_decrypt_same_key({"wrap": T, "decrypt": T, "sensitive": T})
    with_patch = post(("C_GenerateKey", "secure_templates_patch"),
                      ("C_GenerateKeyPair", "secure_templates_patch"))
    assert run(token, tmp_path, "off", "", attack) == c.CKR_OK
    assert run(token, tmp_path, "on", with_patch, attack) == c.CKR_TEMPLATE_INCONSISTENT
    assert run(token, tmp_path, "on2", with_patch, rsa_wrap_then_decrypt) == (
        c.CKR_TEMPLATE_INCONSISTENT)
    with running("p11guard", token, tmp_path / "legit", with_patch) as server, \
            session(server) as (client, s, _):
        assert secret(client, s, encrypt=T, decrypt=T, sensitive=T)[0] == c.CKR_OK
        assert secret(client, s, wrap=T, unwrap=T, sensitive=T)[0] == c.CKR_OK


def unwrap_with_other_rights(client: WireClient, s: int) -> int:
    """Wrap the target, unwrap it again as a non-sensitive key, read it."""
    key, proof = target(client, s)
    _, w = secret(client, s, wrap=T, unwrap=T, sensitive=T)
    rv, blob = client.call("WrapKey", s, (c.CKM_AES_KEY_WRAP, b""), w, key)
    assert rv == c.CKR_OK
    rv, k = client.call("UnwrapKey", s, (c.CKM_AES_KEY_WRAP, b""), w, bytes(blob), [
        attr(c.CKA_CLASS, ulong(c.CKO_SECRET_KEY)), attr(c.CKA_KEY_TYPE, ulong(c.CKK_AES)),
        attr(c.CKA_SENSITIVE, F), attr(c.CKA_EXTRACTABLE, T), attr(c.CKA_TOKEN, F)])
    if rv != c.CKR_OK:
        return int(rv)
    rv, value = read_value(client, s, int(k))
    return outcome(rv, value, proof)


def test_wrapping_format_patch(token: Token, tmp_path: Path) -> None:
    name = "wrapping_format_patch"
    with_patch = f'wrapping_format_key = "{KEY_HEX}"\n' + post(
        ("C_WrapKey", name), ("C_UnwrapKey", name))
    assert run(token, tmp_path, "off", "", unwrap_with_other_rights) == c.CKR_OK
    assert run(token, tmp_path, "on", with_patch, unwrap_with_other_rights) == (
        c.CKR_TEMPLATE_INCONSISTENT)
    with running("p11guard", token, tmp_path / "legit", with_patch) as server, \
            session(server) as (client, s, _):
        key, proof = target(client, s)
        _, w = secret(client, s, wrap=T, unwrap=T, sensitive=T)
        kw = (c.CKM_AES_KEY_WRAP, b"")
        rv, blob = client.call("WrapKey", s, kw, w, key)
        assert rv == c.CKR_OK and len(blob) == 24 + 30  # W + Caml Crush trailer
        template = [attr(c.CKA_CLASS, ulong(c.CKO_SECRET_KEY)),
                    attr(c.CKA_KEY_TYPE, ulong(c.CKK_AES)), attr(c.CKA_ENCRYPT, T),
                    attr(c.CKA_TOKEN, F)]
        rv, k = client.call("UnwrapKey", s, kw, w, bytes(blob), template)
        assert rv == c.CKR_OK
        assert client.rv("EncryptInit", s, (c.CKM_AES_ECB, b""), k) == c.CKR_OK
        assert bytes(client.call("Encrypt", s, ZERO16)[1]) == proof
        # A blob the proxy did not make (or changed) is refused.
        forged = bytes(blob)[:-1] + bytes([blob[-1] ^ 1])
        assert client.call("UnwrapKey", s, kw, w, forged, template)[0] == c.CKR_FUNCTION_FAILED
        assert client.call("UnwrapKey", s, kw, w, bytes(blob)[:24], template)[0] == (
            c.CKR_FUNCTION_FAILED)


def test_do_segregate_usage(token: Token, tmp_path: Path) -> None:
    def sign_and_decrypt(client: WireClient, s: int) -> int:
        return rsa_pair(client, s, {c.CKA_VERIFY: T, c.CKA_ENCRYPT: T},
                        {c.CKA_SIGN: T, c.CKA_DECRYPT: T})[0]
    conflicting = ("C_GenerateKeyPair", "conflicting_attributes_patch")
    assert run(token, tmp_path, "off", post(conflicting), sign_and_decrypt) == c.CKR_OK
    with_patch = post(("C_Initialize", "do_segregate_usage"), conflicting)
    assert run(token, tmp_path, "on", with_patch, sign_and_decrypt) == (
        c.CKR_ATTRIBUTE_VALUE_INVALID)


# -- beyond Caml Crush (strict mode): Caml Crush's patchset 1 vs p11guard's -----------------

BOTH = ["camlcrush", "p11guard"]


@pytest.mark.parametrize("kind", BOTH)
def test_split_key_pair(kind: str, token: Token, tmp_path: Path) -> None:
    """E1 / bug B2: the public key gains WRAP after generation; its private half decrypts."""
    with running(kind, token, tmp_path, patchset1()) as server, \
            session(server) as (client, s, _):
        key, proof = target(client, s)
        rv, pub, priv = rsa_pair(client, s, {c.CKA_VERIFY: T}, {c.CKA_DECRYPT: T})
        assert rv == c.CKR_OK
        rv = client.rv("SetAttributeValue", s, pub, [attr(c.CKA_WRAP, T)])
        if kind == "p11guard":
            assert rv == c.CKR_ATTRIBUTE_VALUE_INVALID
            return
        assert rv == c.CKR_OK
        rv, blob = client.call("WrapKey", s, OAEP, pub, key)
        assert rv == c.CKR_OK
        rv, value = decrypt(client, s, OAEP, priv, bytes(blob)[:128])
        assert outcome(rv, value, proof) == c.CKR_OK  # Caml Crush leaks the key


@pytest.mark.parametrize("kind", BOTH)
def test_copy_checked_on_merged_view(kind: str, token: Token, tmp_path: Path) -> None:
    """Bug B6: a copy that adds WRAP to a decryption key."""
    with running(kind, token, tmp_path, patchset1()) as server, \
            session(server) as (client, s, _):
        _, k = secret(client, s, decrypt=T, sensitive=T)
        rv, copy = client.call("CopyObject", s, k, [attr(c.CKA_WRAP, T)])
        if kind == "p11guard":
            assert rv == c.CKR_ATTRIBUTE_VALUE_INVALID
        else:
            assert rv == c.CKR_OK  # caught later, at use time
            key, _ = target(client, s)
            assert client.call("WrapKey", s, CBC, copy, key)[0] == c.CKR_OBJECT_HANDLE_INVALID


@pytest.mark.parametrize("kind", BOTH)
def test_non_canonical_booleans(kind: str, token: Token, tmp_path: Path) -> None:
    """Bug B3: WRAP=0x02 is TRUE to the token but not to Caml Crush's checks."""
    with running(kind, token, tmp_path, patchset1()) as server, \
            session(server) as (client, s, _):
        rv, _ = secret(client, s, wrap=b"\x02", decrypt=T, sensitive=T)
        assert rv == (c.CKR_OK if kind == "camlcrush" else c.CKR_ATTRIBUTE_VALUE_INVALID)


@pytest.mark.parametrize("kind", BOTH)
def test_padding_option_does_not_disable_patches(kind: str, token: Token,
                                                 tmp_path: Path) -> None:
    """Bug B1: remove_padding_oracles with unwrap skips every unwrap check in Caml Crush."""
    extra = patchset1() + 'remove_padding_oracles = [("softhsm", [unwrap])]\n'
    with running(kind, token, tmp_path, extra) as server, session(server) as (client, s, _):
        key, _ = target(client, s)
        rv, pub, priv = rsa_pair(client, s, {c.CKA_WRAP: T}, {c.CKA_UNWRAP: T})
        assert rv == c.CKR_OK
        rv, blob = client.call("WrapKey", s, OAEP, pub, key)
        assert rv == c.CKR_OK
        bare = bytes(blob)[:128]  # without the authenticated attributes
        rv, _ = client.call("UnwrapKey", s, OAEP, priv, bare, [
            attr(c.CKA_CLASS, ulong(c.CKO_SECRET_KEY)), attr(c.CKA_KEY_TYPE, ulong(c.CKK_AES)),
            attr(c.CKA_DECRYPT, T), attr(c.CKA_TOKEN, F)])
        assert rv == (c.CKR_OK if kind == "camlcrush" else c.CKR_FUNCTION_FAILED)


def test_patchset1_legitimate_use(token: Token, tmp_path: Path) -> None:
    """Generate, sign, encrypt, wrap/unwrap all work through the full patchset 1."""
    with running("p11guard", token, tmp_path, patchset1()) as server, \
            session(server) as (client, s, _):
        _, priv = ec_keypair(client, s, b"ec")
        assert client.rv("SignInit", s, (c.CKM_ECDSA, b""), priv) == c.CKR_OK
        assert client.call("Sign", s, b"\x11" * 32)[0] == c.CKR_OK
        rv, pub, rpriv = rsa_pair(client, s, {c.CKA_ENCRYPT: T}, {c.CKA_DECRYPT: T})
        assert rv == c.CKR_OK
        assert client.rv("EncryptInit", s, RSA, pub) == c.CKR_OK
        rv, ct = client.call("Encrypt", s, b"hello")
        assert rv == c.CKR_OK
        assert decrypt(client, s, RSA, rpriv, bytes(ct)) == (c.CKR_OK, b"hello")
        assert unwrap_with_other_rights(client, s) == c.CKR_TEMPLATE_INCONSISTENT
