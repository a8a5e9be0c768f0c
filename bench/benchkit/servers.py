"""Start and stop the proxy servers under test: p11guard and Debian's pkcs11proxyd.

Both read the same Caml Crush style pkcs11proxyd.conf + filter.conf, so one
writer serves both.  Servers listen on 127.0.0.1 or on a Unix socket inside
the run's temporary directory, run in their own session, and are stopped by
the PID we started (then their own process group, if they ignore SIGTERM).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .softhsm import Token

ALIAS = "softhsm"
PKCS11PROXYD = Path("/usr/bin/pkcs11proxyd")
START_TIMEOUT = 20.0


class ServerError(RuntimeError):
    """A server that could not be started; the message says why (log tail)."""


@dataclass
class Server:
    """A running server and the address a client library needs."""

    name: str
    proc: subprocess.Popen[bytes]
    address: str  # "127.0.0.1:PORT" or a socket path (PKCS11PROXY_SOCKET_PATH)
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                pass
            # start_new_session made the server the leader of its own group:
            # this reaches its workers and nothing else.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _reachable(address: str) -> bool:
    try:
        if address.startswith("/"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                s.connect(address)
        else:
            host, port = address.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=0.5):
                pass
    except OSError:
        return False
    return True


def write_configs(workdir: Path, sockdir: Path, token: Token, *,
                  unix: bool, filter_extra: str = "") -> tuple[Path, str]:
    """Write filter.conf and pkcs11proxyd.conf; return the latter and the address.

    ``sockdir`` must be a short path: Netplex puts its control sockets there,
    and a Unix socket path is limited to 107 bytes.  ``filter_extra``: more
    filter.conf lines (a policy such as patchset 1).
    """
    netplex_dir = sockdir / "netplex"  # Caml Crush needs it writable
    netplex_dir.mkdir(parents=True, exist_ok=True)
    filter_conf = workdir / "filter.conf"
    filter_conf.write_text(
        "debug = 0\n"
        f'modules = [("{ALIAS}", "{token.module}")]\n'
        "log_subchannel = filter\n" + filter_extra
    )
    if unix:
        address = str(sockdir / "p11.sock")
        addr_conf = f'address {{ type = "local"; path = "{address}"; }};'
    else:
        address = f"127.0.0.1:{free_tcp_port()}"
        addr_conf = f'address {{ type = "internet"; bind = "{address}"; }};'
    conf = workdir / "pkcs11proxyd.conf"
    # The same shape as Debian's shipped file: one connection per worker,
    # one idle worker pre-forked.
    conf.write_text(f"""netplex {{
  controller {{ max_level = "notice"; socket_directory = "{netplex_dir}";
               logging {{ type = "stderr"; }}; }};
  service {{
    name = "PKCS#11 Filtering Proxy";
    conn_limit = 1;
    protocol {{ name = "rpc_pkcs11";
               {addr_conf} }};
    processor {{ type = "rpc_pkcs11"; filter_config = "{filter_conf}"; use_ssl = false; }};
    workload_manager {{ type = "dynamic"; max_jobs_per_thread = 1; min_free_jobs_capacity = 1;
                       max_free_jobs_capacity = 1; max_threads = 100; }};
  }}
}}
""")
    return conf, address


def start_server(name: str, cmd: list[str], workdir: Path, token: Token, address: str,
                 extra_env: dict[str, str] | None = None) -> Server:
    """Start ``cmd`` in ``workdir`` and wait until ``address`` accepts connections."""
    env = token.env()
    env.update(extra_env or {})
    log = workdir / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = Server(name, proc, address, log)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if not server.alive():
            raise ServerError(
                f"{name} exited with status {proc.returncode}: {server.log_tail(1)}")
        if _reachable(address):
            return server
        time.sleep(0.05)
    server.stop()
    raise ServerError(f"{name} not listening on {address} after {START_TIMEOUT:.0f}s: "
                      f"{server.log_tail(1)}")


def camlcrush_command(conf: Path) -> list[str]:
    return [str(PKCS11PROXYD), "-fg", "-conf", str(conf)]


def p11guard_command(repo: Path, conf: Path) -> list[str]:
    python = repo / ".venv" / "bin" / "python"
    return [str(python), "-m", "p11guard", "serve", "--config", str(conf), "--foreground"]
