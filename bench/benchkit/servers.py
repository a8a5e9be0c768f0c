"""Start and stop the servers under test: p11guard, Debian's pkcs11proxyd, p11-kit.

p11guard and pkcs11proxyd read the same Caml Crush style pkcs11proxyd.conf +
filter.conf, so one writer serves both; p11guard listens on TCP and on a Unix
socket at once (one server for the native client's two columns).  p11-kit's
server takes the module on its command line and listens on a Unix socket.
Servers listen on 127.0.0.1 or on Unix sockets inside the run's temporary
directory, run in their own session, and are stopped by the PID we started
(then their own process group, if they ignore SIGTERM).
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
P11KIT_SERVER = Path("/usr/libexec/p11-kit/p11-kit-server")
START_TIMEOUT = 20.0
TRANSPORTS = ("tcp", "unix")


class ServerError(RuntimeError):
    """A server that could not be started; the message says why (log tail)."""


@dataclass
class Server:
    """A running server and the addresses a client library needs."""

    name: str
    proc: subprocess.Popen[bytes]
    # transport -> "127.0.0.1:PORT" or a socket path (PKCS11PROXY_SOCKET_PATH)
    addresses: dict[str, str]
    log: Path

    @property
    def address(self) -> str:
        """The first address (the only one for pkcs11proxyd and p11-kit)."""
        return next(iter(self.addresses.values()))

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
                  transports: tuple[str, ...], filter_extra: str = ""
                  ) -> tuple[Path, dict[str, str]]:
    """Write filter.conf and pkcs11proxyd.conf; return the latter and the addresses.

    One listener per transport ("tcp": 127.0.0.1 on a free port, "unix": a
    socket in ``sockdir``).  ``sockdir`` must be a short path: Netplex puts
    its control sockets there, and a Unix socket path is limited to 107 bytes.
    ``filter_extra``: more filter.conf lines (a policy such as patchset 1).
    """
    netplex_dir = sockdir / "netplex"  # Caml Crush needs it writable
    netplex_dir.mkdir(parents=True, exist_ok=True)
    filter_conf = workdir / "filter.conf"
    filter_conf.write_text(
        "debug = 0\n"
        f'modules = [("{ALIAS}", "{token.module}")]\n'
        "log_subchannel = filter\n" + filter_extra
    )
    addresses: dict[str, str] = {}
    addr_conf = ""
    for transport in transports:
        if transport == "unix":
            addresses[transport] = str(sockdir / "p11.sock")
            addr_conf += f'address {{ type = "local"; path = "{addresses[transport]}"; }};\n'
        elif transport == "tcp":
            addresses[transport] = f"127.0.0.1:{free_tcp_port()}"
            addr_conf += (f'address {{ type = "internet"; '
                          f'bind = "{addresses[transport]}"; }};\n')
        else:
            raise ValueError(f"unknown transport {transport!r}")
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
    return conf, addresses


def start_server(name: str, cmd: list[str], workdir: Path, token: Token,
                 addresses: dict[str, str],
                 extra_env: dict[str, str] | None = None) -> Server:
    """Start ``cmd`` in ``workdir`` and wait until every address accepts connections."""
    env = token.env()
    env.update(extra_env or {})
    log = workdir / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = Server(name, proc, addresses, log)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if not server.alive():
            raise ServerError(
                f"{name} exited with status {proc.returncode}: {server.log_tail(1)}")
        if all(_reachable(a) for a in addresses.values()):
            return server
        time.sleep(0.05)
    server.stop()
    raise ServerError(f"{name} not listening on {', '.join(addresses.values())} after "
                      f"{START_TIMEOUT:.0f}s: {server.log_tail(1)}")


def camlcrush_command(conf: Path) -> list[str]:
    return [str(PKCS11PROXYD), "-fg", "-conf", str(conf)]


def p11guard_command(repo: Path, conf: Path) -> list[str]:
    python = repo / ".venv" / "bin" / "python"
    return [str(python), "-m", "p11guard", "serve", "--config", str(conf), "--foreground"]


def p11kit_command(module: str, socket_path: str) -> list[str]:
    """p11-kit's server in the foreground, exporting every token of ``module``.

    It forks (and execs p11-kit-remote) per connection, as p11guard does.
    """
    return [str(P11KIT_SERVER), "--provider", module, "-n", socket_path, "-f", "pkcs11:"]
