"""The ways of reaching the same SoftHSM2 token that the benchmark compares.

A  direct     p11bench loads SoftHSM2 itself (the floor every proxy is measured against)
B  p11guard   Debian's Caml Crush client library -> p11guard server
C  camlcrush  Debian's Caml Crush client library -> Debian's pkcs11proxyd
D  native     our libp11guard.so -> p11guard server

E, F, G are B, C, D with a policy in filter.conf (Caml Crush's patchset 1 unless
told otherwise): "p11guard+ps1", "camlcrush+ps1", "native+ps1".  They are not in
the default set; ``run.py --patchset1`` adds the twin of every selected proxy.
B, C and D run their servers pass-through (no filter action).

A target that cannot be set up keeps a reason and is reported as unavailable;
it never stops the others.
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
DEFAULT_TARGETS = ("direct", "p11guard", "camlcrush", "native")
POLICY_SUFFIX = "+ps1"
# The twin of each proxy target with the policy on, and the pass-through target it
# is compared with.
POLICY_TWINS = {f"{name}{POLICY_SUFFIX}": name for name in DEFAULT_TARGETS[1:]}
ALL_TARGETS = DEFAULT_TARGETS + tuple(POLICY_TWINS)
LETTERS = {"direct": "A", "p11guard": "B", "camlcrush": "C", "native": "D",
           "p11guard+ps1": "E", "camlcrush+ps1": "F", "native+ps1": "G"}
TITLES = {
    "direct": "direct SoftHSM2",
    "p11guard": "p11guard (CC client)",
    "camlcrush": "Caml Crush",
    "native": "p11guard (native client)",
    "p11guard+ps1": "p11guard + patchset 1 (CC client)",
    "camlcrush+ps1": "Caml Crush + patchset 1",
    "native+ps1": "p11guard + patchset 1 (native client)",
}
PATCHSET1_CONF = Path(__file__).resolve().parent / "patchset1.conf"


@dataclass
class Target:
    """How p11bench reaches the token for one column of the table."""

    name: str
    module: str = ""
    env: dict[str, str] = field(default_factory=dict)
    unavailable: str | None = None  # why, when the target cannot be measured

    @property
    def letter(self) -> str:
        return LETTERS[self.name]

    @property
    def title(self) -> str:
        return TITLES[self.name]


def client_env(address: str) -> dict[str, str]:
    """What a Caml Crush style client needs; SOFTHSM2_CONF is removed on purpose."""
    env = dict(os.environ)
    env.pop("SOFTHSM2_CONF", None)
    env["PKCS11PROXY_SOCKET_PATH"] = address
    env["PKCS11PROXY_LIBNAME"] = servers.ALIAS
    return env


class Setup:
    """Builds the requested targets and owns the servers they need."""

    def __init__(self, repo: Path, workdir: Path, token: Token, *, unix: bool,
                 log: Callable[[str], None], policy: str = "") -> None:
        """``policy``: the filter.conf lines of the "+ps1" targets' servers
        (default: Caml Crush's patchset 1, ``patchset1.conf``)."""
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
    def camlcrush_client(self) -> Path:
        name = "libp11clientunix.so" if self.unix else "libp11clienttcp.so"
        return CAMLCRUSH_LIB_DIR / name

    @property
    def native_client(self) -> Path:
        return self.repo / "native" / "client" / "build" / "libp11guard.so"

    def _server(self, kind: str, policy: bool = False) -> servers.Server | str:
        """The running server of ``kind`` ("p11guard"/"camlcrush"), with the policy
        or pass-through, or why there is none."""
        key = kind + (POLICY_SUFFIX if policy else "")
        if key in self.servers:
            return self.servers[key]
        if key in self._server_errors:
            return self._server_errors[key]
        workdir = self.workdir / f"server-{key}"
        workdir.mkdir(parents=True, exist_ok=True)
        sockdir = self.sockdir / (kind[:2] + ("p" if policy else ""))
        conf, address = servers.write_configs(workdir, sockdir, self.token, unix=self.unix,
                                              filter_extra=self.policy if policy else "")
        if kind == "camlcrush":
            if not servers.PKCS11PROXYD.exists():
                self._server_errors[key] = f"{servers.PKCS11PROXYD} not installed"
                return self._server_errors[key]
            cmd = servers.camlcrush_command(conf)
            extra: dict[str, str] = {}
        else:
            cmd = servers.p11guard_command(self.repo, conf)
            if not Path(cmd[0]).exists():
                self._server_errors[key] = f"{cmd[0]} missing (no venv)"
                return self._server_errors[key]
            extra = {"PYTHONPATH": str(self.repo / "src")}
        self.log(f"starting {key} server on {address}")
        try:
            server = servers.start_server(key, cmd, workdir, self.token, address, extra)
        except servers.ServerError as exc:
            self._server_errors[key] = str(exc)
            return self._server_errors[key]
        self.servers[key] = server
        return server

    def build(self, name: str) -> Target:
        target = Target(name)
        policy = name in POLICY_TWINS
        name = POLICY_TWINS.get(name, name)
        if name == "direct":
            target.module = self.token.module
            target.env = self.token.env()
            return target
        if name == "native":
            if not self.native_client.exists():
                target.unavailable = f"{self.native_client.relative_to(self.repo)} not built"
                return target
            target.module = str(self.native_client)
        else:
            if not self.camlcrush_client.exists():
                target.unavailable = f"{self.camlcrush_client} not installed"
                return target
            target.module = str(self.camlcrush_client)
        server = self._server("camlcrush" if name == "camlcrush" else "p11guard", policy)
        if isinstance(server, str):
            target.unavailable = server
            return target
        target.env = client_env(server.address)
        return target

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.servers.clear()
        shutil.rmtree(self.sockdir, ignore_errors=True)
