"""Server life cycle: TOML config, several listeners, daemon mode + pid file, connection
limit, graceful SIGTERM, `make run`'s demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from p11guard.client import WireClient
from tests.support.net import free_tcp_port, wait_for_tcp, wait_for_unix
from tests.support.softhsm import SOFTHSM_MODULE, Token

REPO = Path(__file__).resolve().parents[2]


def _env(token: Token) -> dict[str, str]:
    env = token.env
    env["PYTHONPATH"] = str(REPO / "src")
    return env


def _write_toml(path: Path, body: str) -> Path:
    path.write_text(body + f'\n[modules]\nsofthsm = "{SOFTHSM_MODULE}"\n'
                    '\n[policy]\npreset = "none"\n')
    return path


def _handshake(c: WireClient) -> None:
    assert c.rv("SetupArch", 1) == 1
    assert c.rv("LoadModule", b"softhsm") == 0
    assert c.rv("Initialize") == 0


def _wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_toml_config_tcp_and_unix_listeners_at_once(token: Token, tmp_path: Path) -> None:
    port = free_tcp_port()
    sock = tmp_path / "p11.sock"
    conf = _write_toml(tmp_path / "p11guard.toml",
                       f'[[listen]]\ntcp = "127.0.0.1:{port}"\n\n'
                       f'[[listen]]\nunix = "{sock}"\nmode = "0600"\n')
    proc = subprocess.Popen([sys.executable, "-m", "p11guard", "serve", "--config", str(conf),
                             "--foreground"], env=_env(token), stderr=subprocess.PIPE)
    try:
        wait_for_tcp(port)
        wait_for_unix(sock)
        assert (sock.stat().st_mode & 0o777) == 0o600
        for address in (f"127.0.0.1:{port}", str(sock)):
            with WireClient.connect(address) as c:
                _handshake(c)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert not sock.exists(), "the Unix socket file is removed on exit"
    assert b"stopped:" in err


def test_daemon_mode_writes_and_removes_pid_file(token: Token, tmp_path: Path) -> None:
    port = free_tcp_port()
    conf = _write_toml(tmp_path / "p11guard.toml", f'[[listen]]\ntcp = "127.0.0.1:{port}"\n')
    pid_file = tmp_path / "p11guard.pid"
    subprocess.run([sys.executable, "-m", "p11guard", "serve", "--config", str(conf),
                    "--pid-file", str(pid_file)], env=_env(token), check=True, timeout=30)
    wait_for_tcp(port)
    pid = int(pid_file.read_text())
    try:
        with WireClient.connect(f"127.0.0.1:{port}") as c:
            _handshake(c)
    finally:
        os.kill(pid, signal.SIGTERM)
    assert _wait_gone(pid)
    assert not pid_file.exists()


def test_connection_limit_and_graceful_sigterm(token: Token, tmp_path: Path) -> None:
    port = free_tcp_port()
    conf = _write_toml(tmp_path / "p11guard.toml",
                       f'[[listen]]\ntcp = "127.0.0.1:{port}"\n\n'
                       "[server]\nmax_connections = 2\nshutdown_grace = 1\n")
    proc = subprocess.Popen([sys.executable, "-m", "p11guard", "serve", "--config", str(conf),
                             "--foreground"], env=_env(token), stderr=subprocess.PIPE)
    try:
        wait_for_tcp(port)
        time.sleep(0.3)  # the probe connection's worker goes away
        a = WireClient.connect(f"127.0.0.1:{port}")
        b = WireClient.connect(f"127.0.0.1:{port}")
        _handshake(a)
        _handshake(b)
        third = WireClient.connect(f"127.0.0.1:{port}")
        try:
            third.call("SetupArch", 1)
            refused = False
        except (ConnectionError, OSError):
            refused = True
        assert refused, "a third connection is closed at once"
        third.close()
        # SIGTERM with clients connected: the listener stops, workers are stopped
        # after the grace period and finalize their modules.
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        a.close()
        b.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert b"max_connections" in err
    assert b"3 connection(s) served, 1 refused" in err  # the readiness probe + a + b


def test_make_run_demo_shows_a_client_using_the_proxy(tmp_path: Path) -> None:
    port = free_tcp_port()
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    out = subprocess.run([sys.executable, "-m", "p11guard", "demo", "--once", "--port",
                          str(port)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Signature is valid" in out.stdout
    assert "p11guard-demo" in out.stdout
