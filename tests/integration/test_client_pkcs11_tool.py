"""pkcs11-tool through libp11guard.so gives the same results as SoftHSM2 directly,
against our server and against Debian's pkcs11proxyd."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.native.support import LIB, SOFTHSM, build_all, direct_env
from tests.support.servers import Server, start_server
from tests.support.softhsm import Token

SERVERS = ["camlcrush", "p11guard"]


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    build_all()


@pytest.fixture(params=SERVERS)
def proxy(request: pytest.FixtureRequest, token: Token, tmp_path: Path) -> Iterator[Server]:
    server = start_server(request.param, token, tmp_path / request.param)
    yield server
    server.stop()


def tool(module: str, env: dict[str, str], *args: str, timeout: float = 180,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["pkcs11-tool", "--module", module, *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"pkcs11-tool {args} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def both(proxy: Server, token: Token, *args: str, **kw: object) -> tuple[
        subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    via = tool(str(LIB), proxy.client_env(), *args, **kw)  # type: ignore[arg-type]
    direct = tool(SOFTHSM, direct_env(token.env), *args, **kw)  # type: ignore[arg-type]
    return via, direct


LOGIN = ("--token-label", "test", "--login", "--pin", "1234")


def object_blocks(listing: str) -> list[str]:
    """`pkcs11-tool -O` output as a sorted list of per-object blocks."""
    blocks: list[list[str]] = []
    for line in listing.splitlines():
        if line and not line[0].isspace():
            blocks.append([])
        if blocks:
            blocks[-1].append(line)
    return sorted("\n".join(b) for b in blocks)


def test_list_slots_and_objects(proxy: Server, token: Token) -> None:
    via, direct = both(proxy, token, "-L")
    assert via.stdout == direct.stdout
    assert "token label        : test" in via.stdout
    tool(str(LIB), proxy.client_env(), *LOGIN, "--keypairgen", "--key-type", "rsa:2048",
         "--id", "01", "--label", "rsa1")
    tool(str(LIB), proxy.client_env(), *LOGIN, "--keypairgen", "--key-type", "EC:prime256v1",
         "--id", "02", "--label", "ec1")
    via, direct = both(proxy, token, *LOGIN, "-O")
    # The objects are the same; their order follows SoftHSM's handle numbers,
    # which depend on the order each process loaded them from disk.
    assert object_blocks(via.stdout) == object_blocks(direct.stdout)
    assert "rsa1" in via.stdout and "ec1" in via.stdout


def test_sign_verify_encrypt_decrypt(proxy: Server, token: Token, tmp_path: Path) -> None:
    env = proxy.client_env()
    tool(str(LIB), env, *LOGIN, "--keypairgen", "--key-type", "rsa:2048", "--id", "01",
         "--label", "rsa1")
    data = tmp_path / "data.bin"
    data.write_bytes(b"hello p11guard" * 100)
    sig_via, sig_direct = tmp_path / "via.sig", tmp_path / "direct.sig"
    tool(str(LIB), env, *LOGIN, "--sign", "--id", "01", "-m", "SHA256-RSA-PKCS",
         "-i", str(data), "-o", str(sig_via))
    tool(SOFTHSM, direct_env(token.env), *LOGIN, "--sign", "--id", "01", "-m",
         "SHA256-RSA-PKCS", "-i", str(data), "-o", str(sig_direct))
    assert sig_via.read_bytes() == sig_direct.read_bytes()  # PKCS#1 v1.5 is deterministic
    for module, menv in ((str(LIB), env), (SOFTHSM, direct_env(token.env))):
        out = tool(module, menv, *LOGIN, "--verify", "--id", "01", "-m", "SHA256-RSA-PKCS",
                   "-i", str(data), "--signature-file", str(sig_via))
        assert "Signature is valid" in out.stdout
    # PSS carries a flat parameter structure
    tool(str(LIB), env, *LOGIN, "--sign", "--id", "01", "-m", "SHA256-RSA-PKCS-PSS",
         "-i", str(data), "-o", str(tmp_path / "pss.sig"))
    out = tool(SOFTHSM, direct_env(token.env), *LOGIN, "--verify", "--id", "01", "-m",
               "SHA256-RSA-PKCS-PSS", "-i", str(data), "--signature-file",
               str(tmp_path / "pss.sig"))
    assert "Signature is valid" in out.stdout

    # AES: the same ciphertext via the proxy and directly, and it decrypts back
    tool(str(LIB), env, *LOGIN, "--keygen", "--key-type", "AES:32", "--id", "03",
         "--label", "aes1")
    iv = "00112233445566778899aabbccddeeff"
    ct_via, ct_direct = tmp_path / "via.ct", tmp_path / "direct.ct"
    tool(str(LIB), env, *LOGIN, "--encrypt", "--id", "03", "-m", "AES-CBC-PAD", "--iv", iv,
         "-i", str(data), "-o", str(ct_via))
    tool(SOFTHSM, direct_env(token.env), *LOGIN, "--encrypt", "--id", "03", "-m",
         "AES-CBC-PAD", "--iv", iv, "-i", str(data), "-o", str(ct_direct))
    assert ct_via.read_bytes() == ct_direct.read_bytes()
    back = tmp_path / "back.bin"
    tool(str(LIB), env, *LOGIN, "--decrypt", "--id", "03", "-m", "AES-CBC-PAD", "--iv", iv,
         "-i", str(ct_via), "-o", str(back))
    assert back.read_bytes() == data.read_bytes()
    # RSA-PKCS decrypt of a message encrypted with the public key (read via the proxy)
    pub = tmp_path / "pub.der"
    tool(str(LIB), env, "--token-label", "test", "--read-object", "--type", "pubkey",
         "--id", "01", "-o", str(pub))
    pt = tmp_path / "pt.bin"
    pt.write_bytes(b"secret message")
    rsa_ct = tmp_path / "rsa.ct"
    subprocess.run(["openssl", "pkeyutl", "-encrypt", "-pubin", "-keyform", "DER", "-inkey",
                    str(pub), "-in", str(pt), "-out", str(rsa_ct)], check=True)
    rsa_back = tmp_path / "rsa.back"
    tool(str(LIB), env, *LOGIN, "--decrypt", "--id", "01", "-m", "RSA-PKCS", "-i",
         str(rsa_ct), "-o", str(rsa_back))
    assert rsa_back.read_bytes() == pt.read_bytes()


def _verdicts(text: str) -> list[str]:
    # The OAEP-with-label probe differs on purpose: SoftHSM 2.6.1 rejects it with
    # CKR_ARGUMENTS_BAD and stops; we reject it locally (a label is a pointer that
    # protocol v3 cannot carry), pkcs11-tool prints "Mechanism not supported" and
    # tries OAEP without label, which SoftHSM rejects the same way.
    keep = []
    for line in text.splitlines():
        if "OAEP" in line or "Mechanism not supported" in line:
            continue
        keep.append(re.sub(r"0x[0-9a-f]{6,}", "0xX", line))
    return keep


def test_pkcs11_tool_test_suite(proxy: Server, token: Token) -> None:
    env = proxy.client_env()
    tool(str(LIB), env, *LOGIN, "--keypairgen", "--key-type", "rsa:2048", "--id", "01",
         "--label", "rsa1")
    via, direct = both(proxy, token, *LOGIN, "--test", check=False)
    assert via.returncode == direct.returncode
    assert _verdicts(via.stdout) == _verdicts(direct.stdout)
    assert "RSA-PKCS: OK" in via.stdout
    assert "C_DecryptInit failed: rv = CKR_ARGUMENTS_BAD" in via.stderr + via.stdout


def test_pkcs11_tool_threads_and_fork(proxy: Server) -> None:
    env = proxy.client_env()
    out = tool(str(LIB), env, "--use-locking", "--test-threads", "IN", "--test-threads",
               "GISLGT", "--test-threads", "SLGTGI", "--test-threads", "GIGIGI", "-L")
    assert "token label        : test" in out.stdout
    # SoftHSM2 itself fails this one (CKR_CRYPTOKI_ALREADY_INITIALIZED in the child);
    # the proxy client must pass: a child gets its own fresh connection.
    out = tool(str(LIB), env, "--test-fork")
    assert "Calling C_Initialize in forked child process" in out.stdout


@pytest.mark.parametrize("kind", SERVERS)
def test_unix_socket(token: Token, tmp_path: Path, kind: str) -> None:
    server = start_server(kind, token, tmp_path / f"{kind}-unix", unix=True)
    try:
        for address in (server.address, f"unix://{server.address}"):
            env = server.client_env(PKCS11PROXY_SOCKET_PATH=address)
            via = tool(str(LIB), env, "-L")
            direct = tool(SOFTHSM, direct_env(token.env), "-L")
            assert via.stdout == direct.stdout
    finally:
        server.stop()
