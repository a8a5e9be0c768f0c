"""NSS softokn (PKCS#11 3.0) behind p11guard, driven through libp11guard.so.

The C library as the application's module -> p11guard (TOML alias with
``init_reserved``) -> libsoftokn3.so: a 3.0 function (C_SessionCancel),
RSA-OAEP with a label (SoftHSM2 has no labels) and message-based AES-GCM
(the module generates the IV and writes the tag; both come back into the
caller's CK_GCM_MESSAGE_PARAMS).  Each run is a subprocess
(``python -m tests.integration.test_client_v4_nss MODULE``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests.native.support import LIB, build_all  # noqa: E402

SOFTOKN = "/usr/lib/x86_64-linux-gnu/libsoftokn3.so"
NSS_TOKEN = b"NSS Certificate DB"
CKG_GENERATE_RANDOM = 0x3

pytestmark = pytest.mark.skipif(
    not Path(SOFTOKN).exists() or shutil.which("certutil") is None,
    reason="needs libnss3 (libsoftokn3.so) and certutil (libnss3-tools)")


def _scenario(module_path: str) -> dict[str, str]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from p11guard.pkcs11 import constants as c
    from p11guard.pkcs11 import cparams
    from p11guard.pkcs11.binding import Module, ffi
    from p11guard.wire.mechanisms import param

    def u(v: int) -> bytes:
        return v.to_bytes(ffi.sizeof("CK_ULONG"), sys.byteorder)

    def name(rv: int) -> str:
        return "ok" if rv == c.CKR_OK else c.name_of("CKR", rv)

    class Fail(Exception):
        pass

    def ok(rv: int) -> None:
        if rv != c.CKR_OK:
            raise Fail(name(rv))

    out: dict[str, str] = {}

    def run(check: str, fn: Callable[[], str]) -> None:
        try:
            out[check] = fn()
        except Fail as exc:
            out[check] = str(exc)

    m = Module(module_path)
    out["interface_30"] = str(m.interface_30)
    ok(m.initialize())
    rv, slots, n = m.get_slot_list(True, None)
    rv, slots, n = m.get_slot_list(True, n)
    infos = {s: m.get_token_info(s)[1] for s in slots}
    slot = next(s for s, i in infos.items() if i and i.label.rstrip(b" ") == NSS_TOKEN)
    rv, h = m.open_session(slot, c.CKF_SERIAL_SESSION | c.CKF_RW_SESSION)
    ok(rv)
    true, false = b"\x01", b"\x00"

    def aes_key() -> tuple[int, bytes]:
        rv, key = m.generate_key(h, (c.CKM_AES_KEY_GEN, None), [
            (c.CKA_CLASS, u(c.CKO_SECRET_KEY)), (c.CKA_KEY_TYPE, u(c.CKK_AES)),
            (c.CKA_VALUE_LEN, u(16)), (c.CKA_TOKEN, false), (c.CKA_ENCRYPT, true),
            (c.CKA_DECRYPT, true), (c.CKA_SENSITIVE, false), (c.CKA_EXTRACTABLE, true)])
        ok(rv)
        rv, [(_, value, _)] = m.get_attribute_value(h, key, [(c.CKA_VALUE, 16)])
        ok(rv)
        return key, bytes(value)

    def session_cancel() -> str:
        key, _ = aes_key()
        ok(m.encrypt_init(h, (c.CKM_AES_CBC_PAD, b"\0" * 16), key))
        ok(m.session_cancel(h, c.CKF_ENCRYPT))
        return "ok, then: " + name(m.encrypt(h, b"x", 64)[0])

    def oaep_label() -> str:
        rv, pub, priv = m.generate_key_pair(h, (c.CKM_RSA_PKCS_KEY_PAIR_GEN, None), [
            (c.CKA_TOKEN, false), (c.CKA_ENCRYPT, true), (c.CKA_MODULUS_BITS, u(2048)),
            (c.CKA_PUBLIC_EXPONENT, b"\x01\x00\x01")], [
            (c.CKA_TOKEN, false), (c.CKA_DECRYPT, true), (c.CKA_SENSITIVE, true)])
        ok(rv)
        p = cparams.build(param("RSA_PKCS_OAEP", hash_alg=c.CKM_SHA256, mgf=c.CKG_MGF1_SHA256,
                                source=c.CKZ_DATA_SPECIFIED, source_data=b"a label"))
        ok(m.encrypt_init(h, (c.CKM_RSA_PKCS_OAEP, p.native), pub))
        rv, ct, _ = m.encrypt(h, b"secret", 512)
        ok(rv)
        ok(m.decrypt_init(h, (c.CKM_RSA_PKCS_OAEP, p.native), priv))
        rv, back, _ = m.decrypt(h, bytes(ct or b""), 512)
        ok(rv)
        return "ok" if back == b"secret" else "wrong"

    def message_gcm() -> str:
        key, secret = aes_key()
        ok(m.message_encrypt_init(h, (c.CKM_AES_GCM, None), key))
        enc = cparams.build(param("GCM_MESSAGE", iv=b"\0" * 12, iv_fixed_bits=0,
                                  iv_generator=CKG_GENERATE_RANDOM, tag=b"\0" * 16,
                                  tag_bits=128))
        rv, ct, _ = m.encrypt_message(h, enc.native, b"aad", b"hello 3.0", None)
        ok(rv)  # the length query
        rv, ct, _ = m.encrypt_message(h, enc.native, b"aad", b"hello 3.0", 4096)
        ok(rv)
        _, (iv, _, _, tag, _) = enc.read_back()
        if iv == b"\0" * 12 or tag == b"\0" * 16:
            return "IV or tag not given back"
        if bytes(ct or b"") + tag != AESGCM(secret).encrypt(iv, b"hello 3.0", b"aad"):
            return "wrong ciphertext"
        ok(m.message_encrypt_final(h))
        ok(m.message_decrypt_init(h, (c.CKM_AES_GCM, None), key))
        dec = cparams.build(param("GCM_MESSAGE", iv=iv, iv_fixed_bits=0, iv_generator=0,
                                  tag=tag, tag_bits=128))
        rv, plain, _ = m.decrypt_message(h, dec.native, b"aad", bytes(ct or b""), 4096)
        ok(rv)
        ok(m.message_decrypt_final(h))
        return "ok" if plain == b"hello 3.0" else "wrong plaintext"

    run("session_cancel", session_cancel)
    run("oaep_label", oaep_label)
    run("message_gcm", message_gcm)
    rv, _ = m.generate_random(h, 8)
    out["alive"] = name(rv)
    m.close_session(h)
    m.finalize()
    return out


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    build_all()


def test_nss_through_libp11guard(tmp_path: Path) -> None:
    from tests.integration.test_v4_nss import nss_reserved
    from tests.integration.test_v4_softhsm import start_toml_server

    db = tmp_path / "nssdb"
    db.mkdir()
    subprocess.run(["certutil", "-N", "-d", f"sql:{db}", "--empty-password"], check=True,
                   capture_output=True)
    modules = f'[modules.nss]\npath = "{SOFTOKN}"\ninit_reserved = "{nss_reserved(db)}"\n'
    server = start_toml_server(tmp_path / "p11guard", dict(os.environ), modules, "nss")
    try:
        env = dict(os.environ, PKCS11PROXY_SOCKET_PATH=server.address,
                   PKCS11PROXY_LIBNAME=server.alias, PYTHONPATH=str(REPO / "src"))
        proc = subprocess.run([sys.executable, "-m", "tests.integration.test_client_v4_nss",
                               str(LIB)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["interface_30"] == "True"  # the application sees a 3.0 module
    assert got["session_cancel"] == "ok, then: CKR_OPERATION_NOT_INITIALIZED"
    assert got["oaep_label"] == "ok"
    assert got["alive"] == "ok"
    assert got["message_gcm"] == "ok"  # IV and tag came back into the caller's struct


if __name__ == "__main__":
    print(json.dumps(_scenario(sys.argv[1])))
