"""The ways of reaching the same SoftHSM2 token that the benchmark compares.

A  direct       p11bench loads SoftHSM2 itself (the floor every proxy is measured against)
B  p11guard     Debian's Caml Crush client library -> p11guard server
C  camlcrush    Debian's Caml Crush client library -> Debian's pkcs11proxyd
D  native       our libp11guard.so -> p11guard server over TCP (127.0.0.1)
H  native-unix  our libp11guard.so -> the same p11guard server over its Unix socket
I  p11kit       Debian's p11-kit-client.so -> p11-kit-server (Unix socket only)
J  echo-tcp     no PKCS#11: a bare C request/reply echo over TCP loopback
K  echo-unix    the same over a Unix socket

B and C use the Caml Crush client over TCP, or over a Unix socket with
``--transport unix``.  J and K are the floor of one round trip: they are only
run on the ``sessioninfo`` row, with the call and reply sizes of GetSessionInfo.

E, F, G are B, C, D with a policy in filter.conf (Caml Crush's patchset 1 unless
told otherwise): "p11guard+ps1", "camlcrush+ps1", "native+ps1".  They are not in
the default set; ``run.py --patchset1`` adds the twin of every selected proxy.
B, C, D and H run their servers pass-through (no filter action).

A target that cannot be set up keeps a reason and is reported as unavailable;
it never stops the others.  An op a target cannot do at all (p11-kit and
AES-CBC) is a *gap*: probed once, then reported as n/a with the reason.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import servers
from .softhsm import Token

CAMLCRUSH_LIB_DIR = Path("/usr/lib/x86_64-linux-gnu/caml-crush")
P11KIT_CLIENT = Path("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so")
DEFAULT_TARGETS = ("direct", "p11guard", "camlcrush", "native", "native-unix", "p11kit",
                   "echo-tcp", "echo-unix")
POLICY_SUFFIX = "+ps1"
# The twin of each proxy target with the policy on, and the pass-through target it
# is compared with.
POLICY_TWINS = {f"{name}{POLICY_SUFFIX}": name for name in ("p11guard", "camlcrush", "native")}
ALL_TARGETS = DEFAULT_TARGETS + tuple(POLICY_TWINS)
LETTERS = {"direct": "A", "p11guard": "B", "camlcrush": "C", "native": "D",
           "p11guard+ps1": "E", "camlcrush+ps1": "F", "native+ps1": "G",
           "native-unix": "H", "p11kit": "I", "echo-tcp": "J", "echo-unix": "K"}
TITLES = {
    "direct": "direct SoftHSM2",
    "p11guard": "p11guard (CC client)",
    "camlcrush": "Caml Crush",
    "native": "p11guard (native, TCP)",
    "native-unix": "p11guard (native, Unix)",
    "p11kit": "p11-kit (Unix)",
    "echo-tcp": "C echo (TCP)",
    "echo-unix": "C echo (Unix)",
    "p11guard+ps1": "p11guard + patchset 1 (CC client)",
    "camlcrush+ps1": "Caml Crush + patchset 1",
    "native+ps1": "p11guard + patchset 1 (native client)",
}
# The echo targets stand next to this op: the cheapest call, pure round trip.
ECHO_OP = "sessioninfo"
# Ops a target is known not to support; probed once per run (so a fixed
# release is measured), reported as n/a with this reason when the probe fails.
KNOWN_GAPS = {
    ("p11kit", "aescbc"): "p11-kit 0.24's RPC does not marshal the CKM_AES_CBC IV, so "
                          "C_EncryptInit fails (CKR_MECHANISM_INVALID)",
}
PATCHSET1_CONF = Path(__file__).resolve().parent / "patchset1.conf"


@dataclass
class Target:
    """How p11bench reaches the token for one column of the table."""

    name: str
    module: str = ""
    env: dict[str, str] = field(default_factory=dict)
    transport: str | None = None  # "tcp", "unix", None (in-process)
    unavailable: str | None = None  # why, when the target cannot be measured
    gaps: dict[str, str] = field(default_factory=dict)  # op -> why it is n/a
    server: str | None = None  # key of the server in Setup.servers

    @property
    def letter(self) -> str:
        return LETTERS[self.name]

    @property
    def title(self) -> str:
        return TITLES[self.name]

    @property
    def is_echo(self) -> bool:
        return self.name.startswith("echo-")

    def runs(self, op: str) -> bool:
        """Whether (op, self) is measured: echo only on its row, gaps never."""
        if self.unavailable or op in self.gaps:
            return False
        return op == ECHO_OP if self.is_echo else True

    def shows(self, op: str) -> bool:
        """Whether the table has a cell for (op, self); echo has one row only."""
        return op == ECHO_OP if self.is_echo else True


def client_env(address: str) -> dict[str, str]:
    """What a Caml Crush style client needs; SOFTHSM2_CONF is removed on purpose."""
    env = dict(os.environ)
    env.pop("SOFTHSM2_CONF", None)
    env["PKCS11PROXY_SOCKET_PATH"] = address
    env["PKCS11PROXY_LIBNAME"] = servers.ALIAS
    return env


def p11kit_env(socket_path: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SOFTHSM2_CONF", None)
    env["P11_KIT_SERVER_ADDRESS"] = f"unix:path={socket_path}"
    return env


def native_transport(name: str, cc_transport: str) -> str:
    """The transport of a target: what ratio columns and goals pair up by."""
    base = POLICY_TWINS.get(name, name)
    if base in ("native", "echo-tcp"):
        return "tcp"
    if base in ("native-unix", "p11kit", "echo-unix"):
        return "unix"
    return cc_transport


class Setup:
    """Builds the requested targets and owns the servers they need."""

    def __init__(self, repo: Path, workdir: Path, token: Token, *, unix: bool,
                 log: Callable[[str], None], policy: str = "") -> None:
        """``unix``: the Caml Crush client targets (B, C, E, F) use
        libp11clientunix.so.  ``policy``: the filter.conf lines of the "+ps1"
        targets' servers (default: Caml Crush's patchset 1, ``patchset1.conf``)."""
        self.repo = repo
        self.policy = policy or PATCHSET1_CONF.read_text()
        self.workdir = workdir
        self.token = token
        self.unix = unix
        self.log = log
        self.servers: dict[str, servers.Server] = {}
        # Socket paths are length-limited: keep them in a short directory of
        # our own, whatever the length of workdir.
        self.sockdir = Path(tempfile.mkdtemp(prefix="p11b-", dir="/tmp"))
        self._server_errors: dict[str, str] = {}

    @property
    def cc_transport(self) -> str:
        return "unix" if self.unix else "tcp"

    @property
    def camlcrush_client(self) -> Path:
        name = "libp11clientunix.so" if self.unix else "libp11clienttcp.so"
        return CAMLCRUSH_LIB_DIR / name

    @property
    def native_client(self) -> Path:
        return self.repo / "native" / "client" / "build" / "libp11guard.so"

    def _start(self, key: str, cmd: list[str], workdir: Path, addresses: dict[str, str],
               extra: dict[str, str]) -> servers.Server | str:
        self.log(f"starting {key} server on {', '.join(addresses.values())}")
        try:
            server = servers.start_server(key, cmd, workdir, self.token, addresses, extra)
        except servers.ServerError as exc:
            self._server_errors[key] = str(exc)
            return self._server_errors[key]
        self.servers[key] = server
        return server

    def _server(self, kind: str, policy: bool = False) -> servers.Server | str:
        """The running server of ``kind`` ("p11guard"/"camlcrush"/"p11kit"), with the
        policy or pass-through, or why there is none."""
        key = kind + (POLICY_SUFFIX if policy else "")
        if key in self.servers:
            return self.servers[key]
        if key in self._server_errors:
            return self._server_errors[key]
        workdir = self.workdir / f"server-{key}"
        workdir.mkdir(parents=True, exist_ok=True)
        sockdir = self.sockdir / (kind[:2] + ("p" if policy else ""))
        sockdir.mkdir(parents=True, exist_ok=True)
        if kind == "p11kit":
            if not servers.P11KIT_SERVER.exists():
                self._server_errors[key] = f"{servers.P11KIT_SERVER} not installed"
                return self._server_errors[key]
            addresses = {"unix": str(sockdir / "p11kit.sock")}
            cmd = servers.p11kit_command(self.token.module, addresses["unix"])
            return self._start(key, cmd, workdir, addresses, {})
        # p11guard serves the native client's TCP and Unix columns from one process.
        transports = (self.cc_transport,) if kind == "camlcrush" else servers.TRANSPORTS
        conf, addresses = servers.write_configs(
            workdir, sockdir, self.token, transports=transports,
            filter_extra=self.policy if policy else "")
        if kind == "camlcrush":
            if not servers.PKCS11PROXYD.exists():
                self._server_errors[key] = f"{servers.PKCS11PROXYD} not installed"
                return self._server_errors[key]
            return self._start(key, servers.camlcrush_command(conf), workdir, addresses, {})
        cmd = servers.p11guard_command(self.repo, conf)
        if not Path(cmd[0]).exists():
            self._server_errors[key] = f"{cmd[0]} missing (no venv)"
            return self._server_errors[key]
        return self._start(key, cmd, workdir, addresses,
                           {"PYTHONPATH": str(self.repo / "src")})

    def build(self, name: str) -> Target:
        target = Target(name, transport=native_transport(name, self.cc_transport))
        policy = name in POLICY_TWINS
        base = POLICY_TWINS.get(name, name)
        if base == "direct":
            target.transport = None
            target.module = self.token.module
            target.env = self.token.env()
            return target
        if target.is_echo:
            target.env = dict(os.environ)
            return target
        if base == "p11kit":
            if not P11KIT_CLIENT.exists():
                target.unavailable = f"{P11KIT_CLIENT} not installed"
                return target
            target.module = str(P11KIT_CLIENT)
        elif base in ("native", "native-unix"):
            if not self.native_client.exists():
                target.unavailable = f"{self.native_client.relative_to(self.repo)} not built"
                return target
            target.module = str(self.native_client)
        else:
            if not self.camlcrush_client.exists():
                target.unavailable = f"{self.camlcrush_client} not installed"
                return target
            target.module = str(self.camlcrush_client)
        kind = {"camlcrush": "camlcrush", "p11kit": "p11kit"}.get(base, "p11guard")
        server = self._server(kind, policy)
        if isinstance(server, str):
            target.unavailable = server
            return target
        target.server = server.name
        address = server.addresses[target.transport or "tcp"]
        target.env = p11kit_env(address) if kind == "p11kit" else client_env(address)
        for (gap_target, op), reason in KNOWN_GAPS.items():
            if gap_target == base:
                target.gaps[op] = reason  # until the probe shows otherwise
        return target

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.servers.clear()
        shutil.rmtree(self.sockdir, ignore_errors=True)
