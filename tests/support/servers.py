"""Start and stop proxy servers for tests: p11guard and Debian's pkcs11proxyd.

Both read the same Caml Crush style ``pkcs11proxyd.conf`` + ``filter.conf``, which
is itself part of what we test (drop-in compatibility).  Servers bind to
127.0.0.1 or a Unix socket in the test's directory and are stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .net import free_tcp_port, wait_for_tcp, wait_for_unix
from .softhsm import Token

REPO = Path(__file__).resolve().parents[2]
P11GUARD = [sys.executable, "-m", "p11guard"]
PKCS11PROXYD = "/usr/bin/pkcs11proxyd"
CAMLCRUSH_CLIENT_DIR = Path("/usr/lib/x86_64-linux-gnu/caml-crush")
CAMLCRUSH_TCP = str(CAMLCRUSH_CLIENT_DIR / "libp11clienttcp.so")
CAMLCRUSH_UNIX = str(CAMLCRUSH_CLIENT_DIR / "libp11clientunix.so")
CAMLCRUSH_TLS = str(CAMLCRUSH_CLIENT_DIR / "libp11clienttcpssl.so")


@dataclass
class Server:
    """A running server process and how to reach it."""

    proc: subprocess.Popen[bytes]
    address: str  # "127.0.0.1:PORT" or a socket path: PKCS11PROXY_SOCKET_PATH
    alias: str
    log: Path
    workdir: Path

    def client_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("SOFTHSM2_CONF", None)  # the client must not need it
        env["PKCS11PROXY_SOCKET_PATH"] = self.address
        env["PKCS11PROXY_LIBNAME"] = self.alias
        env.update(extra)
        return env

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._wait_for_group()
        return self.proc.returncode

    def _wait_for_group(self, timeout: float = 5.0) -> None:
        """Wait until no process of the server's group is left (pkcs11proxyd's netplex
        children may outlive its controller by a moment, still holding the listening
        socket a restarted server would share the path of); then SIGKILL the rest."""
        deadline = time.monotonic() + timeout
        while _live_in_group(self.proc.pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                return
            time.sleep(0.02)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _live_in_group(pgid: int) -> bool:
    """Is a process of group ``pgid`` still running?  (Zombies do not count: in a
    container whose init does not reap, orphans stay zombies.)"""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def write_filter_conf(path: Path, alias: str, module: str, extra: str = "") -> Path:
    path.write_text(
        "debug = 0\n"
        f'modules = [("{alias}", "{module}")]\n'
        "log_subchannel = filter\n" + extra
    )
    return path


def write_netplex_conf(
    path: Path, filter_conf: Path, *, tcp_port: int | None = None, unix_path: Path | None = None,
    netplex_dir: Path, processor_extra: str = "",
) -> Path:
    if unix_path is not None:
        address = f'address {{ type = "local"; path = "{unix_path}"; }};'
    else:
        address = f'address {{ type = "internet"; bind = "127.0.0.1:{tcp_port}"; }};'
    path.write_text(f"""netplex {{
  controller {{ max_level = "debug"; socket_directory = "{netplex_dir}";
               logging {{ type = "stderr"; }}; }};
  service {{
    name = "PKCS#11 Filtering Proxy";
    conn_limit = 1;
    protocol {{ name = "rpc_pkcs11";
               {address} }};
    processor {{ type = "rpc_pkcs11"; filter_config = "{filter_conf}"; use_ssl = false;
                {processor_extra} }};
    workload_manager {{ type = "dynamic"; max_jobs_per_thread = 1; min_free_jobs_capacity = 1;
                       max_free_jobs_capacity = 1; max_threads = 100; }};
  }}
}}
""")
    return path


def start_server(
    kind: str, token: Token, workdir: Path, *, unix: bool = False, alias: str = "softhsm",
    filter_extra: str = "", debug_pkcs11: bool = False, extra_args: tuple[str, ...] = (),
) -> Server:
    """Start ``kind`` ("p11guard" or "camlcrush") serving ``token`` from a netplex config."""
    workdir.mkdir(parents=True, exist_ok=True)
    netplex_dir = workdir / "netplex"
    netplex_dir.mkdir(exist_ok=True)
    filter_conf = write_filter_conf(workdir / "filter.conf", alias, token.module, filter_extra)
    port = None if unix else free_tcp_port()
    sock = workdir / "p11.sock" if unix else None
    conf = write_netplex_conf(
        workdir / "pkcs11proxyd.conf", filter_conf, tcp_port=port, unix_path=sock,
        netplex_dir=netplex_dir,
    )
    log = workdir / f"{kind}.log"
    if kind == "p11guard":
        cmd = [*P11GUARD, "serve", "--config", str(conf), "--foreground"]
        if debug_pkcs11:
            cmd.append("--debug-pkcs11")
    elif kind == "camlcrush":
        cmd = [PKCS11PROXYD, "-fg", "-conf", str(conf)]
        if debug_pkcs11:
            cmd.append("-debug-pkcs11")
    else:
        raise ValueError(kind)
    cmd.extend(extra_args)
    env = token.env
    env.setdefault("PYTHONPATH", str(REPO / "src"))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    address = str(sock) if sock else f"127.0.0.1:{port}"
    server = Server(proc, address, alias, log, workdir)
    try:
        if sock is not None:
            wait_for_unix(sock)
        else:
            assert port is not None
            wait_for_tcp(port)
    except TimeoutError:
        server.stop()
        raise RuntimeError(f"{kind} did not start:\n{server.log_text()}") from None
    return server
