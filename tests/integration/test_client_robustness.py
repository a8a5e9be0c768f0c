"""libp11guard.so never crashes and fails cleanly: argument checks on every function,
a hostile server (under ASan and valgrind), server kill/restart, fork, threads, bad
configuration and timeouts."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.native.hostile_server import Hostile
from tests.native.support import (
    LIB,
    build_all,
    run_driver,
    run_restart_scenario,
    sanitizer_report,
)
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


def _ok(proc: subprocess.CompletedProcess[str], done: str) -> None:
    report = sanitizer_report(proc)
    assert report is None, report
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert done in proc.stdout, proc.stdout
    assert "FAIL" not in proc.stdout, proc.stdout


def test_exports_only_pkcs11_symbols() -> None:
    out = subprocess.run(["nm", "-D", "--defined-only", str(LIB)], capture_output=True,
                         text=True, check=True).stdout
    names = [line.split()[-1] for line in out.splitlines() if line.strip()]
    assert names and all(n.startswith("C_") for n in names), names
    assert {"C_GetFunctionList", "C_GetInterfaceList", "C_GetInterface"} <= set(names)
    assert len([n for n in names if n.startswith("C_")]) == 68 + 24


def test_arguments_and_length_queries(proxy: Server) -> None:
    """NULL and too-small arguments on every function, under ASan."""
    _ok(run_driver(["args"], proxy.client_env(), asan=True), "args done, 0 failures")


def test_concurrent_threads(proxy: Server) -> None:
    _ok(run_driver(["threads", "6", "150"], proxy.client_env(), asan=True),
        "threads done, 0 bad results")


def test_fork_with_and_without_initialize(proxy: Server) -> None:
    _ok(run_driver(["fork"], proxy.client_env(), asan=True), "fork done, 0 failures")


@pytest.mark.parametrize("kind", SERVERS)
def test_kill_and_restart_server(token: Token, tmp_path: Path, kind: str) -> None:
    work = tmp_path / kind
    server = start_server(kind, token, work, unix=True)
    env = server.client_env(PKCS11PROXY_RPC_TIMEOUT="5")
    # server.stop() kills the controller and with it the worker serving us.
    try:
        result, restarted = run_restart_scenario(
            env, server.stop, lambda: start_server(kind, token, work, unix=True))
    finally:
        server.stop()  # already stopped unless the driver failed before
    restarted.stop()
    _ok(result, "restart done, 0 failures")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_hostile_server_asan(seed: int) -> None:
    hostile = Hostile(seed=seed, stall=1.5).start()
    try:
        env = dict(os.environ, PKCS11PROXY_SOCKET_PATH=f"127.0.0.1:{hostile.port}",
                   PKCS11PROXY_LIBNAME="x", PKCS11PROXY_RPC_TIMEOUT="1")
        proc = run_driver(["storm", "2500"], env, asan=True, timeout=600)
    finally:
        hostile.stop()
    _ok(proc, "storm done 2500 calls, 0 failures")
    assert hostile.connections > 10  # it reconnected after every broken stream


def test_hostile_server_valgrind() -> None:
    hostile = Hostile(seed=9, stall=1.5).start()
    try:
        env = dict(os.environ, PKCS11PROXY_SOCKET_PATH=f"127.0.0.1:{hostile.port}",
                   PKCS11PROXY_LIBNAME="x", PKCS11PROXY_RPC_TIMEOUT="1")
        proc = run_driver(["storm", "600"], env, valgrind=True, timeout=600)
    finally:
        hostile.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    assert "storm done 600 calls, 0 failures" in proc.stdout


@pytest.mark.parametrize(
    ("address", "libname", "want"),
    [
        ("127.0.0.1", "softhsm", 0x30),  # no port: a Unix path, as in Caml Crush
        ("127.0.0.1:99999", "softhsm", 0x5),  # bad port
        ("a:b:c", "softhsm", 0x5),  # third field
        ("gopher://x:1", "softhsm", 0x5),  # unknown scheme
        ("nonexistent.invalid:14444", "softhsm", 0x30),  # unresolvable
        ("127.0.0.1:1", "softhsm", 0x30),  # nothing listening
        ("/nonexistent/p11.sock", "softhsm", 0x30),
        ("127.0.0.1:1", "", 0x30),  # no module name anywhere
    ],
)
def test_bad_configuration(tmp_path: Path, address: str, libname: str, want: int) -> None:
    env = dict(os.environ, PKCS11PROXY_SOCKET_PATH=address, PKCS11PROXY_LIBNAME=libname,
               HOME=str(tmp_path))
    proc = run_driver(["init"], env, asan=True, timeout=60)
    assert sanitizer_report(proc) is None
    assert proc.returncode == 0
    assert f"init rv=0x{want:x} slotlist rv=0x190" in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("p11guard:")]
    assert len(lines) == 1, proc.stderr


def test_libname_file(proxy: Server, tmp_path: Path) -> None:
    (tmp_path / ".camlcrushlibname").write_text(proxy.alias + "\n")
    env = proxy.client_env(HOME=str(tmp_path))
    del env["PKCS11PROXY_LIBNAME"]
    proc = run_driver(["init"], env)
    assert "init rv=0x0 slotlist rv=0x0" in proc.stdout


def test_unknown_alias(proxy: Server) -> None:
    proc = run_driver(["init"], proxy.client_env(PKCS11PROXY_LIBNAME="nosuchalias"))
    assert "init rv=0x30 slotlist rv=0x190" in proc.stdout


def test_silent_server_times_out() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        env = dict(os.environ, PKCS11PROXY_SOCKET_PATH=f"127.0.0.1:{port}",
                   PKCS11PROXY_LIBNAME="x", PKCS11PROXY_RPC_TIMEOUT="2")
        start = time.monotonic()
        proc = run_driver(["init"], env)
        elapsed = time.monotonic() - start
    assert "init rv=0x30" in proc.stdout
    assert 1.5 < elapsed < 10
