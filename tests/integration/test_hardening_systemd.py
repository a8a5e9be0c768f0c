"""systemd integration without systemd: socket activation and sd_notify, simulated.

The test plays the service manager: it binds the listening socket itself,
starts p11guard with the socket as descriptor 3 and LISTEN_FDS/LISTEN_PID set
(the pid is the server's own: a small exec wrapper sets it), and receives the
READY=1 / STOPPING=1 datagrams on its own NOTIFY_SOCKET.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from p11guard.client import WireClient
from tests.support.servers import REPO, Server
from tests.support.softhsm import SOFTHSM_MODULE, Token

CKR_OK = 0

# Put the inherited socket at fd 3, set LISTEN_PID to our pid, become the server.
EXEC_WRAPPER = (
    "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd); "
    "os.environ['LISTEN_FDS'] = '1'; os.environ['LISTEN_PID'] = str(os.getpid()); "
    "os.execv(sys.executable, [sys.executable, '-m', 'p11guard', *sys.argv[2:]])"
)


def test_socket_activation_and_readiness(tmp_path: Path, token: Token) -> None:
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    listening.listen(16)
    port = listening.getsockname()[1]
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = tmp_path / "notify.sock"
    notify.bind(str(notify_path))
    notify.settimeout(20)
    conf = tmp_path / "server.toml"
    # The configured address is the inherited one: it is adopted, not bound again
    # (binding it a second time would fail with EADDRINUSE).
    conf.write_text(f"""
[server]
shutdown_grace = 1
[[listen]]
tcp = "127.0.0.1:{port}"
[modules]
softhsm = "{SOFTHSM_MODULE}"
""")
    env = token.env
    env["PYTHONPATH"] = str(REPO / "src")
    env["NOTIFY_SOCKET"] = str(notify_path)
    log = tmp_path / "p11guard.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", EXEC_WRAPPER, str(listening.fileno()), "serve", "--config",
             str(conf), "--foreground"],
            pass_fds=(listening.fileno(),), env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    listening.close()  # the server holds it now
    server = Server(proc, f"127.0.0.1:{port}", "softhsm", log, tmp_path)
    try:
        ready = notify.recv(4096).decode()
        assert "READY=1" in ready and f"MAINPID={proc.pid}" in ready
        with WireClient.connect(server.address) as c:
            assert c.rv("SetupArch", 1) == 1
            assert c.rv("LoadModule", b"softhsm") == CKR_OK
            assert c.rv("Initialize") == CKR_OK
        assert "(from systemd)" in server.log_text()
    finally:
        server.stop()
    assert "STOPPING=1" in notify.recv(4096).decode()
    notify.close()


def test_unix_socket_activation_keeps_the_socket_file(tmp_path: Path, token: Token) -> None:
    """A Unix socket from systemd belongs to the socket unit: p11guard does not remove it."""
    path = tmp_path / "p11guard.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen(16)
    conf = tmp_path / "server.toml"
    conf.write_text(f"""
[[listen]]
unix = "{path}"
[modules]
softhsm = "{SOFTHSM_MODULE}"
""")
    env = token.env
    env["PYTHONPATH"] = str(REPO / "src")
    log = tmp_path / "p11guard.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", EXEC_WRAPPER, str(listening.fileno()), "serve", "--config",
             str(conf), "--foreground"],
            pass_fds=(listening.fileno(),), env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    listening.close()
    server = Server(proc, str(path), "softhsm", log, tmp_path)
    try:
        with WireClient.connect(str(path)) as c:  # connects even before the server is up
            assert c.rv("SetupArch", 1) == 1
            assert c.rv("LoadModule", b"softhsm") == CKR_OK
    finally:
        server.stop()
    assert path.exists(), server.log_text()
