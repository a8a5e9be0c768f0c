"""Protocol semantics against a live p11guard + SoftHSM2, with a Python wire client:
clients of other architectures, ordering rules, RPC errors, isolation, bad input."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p11guard.client import WireClient
from p11guard.wire import rpc
from p11guard.wire.codec import PROCEDURE_CODECS
from p11guard.wire.procedures import BY_NAME
from tests.support.servers import Server, start_server
from tests.support.softhsm import make_token

CKR_OK = 0
CKR_BUFFER_TOO_SMALL = 0x150
CKR_GENERAL_ERROR = 5
CKR_CRYPTOKI_NOT_INITIALIZED = 0x190
CKR_MECHANISM_PARAM_INVALID = 0x71
CKR_OBJECT_HANDLE_INVALID = 0x82
CKA_CLASS, CKA_TOKEN, CKA_VALUE, CKA_KEY_TYPE, CKA_LABEL = 0x0, 0x1, 0x11, 0x100, 0x3
CKA_VALUE_LEN, CKA_ENCRYPT, CKA_KEY_GEN_MECHANISM = 0x161, 0x104, 0x166
CKO_SECRET_KEY, CKK_AES = 4, 0x1F
CKM_AES_KEY_GEN, CKM_AES_GCM, CKM_AES_CBC_PAD = 0x1080, 0x1087, 0x1085
CKF_SERIAL_SESSION, CKF_RW_SESSION = 4, 2
CKU_USER = 1
MINUS_ONE = (1 << 64) - 1

ARCHES = {1: (8, "little"), 2: (4, "little"), 3: (8, "big"), 4: (4, "big")}


def ulong(value: int, arch: int) -> bytes:
    size, order = ARCHES[arch]
    return value.to_bytes(size, order)


def attr(t: int, v: bytes) -> tuple[int, bytes, int]:
    return (t, v, len(v))


def open_logged_in(c: WireClient, arch: int = 1) -> int:
    assert c.rv("SetupArch", arch) == 1  # the server's own code: x86-64 little-endian
    assert c.rv("LoadModule", b"softhsm") == CKR_OK
    assert c.rv("Initialize") == CKR_OK
    rv, slots, count = c.call("GetSlotList", 1, 0)
    assert rv == CKR_OK and slots == [] and count >= 1
    rv, slots, count = c.call("GetSlotList", 1, count)
    assert rv == CKR_OK and len(slots) == count
    rv, session = c.call("OpenSession", slots[0], CKF_SERIAL_SESSION | CKF_RW_SESSION)
    assert rv == CKR_OK
    assert c.rv("Login", session, CKU_USER, b"1234") == CKR_OK
    return int(session)


@pytest.mark.parametrize("arch", [1, 2, 3, 4], ids=["le64", "le32", "be64", "be32"])
def test_ulong_attributes_for_every_client_arch(p11guard_tcp: Server, arch: int) -> None:
    size = ARCHES[arch][0]
    with WireClient.connect(p11guard_tcp.address) as c:
        session = open_logged_in(c, arch)
        template = [
            attr(CKA_CLASS, ulong(CKO_SECRET_KEY, arch)),
            attr(CKA_KEY_TYPE, ulong(CKK_AES, arch)),
            attr(CKA_VALUE_LEN, ulong(32, arch)),
            attr(CKA_TOKEN, b"\0"),
            attr(CKA_ENCRYPT, b"\1"),
            attr(CKA_LABEL, b"arch-key"),
        ]
        rv, key = c.call("GenerateKey", session, (CKM_AES_KEY_GEN, b""), template)
        assert rv == CKR_OK
        # Length queries report the client's CK_ULONG size.
        rv, answer = c.call("GetAttributeValue", session, key,
                            [(CKA_CLASS, b"", 0), (CKA_LABEL, b"", 0)])
        assert rv == CKR_OK
        assert [a[2] for a in answer] == [size, 8]
        request = [(t, b"\0" * size, size)
                   for t in (CKA_CLASS, CKA_KEY_TYPE, CKA_VALUE_LEN, CKA_KEY_GEN_MECHANISM)]
        rv, answer = c.call("GetAttributeValue", session, key, request)
        assert rv == CKR_OK
        assert [a[1] for a in answer] == [ulong(v, arch) for v in
                                          (CKO_SECRET_KEY, CKK_AES, 32, CKM_AES_KEY_GEN)]
        # FindObjects with a client-format CKA_CLASS finds the key.
        assert c.rv("FindObjectsInit", session,
                    [attr(CKA_CLASS, ulong(CKO_SECRET_KEY, arch)),
                     attr(CKA_LABEL, b"arch-key")]) == CKR_OK
        rv, objects, count = c.call("FindObjects", session, 10)
        assert (rv, objects, count) == (CKR_OK, [key], 1)
        assert c.rv("FindObjectsFinal", session) == CKR_OK


def test_ordering_rules_and_rpc_errors(p11guard_tcp: Server) -> None:
    with WireClient.connect(p11guard_tcp.address) as c:
        # Before LoadModule: Initialize -> GENERAL_ERROR, others NOT_INITIALIZED.
        assert c.rv("Initialize") == CKR_GENERAL_ERROR
        assert c.rv("GetSlotList", 0, 0) == CKR_CRYPTOKI_NOT_INITIALIZED
        assert c.rv("SetupArch", 99) == 5  # unsupported: may retry
        assert c.rv("SetupArch", 1) == 1
        assert c.rv("SetupArch", 1) == MINUS_ONE  # at most once
        assert c.rv("LoadModule", b"nope") == CKR_GENERAL_ERROR
        assert c.rv("LoadModule", b"sofths") == CKR_GENERAL_ERROR  # exact alias only
        assert c.rv("LoadModule", b"softhsm") == CKR_OK
        assert c.rv("LoadModule", b"softhsm") == MINUS_ONE
        assert c.rv("Initialize") == CKR_OK
        assert c.rv("Initialize") == 0x191  # ALREADY_INITIALIZED, from the module
        # RPC-level errors, each answered, connection still usable.
        reply, _ = c.call_raw(71, b"")
        assert reply.accept_stat is rpc.AcceptStat.PROC_UNAVAIL
        reply, _ = c.call_raw(0, b"")
        assert reply.accept_stat is rpc.AcceptStat.PROC_UNAVAIL
        reply, _ = c.call_raw(16, b"", version=2)
        assert reply.accept_stat is rpc.AcceptStat.PROG_MISMATCH and reply.detail == (3, 3)
        reply, _ = c.call_raw(16, b"", program=5)
        assert reply.accept_stat is rpc.AcceptStat.PROG_UNAVAIL
        reply, _ = c.call_raw(BY_NAME["GetSessionInfo"].number, b"\0" * 12)
        assert reply.accept_stat is rpc.AcceptStat.GARBAGE_ARGS
        # AUTH_SYS is refused with AUTH_TOOWEAK, as Caml Crush does.
        record = bytearray(rpc.call(77, 4, 3, 5, b""))
        record[24:28] = (1).to_bytes(4, "big")
        c.send_raw(rpc.frame(bytes(record)))
        denied = rpc.parse_reply(c.recv_record())
        assert denied.reject_stat is rpc.RejectStat.AUTH_ERROR and denied.detail == (5,)
        # Count semantics of GetSlotList.
        rv, slots, n = c.call("GetSlotList", 0, 0)
        assert rv == CKR_OK and slots == [] and n >= 2
        rv, slots, n2 = c.call("GetSlotList", 0, 1)
        assert (rv, slots, n2) == (CKR_BUFFER_TOO_SMALL, [], n)
        assert c.rv("Finalize") == CKR_OK
        assert c.rv("Initialize") == CKR_OK


def test_pointer_parameters_refused_and_output_of_any_size(p11guard_tcp: Server) -> None:
    with WireClient.connect(p11guard_tcp.address) as c:
        session = open_logged_in(c)
        rv, key = c.call("GenerateKey", session, (CKM_AES_KEY_GEN, b""), [
            attr(CKA_VALUE_LEN, ulong(32, 1)), attr(CKA_TOKEN, b"\0"), attr(CKA_ENCRYPT, b"\1"),
            attr(0x105, b"\1")])
        assert rv == CKR_OK
        # A CK_GCM_PARAMS carrying client pointers never reaches the module.
        gcm = (0x7FFF00001000).to_bytes(8, "little") + (12).to_bytes(8, "little") * 2 + \
            (0x7FFF00002000).to_bytes(8, "little") + (0).to_bytes(8, "little") + \
            (128).to_bytes(8, "little")
        assert c.rv("EncryptInit", session, (CKM_AES_GCM, gcm), key) == \
            CKR_MECHANISM_PARAM_INVALID
        # Output far beyond Caml Crush's fixed 16 KiB buffers.
        iv = bytes(16)
        assert c.rv("EncryptInit", session, (CKM_AES_CBC_PAD, iv), key) == CKR_OK
        data = os.urandom(200_000)
        rv, ciphertext = c.call("Encrypt", session, data)
        assert rv == CKR_OK and len(ciphertext) == 200_016
        assert c.rv("DigestInit", session, (0x250, b"")) == CKR_OK
        rv, digest = c.call("Digest", session, data)
        assert rv == CKR_OK and len(digest) == 32
        rv, random_bytes = c.call("GenerateRandom", session, 100_000)
        assert rv == CKR_OK and len(random_bytes) == 100_000


def test_two_clients_cannot_see_each_others_session_objects(p11guard_tcp: Server) -> None:
    with WireClient.connect(p11guard_tcp.address) as a, \
            WireClient.connect(p11guard_tcp.address) as b:
        sa = open_logged_in(a)
        sb = open_logged_in(b)
        rv, key = a.call("GenerateKey", sa, (CKM_AES_KEY_GEN, b""), [
            attr(CKA_VALUE_LEN, ulong(16, 1)), attr(CKA_TOKEN, b"\0"),
            attr(CKA_LABEL, b"private-to-a")])
        assert rv == CKR_OK
        assert b.rv("FindObjectsInit", sb, [attr(CKA_LABEL, b"private-to-a")]) == CKR_OK
        rv, objects, _ = b.call("FindObjects", sb, 10)
        assert rv == CKR_OK and objects == []
        rv, _ = b.call("GetAttributeValue", sb, key, [(CKA_LABEL, b"", 0)])
        assert rv == CKR_OBJECT_HANDLE_INVALID
        # b's own view of the session does not include a's session either.
        rv, _info = b.call("GetSessionInfo", sa)
        assert rv != CKR_OK or sa == sb


def _workers_of(server: Server) -> set[int]:
    """The listener's children but its pre-forked spares (named p11guard-spare)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == server.proc.pid and "(p11guard-spare)" not in stat:
                out.add(int(entry.name))
    return out


def _wait_no_workers(server: Server, timeout: float = 10.0) -> set[int]:
    deadline = time.monotonic() + timeout
    workers = _workers_of(server)
    while workers and time.monotonic() < deadline:
        time.sleep(0.05)
        workers = _workers_of(server)
    return workers


def test_client_disconnect_mid_session_leaves_no_worker(p11guard_tcp: Server) -> None:
    c = WireClient.connect(p11guard_tcp.address)
    session = open_logged_in(c)
    assert c.rv("SignInit", session, (0x1, b""), 12345) != CKR_OK
    assert _workers_of(p11guard_tcp), "a worker serves the connection"
    c.close()
    assert _wait_no_workers(p11guard_tcp) == set()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("fuzz")
    server = start_server("p11guard", make_token(root / "softhsm"), root / "srv")
    yield server
    server.stop()


_VALID_RECORDS = [
    rpc.call(1, 4, 3, 2, PROCEDURE_CODECS[2].args.encode((1,))),
    rpc.call(2, 4, 3, 70, PROCEDURE_CODECS[70].args.encode((b"softhsm",))),
    rpc.call(3, 4, 3, 3, b""),
    rpc.call(4, 4, 3, 23, PROCEDURE_CODECS[23].args.encode((1, [(0, b"\1" * 8, 8)] * 3))),
    rpc.call(5, 4, 3, 31, PROCEDURE_CODECS[31].args.encode((1, 2, [(3, b"", 0)]))),
]


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out)


def _exchange(server: Server, payload: bytes) -> None:
    host, port = server.address.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        try:
            while s.recv(65536):
                pass
        except (ConnectionResetError, TimeoutError):
            pass


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    records=st.lists(st.sampled_from(_VALID_RECORDS), min_size=1, max_size=5),
    edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=12),
    noise=st.binary(max_size=300),
    framing=st.sampled_from(["frame", "raw", "split"]),
)
def test_live_server_survives_mutated_records(
    fuzz_server: Server, records: list[bytes], edits: list[tuple[int, int]], noise: bytes,
    framing: str,
) -> None:
    """Random and mutated records: the listener lives, workers answer or close."""
    body = b"".join(_mutate(r, edits) if edits else r for r in records)
    if framing == "frame":
        payload = b"".join(rpc.frame(_mutate(r, edits)) for r in records) + noise
    elif framing == "split":
        payload = rpc.frame(body + noise, max_fragment=7)
    else:
        payload = body + noise
    _exchange(fuzz_server, payload)
    assert fuzz_server.proc.poll() is None, "the listener died"


def test_live_server_bounded_after_fuzzing(fuzz_server: Server) -> None:
    before = _rss_kib(fuzz_server.proc.pid)
    # A huge announced record is refused without being buffered.
    host, port = fuzz_server.address.split(":")
    for _ in range(20):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall((0x80000000 | 0x7FFFFFF0).to_bytes(4, "big") + b"x" * 100_000)
            s.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(100) == b""
    assert _wait_no_workers(fuzz_server) == set()
    assert _rss_kib(fuzz_server.proc.pid) - before < 2048, "the listener's memory grew"
    with WireClient.connect(fuzz_server.address) as c:
        open_logged_in(c)
