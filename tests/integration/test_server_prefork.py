"""Pre-forked spare workers, observed on a real server: the hand-off, the next spare,
the fall-back to fork-on-accept, a lost spare's replacement and back-off, the
connection limit, shutdown, and ``preload_modules = false``."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from p11guard.client import WireClient
from tests.support.net import free_tcp_port
from tests.support.pki import start_toml_server
from tests.support.servers import Server
from tests.support.softhsm import SOFTHSM_MODULE, Token

CKR_OK = 0
SOFTHSM_FILE = os.path.realpath(SOFTHSM_MODULE)  # as /proc/PID/maps names it
READY = re.compile(r"spare worker (\d+) ready after")
SERVES = re.compile(r"spare worker (\d+) serves (\S+)")
GONE = re.compile(r"spare worker (\d+) (?:killed by|exited with|stopped)")

# A "module" whose constructor exits: every spare that preloads it dies before it
# is ready, as with a library that cannot stand being loaded early.
CRASHING_MODULE_C = r"""
#include <unistd.h>
__attribute__((constructor)) static void refuse_to_load(void) { _exit(3); }
"""


def _config(port: int, sock: Path | None = None, *, server: str = "",
            modules: dict[str, str] | None = None) -> str:
    text = f'[server]\n{server}\n\n[[listen]]\ntcp = "127.0.0.1:{port}"\n'
    if sock is not None:
        text += f'\n[[listen]]\nunix = "{sock}"\n'
    text += "\n[modules]\n" + "".join(f'{alias} = "{path}"\n' for alias, path in
                                       (modules or {"softhsm": SOFTHSM_MODULE}).items())
    return text + '\n[policy]\npreset = "none"\n'


@pytest.fixture
def start(token: Token, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def run(toml_text: str, port: int) -> Server:
        server = start_toml_server(tmp_path / f"srv{len(started)}", toml_text, token.env,
                                   wait=f"127.0.0.1:{port}", extra_args=("--verbose",))
        started.append(server)
        # The readiness probe's connection (served by a spare, or a forked worker) is over.
        _wait("the probe's worker to finish", lambda: " done after " in server.log_text())
        return server

    yield run
    for server in started:
        server.stop()


def _wait(what: str, found: Callable[[], object], timeout: float = 20.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _idle_spares(server: Server) -> list[int]:
    """Spares that said they are ready and have neither served nor gone, oldest first."""
    log = server.log_text()
    used = {int(pid) for pid, _ in SERVES.findall(log)} | {int(p) for p in GONE.findall(log)}
    return [int(pid) for pid in READY.findall(log) if int(pid) not in used]


def _ready_spare(server: Server, other_than: set[int] | None = None) -> int:
    def spare() -> int | None:
        pids = [p for p in _idle_spares(server) if p not in (other_than or set())]
        return pids[-1] if pids else None

    return int(str(_wait("a ready spare worker", spare)))


def _handshake(c: WireClient) -> None:
    assert c.rv("SetupArch", 1) == 1
    assert c.rv("LoadModule", b"softhsm") == CKR_OK
    assert c.rv("Initialize") == CKR_OK
    rv, slots, _ = c.call("GetSlotList", 1, 16)
    assert rv == CKR_OK and slots


def _connected(server: Server) -> list[dict[str, object]]:
    return [json.loads(line) for line in server.log_text().splitlines()
            if line.startswith('{"event": "connected"')]


def _maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except PermissionError:  # not dumpable: /proc/PID/maps is root's
        pytest.skip("needs root to read a worker's memory map")


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0]
    except (OSError, IndexError):
        return "zombie"


def test_a_ready_spare_serves_the_next_connection_and_is_replaced(
        start: Callable[..., Server], tmp_path: Path) -> None:
    port = free_tcp_port()
    sock = tmp_path / "p11.sock"
    server = start(_config(port, sock), port)
    for address in (f"127.0.0.1:{port}", str(sock)):  # the listener's index is passed on
        spare = _ready_spare(server)
        assert SOFTHSM_FILE in _maps(spare), "the spare preloaded the module"
        assert _comm(spare) == "p11guard-spare"
        with WireClient.connect(address) as c:
            _handshake(c)
            assert _comm(spare) == "p11guard-worker"
            if c.sock.family == socket.AF_UNIX:
                peer = rf"unix:pid={os.getpid()},uid={os.getuid()},gid={os.getgid()}"
                audited = "unix"
            else:
                peer = audited = f"127.0.0.1:{c.sock.getsockname()[1]}"
            # The spare became this connection's worker, with the peer's right name.
            last = _connected(server)[-1]
            assert (last["pid"], last["peer"]) == (spare, audited)
            served = {int(pid): name for pid, name in SERVES.findall(server.log_text())}
            assert served[spare] == peer
            # ... and the listener has forked the next spare.
            assert _ready_spare(server, other_than={spare}) != spare


def test_without_spares_a_worker_is_forked_on_accept(start: Callable[..., Server]) -> None:
    port = free_tcp_port()
    server = start(_config(port, server="spare_workers = 0"), port)
    with WireClient.connect(f"127.0.0.1:{port}") as c:
        _handshake(c)
        pid = _connected(server)[-1]["pid"]
    server.stop()
    log = server.log_text()
    assert f"worker {pid} serves 127.0.0.1:" in log
    assert not READY.search(log)
    assert "0 by a spare worker" in log


def test_a_lost_spare_is_replaced(start: Callable[..., Server]) -> None:
    port = free_tcp_port()
    server = start(_config(port), port)
    spare = _ready_spare(server)
    os.kill(spare, signal.SIGKILL)
    replacement = _ready_spare(server, other_than={spare})
    assert replacement != spare
    assert f"spare worker {spare} killed by SIGKILL; next spare in 0.1s" in server.log_text()
    with WireClient.connect(f"127.0.0.1:{port}") as c:
        _handshake(c)
        assert _connected(server)[-1]["pid"] == replacement


@pytest.fixture
def crashing_module(tmp_path: Path) -> Path:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    src = tmp_path / "crash.c"
    src.write_text(CRASHING_MODULE_C)
    out = tmp_path / "libcrash.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    return out


def test_spares_that_keep_dying_back_off_and_connections_fall_back_to_fork(
        start: Callable[..., Server], crashing_module: Path) -> None:
    port = free_tcp_port()
    server = start(_config(port, modules={"softhsm": SOFTHSM_MODULE,
                                          "crash": str(crashing_module)}), port)
    # Each spare dies preloading the crashing module; the delay doubles.
    _wait("three lost spares", lambda: "exited with status 3; next spare in 0.4s"
          in server.log_text())
    log = server.log_text()
    assert "exited with status 3; next spare in 0.1s" in log
    assert "exited with status 3; next spare in 0.2s" in log
    assert not _idle_spares(server)
    # Meanwhile connections are served by workers forked on accept.
    with WireClient.connect(f"127.0.0.1:{port}") as c:
        _handshake(c)
        pid = _connected(server)[-1]["pid"]
    assert f"worker {pid} serves 127.0.0.1:" in server.log_text()
    assert server.proc.poll() is None


def test_spares_do_not_count_against_the_connection_limit(
        start: Callable[..., Server]) -> None:
    port = free_tcp_port()
    server = start(_config(port, server="max_connections = 2\nspare_workers = 2"), port)
    _wait("two ready spares", lambda: len(_idle_spares(server)) >= 2)
    a = WireClient.connect(f"127.0.0.1:{port}")
    b = WireClient.connect(f"127.0.0.1:{port}")
    try:
        _handshake(a)
        _handshake(b)
        _wait("two ready spares again", lambda: len(_idle_spares(server)) >= 2)
        with WireClient.connect(f"127.0.0.1:{port}") as third, pytest.raises(
                (ConnectionError, OSError)):
            third.call("SetupArch", 1)
        assert "max_connections" in server.log_text()
        # The spares are still waiting: the refusal did not consume one.
        assert len(_idle_spares(server)) >= 2
    finally:
        a.close()
        b.close()


def test_shutdown_stops_the_spares(start: Callable[..., Server]) -> None:
    port = free_tcp_port()
    server = start(_config(port, server="spare_workers = 3\nshutdown_grace = 1"), port)
    _wait("three ready spares", lambda: len(_idle_spares(server)) >= 3)
    spares = _idle_spares(server)
    with WireClient.connect(f"127.0.0.1:{port}") as c:
        _handshake(c)
        assert server.stop() == 0
    # The listener reaped them before it exited.
    assert [pid for pid in spares if _alive(pid)] == []
    log = server.log_text()
    assert "spare(s) lost" in log and ", 0 spare(s) lost" in log
    assert "killed by SIGTERM; next spare" not in log


def test_preload_off_loads_the_module_at_loadmodule(start: Callable[..., Server]) -> None:
    port = free_tcp_port()
    server = start(_config(port, server="preload_modules = false"), port)
    spare = _ready_spare(server)
    assert SOFTHSM_FILE not in _maps(spare)
    with WireClient.connect(f"127.0.0.1:{port}") as c:
        _handshake(c)
        assert _connected(server)[-1]["pid"] == spare
        assert SOFTHSM_FILE in _maps(spare)
