"""The four ways of reaching the same SoftHSM2 token that the benchmark compares.

A  direct     p11bench loads SoftHSM2 itself (the floor every proxy is measured against)
B  p11guard   Debian's Caml Crush client library -> p11guard server
C  camlcrush  Debian's Caml Crush client library -> Debian's pkcs11proxyd
D  native     our libp11guard.so -> p11guard server

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
ALL_TARGETS = ("direct", "p11guard", "camlcrush", "native")
LETTERS = {"direct": "A", "p11guard": "B", "camlcrush": "C", "native": "D"}
TITLES = {
    "direct": "direct SoftHSM2",
    "p11guard": "p11guard (CC client)",
    "camlcrush": "Caml Crush",
    "native": "p11guard (native client)",
}


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
                 log: Callable[[str], None]) -> None:
        self.repo = repo
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

    def _server(self, kind: str) -> servers.Server | str:
        """The running server of ``kind`` ("p11guard"/"camlcrush"), or why there is none."""
        if kind in self.servers:
            return self.servers[kind]
        if kind in self._server_errors:
            return self._server_errors[kind]
        workdir = self.workdir / f"server-{kind}"
        workdir.mkdir(parents=True, exist_ok=True)
        sockdir = self.sockdir / kind[:2]
        conf, address = servers.write_configs(workdir, sockdir, self.token, unix=self.unix)
        if kind == "camlcrush":
            if not servers.PKCS11PROXYD.exists():
                self._server_errors[kind] = f"{servers.PKCS11PROXYD} not installed"
                return self._server_errors[kind]
            cmd = servers.camlcrush_command(conf)
            extra: dict[str, str] = {}
        else:
            cmd = servers.p11guard_command(self.repo, conf)
            if not Path(cmd[0]).exists():
                self._server_errors[kind] = f"{cmd[0]} missing (no venv)"
                return self._server_errors[kind]
            extra = {"PYTHONPATH": str(self.repo / "src")}
        self.log(f"starting {kind} server on {address}")
        try:
            server = servers.start_server(kind, cmd, workdir, self.token, address, extra)
        except servers.ServerError as exc:
            self._server_errors[kind] = str(exc)
            return self._server_errors[kind]
        self.servers[kind] = server
        return server

    def build(self, name: str) -> Target:
        target = Target(name)
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
        server = self._server("camlcrush" if name == "camlcrush" else "p11guard")
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
