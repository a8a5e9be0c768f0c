"""Protocol version 4 in libp11guard.so, on the real path: the C library as a
PKCS#11 module -> p11guard -> SoftHSM2, compared call by call with SoftHSM2
loaded directly.

AES-GCM, RSA-OAEP (with and without a label), ECDH1 derive, CKA_WRAP_TEMPLATE
(nested templates written and read back), CKA_ALLOWED_MECHANISMS, per-message
3.0 calls.  Against Debian's pkcs11proxyd the library falls back to version 3
and the same calls are refused cleanly with CKR_MECHANISM_PARAM_INVALID, as
they are through Debian's own Caml Crush client talking to p11guard.

The driver is the project's cffi binding (``p11guard.pkcs11.binding``), which
can pass typed parameter structures and nested templates; each run is a
subprocess (``python -m tests.integration.test_client_v4 MODULE``) so that
every module is loaded fresh with its own environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests.native.support import LIB, build_all  # noqa: E402
from tests.support.servers import CAMLCRUSH_TCP, Server, start_server  # noqa: E402
from tests.support.softhsm import SOFTHSM_MODULE, Token  # noqa: E402

Results = dict[str, str]


# --- the driver (runs in a subprocess) ------------------------------------------------

def _scenario(module_path: str, label: str, pin: str) -> Results:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from p11guard.pkcs11 import constants as c
    from p11guard.pkcs11 import cparams
    from p11guard.pkcs11.binding import Module, ffi
    from p11guard.pkcs11.types import NativeValue, TemplateRequest
    from p11guard.wire.mechanisms import param

    ulong_size = ffi.sizeof("CK_ULONG")
    attr_size = ffi.sizeof("CK_ATTRIBUTE")

    def u(v: int) -> bytes:
        return v.to_bytes(ulong_size, sys.byteorder)

    true, false = b"\x01", b"\x00"
    out: Results = {}

    def name(rv: int) -> str:
        return "ok" if rv == c.CKR_OK else c.name_of("CKR", rv)

    def nested(entries: list[tuple[int, bytes]]) -> NativeValue:
        array = ffi.new("CK_ATTRIBUTE[]", len(entries))
        keep: list[Any] = [array]
        for i, (atype, value) in enumerate(entries):
            buf = ffi.new("char[]", value)
            keep.append(buf)
            array[i].type = atype
            array[i].pValue = buf
            array[i].ulValueLen = len(value)
        return NativeValue(array, len(entries) * attr_size, keep)

    class Fail(Exception):
        pass

    def ok(rv: int) -> None:
        if rv != c.CKR_OK:
            raise Fail(name(rv))

    def run(check: str, fn: Callable[[], str]) -> None:
        try:
            out[check] = fn()
        except Fail as exc:
            out[check] = str(exc)

    m = Module(module_path)
    ok(m.initialize())
    rv, slots, n = m.get_slot_list(True, None)
    rv, slots, n = m.get_slot_list(True, n)
    infos = {s: m.get_token_info(s)[1] for s in slots}
    slot = next(s for s, i in infos.items() if i and i.label.rstrip(b" ") == label.encode())
    rv, h = m.open_session(slot, c.CKF_SERIAL_SESSION | c.CKF_RW_SESSION)
    ok(rv)
    ok(m.login(h, c.CKU_USER, pin.encode()))

    def out_call(fn: Callable[..., Any], *args: Any) -> bytes:
        """Query the length, then fetch: the C way."""
        rv, _, need = fn(*args, None)
        ok(rv)
        rv, data, got = fn(*args, need)
        ok(rv)
        assert data is not None and got <= need
        return bytes(data)

    def aes_key(extra: list[tuple[int, Any]] | None = None) -> int:
        rv, key = m.generate_key(h, (c.CKM_AES_KEY_GEN, None), [
            (c.CKA_CLASS, u(c.CKO_SECRET_KEY)), (c.CKA_KEY_TYPE, u(c.CKK_AES)),
            (c.CKA_VALUE_LEN, u(32)), (c.CKA_TOKEN, false), (c.CKA_ENCRYPT, true),
            (c.CKA_DECRYPT, true), (c.CKA_WRAP, true), (c.CKA_UNWRAP, true),
            (c.CKA_SENSITIVE, false), (c.CKA_EXTRACTABLE, true), *(extra or [])])
        ok(rv)
        return key

    def value(obj: int, atype: int = c.CKA_VALUE) -> bytes:
        rv, [(_, _, need)] = m.get_attribute_value(h, obj, [(atype, None)])
        ok(rv)
        rv, [(_, data, _)] = m.get_attribute_value(h, obj, [(atype, need)])
        ok(rv)
        return bytes(data)

    def gcm() -> str:
        key = aes_key()
        secret = value(key)
        iv, aad, data = b"\x11" * 12, b"header", b"attack at dawn" * 5
        p = cparams.build(param("GCM", iv=iv, iv_bits=96, aad=aad, tag_bits=128))
        ok(m.encrypt_init(h, (c.CKM_AES_GCM, p.native), key))
        ct = out_call(m.encrypt, h, data)
        if ct != AESGCM(secret).encrypt(iv, data, aad):
            return "wrong ciphertext"
        ok(m.decrypt_init(h, (c.CKM_AES_GCM, p.native), key))
        if out_call(m.decrypt, h, ct) != data:
            return "wrong plaintext"
        ok(m.decrypt_init(h, (c.CKM_AES_GCM, p.native), key))
        bad = ct[:-1] + bytes([ct[-1] ^ 1])
        return "ok, tampered: " + name(m.decrypt(h, bad, 4096)[0])

    def rsa_pair() -> tuple[int, int]:
        rv, pub, priv = m.generate_key_pair(h, (c.CKM_RSA_PKCS_KEY_PAIR_GEN, None), [
            (c.CKA_TOKEN, false), (c.CKA_ENCRYPT, true), (c.CKA_MODULUS_BITS, u(2048)),
            (c.CKA_PUBLIC_EXPONENT, b"\x01\x00\x01")], [
            (c.CKA_TOKEN, false), (c.CKA_DECRYPT, true), (c.CKA_SENSITIVE, true)])
        ok(rv)
        return pub, priv

    pair: list[tuple[int, int]] = []

    def oaep(label_bytes: bytes) -> Callable[[], str]:
        def check() -> str:
            if not pair:
                pair.append(rsa_pair())
            pub, priv = pair[0]
            p = cparams.build(param("RSA_PKCS_OAEP", hash_alg=c.CKM_SHA_1, mgf=c.CKG_MGF1_SHA1,
                                    source=c.CKZ_DATA_SPECIFIED, source_data=label_bytes))
            ok(m.encrypt_init(h, (c.CKM_RSA_PKCS_OAEP, p.native), pub))
            ct = out_call(m.encrypt, h, b"secret message")
            ok(m.decrypt_init(h, (c.CKM_RSA_PKCS_OAEP, p.native), priv))
            return "ok" if out_call(m.decrypt, h, ct) == b"secret message" else "wrong"
        return check

    def ec_pair() -> tuple[int, int]:
        p256 = bytes.fromhex("06082a8648ce3d030107")
        rv, pub, priv = m.generate_key_pair(h, (c.CKM_EC_KEY_PAIR_GEN, None), [
            (c.CKA_TOKEN, false), (c.CKA_EC_PARAMS, p256)], [
            (c.CKA_TOKEN, false), (c.CKA_DERIVE, true), (c.CKA_SENSITIVE, true)])
        ok(rv)
        return pub, priv

    def ecdh() -> str:
        (pub_a, priv_a), (pub_b, priv_b) = ec_pair(), ec_pair()
        secrets = []
        for priv, other in ((priv_a, pub_b), (priv_b, pub_a)):
            point = value(other, c.CKA_EC_POINT)
            p = cparams.build(param("ECDH1_DERIVE", kdf=c.CKD_NULL, shared_data=b"",
                                    public_data=point))
            rv, key = m.derive_key(h, (c.CKM_ECDH1_DERIVE, p.native), priv, [
                (c.CKA_CLASS, u(c.CKO_SECRET_KEY)), (c.CKA_KEY_TYPE, u(c.CKK_GENERIC_SECRET)),
                (c.CKA_VALUE_LEN, u(32)), (c.CKA_TOKEN, false), (c.CKA_SENSITIVE, false),
                (c.CKA_EXTRACTABLE, true)])
            ok(rv)
            secrets.append(value(key))
        return "ok" if secrets[0] == secrets[1] and len(secrets[0]) == 32 else "differ"

    def wrap_template() -> str:
        inner = [(c.CKA_KEY_TYPE, u(c.CKK_AES)), (c.CKA_EXTRACTABLE, true)]
        wrapper = aes_key([(c.CKA_WRAP_TEMPLATE, nested(inner))])
        # Read it back the C way: length, then the inner types and lengths, then values.
        rv, [(_, _, size)] = m.get_attribute_value(h, wrapper, [(c.CKA_WRAP_TEMPLATE, None)])
        ok(rv)
        if size != len(inner) * attr_size:
            return f"outer length {size}"
        count = size // attr_size
        rv, [(_, entries, _)] = m.get_attribute_value(
            h, wrapper, [(c.CKA_WRAP_TEMPLATE, TemplateRequest([(0, None)] * count))])
        ok(rv)
        request = [(t, n) for t, _, n in entries]
        rv, [(_, entries, _)] = m.get_attribute_value(
            h, wrapper, [(c.CKA_WRAP_TEMPLATE, TemplateRequest(request))])
        ok(rv)
        got = sorted((t, v) for t, v, _ in entries)
        if got != sorted(inner):
            return f"read back {got!r}"
        # An AES key matches the template; a generic secret does not.
        target = aes_key()
        rv, wrapped, _ = m.wrap_key(h, (c.CKM_AES_KEY_WRAP, None), wrapper, target, 4096)
        ok(rv)
        rv, other = m.generate_key(h, (c.CKM_GENERIC_SECRET_KEY_GEN, None), [
            (c.CKA_TOKEN, false), (c.CKA_VALUE_LEN, u(32)), (c.CKA_EXTRACTABLE, true)])
        ok(rv)
        mismatch = name(m.wrap_key(h, (c.CKM_AES_KEY_WRAP, None), wrapper, other, 4096)[0])
        return f"ok, {len(wrapped or b'')} bytes, mismatch: {mismatch}"

    def allowed_mechanisms() -> str:
        mechs = [c.CKM_AES_GCM, c.CKM_AES_KEY_WRAP]
        key = aes_key([(c.CKA_ALLOWED_MECHANISMS, b"".join(u(x) for x in mechs))])
        raw = value(key, c.CKA_ALLOWED_MECHANISMS)
        got = [int.from_bytes(raw[i:i + ulong_size], sys.byteorder)
               for i in range(0, len(raw), ulong_size)]
        iv = b"\0" * 16
        cbc = name(m.encrypt_init(h, (c.CKM_AES_CBC_PAD, iv), key))
        return f"{got == mechs}, cbc: {cbc}"

    def message_gcm() -> str:
        key = aes_key()
        return name(m.message_encrypt_init(h, (c.CKM_AES_GCM, None), key))

    def login_user() -> str:
        return name(m.login_user(h, c.CKU_USER, pin.encode(), b"user"))

    run("gcm", gcm)
    run("oaep", oaep(b""))
    run("oaep_label", oaep(b"a label"))
    run("ecdh", ecdh)
    run("wrap_template", wrap_template)
    run("allowed_mechanisms", allowed_mechanisms)
    run("message_gcm", message_gcm)
    run("login_user", login_user)
    rv, data = m.generate_random(h, 16)
    out["alive"] = name(rv) if rv != c.CKR_OK or len(data) == 16 else "short"
    m.close_session(h)
    m.finalize()
    return out


# --- tests ------------------------------------------------------------------------------

def _run(module: str, env: dict[str, str], token: Token) -> Results:
    env = dict(env, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.test_client_v4", module, token.label,
         token.user_pin], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result: Results = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    build_all()


@pytest.fixture
def direct(token: Token) -> Results:
    return _run(SOFTHSM_MODULE, token.env, token)


def _proxied(kind: str, token: Token, workdir: Path, module: str = str(LIB),
             **extra: str) -> tuple[Results, Server]:
    server = start_server(kind, token, workdir)
    try:
        return _run(module, server.client_env(**extra), token), server
    finally:
        server.stop()


def test_v4_through_p11guard_matches_softhsm_directly(direct: Results, token: Token,
                                                      tmp_path: Path) -> None:
    """Every call gives what SoftHSM2 gives when loaded directly."""
    proxied, _ = _proxied("p11guard", token, tmp_path / "p11guard")
    assert proxied == direct
    # The acceptance calls work (SoftHSM2 itself refuses OAEP labels).
    assert direct["gcm"].startswith("ok, tampered: ")
    assert direct["oaep"] == "ok" and direct["ecdh"] == "ok"
    assert direct["wrap_template"].startswith("ok, ")
    assert direct["allowed_mechanisms"].startswith("True")
    assert direct["alive"] == "ok"


def test_v3_fallback_against_camlcrush_refuses_cleanly(token: Token, tmp_path: Path) -> None:
    """libp11guard.so -> Debian's pkcs11proxyd: version 3; pointer parameters
    and nested templates are refused before anything is sent."""
    proxied, server = _proxied("camlcrush", token, tmp_path / "cc")
    assert proxied["gcm"] == "CKR_MECHANISM_PARAM_INVALID"
    assert proxied["ecdh"] == "CKR_MECHANISM_PARAM_INVALID"
    assert proxied["oaep_label"] == "CKR_MECHANISM_PARAM_INVALID"
    assert proxied["oaep"] == "ok"
    assert proxied["wrap_template"] == "CKR_ATTRIBUTE_VALUE_INVALID"
    assert proxied["message_gcm"] == "CKR_FUNCTION_NOT_SUPPORTED"
    assert proxied["login_user"] == "CKR_FUNCTION_NOT_SUPPORTED"
    assert proxied["alive"] == "ok"
    assert "Fatal" not in server.log_text()


def test_forced_v3_against_p11guard(token: Token, tmp_path: Path) -> None:
    """PKCS11PROXY_PROTOCOL=3 keeps the Caml Crush protocol with p11guard too."""
    proxied, _ = _proxied("p11guard", token, tmp_path / "p3", PKCS11PROXY_PROTOCOL="3")
    assert proxied["gcm"] == "CKR_MECHANISM_PARAM_INVALID"
    assert proxied["oaep"] == "ok"
    assert proxied["alive"] == "ok"


def test_camlcrush_client_against_p11guard_refuses_cleanly(token: Token,
                                                           tmp_path: Path) -> None:
    """Debian's Caml Crush client sends raw client memory: p11guard refuses the
    pointer-bearing parameters with CKR_MECHANISM_PARAM_INVALID and lives on."""
    proxied, server = _proxied("p11guard", token, tmp_path / "ccc", module=CAMLCRUSH_TCP)
    assert proxied["gcm"] == "CKR_MECHANISM_PARAM_INVALID"
    assert proxied["ecdh"] == "CKR_MECHANISM_PARAM_INVALID"
    assert proxied["oaep_label"] == "CKR_MECHANISM_PARAM_INVALID"
    assert proxied["alive"] == "ok"
    assert server.proc.returncode is not None  # stopped by us, not crashed before


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(REPO / "src"))
    print(json.dumps(_scenario(sys.argv[1], sys.argv[2], sys.argv[3])))
