"""Attack and legitimate-use scenarios run through a real PKCS#11 client library.

python-pkcs11 loads one library per process and the client libraries read
their environment (PKCS11PROXY_SOCKET_PATH / PKCS11PROXY_LIBNAME) once, so
every server gets a fresh process:

    python -m tests.support.p11lib LIB STEP[=ARG] [STEP[=ARG] ...]

prints one JSON object ``{STEP: outcome}``.  An outcome is

* ``"leaked"``: the attack recovered the target key's value (proved by an
  encryption the token made with the target before the attack);
* ``"<Function>:<Error>"``: the call that was refused and python-pkcs11's
  exception class for its CK_RV (``"WrapKey:ObjectHandleInvalid"``);
* for legitimate uses: whatever the step returns (True, a hex string, ...).

The parent side (``run_steps``) starts the process and parses the answer; a
library that fails to load (a concurrent rebuild of libp11guard.so) is
retried once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
LOAD_FAILED = 3  # exit status: the library did not load
ZERO16 = bytes(16)
P256 = bytes.fromhex("06082a8648ce3d030107")


def ckr_name(rv_name: str) -> str:
    """"CKR_OBJECT_HANDLE_INVALID" -> "ObjectHandleInvalid" (python-pkcs11's class name)."""
    return "".join(part.capitalize() for part in rv_name.removeprefix("CKR_").split("_"))


def run_steps(lib: Path | str, env: dict[str, str], *steps: str,
              timeout: float = 120.0) -> dict[str, Any]:
    """Run ``steps`` in a fresh process loading ``lib`` with ``env``; the JSON answer."""
    env = dict(env)
    env["PYTHONPATH"] = f"{REPO / 'src'}:{REPO}"
    cmd = [sys.executable, "-m", "tests.support.p11lib", str(lib), *steps]
    for attempt in (1, 2):
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode == LOAD_FAILED and attempt == 1:
            time.sleep(2.0)  # the library may be being rebuilt right now
            continue
        break
    if proc.returncode != 0:
        raise AssertionError(f"client process failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    answer: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return answer


# -- the child side ---------------------------------------------------------------------------
# Everything below runs in the child process only (python-pkcs11 imported lazily so
# that the parent never loads a PKCS#11 library).

def _child(argv: list[str]) -> int:
    import pkcs11
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, _pkcs11
    from pkcs11 import MechanismFlag as M
    from pkcs11.attributes import AttributeMapper, handle_bool
    from pkcs11.constants import DEFAULT
    from pkcs11.exceptions import PKCS11Error

    try:
        lib = pkcs11.lib(argv[0])
    except Exception as exc:  # any load failure: the parent retries once
        print(f"cannot load {argv[0]}: {exc}", file=sys.stderr)
        return LOAD_FAILED

    def raw_or_bool(value: Any) -> bytes:
        return value if isinstance(value, bytes) else bytes(handle_bool[0](value))

    class RawBools(AttributeMapper):
        """Booleans given as bytes go out as is: a non-canonical TRUE (0x02) is an attack."""

        def __init__(self) -> None:
            super().__init__()
            _, unpack = handle_bool
            for key, handler in list(self.attribute_types.items()):
                if handler is handle_bool:
                    self.attribute_types[key] = (raw_or_bool, unpack)

    _p: Any = _pkcs11  # compiled: no typed view of its classes
    mixins = tuple(getattr(_p, n) for n in ("EncryptMixin", "DecryptMixin", "SignMixin",
                                             "VerifyMixin", "WrapMixin", "UnwrapMixin",
                                             "DeriveMixin"))

    def able(obj: Any) -> Any:
        """``obj`` with every operation method, whatever its usage attributes.

        python-pkcs11 only gives an object the methods its attributes allow: the
        attack must reach the proxy, which is the one to refuse (or not).
        """
        base = type(obj).__bases__[0]
        return type(base.__name__, (base, *mixins, _p.Object), {})(obj.wrapper)

    iv = ZERO16
    cbc: dict[str, Any] = {"mechanism": Mechanism.AES_CBC, "mechanism_param": iv}
    ecb: dict[str, Any] = {"mechanism": Mechanism.AES_ECB}
    kw: dict[str, Any] = {"mechanism": Mechanism.AES_KEY_WRAP}
    oaep: dict[str, Any] = {"mechanism": Mechanism.RSA_PKCS_OAEP}
    rsa: dict[str, Any] = {"mechanism": Mechanism.RSA_PKCS}
    stage = ["?"]

    def at(name: str) -> None:
        stage[0] = name

    def aes_ecb(key: bytes) -> bytes:
        enc = Cipher(algorithms.AES(key[:16]), modes.ECB()).encryptor()
        return enc.update(ZERO16) + enc.finalize()

    def aes_cbc_decrypt(key: bytes, data: bytes) -> bytes:
        dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        return dec.update(data) + dec.finalize()

    def judge(value: bytes, proof: bytes) -> str:
        return "leaked" if len(value) >= 16 and aes_ecb(value) == proof else "garbage"

    tok = lib.get_token(token_label="test")
    session = tok.open(user_pin="1234", rw=True, attribute_mapper=RawBools())
    s = session

    def secret(caps: Any = 0, template: dict[Any, Any] | None = None, *,
               store: bool = False, label: str | None = None) -> Any:
        at("GenerateKey")
        return able(s.generate_key(KeyType.AES, 128, capabilities=caps, template=template,
                                   store=store, label=label))

    def target(store: bool = False) -> tuple[Any, bytes]:
        """A sensitive, extractable AES key and its ECB encryption of zeros."""
        t = secret(M.ENCRYPT, {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True},
                   store=store, label="target")
        at("Encrypt")
        return t, bytes(t.encrypt(ZERO16, **ecb))

    def rsa_pair(pub: dict[Any, Any], priv: dict[Any, Any]) -> tuple[Any, Any]:
        at("GenerateKeyPair")
        pair = s.generate_keypair(KeyType.RSA, 1024, capabilities=0, public_template=pub,
                                  private_template={Attribute.SENSITIVE: True, **priv})
        return able(pair[0]), able(pair[1])

    # -- attacks: each returns "leaked"/"garbage" (or raises) -------------------------------

    def wrap_then_decrypt(extra: dict[Any, Any] | None = None, caps: int = M.WRAP | M.DECRYPT,
                          ) -> str:
        t, proof = target()
        k = secret(caps, {Attribute.SENSITIVE: True, **(extra or {})})
        at("WrapKey")
        blob = k.wrap_key(t, **cbc)
        at("Decrypt")
        return judge(bytes(k.decrypt(blob[:16], **cbc)), proof)

    def bare_wrap_then_decrypt() -> str:
        # No usage attribute at all: SoftHSM2's defaults (WRAP and DECRYPT TRUE).
        drop = {a: DEFAULT for a in (Attribute.ENCRYPT, Attribute.DECRYPT, Attribute.WRAP,
                                     Attribute.UNWRAP, Attribute.SIGN, Attribute.VERIFY,
                                     Attribute.DERIVE, Attribute.SENSITIVE,
                                     Attribute.PRIVATE)}
        return wrap_then_decrypt(drop, caps=0)

    def rsa_wrap_then_decrypt() -> str:
        t, proof = target()
        pub, priv = rsa_pair({Attribute.WRAP: True}, {Attribute.DECRYPT: True})
        at("WrapKey")
        blob = pub.wrap_key(t, **rsa)
        at("Decrypt")
        return judge(bytes(priv.decrypt(blob, **rsa)), proof)

    def dangerous_key() -> str:
        """A wrapping key read while not sensitive, then made sensitive."""
        t, proof = target()
        k = secret(M.WRAP, {Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True})
        at("GetAttributeValue")
        k_value = bytes(k[Attribute.VALUE])
        at("SetAttributeValue")
        k[Attribute.SENSITIVE] = True
        at("WrapKey")
        blob = k.wrap_key(t, **cbc)
        return judge(aes_cbc_decrypt(k_value, blob[:16]), proof)

    def sticky() -> str:
        """Wrap while the key may wrap, then turn it into a decryption key."""
        t, proof = target()
        k = secret(M.WRAP, label="sticky")
        at("WrapKey")
        blob = k.wrap_key(t, **cbc)
        at("SetAttributeValue")
        k[Attribute.WRAP] = False
        k[Attribute.DECRYPT] = True
        at("Decrypt")
        return judge(bytes(k.decrypt(blob[:16], **cbc)), proof)

    def known_key() -> str:
        """Import a wrapping key whose value we know; wrap the target with it."""
        t, proof = target()
        known = bytes(range(16))
        at("CreateObject")
        k = able(s.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                  Attribute.KEY_TYPE: KeyType.AES, Attribute.VALUE: known,
                                  Attribute.WRAP: True, Attribute.TOKEN: False}))
        at("WrapKey")
        blob = k.wrap_key(t, **cbc)
        return judge(aes_cbc_decrypt(known, blob[:16]), proof)

    def read_value() -> str:
        k = secret(M.ENCRYPT, {Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True})
        at("Encrypt")
        proof = bytes(k.encrypt(ZERO16, **ecb))
        at("GetAttributeValue")
        return judge(bytes(k[Attribute.VALUE]), proof)

    def unwrap_weaker() -> str:
        """Wrap the target, unwrap it again as a non-sensitive key, read it."""
        t, proof = target()
        w = secret(M.WRAP | M.UNWRAP)
        at("WrapKey")
        blob = w.wrap_key(t, **kw)
        at("UnwrapKey")
        k = w.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, blob, capabilities=M.ENCRYPT,
                         template={Attribute.SENSITIVE: False,
                                   Attribute.EXTRACTABLE: True}, **kw)
        at("GetAttributeValue")
        return judge(bytes(k[Attribute.VALUE]), proof)

    def split_pair() -> str:
        """B2: the public half gains WRAP after generation; the private half decrypts."""
        t, proof = target()
        pub, priv = rsa_pair({Attribute.VERIFY: True, Attribute.LABEL: "split"},
                             {Attribute.DECRYPT: True})
        at("SetAttributeValue")
        pub[Attribute.WRAP] = True
        at("WrapKey")
        blob = pub.wrap_key(t, **oaep)
        at("Decrypt")
        return judge(bytes(priv.decrypt(blob[:128], **oaep)), proof)

    def copy_merged() -> str:
        """B6: a copy of a decryption key that adds WRAP."""
        t, proof = target()
        k = secret(M.DECRYPT)
        at("CopyObject")
        c = able(k.copy({Attribute.WRAP: True}))
        at("WrapKey")
        blob = c.wrap_key(t, **cbc)
        at("Decrypt")
        return judge(bytes(c.decrypt(blob[:16], **cbc)), proof)

    def odd_bool() -> str:
        """B3: WRAP=0x02 is TRUE to the token but not to a byte-for-byte check."""
        return wrap_then_decrypt({Attribute.WRAP: b"\x02"}, caps=M.DECRYPT)

    def padding_option() -> str:
        """B1: a bare RSA blob (no authenticated attributes) unwrapped as a decryption key.

        "leaked" here: the target's value, re-imported with rights it never had."""
        t, proof = target()
        pub, priv = rsa_pair({Attribute.WRAP: True}, {Attribute.UNWRAP: True})
        at("WrapKey")
        blob = pub.wrap_key(t, **oaep)
        at("UnwrapKey")
        k = able(priv.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, blob[:128],
                                 capabilities=M.DECRYPT,
                                 template={Attribute.SENSITIVE: False,
                                           Attribute.EXTRACTABLE: True}, **oaep))
        # The target never could decrypt; its copy decrypts what the target encrypted.
        at("Decrypt")
        return "leaked" if bytes(k.decrypt(proof, **ecb)) == ZERO16 else "garbage"

    def derive_weaker() -> str:
        """Derive a readable key from a sensitive base key (AES_ECB_ENCRYPT_DATA over
        zeros): the derived value is the base key's encryption of zeros, out of
        the token.  Needs protocol v4 (the parameter holds a pointer)."""
        base = secret(M.ENCRYPT | M.DERIVE, {Attribute.SENSITIVE: True,
                                             Attribute.EXTRACTABLE: False})
        at("Encrypt")
        proof = bytes(base.encrypt(ZERO16, **ecb))
        at("DeriveKey")
        k = able(base.derive_key(KeyType.AES, 128, mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
                                 mechanism_param=ZERO16,
                                 template={Attribute.SENSITIVE: False,
                                           Attribute.EXTRACTABLE: True}))
        at("GetAttributeValue")
        return "leaked" if bytes(k[Attribute.VALUE]) == proof else "garbage"

    def legit_derive() -> bool:
        """The same derivation into a key as protected as its base: allowed, usable."""
        base = secret(M.ENCRYPT | M.DERIVE, {Attribute.SENSITIVE: True,
                                             Attribute.EXTRACTABLE: False})
        at("DeriveKey")
        k = able(base.derive_key(KeyType.AES, 128, mechanism=Mechanism.AES_ECB_ENCRYPT_DATA,
                                 mechanism_param=ZERO16, capabilities=M.ENCRYPT | M.DECRYPT,
                                 template={Attribute.SENSITIVE: True,
                                           Attribute.EXTRACTABLE: False}))
        at("Encrypt")
        ct = k.encrypt(b"y" * 16, **cbc)
        at("Decrypt")
        return bool(k.decrypt(ct, **cbc) == b"y" * 16)

    # -- legitimate uses ----------------------------------------------------------------------

    def legit_sign() -> bool:
        at("GenerateKeyPair")
        pub: Any
        priv: Any
        pub, priv = s.generate_keypair(KeyType.EC, None, capabilities=M.SIGN | M.VERIFY,
                                       public_template={Attribute.EC_PARAMS: P256})
        at("Sign")
        sig = priv.sign(b"\x11" * 32, mechanism=Mechanism.ECDSA)
        at("Verify")
        return bool(pub.verify(b"\x11" * 32, sig, mechanism=Mechanism.ECDSA))

    def legit_encrypt() -> bool:
        k = secret(M.ENCRYPT | M.DECRYPT)
        at("Encrypt")
        ct = k.encrypt(b"x" * 16, **cbc)
        at("Decrypt")
        return bool(k.decrypt(ct, **cbc) == b"x" * 16)

    def legit_rsa() -> bool:
        pub, priv = rsa_pair({Attribute.ENCRYPT: True}, {Attribute.DECRYPT: True})
        at("Encrypt")
        ct = pub.encrypt(b"hello", **oaep)
        at("Decrypt")
        return bool(priv.decrypt(ct, **oaep) == b"hello")

    def legit_wrap() -> bool:
        t, proof = target()
        w = secret(M.WRAP | M.UNWRAP)
        at("WrapKey")
        blob = w.wrap_key(t, **kw)
        at("UnwrapKey")
        k = w.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, blob, capabilities=M.ENCRYPT, **kw)
        at("Encrypt")
        return bool(k.encrypt(ZERO16, **ecb) == proof)

    def legit_wrap_cbc() -> bool:
        t, _ = target()
        w = secret(M.WRAP | M.UNWRAP)
        at("WrapKey")
        return len(w.wrap_key(t, **cbc)) >= 16

    def legit_rsa_segregated() -> bool:
        rsa_pair({Attribute.VERIFY: True}, {Attribute.SIGN: True})
        rsa_pair({Attribute.ENCRYPT: True}, {Attribute.DECRYPT: True})
        return True

    def segregation_attack() -> str:
        rsa_pair({Attribute.VERIFY: True, Attribute.ENCRYPT: True},
                 {Attribute.SIGN: True, Attribute.DECRYPT: True})
        return "created"

    def legit_set_usage() -> bool:
        k = secret(0)
        at("SetAttributeValue")
        k[Attribute.ENCRYPT] = True
        k[Attribute.LABEL] = "x"
        return True

    def legit_import() -> bool:
        at("CreateObject")
        k = able(s.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                  Attribute.KEY_TYPE: KeyType.AES, Attribute.VALUE: bytes(16),
                                  Attribute.ENCRYPT: True, Attribute.TOKEN: False}))
        at("Encrypt")
        return bool(k.encrypt(ZERO16, **ecb) == aes_ecb(bytes(16)))

    def legit_attributes() -> list[str]:
        """Non-secret attributes still readable; the value neither readable nor writable."""
        k = secret(M.ENCRYPT, {Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True},
                   label="lbl")
        out = [str(k[Attribute.LABEL])]
        try:
            k[Attribute.VALUE]
            out.append("get:ok")
        except PKCS11Error as exc:
            out.append(f"get:{err(exc)}")
        try:
            k[Attribute.VALUE] = bytes(16)
            out.append("set:ok")
        except PKCS11Error as exc:
            out.append(f"set:{err(exc)}")
        return out

    def legit_wrapformat() -> dict[str, Any]:
        """Wrap and unwrap through the format; a changed or truncated blob is refused."""
        t, proof = target()
        w = secret(M.WRAP | M.UNWRAP)
        at("WrapKey")
        blob = bytes(w.wrap_key(t, **kw))
        out: dict[str, Any] = {"len": len(blob)}

        def unwrap(data: bytes) -> str:
            try:
                k = w.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, data,
                                 capabilities=M.ENCRYPT, **kw)
            except PKCS11Error as exc:
                return err(exc)
            return "same" if k.encrypt(ZERO16, **ecb) == proof else "other"
        out["unwrap"] = unwrap(blob)
        out["forged"] = unwrap(blob[:-1] + bytes([blob[-1] ^ 1]))
        out["truncated"] = unwrap(blob[:24])
        return out

    def share_wrap() -> dict[str, str]:
        """Wrap a token key with a token KEK: the blob goes to another p11guard."""
        t, proof = target(store=True)
        w = secret(M.WRAP | M.UNWRAP, store=True, label="kek")
        at("WrapKey")
        return {"blob": bytes(w.wrap_key(t, **kw)).hex(), "proof": proof.hex()}

    def share_unwrap(blob_hex: str) -> str:
        at("FindObjects")
        w = able(s.get_key(label="kek", object_class=ObjectClass.SECRET_KEY))
        at("UnwrapKey")
        k = w.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, bytes.fromhex(blob_hex),
                         capabilities=M.ENCRYPT, **kw)
        at("Encrypt")
        return bytes(k.encrypt(ZERO16, **ecb)).hex()

    steps: dict[str, Callable[..., Any]] = {
        "wrap_then_decrypt": wrap_then_decrypt,
        "bare_wrap_then_decrypt": bare_wrap_then_decrypt,
        "rsa_wrap_then_decrypt": rsa_wrap_then_decrypt,
        "dangerous_key": dangerous_key,
        "sticky": sticky,
        "known_key": known_key,
        "read_value": read_value,
        "unwrap_weaker": unwrap_weaker,
        "split_pair": split_pair,
        "copy_merged": copy_merged,
        "odd_bool": odd_bool,
        "padding_option": padding_option,
        "segregation_attack": segregation_attack,
        "derive_weaker": derive_weaker,
        "legit_derive": legit_derive,
        "legit_sign": legit_sign,
        "legit_encrypt": legit_encrypt,
        "legit_rsa": legit_rsa,
        "legit_wrap": legit_wrap,
        "legit_wrap_cbc": legit_wrap_cbc,
        "legit_rsa_segregated": legit_rsa_segregated,
        "legit_set_usage": legit_set_usage,
        "legit_import": legit_import,
        "legit_attributes": legit_attributes,
        "legit_wrapformat": legit_wrapformat,
        "share_wrap": share_wrap,
        "share_unwrap": share_unwrap,
    }
    from p11guard.pkcs11 import constants

    def err(exc: PKCS11Error) -> str:
        """python-pkcs11's class name; for the CK_RVs it has no class for, the same
        spelling derived from the constant's name ("KeyFunctionNotPermitted")."""
        text = str(exc)
        if type(exc) is PKCS11Error and text.startswith("Unmapped error code "):
            rv = int(text.rsplit(" ", 1)[1], 16)
            names = [n for n in dir(constants)
                     if n.startswith("CKR_") and getattr(constants, n) == rv]
            return ckr_name(names[0]) if names else hex(rv)
        return type(exc).__name__

    out: dict[str, Any] = {}
    try:
        for step in argv[1:]:
            name, _, arg = step.partition("=")
            stage[0] = "?"
            try:
                out[name] = steps[name](arg) if arg else steps[name]()
            except PKCS11Error as exc:
                out[name] = f"{stage[0]}:{err(exc)}"
    finally:
        session.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
