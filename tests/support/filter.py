"""Helpers for the filter integration tests (no tests here).

Servers read a Caml Crush pkcs11proxyd.conf + filter.conf written from a full
filter text, so the same configuration runs Debian's pkcs11proxyd and p11guard.
Hooks used by the tests (``tests.support.filter:...``) live
here too, importable by the server process.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from p11guard.client import WireClient
from p11guard.pkcs11 import constants as c
from p11guard.policy.rules.calls import Call
from tests.support.net import free_tcp_port, wait_for_tcp
from tests.support.servers import P11GUARD, PKCS11PROXYD, REPO, Server, write_netplex_conf
from tests.support.softhsm import SOFTHSM_MODULE, Token

CKF_RW_SERIAL = c.CKF_SERIAL_SESSION | c.CKF_RW_SESSION


def filter_text(extra: str = "", *, modules: str | None = None) -> str:
    mods = modules or f'[("softhsm", "{SOFTHSM_MODULE}")]'
    return f"debug = 1\nmodules = {mods}\nlog_subchannel = filter\n{extra}"


def start(kind: str, token: Token, workdir: Path, filter_conf: str) -> Server:
    """Start ``kind`` ("p11guard" or "camlcrush") on TCP with this filter.conf text."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "netplex").mkdir(exist_ok=True)
    conf_path = workdir / "filter.conf"
    conf_path.write_text(filter_conf)
    port = free_tcp_port()
    conf = write_netplex_conf(workdir / "pkcs11proxyd.conf", conf_path, tcp_port=port,
                              netplex_dir=workdir / "netplex")
    log = workdir / f"{kind}.log"
    if kind == "p11guard":
        cmd = [*P11GUARD, "serve", "--config", str(conf), "--foreground"]
    else:
        cmd = [PKCS11PROXYD, "-fg", "-conf", str(conf)]
    env = token.env
    # The server imports the test hooks of this module.
    env["PYTHONPATH"] = f"{REPO / 'src'}:{REPO}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(proc, f"127.0.0.1:{port}", "softhsm", log, workdir)
    try:
        wait_for_tcp(port)
    except TimeoutError:
        server.stop()
        raise RuntimeError(f"{kind} did not start:\n{server.log_text()}") from None
    return server


@contextmanager
def running(kind: str, token: Token, workdir: Path, extra: str = "",
            *, modules: str | None = None) -> Iterator[Server]:
    server = start(kind, token, workdir / kind, filter_text(extra, modules=modules))
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def session(server: Server, *, alias: bytes = b"softhsm", login: bool = True,
            flags: int = CKF_RW_SERIAL) -> Iterator[tuple[WireClient, int, int]]:
    """(client, session, slot): SetupArch, LoadModule, Initialize, OpenSession, Login."""
    with WireClient.connect(server.address) as client:
        assert client.rv("SetupArch", 1) == 1
        assert client.rv("LoadModule", alias) == c.CKR_OK
        assert client.rv("Initialize") == c.CKR_OK
        rv, _, count = client.call("GetSlotList", 1, 0)
        rv, slots, count = client.call("GetSlotList", 1, count)
        assert rv == c.CKR_OK
        rv, handle = client.call("OpenSession", slots[0], flags)
        assert rv == c.CKR_OK
        if login:
            assert client.rv("Login", handle, c.CKU_USER, b"1234") == c.CKR_OK
        yield client, int(handle), int(slots[0])
        client.rv("Finalize")


def attr(t: int, value: bytes) -> tuple[int, bytes, int]:
    return (t, value, len(value))


def ulong(v: int) -> bytes:
    return v.to_bytes(8, "little")


P256 = bytes.fromhex("06082a8648ce3d030107")


def ec_keypair(client: WireClient, s: int, label: bytes, key_id: bytes = b"\x01",
               token: bool = False) -> tuple[int, int]:
    flag = b"\x01" if token else b"\x00"
    pub = [attr(c.CKA_EC_PARAMS, P256), attr(c.CKA_LABEL, label), attr(c.CKA_ID, key_id),
           attr(c.CKA_VERIFY, b"\x01"), attr(c.CKA_TOKEN, flag)]
    priv = [attr(c.CKA_LABEL, label), attr(c.CKA_ID, key_id), attr(c.CKA_SIGN, b"\x01"),
            attr(c.CKA_TOKEN, flag), attr(c.CKA_SENSITIVE, b"\x01")]
    rv, h_pub, h_priv = client.call("GenerateKeyPair", s, (c.CKM_EC_KEY_PAIR_GEN, b""), pub, priv)
    assert rv == c.CKR_OK, hex(rv)
    return int(h_pub), int(h_priv)


def aes_key(client: WireClient, s: int, label: bytes, *, token: bool = False,
            key_id: bytes = b"\x01") -> tuple[int, int]:
    """(rv, handle) of a fresh sensitive AES-256 key."""
    template = [attr(c.CKA_VALUE_LEN, ulong(32)), attr(c.CKA_LABEL, label),
                attr(c.CKA_ID, key_id), attr(c.CKA_TOKEN, b"\x01" if token else b"\x00"),
                attr(c.CKA_ENCRYPT, b"\x01"), attr(c.CKA_DECRYPT, b"\x01"),
                attr(c.CKA_SENSITIVE, b"\x01")]
    rv, handle = client.call("GenerateKey", s, (c.CKM_AES_KEY_GEN, b""), template)
    return int(rv), int(handle)


def find_all(client: WireClient, s: int, template: list[Any] | None = None) -> list[int]:
    assert client.rv("FindObjectsInit", s, template or []) == c.CKR_OK
    rv, handles, _ = client.call("FindObjects", s, 100)
    assert rv == c.CKR_OK
    assert client.rv("FindObjectsFinal", s) == c.CKR_OK
    return list(handles)


def direct_tool(token: Token, *args: str) -> str:
    """pkcs11-tool straight on SoftHSM2 (no proxy): to set up what a proxy would refuse."""
    proc = subprocess.run(["pkcs11-tool", "--module", SOFTHSM_MODULE, "--token-label",
                           token.label, "--login", "--pin", token.user_pin, *args],
                          env=token.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


# -- hooks the servers load (filter_actions_pre/post = "module:function") --------------

def refuse_random(call: Call) -> int | str:
    """Refuse C_GenerateRandom for more than 32 bytes."""
    return c.CKR_DATA_LEN_RANGE if int(call.get("length")) > 32 else "continue"
