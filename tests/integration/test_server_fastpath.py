"""The worker's C fast path (server/fastpath.py, native/server/fastpath.c) answers
exactly like the Python path: the same call script, valid and hostile, runs against
two servers on one SoftHSM2 token, one with the fast path and one without
(P11GUARD_FASTPATH=off), in both protocol versions, and the answers must be equal.

Variants run the fast-path server with the AddressSanitizer and ThreadSanitizer builds
of the library; the pipeline script drives C's threads for long calls
(native/server/pool.c).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from p11guard.client import WireClient
from p11guard.pkcs11 import constants as c
from p11guard.server import fastpath
from p11guard.wire import rpc
from p11guard.wire.codec import CODECS_BY_VERSION
from p11guard.wire.mechanisms import NO_PARAM, param
from p11guard.wire.procedures import (
    ARCH_LITTLE_ENDIAN_32,
    ARCH_LITTLE_ENDIAN_64,
    NAMES_BY_VERSION,
    OUT_LEN_NULL,
    PROGRAM,
)
from p11guard.wire.templates import ValueKind
from tests.support.servers import REPO, Server, start_server
from tests.support.softhsm import Token

CKM_AES_ECB, CKM_AES_CMAC, CKM_SHA256, CKM_AES_CBC = 0x1081, 0x108A, 0x250, 0x1082
MAX_OPAQUE = 16 * 1024 * 1024  # the servers' default max_record_size
U, B = ValueKind.ULONG, ValueKind.BYTES
TRUE, FALSE = b"\x01", b"\x00"
SERVER_LIB = REPO / "native" / "server" / "build" / "libp11guard-fast.so"

Script = Callable[["Peer"], list[Any]]


def start(token: Token, workdir: Path, **env: str) -> Server:
    return start_server("p11guard", dataclasses.replace(token, extra_env=env), workdir,
                        extra_args=("--verbose",))


@pytest.fixture(scope="module", autouse=True)
def _library_built() -> None:
    subprocess.run(["make", "-s", "-C", str(REPO / "native" / "server"), "all"], check=True)


@pytest.fixture
def servers(token: Token, tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    fast = start(token, tmp_path / "fast", P11GUARD_FASTPATH_LIB=str(SERVER_LIB))
    slow = start(token, tmp_path / "slow", P11GUARD_FASTPATH="off")
    yield fast, slow
    fast.stop()
    slow.stop()


class Peer:
    """One connection, set up the same way on both servers."""

    def __init__(self, address: str, version: int, arch: int = ARCH_LITTLE_ENDIAN_64) -> None:
        self.c = WireClient.connect(address, version=version)
        self.version = version
        self.ulong_size = 4 if arch == ARCH_LITTLE_ENDIAN_32 else 8
        assert self.c.rv("SetupArch", arch) == ARCH_LITTLE_ENDIAN_64
        assert self.c.rv("LoadModule", b"softhsm") == c.CKR_OK
        assert self.c.rv("Initialize", *((0,) if version == 4 else ())) == c.CKR_OK
        _, slots, _ = self.c.call("GetSlotList", 1, 16)
        self.slot = slots[0]
        rv, self.session = self.c.call("OpenSession", self.slot,
                                       c.CKF_SERIAL_SESSION | c.CKF_RW_SESSION)
        assert rv == c.CKR_OK
        assert self.c.rv("Login", self.session, c.CKU_USER, b"1234") == c.CKR_OK

    def mech(self, mech_type: int, raw: bytes = b"") -> Any:
        if self.version == 3:
            return (mech_type, raw)
        return (mech_type, param("BYTES", data=raw) if raw else NO_PARAM)

    def out(self, *extra: int) -> tuple[int, ...]:
        """The output-length argument(s) of an output call (version 4 only)."""
        return extra if self.version == 4 else ()

    def aes_key(self) -> int:
        """A session AES key with a fixed value: outputs are comparable."""
        value = bytes(range(16))
        if self.version == 3:
            template: list[Any] = [
                (c.CKA_CLASS, c.CKO_SECRET_KEY.to_bytes(8, "little"), 8),
                (c.CKA_KEY_TYPE, c.CKK_AES.to_bytes(8, "little"), 8),
                (c.CKA_VALUE, value, 16),
                (c.CKA_TOKEN, FALSE, 1), (c.CKA_ENCRYPT, TRUE, 1), (c.CKA_DECRYPT, TRUE, 1),
                (c.CKA_SIGN, TRUE, 1), (c.CKA_VERIFY, TRUE, 1),
            ]
        else:
            template = [(c.CKA_CLASS, U, c.CKO_SECRET_KEY), (c.CKA_KEY_TYPE, U, c.CKK_AES),
                        (c.CKA_VALUE, B, value), (c.CKA_TOKEN, B, FALSE),
                        (c.CKA_ENCRYPT, B, TRUE), (c.CKA_DECRYPT, B, TRUE),
                        (c.CKA_SIGN, B, TRUE), (c.CKA_VERIFY, B, TRUE)]
        rv, key = self.c.call("CreateObject", self.session, template)
        assert rv == c.CKR_OK
        return int(key)

    def raw(self, name: str, body: bytes) -> bytes:
        """A hand-made argument body: the whole reply (accept status and result)."""
        number = NAMES_BY_VERSION[self.version][name].number
        reply, result = self.c.call_raw(number, body)
        return bytes([reply.accept_stat or 0]) + result


def crypto_script(p: Peer) -> list[Any]:
    s, out = p.session, p.out
    key = p.aes_key()
    data = bytes(range(32))
    calls: list[tuple[str, tuple[Any, ...]]] = [
        ("GetSessionInfo", (s,)), ("GetSessionInfo", (0xDEAD,)),
        ("SeedRandom", (s, b"seed")),
        ("Digest", (s, data, *out(64))),  # no operation active
        ("DigestInit", (s, p.mech(CKM_SHA256))),
        ("Digest", (s, data, *out(OUT_LEN_NULL))), ("Digest", (s, data, *out(8))),
        ("Digest", (s, data, *out(32))),
        ("DigestInit", (s, p.mech(CKM_SHA256))), ("DigestUpdate", (s, data)),
        ("DigestUpdate", (s, b"")), ("DigestFinal", (s, *out(1000))),
        ("DigestInit", (s, p.mech(0xFFFF_FFF0))),  # unknown mechanism
        ("DigestInit", (s, p.mech(CKM_SHA256, b"x"))),  # a parameter: Python's path
        ("DigestFinal", (s, *out(64))),
        ("EncryptInit", (s, p.mech(CKM_AES_ECB), key)),
        ("Encrypt", (s, data, *out(OUT_LEN_NULL))), ("Encrypt", (s, data, *out(16))),
        ("Encrypt", (s, data, *out(32))),
        ("EncryptInit", (s, p.mech(CKM_AES_ECB), key)), ("EncryptUpdate", (s, data, *out(64))),
        ("EncryptUpdate", (s, data[:5], *out(64))), ("EncryptFinal", (s, *out(64))),
        ("EncryptInit", (s, p.mech(CKM_AES_ECB), 0xBAD)),  # bad key handle
        ("EncryptInit", (s, p.mech(CKM_AES_CBC, bytes(16)), key)),  # IV: Python's path
        ("Encrypt", (s, data, *out(64))),
        ("DecryptInit", (s, p.mech(CKM_AES_ECB), key)), ("Decrypt", (s, data, *out(64))),
        ("SignInit", (s, p.mech(CKM_AES_CMAC), key)), ("Sign", (s, data, *out(64))),
        ("SignInit", (s, p.mech(CKM_AES_CMAC), key)), ("SignUpdate", (s, data)),
        ("SignFinal", (s, *out(OUT_LEN_NULL))), ("SignFinal", (s, *out(64))),
        ("VerifyInit", (s, p.mech(CKM_AES_CMAC), key)),
        ("Verify", (s, data, bytes(16))),  # wrong MAC
        ("VerifyInit", (s, p.mech(CKM_AES_CMAC), key)), ("VerifyUpdate", (s, data)),
        ("VerifyFinal", (s, bytes(16))),
        ("GenerateRandom", (s, 0)), ("GenerateRandom", (s, MAX_OPAQUE + 1)),
        ("GenerateRandom", (0xBAD, 16)),
    ]
    results: list[Any] = [(name, p.c.call(name, *args)) for name, args in calls]
    rv, random = p.c.call("GenerateRandom", s, 48)
    results.append(("GenerateRandom 48", rv, len(random)))  # the bytes differ, not the size
    return results


def session_script(p: Peer) -> list[Any]:
    s = p.session
    calls: list[tuple[str, tuple[Any, ...]]] = [
        ("OpenSession", (p.slot, c.CKF_SERIAL_SESSION)),
        ("OpenSession", (p.slot, 0)),  # CKF_SERIAL_SESSION missing
        ("OpenSession", (0xFFFF, c.CKF_SERIAL_SESSION)),
        ("CloseSession", (0xFFFF,)),
        ("FindObjects", (s, 10)),  # not initialised
        ("FindObjectsInit", (s, [])),
        ("FindObjects", (s, 0)), ("FindObjects", (s, 1)), ("FindObjects", (s, 1 << 40)),
        ("FindObjectsFinal", (s,)), ("FindObjectsFinal", (s,)),
        ("Logout", (s,)), ("Logout", (s,)),
        ("CloseAllSessions", (p.slot,)), ("GetSessionInfo", (s,)),
    ]
    return [(name, p.c.call(name, *args)) for name, args in calls]


def find_script(p: Peer) -> list[Any]:
    """FindObjectsInit templates: plain ones are served in C (version 4), the others
    (non-canonical booleans, nested templates, arrays) go to Python's path."""
    s = p.session
    p.aes_key()
    if p.version == 3:
        cls = c.CKO_SECRET_KEY.to_bytes(p.ulong_size, "little")
        templates: list[Any] = [
            [], [(c.CKA_CLASS, cls, len(cls))], [(c.CKA_LABEL, b"", 0)],
            [(c.CKA_CLASS, cls, len(cls)), (c.CKA_ENCRYPT, TRUE, 1)],
            [(c.CKA_ENCRYPT, b"\x02", 1)],  # non-canonical TRUE: Python canonicalises
            [(c.CKA_ENCRYPT, b"\x02\x00", 2)],  # two bytes: as it is
            [(c.CKA_CLASS, cls, 99)],  # the length word is not used
            [(c.CKA_CLASS, cls[:3], 3)],  # not a CK_ULONG
            [(c.CKA_WRAP_TEMPLATE, b"xx", 2)],  # client memory for an array attribute
            [(0x8000_0001, b"vendor", 6)] * 33,  # more than fastpath.c takes
        ]
    else:
        templates = [
            [], [(c.CKA_CLASS, U, c.CKO_SECRET_KEY)], [(c.CKA_LABEL, B, b"")],
            [(c.CKA_CLASS, U, c.CKO_SECRET_KEY), (c.CKA_ENCRYPT, B, TRUE)],
            [(c.CKA_ENCRYPT, B, b"\x02")],  # non-canonical TRUE: Python canonicalises
            [(c.CKA_ENCRYPT, B, b"\x02\x00")],  # two bytes: as it is
            [(c.CKA_WRAP_TEMPLATE, B, b"xx")],  # bytes for an array attribute: refused
            [(c.CKA_WRAP_TEMPLATE, ValueKind.TEMPLATE, [(c.CKA_ENCRYPT, B, TRUE)])],
            [(c.CKA_VALUE_LEN, U, (1 << 64) - 1)],
            [(0x8000_0001, B, b"vendor")] * 33,  # more than fastpath.c takes
        ]
    out: list[Any] = []
    for template in templates:
        out.append(("FindObjectsInit", p.c.call("FindObjectsInit", s, template)))
        out.append(("FindObjects", p.c.call("FindObjects", s, 10)))
        out.append(("FindObjectsFinal", p.c.call("FindObjectsFinal", s)))
    return out


def hostile_script(p: Peer) -> list[Any]:
    """Bodies no honest client sends, for procedures the fast path serves."""
    s = p.session.to_bytes(8, "big")
    big = (0xFFFF_FFFF).to_bytes(4, "big")
    out = (64).to_bytes(8, "big") if p.version == 4 else b""
    bodies = [
        ("GetSessionInfo", b""), ("GetSessionInfo", s[:4]), ("GetSessionInfo", s + b"\0" * 4),
        ("GenerateRandom", s), ("GenerateRandom", s + (16).to_bytes(8, "big") + b"\0"),
        ("Digest", s + big), ("Digest", s + (5).to_bytes(4, "big") + b"abc"),
        ("Digest", s + (3).to_bytes(4, "big") + b"abc\0" + out + b"\0\0\0\0"),
        ("SignInit", s + (CKM_AES_CMAC).to_bytes(8, "big")),
        ("FindObjects", s), ("CloseSession", b"\0" * 7),
    ]
    results: list[Any] = [(name, body.hex(), p.raw(name, body)) for name, body in bodies]
    # Two whole calls in one send: the fast path hands both to Python, in order.
    number = NAMES_BY_VERSION[p.version]["GetSessionInfo"].number
    two = b"".join(rpc.frame(rpc.call(1000 + i, PROGRAM, p.version, number, s))
                   for i in range(2))
    p.c.send_raw(two)
    results.append(("pipelined", p.c.recv_record(), p.c.recv_record()))
    # A call of the other protocol version on this connection: PROG_MISMATCH.
    other = 3 if p.version == 4 else 4
    p.c.send_raw(rpc.frame(rpc.call(2000, PROGRAM, other, number, s)))
    results.append(("other version", p.c.recv_record()))
    # The connection still works.
    results.append(("after", p.c.call("GetSessionInfo", p.session)))
    return results


def pipeline_script(p: Peer) -> list[Any]:
    """Bursts of calls in one send, as a multi-threaded client pipelines them: long
    calls on several sessions (C runs them on its threads), calls on one session in
    order, a call for Python's path in the middle, a record split across sends.
    Replies may come in any order: they are compared by XID."""
    sessions = [p.session] + [p.c.call("OpenSession", p.slot, c.CKF_SERIAL_SESSION)[1]
                              for _ in range(2)]
    key = p.aes_key()
    xids = iter(range(5000, 6000))

    def record(name: str, *args: Any) -> bytes:
        proc = NAMES_BY_VERSION[p.version][name]
        body = CODECS_BY_VERSION[p.version][proc.number].args.encode(args)
        return rpc.frame(rpc.call(next(xids), PROGRAM, p.version, proc.number, body))

    def burst(records: list[bytes], split: int | None = None) -> list[Any]:
        data = b"".join(records)
        if split is None:
            p.c.send_raw(data)
        else:  # the last record arrives in two pieces
            p.c.send_raw(data[:split])
            time.sleep(0.05)
            p.c.send_raw(data[split:])
        replies = [p.c.recv_record() for _ in records]
        return sorted(replies)  # by XID (the first 4 bytes)

    data = bytes(range(48))
    per_session = [
        [record("DigestInit", s, p.mech(CKM_SHA256)), record("Digest", s, data, *p.out(64)),
         record("EncryptInit", s, p.mech(CKM_AES_ECB), key),
         record("Encrypt", s, data, *p.out(64)),
         record("SignInit", s, p.mech(CKM_AES_CMAC), key), record("Sign", s, data, *p.out(64))]
        for s in sessions
    ]
    interleaved = [r for row in zip(*per_session, strict=True) for r in row]
    results: list[Any] = [("interleaved", burst(interleaved))]
    # A call only Python serves (GetTokenInfo) between long calls: C hands it and
    # everything read after it to Python, after its own threads finished.
    mixed = [record("DigestInit", s, p.mech(CKM_SHA256)) for s in sessions]
    mixed += [record("Digest", sessions[0], data, *p.out(64)),
              record("GetTokenInfo", p.slot),
              record("Digest", sessions[1], data, *p.out(64)),
              record("GetSessionInfo", sessions[2]),
              record("Digest", sessions[2], data, *p.out(64))]
    results.append(("mixed", burst(mixed)))
    split = [record("DigestInit", s, p.mech(CKM_SHA256)) for s in sessions]
    split += [record("Digest", s, data, *p.out(64)) for s in sessions]
    results.append(("split", burst(split, split=len(b"".join(split)) - 10)))
    results.append(("after", p.c.call("GetSessionInfo", p.session)))
    return results


SCRIPTS: dict[str, Script] = {"crypto": crypto_script, "sessions": session_script,
                              "hostile": hostile_script, "find": find_script,
                              "pipeline": pipeline_script}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("version", [3, 4])
def test_fast_path_answers_like_python(servers: tuple[Server, Server], version: int,
                                       script: str) -> None:
    answers = []
    for server in servers:
        peer = Peer(server.address, version)
        try:
            answers.append(SCRIPTS[script](peer))
        finally:
            peer.c.close()
    fast, slow = answers
    assert len(fast) == len(slow)
    for got, want in zip(fast, slow, strict=True):
        assert got == want


def test_fast_path_leaves_a_32_bit_clients_templates_to_python(
        servers: tuple[Server, Server]) -> None:
    """A v3 client of another layout (32-bit): its templates are converted in Python,
    and the answers are the same."""
    answers = []
    for server in servers:
        peer = Peer(server.address, 3, arch=ARCH_LITTLE_ENDIAN_32)
        try:
            answers.append(find_script(peer))
        finally:
            peer.c.close()
    assert answers[0] == answers[1]


def test_fast_path_serves_the_calls(servers: tuple[Server, Server]) -> None:
    """The fast server really answers in C (its worker logs how many), the other not:
    GetSessionInfo in version 4, FindObjectsInit/Final with a native v3 template."""
    cls = c.CKO_SECRET_KEY.to_bytes(8, "little")
    for server in servers:
        peer = Peer(server.address, 4)
        for _ in range(50):
            assert peer.c.rv("GetSessionInfo", peer.session) == c.CKR_OK
        peer.c.close()
        peer = Peer(server.address, 3)
        for _ in range(25):
            assert peer.c.rv("FindObjectsInit", peer.session, [(c.CKA_CLASS, cls, 8)]) \
                == c.CKR_OK
            assert peer.c.rv("FindObjectsFinal", peer.session) == c.CKR_OK
        peer.c.close()
    fast, slow = servers
    fast.stop()
    slow.stop()
    assert "C fast path off" in slow.log_text()
    assert "C fast path unavailable" not in fast.log_text()
    served = re.findall(r"(\d+) calls answered, (\d+) of them by the C fast path",
                        fast.log_text())
    assert served and int(served[-1][1]) >= 50, fast.log_text()[-2000:]


def test_pipelined_long_calls_run_on_c_threads(servers: tuple[Server, Server]) -> None:
    """Calls that arrive together make C run the long ones on its own threads."""
    fast = servers[0]
    peer = Peer(fast.address, 4)
    pipeline_script(peer)
    peer.c.close()
    fast.stop()
    pooled = re.findall(r"by the C fast path \((\d+) on its threads\)", fast.log_text())
    assert pooled and int(pooled[-1]) > 0, fast.log_text()[-2000:]


def test_policy_units_keep_their_functions_in_python(token: Token, tmp_path: Path) -> None:
    """A function a policy unit acts on is never served in C: forbidden_mechanisms
    refuses CKM_SHA256 even though DigestInit has a fast-path shape."""
    server = start_server("p11guard", token, tmp_path / "policy",
                          filter_extra="forbidden_mechanisms = [(\"softhsm\", [CKM_SHA256])]\n")
    try:
        peer = Peer(server.address, 4)
        assert peer.c.rv("DigestInit", peer.session, peer.mech(CKM_SHA256)) \
            == c.CKR_MECHANISM_INVALID
        peer.c.close()
    finally:
        server.stop()


def test_plan_lists_only_unfiltered_functions() -> None:
    library = fastpath.load()
    assert library is not None, "native/server/build/libp11guard-fast.so missing"
    plan = library.plan(4, 0x1000, frozenset({"C_Sign", "C_GetSessionInfo"}), frozenset({43}),
                        output_slack=4096, max_list=1 << 20)
    numbers = {NAMES_BY_VERSION[4]["Sign"].number, NAMES_BY_VERSION[4]["GetSessionInfo"].number}
    assert set(plan.procs) == numbers
    assert plan.procs[43][1] == fastpath.FLAG_LONG


SANITIZERS = {
    # sanitizer: (runtime library, its options, scripts, rounds)
    "asan": ("libasan.so", {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0"},
             (hostile_script, crypto_script, pipeline_script), 1),
    # The pool's threads (pipelined long calls), several times over.
    "tsan": ("libtsan.so", {"TSAN_OPTIONS": "halt_on_error=0:report_signal_unsafe=0"},
             (pipeline_script,), 3),
}


@pytest.mark.skipif(not os.path.exists("/usr/bin/gcc"), reason="needs gcc")
@pytest.mark.parametrize("sanitizer", sorted(SANITIZERS))
def test_fast_path_under_sanitizer(token: Token, tmp_path: Path, sanitizer: str) -> None:
    """Call scripts against the AddressSanitizer and ThreadSanitizer builds."""
    runtime, options, scripts, rounds = SANITIZERS[sanitizer]
    subprocess.run(["make", "-s", "-C", str(REPO / "native" / "server"), sanitizer], check=True)
    preload = subprocess.run(["gcc", f"-print-file-name={runtime}"], capture_output=True,
                             text=True, check=True).stdout.strip()
    library = REPO / "native" / "server" / "build" / sanitizer / "libp11guard-fast.so"
    server = start(token, tmp_path / sanitizer, P11GUARD_FASTPATH_LIB=str(library),
                   LD_PRELOAD=preload, **options)
    try:
        for version in (3, 4):
            for script in scripts:
                for _ in range(rounds):
                    peer = Peer(server.address, version)
                    script(peer)
                    peer.c.close()
    finally:
        server.stop()
    log = server.log_text()
    assert "Sanitizer" not in log, log[-4000:]
    assert "C fast path unavailable" not in log
