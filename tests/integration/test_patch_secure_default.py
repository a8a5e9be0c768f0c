"""The secure default and wrapped keys moving between proxies, through real
client libraries against SoftHSM2.

* A TOML configuration without a policy applies patchset 1 + strict mode with
  a per-installation random wrapping key (0600): python-pkcs11 driving
  libp11guard.so sees the wrap-then-decrypt attack blocked, while it
  succeeds with ``preset = "none"``; legitimate use works, and a key
  wrapped through one p11guard instance unwraps through another.
* Caml Crush 1.0.12 (Debian's pkcs11proxyd, patchset 1) and p11guard with the
  same ``wrapping_format_key`` read each other's blobs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from p11guard.paths import client_library
from p11guard.pkcs11 import constants as c
from p11guard.policy.wrapformat import P11G_TRAILER_LEN
from tests.integration.test_patch_attacks import KEY_HEX, OAEP, ZERO16, T, patchset1
from tests.support.filter import attr, find_all, running, session, ulong
from tests.support.net import free_tcp_port, wait_for_tcp
from tests.support.servers import P11GUARD, REPO, Server
from tests.support.softhsm import Token

F = b"\x00"

# Run in a fresh process per scenario: the client library reads its
# environment once.  Prints one JSON object.
CLIENT = r'''
import json, os, sys
import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag as M, ObjectClass
from pkcs11.exceptions import PKCS11Error
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

lib = pkcs11.lib(sys.argv[1])
scenario = sys.argv[2]
iv = bytes(16)
out = {}
tok = lib.get_token(token_label="test")
with tok.open(user_pin="1234", rw=True) as s:
    def target():
        return s.generate_key(KeyType.AES, 128, capabilities=M.ENCRYPT, template={
            Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True}, label="target",
            store=scenario.startswith("share"))
    if scenario == "attack":
        t = target()
        proof = t.encrypt(bytes(16), mechanism=Mechanism.AES_ECB)
        try:
            k = s.generate_key(KeyType.AES, 128, capabilities=M.WRAP | M.DECRYPT)
            blob = k.wrap_key(t, mechanism=Mechanism.AES_CBC, mechanism_param=iv)
            plain = k.decrypt(blob, mechanism=Mechanism.AES_CBC, mechanism_param=iv)
            enc = Cipher(algorithms.AES(plain[:16]), modes.ECB()).encryptor()
            out["attack"] = "leaked" if enc.update(bytes(16)) == proof else "garbage"
        except PKCS11Error as exc:
            out["attack"] = type(exc).__name__
    elif scenario == "legit":
        pub, priv = s.generate_keypair(
            KeyType.EC, None, store=False, capabilities=M.SIGN | M.VERIFY,
            public_template={Attribute.EC_PARAMS: bytes.fromhex("06082a8648ce3d030107")})
        sig = priv.sign(bytes(32), mechanism=Mechanism.ECDSA)
        out["verify"] = pub.verify(bytes(32), sig, mechanism=Mechanism.ECDSA)
        k = s.generate_key(KeyType.AES, 128, capabilities=M.ENCRYPT | M.DECRYPT)
        ct = k.encrypt(b"x" * 16, mechanism=Mechanism.AES_CBC, mechanism_param=iv)
        out["decrypt"] = k.decrypt(ct, mechanism=Mechanism.AES_CBC, mechanism_param=iv) == b"x" * 16
    elif scenario == "share-wrap":
        t = target()
        w = s.generate_key(KeyType.AES, 128, capabilities=M.WRAP | M.UNWRAP, store=True,
                           label="kek")
        out["blob"] = w.wrap_key(t, mechanism=Mechanism.AES_KEY_WRAP).hex()
        out["proof"] = t.encrypt(bytes(16), mechanism=Mechanism.AES_ECB).hex()
    elif scenario == "share-unwrap":
        w = s.get_key(label="kek", object_class=ObjectClass.SECRET_KEY)
        k = w.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, bytes.fromhex(sys.argv[3]),
                         mechanism=Mechanism.AES_KEY_WRAP, capabilities=M.ENCRYPT)
        out["proof"] = k.encrypt(bytes(16), mechanism=Mechanism.AES_ECB).hex()
        try:
            w.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, bytes.fromhex(sys.argv[3]),
                         mechanism=Mechanism.AES_KEY_WRAP, capabilities=M.DECRYPT,
                         template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True})
            out["weaker"] = "accepted"
        except PKCS11Error as exc:
            out["weaker"] = type(exc).__name__
print(json.dumps(out))
'''


def client(server: Server, scenario: str, *args: str) -> dict[str, object]:
    lib = client_library()
    if lib is None:
        pytest.skip("libp11guard.so is not built")
    env = server.client_env()
    proc = subprocess.run([sys.executable, "-c", CLIENT, str(lib), scenario, *args], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr + server.log_text()
    answer: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return answer


@contextmanager
def toml_server(token: Token, workdir: Path, policy: str = "",
                config_name: str = "p11guard.toml") -> Iterator[Server]:
    """p11guard from a TOML configuration (``policy``: extra [policy] lines)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_tcp_port()
    conf = workdir / config_name
    text = f'[[listen]]\ntcp = "127.0.0.1:{port}"\n\n[modules]\nsofthsm = "{token.module}"\n'
    if policy:
        text += f"\n[policy]\n{policy}\n"
    conf.write_text(text)
    log = workdir / f"{config_name}.log"
    env = token.env
    env.pop("P11GUARD_WRAPPING_KEY_FILE", None)
    env.pop("STATE_DIRECTORY", None)
    env["PYTHONPATH"] = f"{REPO / 'src'}:{REPO}"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*P11GUARD, "serve", "--config", str(conf), "--foreground"],
                                cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Server(proc, f"127.0.0.1:{port}", "softhsm", log, workdir)
    try:
        wait_for_tcp(port)
        yield server
    finally:
        server.stop()


def test_secure_default_blocks_the_attack(token: Token, tmp_path: Path) -> None:
    with toml_server(token, tmp_path / "none", 'preset = "none"') as server:
        assert client(server, "attack") == {"attack": "leaked"}  # the test is real
    assert not (tmp_path / "none" / "wrapping_format.key").exists()
    with toml_server(token, tmp_path / "default") as server:
        assert client(server, "attack")["attack"] == "AttributeValueInvalid"
        assert client(server, "legit") == {"verify": True, "decrypt": True}
    key_file = tmp_path / "default" / "wrapping_format.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert len(key_file.read_text().strip()) == 32
    assert "generated a new wrapping format key" in server.log_text()


def test_wrapped_keys_move_between_p11guard_instances(token: Token, tmp_path: Path) -> None:
    # Two instances of one installation: their configurations share a directory,
    # hence the wrapping key.
    with toml_server(token, tmp_path, config_name="a.toml") as a, \
            toml_server(token, tmp_path, config_name="b.toml") as b:
        wrapped = client(a, "share-wrap")
        blob = str(wrapped["blob"])
        assert len(bytes.fromhex(blob)) == 24 + P11G_TRAILER_LEN  # W + p11guard v1 trailer
        got = client(b, "share-unwrap", blob)
        assert got["proof"] == wrapped["proof"]
        assert got["weaker"] == "TemplateInconsistent"
    # Another installation (another key) does not accept the blob.
    with toml_server(token, tmp_path / "other") as other:
        proc_answer = None
        with pytest.raises(AssertionError) as err:
            proc_answer = client(other, "share-unwrap", blob)
        assert proc_answer is None and "WrappedKeyInvalid" in str(err.value)


# -- Caml Crush's format, both ways ------------------------------------------------------

def _token_keys(client_: object, s: int) -> None:
    from p11guard.client import WireClient

    assert isinstance(client_, WireClient)
    pub = [attr(c.CKA_MODULUS_BITS, ulong(1024)), attr(c.CKA_PUBLIC_EXPONENT, b"\1\0\1"),
           attr(c.CKA_TOKEN, T), attr(c.CKA_WRAP, T), attr(c.CKA_LABEL, b"kt")]
    priv = [attr(c.CKA_TOKEN, T), attr(c.CKA_SENSITIVE, T), attr(c.CKA_UNWRAP, T),
            attr(c.CKA_LABEL, b"kt")]
    rv, _, _ = client_.call("GenerateKeyPair", s, (c.CKM_RSA_PKCS_KEY_PAIR_GEN, b""), pub, priv)
    assert rv == c.CKR_OK
    rv, _ = client_.call("GenerateKey", s, (c.CKM_AES_KEY_GEN, b""), [
        attr(c.CKA_VALUE_LEN, ulong(16)), attr(c.CKA_TOKEN, T), attr(c.CKA_LABEL, b"tgt"),
        attr(c.CKA_SENSITIVE, T), attr(c.CKA_EXTRACTABLE, T), attr(c.CKA_ENCRYPT, T)])
    assert rv == c.CKR_OK


def _by_label(client_: object, s: int, label: bytes, klass: int) -> int:
    from p11guard.client import WireClient

    assert isinstance(client_, WireClient)
    found = find_all(client_, s, [attr(c.CKA_LABEL, label), attr(c.CKA_CLASS, ulong(klass))])
    assert len(found) == 1, found
    return int(found[0])


def _wrap(server: Server) -> tuple[bytes, bytes]:
    with session(server) as (cl, s, _):
        pub = _by_label(cl, s, b"kt", c.CKO_PUBLIC_KEY)
        tgt = _by_label(cl, s, b"tgt", c.CKO_SECRET_KEY)
        rv, blob = cl.call("WrapKey", s, OAEP, pub, tgt)
        assert rv == c.CKR_OK
        assert cl.rv("EncryptInit", s, (c.CKM_AES_ECB, b""), tgt) == c.CKR_OK
        return bytes(blob), bytes(cl.call("Encrypt", s, ZERO16)[1])


def _unwrap(server: Server, blob: bytes, extra: list[tuple[int, bytes, int]]) -> tuple[int, bytes]:
    with session(server) as (cl, s, _):
        priv = _by_label(cl, s, b"kt", c.CKO_PRIVATE_KEY)
        rv, k = cl.call("UnwrapKey", s, OAEP, priv, blob, [
            attr(c.CKA_CLASS, ulong(c.CKO_SECRET_KEY)), attr(c.CKA_KEY_TYPE, ulong(c.CKK_AES)),
            attr(c.CKA_TOKEN, F), *extra])
        if rv != c.CKR_OK:
            return int(rv), b""
        assert cl.rv("EncryptInit", s, (c.CKM_AES_ECB, b""), k) == c.CKR_OK
        return int(rv), bytes(cl.call("Encrypt", s, ZERO16)[1])


def test_camlcrush_wrapping_format_interop(token: Token, tmp_path: Path) -> None:
    extra = patchset1()
    with running("camlcrush", token, tmp_path, extra) as cc, \
            running("p11guard", token, tmp_path, extra) as pg:
        with session(cc) as (cl, s, _):
            _token_keys(cl, s)
        for maker, reader in ((cc, pg), (pg, cc)):
            blob, proof = _wrap(maker)
            assert len(blob) == 128 + 30  # RSA-1024 W + Caml Crush trailer
            assert _unwrap(reader, blob, [attr(c.CKA_ENCRYPT, T)]) == (c.CKR_OK, proof)
            # The bound attributes hold on the other side too.
            assert _unwrap(reader, blob, [attr(c.CKA_SENSITIVE, F)])[0] == (
                c.CKR_TEMPLATE_INCONSISTENT)


def test_other_key_refuses_camlcrush_blob(token: Token, tmp_path: Path) -> None:
    with running("camlcrush", token, tmp_path, patchset1()) as cc:
        with session(cc) as (cl, s, _):
            _token_keys(cl, s)
        blob, _ = _wrap(cc)
    other = patchset1().replace(KEY_HEX, "ff" * 16)
    with running("p11guard", token, tmp_path / "x", other) as pg:
        assert _unwrap(pg, blob, [])[0] == c.CKR_FUNCTION_FAILED
