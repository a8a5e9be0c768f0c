"""Protocol version 4 through a live p11guard serving SoftHSM2, with the Python v4 client.

Typed mechanism parameters (AES-GCM, RSA-OAEP, ECDH1 derive, AES key wrap),
nested templates (CKA_WRAP_TEMPLATE), CK_ULONG arrays (CKA_ALLOWED_MECHANISMS),
a 32-bit-style peer, version negotiation (also against Debian's pkcs11proxyd).
Helpers here are reused by test_v4_nss.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from p11guard.client import RpcCallError, WireClient
from p11guard.pkcs11 import constants as c
from p11guard.wire.mechanisms import NO_PARAM, param
from p11guard.wire.procedures import OUT_LEN_NULL, PROGRAM
from p11guard.wire.rpc import AcceptStat
from p11guard.wire.templates import ValueKind
from tests.support.net import free_tcp_port, wait_for_tcp
from tests.support.servers import CAMLCRUSH_TCP, REPO, start_server
from tests.support.softhsm import SOFTHSM_MODULE, Token

B, U, T, A = ValueKind.BYTES, ValueKind.ULONG, ValueKind.TEMPLATE, ValueKind.ULONG_ARRAY
TRUE, FALSE = b"\x01", b"\x00"
P256 = bytes.fromhex("06082a8648ce3d030107")


@dataclass
class Proxy:
    proc: subprocess.Popen[bytes]
    address: str
    alias: str
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_toml_server(workdir: Path, env: dict[str, str], modules_toml: str,
                      alias: str) -> Proxy:
    """p11guard from a TOML configuration (``modules_toml``: the [modules...] part)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_tcp_port()
    conf = workdir / "p11guard.toml"
    conf.write_text(f'[[listen]]\ntcp = "127.0.0.1:{port}"\n\n{modules_toml}\n'
                    '[policy]\npreset = "none"\n')
    log = workdir / "p11guard.log"
    env = dict(env)
    env["PYTHONPATH"] = str(REPO / "src")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "p11guard", "serve", "--config",
                                 str(conf), "--foreground"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    proxy = Proxy(proc, f"127.0.0.1:{port}", alias, log)
    try:
        wait_for_tcp(port)
    except TimeoutError:
        proxy.stop()
        raise RuntimeError(log.read_text()) from None
    return proxy


class V4:
    """A v4 session over WireClient: handshake, login, typed helpers."""

    def __init__(self, address: str, alias: str, arch: int = 1) -> None:
        self.c = WireClient.connect(address, version=4)
        assert self.c.rv("SetupArch", arch) == 1
        assert self.c.rv("LoadModule", alias.encode()) == c.CKR_OK
        assert self.c.rv("Initialize", 0) == c.CKR_OK

    def close(self) -> None:
        self.c.close()

    def ok(self, name: str, *args: Any) -> tuple[Any, ...]:
        result = self.c.call(name, *args)
        assert result[0] == c.CKR_OK, f"{name}: {c.name_of('CKR', result[0])}"
        return result

    def session(self, label: bytes, pin: bytes | None, user: int = c.CKU_USER) -> int:
        _, slots, _ = self.ok("GetSlotList", 1, 64)
        for slot in slots:
            info = self.ok("GetTokenInfo", slot)[1]
            if info["label"].rstrip(b" \0") == label:
                h = self.ok("OpenSession", slot, c.CKF_SERIAL_SESSION | c.CKF_RW_SESSION)[1]
                if pin is not None:
                    self.ok("Login", h, user, pin)
                return int(h)
        raise AssertionError(f"no token {label!r}")

    def out(self, name: str, *args: Any) -> bytes:
        """An output call done the C way: ask the length, then fetch."""
        rv, value, length = self.c.call(name, *args, OUT_LEN_NULL)
        assert rv == c.CKR_OK and value == b"", (name, hex(rv))
        rv, value, got = self.c.call(name, *args, length)
        assert rv == c.CKR_OK, (name, c.name_of("CKR", rv))
        assert got == len(value) <= length
        return bytes(value)

    def aes_key(self, h: int, extra: list[Any] | None = None, size: int = 32) -> int:
        template = [(c.CKA_CLASS, U, c.CKO_SECRET_KEY), (c.CKA_KEY_TYPE, U, c.CKK_AES),
                    (c.CKA_VALUE_LEN, U, size), (c.CKA_TOKEN, B, FALSE),
                    (c.CKA_ENCRYPT, B, TRUE), (c.CKA_DECRYPT, B, TRUE),
                    (c.CKA_SENSITIVE, B, FALSE), (c.CKA_EXTRACTABLE, B, TRUE),
                    *(extra or [])]
        return int(self.ok("GenerateKey", h, (c.CKM_AES_KEY_GEN, NO_PARAM), template)[1])

    def attrs(self, h: int, obj: int, *types: int) -> tuple[int, dict[int, Any]]:
        rv, values = self.c.call("GetAttributeValue", h, obj, list(types))
        return rv, {t: (k, v) for t, k, v in values}


@pytest.fixture
def proxy(token: Token, tmp_path: Path) -> Iterator[Proxy]:
    server = start_toml_server(tmp_path / "p11guard", token.env,
                               f'[modules]\nsofthsm = "{SOFTHSM_MODULE}"\n', "softhsm")
    yield server
    server.stop()


@pytest.fixture
def v4(proxy: Proxy) -> Iterator[V4]:
    client = V4(proxy.address, proxy.alias)
    yield client
    client.close()


def gcm_round_trip(v: V4, h: int) -> None:
    key = v.aes_key(h)
    rv, got = v.attrs(h, key, c.CKA_VALUE, c.CKA_KEY_TYPE, c.CKA_VALUE_LEN)
    assert rv == c.CKR_OK and got[c.CKA_KEY_TYPE] == (U, c.CKK_AES)
    assert got[c.CKA_VALUE_LEN] == (U, 32)
    secret = got[c.CKA_VALUE][1]
    iv, aad, data = b"\x11" * 12, b"header", b"attack at dawn" * 5
    gcm = param("GCM", iv=iv, iv_bits=96, aad=aad, tag_bits=128)
    v.ok("EncryptInit", h, (c.CKM_AES_GCM, gcm), key)
    ciphertext = v.out("Encrypt", h, data)
    assert ciphertext == AESGCM(secret).encrypt(iv, data, aad)
    v.ok("DecryptInit", h, (c.CKM_AES_GCM, gcm), key)
    assert v.out("Decrypt", h, ciphertext) == data
    # A wrong tag: the module refuses, the worker lives on.
    v.ok("DecryptInit", h, (c.CKM_AES_GCM, gcm), key)
    rv = v.c.call("Decrypt", h, ciphertext[:-1] + bytes([ciphertext[-1] ^ 1]), 4096)[0]
    assert rv in (c.CKR_ENCRYPTED_DATA_INVALID, c.CKR_GENERAL_ERROR)
    assert v.ok("GenerateRandom", h, 8)[1] != b""


def test_v4_aes_gcm_round_trip(v4: V4, token: Token) -> None:
    h = v4.session(token.label.encode(), token.user_pin.encode())
    gcm_round_trip(v4, h)


def test_v4_32bit_style_client_gets_the_same_typed_values(proxy: Proxy, token: Token) -> None:
    """SetupArch says LITTLE_ENDIAN_32: v4 values are hypers, nothing to convert."""
    client = V4(proxy.address, proxy.alias, arch=2)
    try:
        h = client.session(token.label.encode(), token.user_pin.encode())
        gcm_round_trip(client, h)
        key = client.aes_key(h, [(c.CKA_ALLOWED_MECHANISMS, A, [c.CKM_AES_GCM])])
        rv, got = client.attrs(h, key, c.CKA_CLASS, c.CKA_ALLOWED_MECHANISMS)
        assert rv == c.CKR_OK
        assert got[c.CKA_CLASS] == (U, c.CKO_SECRET_KEY)
        assert got[c.CKA_ALLOWED_MECHANISMS] == (A, [c.CKM_AES_GCM])
    finally:
        client.close()


def test_v4_wrong_parameter_type_is_refused_not_forwarded(v4: V4, token: Token) -> None:
    h = v4.session(token.label.encode(), token.user_pin.encode())
    key = v4.aes_key(h)
    ccm = param("CCM", data_len=4, nonce=b"\0" * 12, aad=b"", mac_len=16)
    for mech in ((c.CKM_AES_GCM, ccm), (c.CKM_AES_GCM, param("BYTES", data=b"\0" * 48)),
                 (c.CKM_AES_GCM, param("RAW", data=b"\0" * 48)),
                 (0x8000_1234, param("RAW", data=b"\0" * 8))):
        assert v4.c.rv("EncryptInit", h, mech, key) == c.CKR_MECHANISM_PARAM_INVALID
    # A GCM tag buffer shorter than the tag bits never reaches the module.
    short = param("GCM", iv=b"\0" * 12, iv_bits=128, aad=b"", tag_bits=128)
    assert v4.c.rv("EncryptInit", h, (c.CKM_AES_GCM, short), key) == \
        c.CKR_MECHANISM_PARAM_INVALID
    # NONE for a mechanism that needs a parameter: the module answers itself.
    assert v4.c.rv("EncryptInit", h, (c.CKM_AES_GCM, NO_PARAM), key) != c.CKR_OK
    # Still serving.
    assert v4.ok("GenerateRandom", h, 4)[1]


def rsa_pair(v: V4, h: int) -> tuple[int, int]:
    public = [(c.CKA_MODULUS_BITS, U, 2048), (c.CKA_PUBLIC_EXPONENT, B, b"\x01\x00\x01"),
              (c.CKA_ENCRYPT, B, TRUE), (c.CKA_VERIFY, B, TRUE), (c.CKA_TOKEN, B, FALSE)]
    private = [(c.CKA_DECRYPT, B, TRUE), (c.CKA_SIGN, B, TRUE), (c.CKA_TOKEN, B, FALSE)]
    _, pub, priv = v.ok("GenerateKeyPair", h, (c.CKM_RSA_PKCS_KEY_PAIR_GEN, NO_PARAM),
                        public, private)
    return int(pub), int(priv)


def oaep_round_trip(v: V4, h: int, label: bytes, sha1: bool = False) -> None:
    pub, priv = rsa_pair(v, h)
    hash_alg, mgf = (c.CKM_SHA_1, c.CKG_MGF1_SHA1) if sha1 else (c.CKM_SHA256, c.CKG_MGF1_SHA256)
    oaep = param("RSA_PKCS_OAEP", hash_alg=hash_alg, mgf=mgf,
                 source=c.CKZ_DATA_SPECIFIED, source_data=label)
    v.ok("EncryptInit", h, (c.CKM_RSA_PKCS_OAEP, oaep), pub)
    ciphertext = v.out("Encrypt", h, b"secret message")
    assert len(ciphertext) == 256
    v.ok("DecryptInit", h, (c.CKM_RSA_PKCS_OAEP, oaep), priv)
    assert v.out("Decrypt", h, ciphertext) == b"secret message"
    if label:
        other = param("RSA_PKCS_OAEP", hash_alg=hash_alg, mgf=mgf,
                      source=c.CKZ_DATA_SPECIFIED, source_data=b"another label")
        v.ok("DecryptInit", h, (c.CKM_RSA_PKCS_OAEP, other), priv)
        assert v.c.call("Decrypt", h, ciphertext, 4096)[0] != c.CKR_OK


def test_v4_rsa_oaep_and_pss(v4: V4, token: Token) -> None:
    """SoftHSM 2.6.1 has OAEP with SHA-1 only and no labels (CKR_ARGUMENTS_BAD, as
    directly): the label round trip is in test_v4_nss.py; here OAEP and PSS."""
    h = v4.session(token.label.encode(), token.user_pin.encode())
    oaep_round_trip(v4, h, b"", sha1=True)
    pub, priv = rsa_pair(v4, h)
    labelled = param("RSA_PKCS_OAEP", hash_alg=c.CKM_SHA_1, mgf=c.CKG_MGF1_SHA1,
                     source=c.CKZ_DATA_SPECIFIED, source_data=b"label")
    assert v4.c.rv("EncryptInit", h, (c.CKM_RSA_PKCS_OAEP, labelled), pub) == \
        c.CKR_ARGUMENTS_BAD
    pss = param("RSA_PKCS_PSS", hash_alg=c.CKM_SHA256, mgf=c.CKG_MGF1_SHA256, salt_len=32)
    v4.ok("SignInit", h, (c.CKM_SHA256_RSA_PKCS_PSS, pss), priv)
    signature = v4.out("Sign", h, b"data")
    v4.ok("VerifyInit", h, (c.CKM_SHA256_RSA_PKCS_PSS, pss), pub)
    assert v4.c.rv("Verify", h, b"data", signature) == c.CKR_OK


def test_v4_ecdh1_derive_both_sides_agree(v4: V4, token: Token) -> None:
    h = v4.session(token.label.encode(), token.user_pin.encode())
    pairs = []
    for _ in range(2):
        _, pub, priv = v4.ok(
            "GenerateKeyPair", h, (c.CKM_EC_KEY_PAIR_GEN, NO_PARAM),
            [(c.CKA_EC_PARAMS, B, P256), (c.CKA_TOKEN, B, FALSE)],
            [(c.CKA_DERIVE, B, TRUE), (c.CKA_TOKEN, B, FALSE)])
        point = v4.attrs(h, pub, c.CKA_EC_POINT)[1][c.CKA_EC_POINT][1]
        pairs.append((priv, point))
    derived = [(c.CKA_CLASS, U, c.CKO_SECRET_KEY), (c.CKA_KEY_TYPE, U, c.CKK_AES),
               (c.CKA_VALUE_LEN, U, 32), (c.CKA_ENCRYPT, B, TRUE), (c.CKA_DECRYPT, B, TRUE),
               (c.CKA_TOKEN, B, FALSE)]
    keys = []
    for (priv, _), (_, other_point) in ((pairs[0], pairs[1]), (pairs[1], pairs[0])):
        ecdh = param("ECDH1_DERIVE", kdf=c.CKD_NULL, shared_data=b"", public_data=other_point)
        keys.append(v4.ok("DeriveKey", h, (c.CKM_ECDH1_DERIVE, ecdh), priv, derived)[1])
    iv = param("BYTES", data=b"\x42" * 16)
    v4.ok("EncryptInit", h, (c.CKM_AES_CBC_PAD, iv), keys[0])
    ciphertext = v4.out("Encrypt", h, b"the same secret on both sides")
    v4.ok("DecryptInit", h, (c.CKM_AES_CBC_PAD, iv), keys[1])
    assert v4.out("Decrypt", h, ciphertext) == b"the same secret on both sides"


def test_v4_wrap_template_and_allowed_mechanisms(v4: V4, token: Token) -> None:
    h = v4.session(token.label.encode(), token.user_pin.encode())
    wrap_template = [(c.CKA_CLASS, U, c.CKO_SECRET_KEY), (c.CKA_KEY_TYPE, U, c.CKK_AES),
                     (c.CKA_EXTRACTABLE, B, TRUE)]
    wrapping = v4.aes_key(h, [(c.CKA_WRAP, B, TRUE), (c.CKA_UNWRAP, B, TRUE),
                              (c.CKA_WRAP_TEMPLATE, T, wrap_template),
                              (c.CKA_ALLOWED_MECHANISMS, A,
                               [c.CKM_AES_KEY_WRAP, c.CKM_AES_KEY_WRAP_PAD])])
    rv, got = v4.attrs(h, wrapping, c.CKA_WRAP_TEMPLATE, c.CKA_ALLOWED_MECHANISMS,
                       c.CKA_UNWRAP_TEMPLATE, c.CKA_LABEL)
    assert rv == c.CKR_OK
    kind, nested = got[c.CKA_WRAP_TEMPLATE]
    assert kind is T and sorted(nested) == sorted(wrap_template)
    assert got[c.CKA_ALLOWED_MECHANISMS] == (A, [c.CKM_AES_KEY_WRAP, c.CKM_AES_KEY_WRAP_PAD])
    target = v4.aes_key(h)
    secret = v4.attrs(h, target, c.CKA_VALUE)[1][c.CKA_VALUE][1]
    wrapped = v4.out("WrapKey", h, (c.CKM_AES_KEY_WRAP, NO_PARAM), wrapping, target)
    assert len(wrapped) == 40
    unwrapped = v4.ok("UnwrapKey", h, (c.CKM_AES_KEY_WRAP, NO_PARAM), wrapping, wrapped,
                      [(c.CKA_CLASS, U, c.CKO_SECRET_KEY), (c.CKA_KEY_TYPE, U, c.CKK_AES),
                       (c.CKA_TOKEN, B, FALSE), (c.CKA_SENSITIVE, B, FALSE),
                       (c.CKA_EXTRACTABLE, B, TRUE)])[1]
    assert v4.attrs(h, unwrapped, c.CKA_VALUE)[1][c.CKA_VALUE] == (B, secret)
    # A mechanism outside CKA_ALLOWED_MECHANISMS: the module refuses it.
    iv = param("BYTES", data=b"\0" * 16)
    assert v4.c.rv("EncryptInit", h, (c.CKM_AES_CBC_PAD, iv), wrapping) == \
        c.CKR_MECHANISM_INVALID
    # Bytes standing for a nested template never reach the module.
    bad = [(c.CKA_WRAP_TEMPLATE, B, b"\0" * 24)]
    assert v4.c.call("GenerateKey", h, (c.CKM_AES_KEY_GEN, NO_PARAM),
                     [(c.CKA_VALUE_LEN, U, 16), *bad])[0] == c.CKR_ATTRIBUTE_VALUE_INVALID


def test_v4_output_length_semantics(v4: V4, token: Token) -> None:
    """NULL output -> the length and the operation goes on; a short buffer ->
    CKR_BUFFER_TOO_SMALL and the operation goes on; then the real call."""
    h = v4.session(token.label.encode(), token.user_pin.encode())
    v4.ok("DigestInit", h, (c.CKM_SHA256, NO_PARAM))
    rv, value, length = v4.c.call("Digest", h, b"abc", OUT_LEN_NULL)
    assert (rv, value, length) == (c.CKR_OK, b"", 32)
    rv, value, length = v4.c.call("Digest", h, b"abc", 10)
    assert (rv, value, length) == (c.CKR_BUFFER_TOO_SMALL, b"", 32)
    rv, value, length = v4.c.call("Digest", h, b"abc", 64)
    assert rv == c.CKR_OK and length == 32
    assert value.hex().startswith("ba7816bf")


def test_v4_one_version_per_connection_and_interface_info(v4: V4) -> None:
    rv, major, minor, flags, functions = v4.c.call("GetInterfaceInfo")
    assert rv == c.CKR_OK and (major, minor) == (2, 40) and flags == 0 and functions == []
    reply, _ = v4.c.call_raw(5, b"", version=3)  # GetInfo, but in version 3
    assert reply.accept_stat == AcceptStat.PROG_MISMATCH
    assert reply.detail == (4, 4)
    # 3.0 functions SoftHSM 2.6 does not have: CKR_FUNCTION_NOT_SUPPORTED, no crash.
    assert v4.c.rv("SessionCancel", 1, 0) in (c.CKR_FUNCTION_NOT_SUPPORTED,
                                              c.CKR_SESSION_HANDLE_INVALID)


def test_v3_clients_still_get_version_3(proxy: Proxy) -> None:
    with WireClient.connect(proxy.address) as client:
        assert client.rv("SetupArch", 1) == 1
        reply, _ = client.call_raw(2, (1).to_bytes(8, "big"), version=4)
        assert reply.accept_stat == AcceptStat.PROG_MISMATCH
        assert reply.detail == (3, 3)


def test_v4_against_camlcrush_gets_prog_mismatch_3(token: Token, tmp_path: Path) -> None:
    """What the C client's fallback relies on: Debian's pkcs11proxyd answers a
    version-4 call with PROG_MISMATCH low=3 high=3, and keeps serving v3."""
    server = start_server("camlcrush", token, tmp_path / "cc")
    try:
        with WireClient.connect(server.address, version=4) as client:
            with pytest.raises(RpcCallError) as err:
                client.call("SetupArch", 1)
            reply = err.value.reply
            assert reply.accept_stat == AcceptStat.PROG_MISMATCH
            assert reply.detail == (3, 3)
        with WireClient.connect(server.address) as client:
            assert client.rv("SetupArch", 1) == 1
            assert client.rv("LoadModule", b"softhsm") == c.CKR_OK
    finally:
        server.stop()
    assert PROGRAM == 4


CAMLCRUSH_PROBE = textwrap.dedent("""
    import sys
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
    from pkcs11.exceptions import MechanismParamInvalid
    from pkcs11.mechanisms import GCMParams
    lib = pkcs11.lib(sys.argv[1])
    token = lib.get_token(token_label="test")
    with token.open(user_pin="1234", rw=True) as session:
        key = session.generate_key(KeyType.AES, 256, store=False)
        try:
            key.encrypt(b"data", mechanism=Mechanism.AES_GCM,
                        mechanism_param=GCMParams(b"0" * 12, b"aad", 128))
        except MechanismParamInvalid:
            print("GCM refused")
        ec_params = bytes.fromhex("06082a8648ce3d030107")
        pub, priv = session.generate_keypair(KeyType.EC, store=False, public_template={
            Attribute.EC_PARAMS: ec_params})
        try:
            priv.derive_key(KeyType.AES, 256, mechanism_param=(
                pkcs11.KDF.NULL, None, pub[Attribute.EC_POINT]))
        except MechanismParamInvalid:
            print("ECDH refused")
        print("still serving", len(session.generate_random(64)))
""")


def test_debian_camlcrush_client_is_refused_cleanly(token: Token, tmp_path: Path) -> None:
    """The same typed calls through Debian's v3 client: CKR_MECHANISM_PARAM_INVALID,
    and the connection keeps working (Caml Crush's own server crashes here)."""
    server = start_server("p11guard", token, tmp_path / "srv")
    try:
        probe = tmp_path / "probe.py"
        probe.write_text(CAMLCRUSH_PROBE)
        out = subprocess.run([sys.executable, str(probe), CAMLCRUSH_TCP],
                             env=server.client_env(), capture_output=True, text=True,
                             timeout=120)
    finally:
        server.stop()
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["GCM refused", "ECDH refused", "still serving 8"]
