"""The cffi binding against real SoftHSM2.

SoftHSM2 reads SOFTHSM2_CONF at C_Initialize and a process should hold one
initialised module, so every scenario runs in a fresh Python child process
with its own token directory; the pytest test only starts the child and
reports its output.  The scenarios are plain functions in this file (named
``scenario_*``) so that a failure's traceback points at the line.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from p11guard.pkcs11 import constants as c
from p11guard.pkcs11.attributes import FALSE, TRUE, ulong_bytes
from p11guard.pkcs11.binding import Module, ModuleLoadError, ffi
from p11guard.pkcs11.types import Template
from tests.support.softhsm import Token

REPO = Path(__file__).resolve().parents[2]
UNAVAILABLE = c.CK_UNAVAILABLE_INFORMATION
P256_OID = bytes.fromhex("06082a8648ce3d030107")  # DER OID prime256v1


# -- helpers used inside the child --------------------------------------------


def _module() -> Module:
    return Module(os.environ["P11_MODULE"])


def _ready(rw: bool = True, login: bool = True) -> tuple[Module, int, int]:
    """An initialised module, the token's slot, and an open (logged-in) session."""
    m = _module()
    assert m.initialize() == c.CKR_OK
    rv, slots, _n = m.get_slot_list(True, 8)
    assert rv == c.CKR_OK and slots, (rv, slots)
    slot = slots[0]
    flags = c.CKF_SERIAL_SESSION | (c.CKF_RW_SESSION if rw else 0)
    rv, session = m.open_session(slot, flags)
    assert rv == c.CKR_OK, c.name_of("CKR", rv)
    if login:
        rv = m.login(session, c.CKU_USER, os.environ["P11_PIN"].encode())
        assert rv == c.CKR_OK, c.name_of("CKR", rv)
    return m, slot, session


def _ok(rv: int) -> None:
    assert rv == c.CKR_OK, c.name_of("CKR", rv)


def _ul(n: int) -> bytes:
    return ulong_bytes(n)


def _rsa_pair(m: Module, session: int) -> tuple[int, int]:
    public: Template = [
        (c.CKA_TOKEN, FALSE), (c.CKA_VERIFY, TRUE), (c.CKA_ENCRYPT, TRUE),
        (c.CKA_MODULUS_BITS, _ul(2048)), (c.CKA_PUBLIC_EXPONENT, b"\x01\x00\x01"),
    ]
    private: Template = [
        (c.CKA_TOKEN, FALSE), (c.CKA_SIGN, TRUE), (c.CKA_DECRYPT, TRUE),
        (c.CKA_SENSITIVE, TRUE), (c.CKA_PRIVATE, TRUE),
    ]
    rv, pub, priv = m.generate_key_pair(
        session, (c.CKM_RSA_PKCS_KEY_PAIR_GEN, None), public, private
    )
    _ok(rv)
    assert pub != priv and pub and priv
    return pub, priv


def _aes_key(m: Module, session: int, extra: Template | None = None) -> int:
    template: Template = [
        (c.CKA_TOKEN, FALSE), (c.CKA_VALUE_LEN, _ul(32)), (c.CKA_ENCRYPT, TRUE),
        (c.CKA_DECRYPT, TRUE), *(extra or []),
    ]
    rv, key = m.generate_key(session, (c.CKM_AES_KEY_GEN, None), template)
    _ok(rv)
    return key


# -- scenarios ------------------------------------------------------------------


def scenario_initialize_finalize_order() -> None:
    m = _module()
    assert m.version == (2, 40) and not m.interface_30  # SoftHSM 2.6 has no C_GetInterface
    assert m.has("C_Sign") and not m.has("C_LoginUser")
    assert m.login_user(1, c.CKU_USER, b"1234", b"me") == c.CKR_FUNCTION_NOT_SUPPORTED
    assert m.finalize() == c.CKR_CRYPTOKI_NOT_INITIALIZED
    assert m.get_info() == (c.CKR_CRYPTOKI_NOT_INITIALIZED, None)
    assert m.initialize() == c.CKR_OK
    assert m.initialize() == c.CKR_CRYPTOKI_ALREADY_INITIALIZED
    rv, info = m.get_info()
    _ok(rv)
    assert info is not None
    assert info.cryptoki_version == (2, 40)
    assert len(info.manufacturer_id) == 32 and info.manufacturer_id.startswith(b"SoftHSM")
    assert len(info.library_description) == 32
    assert m.finalize() == c.CKR_OK
    assert m.finalize() == c.CKR_CRYPTOKI_NOT_INITIALIZED
    # Explicit init args: OS locking is what a threaded worker asks for.
    assert m.initialize(c.CKF_OS_LOCKING_OK) == c.CKR_OK
    assert m.finalize() == c.CKR_OK
    # pReserved must be NULL.
    assert m.initialize(0, b"x") == c.CKR_ARGUMENTS_BAD
    _ok(m.initialize())
    _ok(m.finalize())
    m.close()
    assert m.initialize() == c.CKR_CRYPTOKI_NOT_INITIALIZED  # closed: nothing reaches C
    m.close()  # twice is fine


def scenario_slots_and_tokens() -> None:
    m = _module()
    _ok(m.initialize())
    rv, slots, count = m.get_slot_list(False, None)  # length query: NULL pSlotList
    _ok(rv)
    assert slots == [] and count == 2  # our token + SoftHSM's spare uninitialised slot
    rv, slots, got = m.get_slot_list(False, 1)
    assert rv == c.CKR_BUFFER_TOO_SMALL and slots == [] and got == 2
    rv, slots, got = m.get_slot_list(False, 0)
    assert rv == c.CKR_BUFFER_TOO_SMALL and got == 2
    rv, all_slots, got = m.get_slot_list(False, 5)
    _ok(rv)
    assert got == 2 and len(all_slots) == 2
    rv, present, got = m.get_slot_list(True, 5)
    _ok(rv)
    slot = present[0]

    rv, sinfo = m.get_slot_info(slot)
    _ok(rv)
    assert sinfo is not None and sinfo.flags & c.CKF_TOKEN_PRESENT
    assert len(sinfo.slot_description) == 64 and len(sinfo.manufacturer_id) == 32

    rv, tinfo = m.get_token_info(slot)
    _ok(rv)
    assert tinfo is not None
    assert tinfo.label == os.environ["P11_LABEL"].encode().ljust(32, b" ")
    assert tinfo.flags & c.CKF_TOKEN_INITIALIZED and tinfo.flags & c.CKF_USER_PIN_INITIALIZED
    assert len(tinfo.serial_number) == 16 and len(tinfo.utc_time) == 16
    assert "CKF_LOGIN_REQUIRED" in c.flag_names("CKF_TOKEN", tinfo.flags)

    assert m.get_slot_info(9999) == (c.CKR_SLOT_ID_INVALID, None)
    assert m.get_token_info(9999)[0] == c.CKR_SLOT_ID_INVALID

    rv, mechs, n = m.get_mechanism_list(slot, None)
    _ok(rv)
    assert mechs == [] and n > 10
    rv, mechs, n2 = m.get_mechanism_list(slot, 1)
    assert rv == c.CKR_BUFFER_TOO_SMALL and n2 == n
    rv, mechs, n3 = m.get_mechanism_list(slot, n)
    _ok(rv)
    assert n3 == n == len(mechs) and c.CKM_AES_KEY_WRAP in mechs
    rv, minfo = m.get_mechanism_info(slot, c.CKM_RSA_PKCS_KEY_PAIR_GEN)
    _ok(rv)
    assert minfo is not None and minfo.flags & c.CKF_GENERATE_KEY_PAIR
    assert minfo.min_key_size <= 2048 <= minfo.max_key_size
    assert m.get_mechanism_info(slot, 0x7FFFFFF0)[0] == c.CKR_MECHANISM_INVALID
    _ok(m.finalize())


def scenario_sessions_and_login() -> None:
    m, slot, session = _ready(login=False)
    rv, info = m.get_session_info(session)
    _ok(rv)
    assert info is not None and info.slot_id == slot and info.state == c.CKS_RW_PUBLIC_SESSION
    assert info.flags & c.CKF_RW_SESSION
    assert m.login(session, c.CKU_USER, b"wrong-pin") == c.CKR_PIN_INCORRECT
    _ok(m.login(session, c.CKU_USER, os.environ["P11_PIN"].encode()))
    assert m.login(session, c.CKU_USER, b"x") == c.CKR_USER_ALREADY_LOGGED_IN
    assert m.get_session_info(session)[1].state == c.CKS_RW_USER_FUNCTIONS  # type: ignore[union-attr]
    # Session without CKF_SERIAL_SESSION is refused by the standard.
    assert m.open_session(slot, 0)[0] == c.CKR_SESSION_PARALLEL_NOT_SUPPORTED
    _ok(m.set_pin(session, os.environ["P11_PIN"].encode(), b"98765"))
    _ok(m.set_pin(session, b"98765", os.environ["P11_PIN"].encode()))
    _ok(m.logout(session))
    assert m.logout(session) == c.CKR_OK  # SoftHSM2 2.6 does not complain twice
    assert m.get_function_status(session) == c.CKR_FUNCTION_NOT_PARALLEL
    assert m.cancel_function(session) == c.CKR_FUNCTION_NOT_PARALLEL
    _ok(m.close_session(session))
    assert m.close_session(session) == c.CKR_SESSION_HANDLE_INVALID
    assert m.get_session_info(session) == (c.CKR_SESSION_HANDLE_INVALID, None)
    rv, s2 = m.open_session(slot, c.CKF_SERIAL_SESSION)
    _ok(rv)
    _ok(m.close_all_sessions(slot))
    assert m.close_session(s2) == c.CKR_SESSION_HANDLE_INVALID
    _ok(m.finalize())


def scenario_rsa_sign_verify() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    m, _slot, session = _ready()
    pub, priv = _rsa_pair(m, session)
    data = b"the quick brown fox" * 10
    mech = (c.CKM_SHA256_RSA_PKCS, None)
    _ok(m.sign_init(session, mech, priv))
    rv, out, need = m.sign(session, data, None)  # length query keeps the operation
    assert (rv, out, need) == (c.CKR_OK, None, 256)
    rv, out, need = m.sign(session, data, 10)
    assert (rv, out, need) == (c.CKR_BUFFER_TOO_SMALL, None, 256)
    rv, signature, got = m.sign(session, data, 512)
    _ok(rv)
    assert signature is not None and got == len(signature) == 256
    # Operation finished: another sign without init fails.
    assert m.sign(session, data, 512)[0] == c.CKR_OPERATION_NOT_INITIALIZED

    _ok(m.verify_init(session, mech, pub))
    _ok(m.verify(session, data, signature))
    _ok(m.verify_init(session, mech, pub))
    assert m.verify(session, data + b"!", signature) == c.CKR_SIGNATURE_INVALID

    # Multi-part sign gives the same (deterministic PKCS#1 v1.5) signature.
    _ok(m.sign_init(session, mech, priv))
    _ok(m.sign_update(session, data[:50]))
    _ok(m.sign_update(session, data[50:]))
    assert m.sign_final(session, None) == (c.CKR_OK, None, 256)
    assert m.sign_final(session, 256) == (c.CKR_OK, signature, 256)
    _ok(m.verify_init(session, mech, pub))
    _ok(m.verify_update(session, data))
    _ok(m.verify_final(session, signature))

    # The signature checks out with an independent implementation.
    rv, attrs = m.get_attribute_value(
        session, pub, [(c.CKA_MODULUS, 256), (c.CKA_PUBLIC_EXPONENT, 3)]
    )
    _ok(rv)
    modulus, exponent = (int.from_bytes(v or b"", "big") for _t, v, _n in attrs)
    key = rsa.RSAPublicNumbers(exponent, modulus).public_key()
    key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())

    # Raw RSA encrypt/decrypt with length queries.
    _ok(m.encrypt_init(session, (c.CKM_RSA_PKCS, None), pub))
    rv, _none, need = m.encrypt(session, b"secret", None)
    assert rv == c.CKR_OK and need == 256
    rv, ct, _n = m.encrypt(session, b"secret", need)
    _ok(rv)
    _ok(m.decrypt_init(session, (c.CKM_RSA_PKCS, b""), priv))  # b"" param == NULL
    rv, pt, n = m.decrypt(session, ct or b"", 256)
    assert (rv, pt, n) == (c.CKR_OK, b"secret", 6)
    _ok(m.finalize())


def scenario_ec_sign_verify() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, utils

    m, _slot, session = _ready()
    public: Template = [(c.CKA_TOKEN, FALSE), (c.CKA_VERIFY, TRUE), (c.CKA_EC_PARAMS, P256_OID)]
    private: Template = [(c.CKA_TOKEN, FALSE), (c.CKA_SIGN, TRUE), (c.CKA_SENSITIVE, TRUE)]
    rv, pub, priv = m.generate_key_pair(session, (c.CKM_EC_KEY_PAIR_GEN, None), public, private)
    _ok(rv)
    digest = hashlib.sha256(b"message").digest()
    _ok(m.sign_init(session, (c.CKM_ECDSA, None), priv))
    rv, _none, need = m.sign(session, digest, None)
    assert rv == c.CKR_OK and need == 64
    rv, sig, got = m.sign(session, digest, need)
    _ok(rv)
    assert sig is not None and got == 64
    _ok(m.verify_init(session, (c.CKM_ECDSA, None), pub))
    _ok(m.verify(session, digest, sig))

    rv, attrs = m.get_attribute_value(session, pub, [(c.CKA_EC_POINT, None)])
    _ok(rv)
    (_t, _v, point_len), = attrs
    rv, attrs = m.get_attribute_value(session, pub, [(c.CKA_EC_POINT, point_len)])
    _ok(rv)
    point = attrs[0][1] or b""
    assert point[0] == 0x04 and point[1] == 65  # DER OCTET STRING around the raw point
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point[2:])
    der = utils.encode_dss_signature(int.from_bytes(sig[:32], "big"),
                                     int.from_bytes(sig[32:], "big"))
    key.verify(der, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    _ok(m.finalize())


def scenario_aes_cbc_and_digest() -> None:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    m, _slot, session = _ready()
    key = _aes_key(m, session, [(c.CKA_SENSITIVE, FALSE), (c.CKA_EXTRACTABLE, TRUE)])
    iv = bytes(range(16))
    plain = b"0123456789abcdef" * 3
    _ok(m.encrypt_init(session, (c.CKM_AES_CBC, iv), key))
    rv, _none, need = m.encrypt(session, plain, None)
    assert rv == c.CKR_OK and need == len(plain)
    rv, _none, need2 = m.encrypt(session, plain, 16)
    assert rv == c.CKR_BUFFER_TOO_SMALL and need2 == len(plain)
    rv, ct, _n = m.encrypt(session, plain, need)
    _ok(rv)
    assert ct is not None and ct != plain

    rv, attrs = m.get_attribute_value(session, key, [(c.CKA_VALUE, 32)])
    _ok(rv)
    value = attrs[0][1] or b""
    enc = Cipher(algorithms.AES(value), modes.CBC(iv)).encryptor()
    assert enc.update(plain) + enc.finalize() == ct

    # Multi-part decrypt with padding.
    _ok(m.encrypt_init(session, (c.CKM_AES_CBC_PAD, iv), key))
    rv, part1, _n = m.encrypt_update(session, plain[:20], 64)
    _ok(rv)
    rv, part2, _n = m.encrypt_update(session, plain[20:], 64)
    _ok(rv)
    rv, _none, need = m.encrypt_final(session, None)
    assert rv == c.CKR_OK and need >= 16
    rv, last, _n = m.encrypt_final(session, need)
    _ok(rv)
    ct_pad = (part1 or b"") + (part2 or b"") + (last or b"")
    assert len(ct_pad) == 64
    _ok(m.decrypt_init(session, (c.CKM_AES_CBC_PAD, iv), key))
    rv, pt, n = m.decrypt(session, ct_pad, 64)
    _ok(rv)
    assert pt == plain and n == len(plain)
    # A missing IV is a parameter error, not a crash.
    rv = m.encrypt_init(session, (c.CKM_AES_CBC, None), key)
    assert rv in (c.CKR_MECHANISM_PARAM_INVALID, c.CKR_ARGUMENTS_BAD), c.name_of("CKR", rv)

    # Digest, one-shot and multi-part.
    _ok(m.digest_init(session, (c.CKM_SHA256, None)))
    assert m.digest(session, plain, None) == (c.CKR_OK, None, 32)
    assert m.digest(session, plain, 32) == (c.CKR_OK, hashlib.sha256(plain).digest(), 32)
    _ok(m.digest_init(session, (c.CKM_SHA256, None)))
    _ok(m.digest_update(session, plain[:7]))
    _ok(m.digest_update(session, plain[7:]))
    assert m.digest_final(session, 32) == (c.CKR_OK, hashlib.sha256(plain).digest(), 32)
    _ok(m.finalize())


def scenario_attributes() -> None:
    m, _slot, session = _ready()
    pub, priv = _rsa_pair(m, session)
    # A sensitive attribute: the rv says so and its length is CK_UNAVAILABLE_INFORMATION.
    rv, attrs = m.get_attribute_value(
        session, priv, [(c.CKA_PRIVATE_EXPONENT, None), (c.CKA_MODULUS, None)]
    )
    assert rv == c.CKR_ATTRIBUTE_SENSITIVE
    assert attrs[0] == (c.CKA_PRIVATE_EXPONENT, None, UNAVAILABLE)
    assert attrs[1] == (c.CKA_MODULUS, None, 256)  # still answered
    rv, attrs = m.get_attribute_value(session, priv, [(c.CKA_PRIVATE_EXPONENT, 512)])
    assert rv == c.CKR_ATTRIBUTE_SENSITIVE and attrs[0][1:] == (None, UNAVAILABLE)

    # Buffer too small: that entry gets UNAVAILABLE, the others are filled in.
    rv, attrs = m.get_attribute_value(
        session, pub, [(c.CKA_MODULUS, 10), (c.CKA_CLASS, 8), (c.CKA_TOKEN, 1)]
    )
    assert rv == c.CKR_BUFFER_TOO_SMALL
    assert attrs[0] == (c.CKA_MODULUS, None, UNAVAILABLE)
    assert attrs[1] == (c.CKA_CLASS, _ul(c.CKO_PUBLIC_KEY), 8)
    assert attrs[2] == (c.CKA_TOKEN, FALSE, 1)

    # Unknown attribute type.
    rv, attrs = m.get_attribute_value(session, pub, [(0x7FFFFF00, 16)])
    assert rv == c.CKR_ATTRIBUTE_TYPE_INVALID and attrs[0][1:] == (None, UNAVAILABLE)
    # Empty request: NULL template, SoftHSM2 calls that bad arguments.
    assert m.get_attribute_value(session, pub, []) == (c.CKR_ARGUMENTS_BAD, [])

    # Create, copy, set, size, destroy.
    label = b"binding-test"
    rv, obj = m.create_object(session, [
        (c.CKA_CLASS, _ul(c.CKO_DATA)), (c.CKA_TOKEN, FALSE), (c.CKA_LABEL, label),
        (c.CKA_VALUE, b"payload"), (c.CKA_APPLICATION, b""),
    ])
    _ok(rv)
    rv, _size = m.get_object_size(session, obj)
    assert rv in (c.CKR_OK, c.CKR_INFORMATION_SENSITIVE)
    _ok(m.set_attribute_value(session, obj, [(c.CKA_LABEL, b"renamed")]))
    rv, copy = m.copy_object(session, obj, [(c.CKA_LABEL, b"copy")])
    _ok(rv)
    rv, attrs = m.get_attribute_value(session, copy, [(c.CKA_LABEL, 32), (c.CKA_VALUE, 32),
                                                      (c.CKA_APPLICATION, 4)])
    _ok(rv)
    assert [a[1] for a in attrs] == [b"copy", b"payload", b""]
    _ok(m.destroy_object(session, copy))
    assert m.destroy_object(session, copy) == c.CKR_OBJECT_HANDLE_INVALID
    assert m.create_object(session, [])[0] == c.CKR_ARGUMENTS_BAD  # (NULL, 0) template
    _ok(m.finalize())


def scenario_find_objects() -> None:
    m, _slot, session = _ready()
    created = []
    for i in range(5):
        rv, obj = m.create_object(session, [
            (c.CKA_CLASS, _ul(c.CKO_DATA)), (c.CKA_TOKEN, TRUE), (c.CKA_LABEL, b"find-me"),
            (c.CKA_VALUE, bytes([i])),
        ])
        _ok(rv)
        created.append(obj)
    _ok(m.find_objects_init(session, [(c.CKA_LABEL, b"find-me")]))
    assert m.find_objects_init(session, []) == c.CKR_OPERATION_ACTIVE
    rv, first = m.find_objects(session, 3)
    _ok(rv)
    assert len(first) == 3
    rv, rest = m.find_objects(session, 10)
    _ok(rv)
    assert sorted(first + rest) == sorted(created)
    assert m.find_objects(session, 10) == (c.CKR_OK, [])
    _ok(m.find_objects_final(session))
    assert m.find_objects(session, 1)[0] == c.CKR_OPERATION_NOT_INITIALIZED
    # Empty template (NULL, 0) finds everything, including our objects.
    _ok(m.find_objects_init(session, []))
    rv, everything = m.find_objects(session, 100)
    _ok(rv)
    assert set(created) <= set(everything)
    _ok(m.find_objects_final(session))
    _ok(m.finalize())


def scenario_wrap_unwrap() -> None:
    m, _slot, session = _ready()
    kek = _aes_key(m, session, [(c.CKA_WRAP, TRUE), (c.CKA_UNWRAP, TRUE)])
    key = _aes_key(m, session, [(c.CKA_EXTRACTABLE, TRUE), (c.CKA_SENSITIVE, TRUE)])
    mech = (c.CKM_AES_KEY_WRAP, None)  # RFC 3394 with the default IV: NULL parameter
    rv, _none, need = m.wrap_key(session, mech, kek, key, None)
    assert rv == c.CKR_OK and need == 40
    rv, _none, need2 = m.wrap_key(session, mech, kek, key, 8)
    assert rv == c.CKR_BUFFER_TOO_SMALL and need2 == 40
    rv, wrapped, got = m.wrap_key(session, mech, kek, key, 64)
    _ok(rv)
    assert wrapped is not None and got == 40
    rv, wrapped2, _n = m.wrap_key(session, (c.CKM_AES_KEY_WRAP, b""), kek, key, 40)
    assert rv == c.CKR_OK and wrapped2 == wrapped

    template: Template = [
        (c.CKA_CLASS, _ul(c.CKO_SECRET_KEY)), (c.CKA_KEY_TYPE, _ul(c.CKK_AES)),
        (c.CKA_TOKEN, FALSE), (c.CKA_ENCRYPT, TRUE), (c.CKA_DECRYPT, TRUE),
    ]
    rv, unwrapped = m.unwrap_key(session, mech, kek, wrapped, template)
    _ok(rv)
    # Same key material: both encrypt a block identically.
    block = b"\x00" * 16
    outs = []
    for k in (key, unwrapped):
        _ok(m.encrypt_init(session, (c.CKM_AES_ECB, None), k))
        rv, out, _n = m.encrypt(session, block, 16)
        _ok(rv)
        outs.append(out)
    assert outs[0] == outs[1]
    # Corrupted wrapped data is refused.
    bad = bytes([wrapped[0] ^ 1]) + wrapped[1:]
    assert m.unwrap_key(session, mech, kek, bad, template)[0] != c.CKR_OK

    _ok(m.finalize())


def scenario_derive() -> None:
    m, _slot, session = _ready()
    base = _aes_key(m, session, [(c.CKA_DERIVE, TRUE), (c.CKA_SENSITIVE, FALSE)])
    # CK_KEY_DERIVATION_STRING_DATA holds a pointer: in-process we can build it
    # for real (a remote peer cannot, which is the mechparams layer's problem).
    data = bytes(range(32))
    keep = ffi.new("char[]", data)
    param = struct.pack("=QQ", int(ffi.cast("uintptr_t", keep)), len(data))
    template: Template = [
        (c.CKA_CLASS, _ul(c.CKO_SECRET_KEY)), (c.CKA_KEY_TYPE, _ul(c.CKK_AES)),
        (c.CKA_TOKEN, FALSE), (c.CKA_SENSITIVE, FALSE), (c.CKA_EXTRACTABLE, TRUE),
        (c.CKA_VALUE_LEN, _ul(32)),
    ]
    rv, derived = m.derive_key(session, (c.CKM_AES_ECB_ENCRYPT_DATA, param), base, template)
    _ok(rv)
    rv, attrs = m.get_attribute_value(session, derived, [(c.CKA_VALUE, 64)])
    _ok(rv)
    _ok(m.encrypt_init(session, (c.CKM_AES_ECB, None), base))
    assert m.encrypt(session, data, 32) == (c.CKR_OK, attrs[0][1], 32)
    del keep
    _ok(m.finalize())


def scenario_random_and_state() -> None:
    m, _slot, session = _ready(login=False)
    rv, r1 = m.generate_random(session, 32)
    _ok(rv)
    rv, r2 = m.generate_random(session, 32)
    _ok(rv)
    assert len(r1) == len(r2) == 32 and r1 != r2
    assert m.generate_random(session + 1000, 16) == (c.CKR_SESSION_HANDLE_INVALID, b"")
    _ok(m.seed_random(session, b"some entropy"))
    # SoftHSM does not implement operation state: the rv comes back untouched.
    _ok(m.digest_init(session, (c.CKM_SHA256, None)))
    rv, state, _n = m.get_operation_state(session, None)
    assert state is None and rv in (c.CKR_FUNCTION_NOT_SUPPORTED, c.CKR_OK)
    assert m.set_operation_state(session, b"x" * 8, 0, 0) in (
        c.CKR_FUNCTION_NOT_SUPPORTED, c.CKR_SAVED_STATE_INVALID)
    assert m.digest_key(session, 12345) in (c.CKR_KEY_HANDLE_INVALID, c.CKR_OBJECT_HANDLE_INVALID)
    _ok(m.finalize())


SCENARIOS: dict[str, Callable[[], None]] = {
    name[len("scenario_"):]: fn for name, fn in globals().items()
    if name.startswith("scenario_") and callable(fn)
}


# -- pytest side ------------------------------------------------------------------


def _run(name: str, token: Token) -> None:
    env = token.env
    env.update(P11_MODULE=token.module, P11_PIN=token.user_pin, P11_LABEL=token.label)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    code = (
        "import sys; from tests.integration import test_binding_softhsm as t; "
        "t.SCENARIOS[sys.argv[1]]()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, name], env=env, cwd=REPO,
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"scenario {name} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_binding_against_softhsm(name: str, token: Token) -> None:
    _run(name, token)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModuleLoadError) as info:
        Module(str(tmp_path / "missing.so"))
    assert info.value.path.endswith("missing.so")
    # A real library that is not a PKCS#11 module.
    with pytest.raises(ModuleLoadError, match="neither C_GetInterface nor C_GetFunctionList"):
        Module("libz.so.1")
